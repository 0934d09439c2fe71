"""The GPU path's decisions, checked on the CPU: per-role placement and its refusals, the
weight backend that auto picks, each child's environment, the cores each role is pinned
to, and every tensor that meets the model placed on the learner's device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from dashrl.learner.batch import collate
from dashrl.protocol import Sample
from dashrl.protocol.config import Config
from dashrl.protocol.placement import (
    child_env,
    placement_problem,
    resolve_cpus,
    resolve_weight_backend,
)


def config(**sections) -> Config:
    return Config.model_validate(sections)


def test_nccl_needs_gpus_of_its_own_for_every_role() -> None:
    with pytest.raises(ValidationError, match="needs --learner.gpus and --actor.gpus"):
        config(transport={"weight_backend": "nccl"})
    with pytest.raises(ValidationError, match=r"GPU\(s\) \[0\] shared between the learner"):
        config(transport={"weight_backend": "nccl"}, learner={"gpus": [0]}, actor={"gpus": [0]})
    # two actors round-robin onto one GPU: NCCL would see it twice
    with pytest.raises(ValidationError, match=r"GPU\(s\) \[1\] shared"):
        config(transport={"weight_backend": "nccl"}, learner={"gpus": [0]},
               actor={"gpus": [1], "num_actors": 2})  # fmt: skip
    # a second learner rank's GPU is off limits too
    with pytest.raises(ValidationError, match=r"GPU\(s\) \[1\] shared"):
        config(transport={"weight_backend": "nccl"},
               learner={"gpus": [0, 1], "num_ranks": 2}, actor={"gpus": [1, 2]})  # fmt: skip
    ok = config(transport={"weight_backend": "nccl"}, learner={"gpus": [0]},
                actor={"gpus": [1, 2], "num_actors": 2})  # fmt: skip
    assert ok.actor.gpus == [1, 2]
    # a shared GPU is fine over gloo (the one-GPU colocated setup)
    assert config(learner={"gpus": [0]}, actor={"gpus": [0]}).transport.weight_backend == "auto"


def test_gpu_lists_are_checked() -> None:
    with pytest.raises(ValidationError, match="fewer GPUs than learner.num_ranks"):
        config(learner={"gpus": [0], "num_ranks": 2, "backend": "deepspeed"})
    with pytest.raises(ValidationError, match="names a GPU twice"):
        config(actor={"gpus": [1, 1]})
    with pytest.raises(ValidationError, match="indices >= 0"):
        config(learner={"gpus": [-1]})
    assert placement_problem("gloo", None, None, 4, 1) is None


def test_auto_never_picks_nccl_for_two_processes_on_one_gpu() -> None:
    pick = resolve_weight_backend
    assert pick("auto", None, None, 1, "vllm", cuda_available=True) == "gloo"  # all on cuda:0
    assert pick("auto", [0], [0], 1, "vllm", cuda_available=True) == "gloo"  # colocated
    assert pick("auto", [0], [1], 2, "vllm", cuda_available=True) == "gloo"  # actors share 1
    assert pick("auto", [0], [1, 2], 2, "vllm", cuda_available=True) == "nccl"
    assert pick("auto", [0], [1, 2], 2, "hf", cuda_available=True) == "nccl"
    assert pick("auto", [0], [1, 2], 2, "fake", cuda_available=True) == "gloo"  # no model
    # learner rank 1 sits on GPU 1: an actor there too gets gloo (as nccl is refused there)
    assert pick("auto", [0, 1], [1], 1, "vllm", cuda_available=True, num_ranks=2) == "gloo"
    assert pick("auto", [0, 1], [2], 1, "vllm", cuda_available=True, num_ranks=2) == "nccl"
    assert pick("auto", [0], [1], 1, "vllm", cuda_available=False) == "gloo"
    assert pick("zmq", None, None, 1, "vllm", cuda_available=False) == "zmq"
    with pytest.raises(ValueError, match="expected one of"):
        pick("mpi", None, None, 1, "vllm", cuda_available=False)


def test_each_child_sees_only_its_gpus_and_no_cpu_preloads_on_a_gpu(monkeypatch) -> None:
    import dashrl.protocol.placement as placement

    monkeypatch.setattr(placement, "actor_env", lambda engine: {"LD_PRELOAD": "libiomp5.so"})
    cfg = config(learner={"gpus": [0, 1]}, actor={"gpus": [2, 3], "num_actors": 3})
    assert child_env(cfg, "learner", True) == {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert child_env(cfg, "actor0", True) == {"CUDA_VISIBLE_DEVICES": "2"}
    assert child_env(cfg, "actor2", True) == {"CUDA_VISIBLE_DEVICES": "2"}  # round robin
    assert child_env(config(), "actor0", True) == {}  # unplaced on a GPU: inherit, no preload
    assert child_env(config(), "actor0", False) == {"LD_PRELOAD": "libiomp5.so"}  # CPU vLLM
    assert child_env(config(), "learner", False) == {}


def _sample(prompt: list[int], completion: list[int], adv: float) -> Sample:
    c = np.array(completion, np.int32)
    return Sample.make("p" + str(prompt[0]), np.array(prompt, np.int32), c,
                       np.full(len(c), -1.0, np.float32), 1.0, adv, 0)  # fmt: skip


def test_the_learner_gets_cores_of_its_own_on_a_cpu_machine() -> None:
    two, eight = [0, 1], list(range(8))
    assert resolve_cpus(None, None, True, 1, two, gpu=False) == ([0], [1])
    assert resolve_cpus(None, None, True, 2, eight, gpu=False) == ([0, 1], [2, 3, 4, 5, 6, 7])
    # nothing pinned: asked not to, a GPU learner, or no core to spare
    assert resolve_cpus(None, None, False, 1, two, gpu=False) == (None, None)
    assert resolve_cpus(None, None, True, 1, two, gpu=True) == (None, None)
    assert resolve_cpus(None, None, True, 2, two, gpu=False) == (None, None)
    assert resolve_cpus(None, None, True, 1, [3], gpu=False) == (None, None)
    # one side set: the other gets what is left, or every core when nothing is
    assert resolve_cpus([1], None, True, 1, two, gpu=False) == ([1], [0])
    assert resolve_cpus(None, [0, 2], True, 1, [0, 1, 2, 3], gpu=False) == ([1, 3], [0, 2])
    assert resolve_cpus([0, 1], None, True, 1, two, gpu=False) == ([0, 1], None)
    assert resolve_cpus([0], [0, 1], False, 1, two, gpu=True) == ([0], [0, 1])  # as given
    with pytest.raises(ValueError, match=r"learner.cpus \[5\]: this machine's cores are \[0, 1\]"):
        resolve_cpus([5], None, True, 1, two, gpu=False)
    with pytest.raises(ValueError, match="actor.cpus"):
        resolve_cpus(None, [], True, 1, two, gpu=False)


def test_a_role_runs_on_its_cores_and_what_it_starts_inherits_them(tmp_path) -> None:
    """pin_cores in a child process: its affinity, and that of a process it starts, is the
    one core; a core that does not exist is logged and the process goes on unpinned."""
    import os
    import subprocess
    import sys

    core = min(os.sched_getaffinity(0))
    code = (
        "import os, subprocess, sys\n"
        "from dashrl.protocol.runtime import pin_cores\n"
        "pin_cores([int(sys.argv[1])], 'test')\n"
        "child = subprocess.run([sys.executable, '-c', 'import os; print(sorted("
        "os.sched_getaffinity(0)))'], capture_output=True, text=True).stdout.strip()\n"
        "print(sorted(os.sched_getaffinity(0)), child, sep='\\n')\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(core)], capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert out.stdout.splitlines() == [f"[{core}]", f"[{core}]"]
    bad = subprocess.run([sys.executable, "-c", code, "4096"], capture_output=True, text=True,
                         check=True)  # fmt: skip
    assert "could not pin to cores [4096]" in bad.stderr
    assert bad.stdout.splitlines()[0] == str(sorted(os.sched_getaffinity(0)))


@pytest.mark.parametrize("share_prefix", [False, True])
def test_micro_batch_moves_every_tensor(share_prefix: bool) -> None:
    """A field added to MicroBatch or Packed later is moved too (meta stands in for a GPU)."""
    samples = [_sample([5, 6, 7], [8, 9], 1.0), _sample([5, 6, 7], [10], -1.0),
               _sample([1, 2], [3, 4, 5], 0.5)]  # fmt: skip
    b = collate(samples, pad_id=0, share_prefix=share_prefix)
    moved = b.to("meta")
    tensors = [v for v in vars(moved).values() if isinstance(v, torch.Tensor)]
    if share_prefix:
        assert moved.packed is not None
        tensors += [v for v in vars(moved.packed).values() if isinstance(v, torch.Tensor)]
    assert len(tensors) >= 10 and all(t.device.type == "meta" for t in tensors)
    assert moved.prompt_keys == b.prompt_keys
    assert b.to("cpu") is b  # already there: no copy


def test_learner_places_model_reference_heads_and_batches_on_its_device(
    tiny_cfg, monkeypatch
) -> None:
    """With the learner's device set to meta (a stand-in for cuda:0 that a CPU machine
    has), the policy, the reference model and the heads live there, the optimizers hold
    those tensors, and the micro-batch reaches the forward there."""
    import dashrl.learner.learner as learner_module

    monkeypatch.setattr(learner_module, "role_device", lambda setting: torch.device("meta"))
    cfg = tiny_cfg.model_copy(update={
        "algo": "ppo",
        "learner": tiny_cfg.learner.model_copy(update={"kl_coef": 0.1, "backend": "torch"}),
    })  # fmt: skip
    learner = learner_module.Learner(cfg, connect=False)
    modules = [learner.model, learner.ref_model, *learner.heads.values()]
    assert all(p.device.type == "meta" for m in modules for p in m.parameters())
    groups = [*learner.backend.optimizer.param_groups, *learner.head_optimizer.param_groups]
    assert all(p.device.type == "meta" for g in groups for p in g["params"])

    seen = []

    class Reached(Exception):
        pass

    def forward(batch, *args, **kwargs):
        seen.extend(v.device.type for v in vars(batch).values() if isinstance(v, torch.Tensor))
        raise Reached

    monkeypatch.setattr(learner.backend, "forward", forward)
    with pytest.raises(Reached):
        learner.train_micro_batch([_sample([1, 50], [5, 6], 1.0)], scale=1.0)
    assert seen and set(seen) == {"meta"}


def test_vllm_api_check_names_what_a_different_release_lacks(monkeypatch) -> None:
    pytest.importorskip("vllm")
    from vllm.v1.engine.async_llm import AsyncLLM

    from dashrl.actors.vllm_engine import VLLM_VERSION, check_vllm_api

    check_vllm_api()  # the pinned release has everything

    async def old_pause(self, wait_for_inflight_requests: bool = False, clear_cache: bool = True):
        """vLLM's older signature (before pause modes)."""

    monkeypatch.setattr(AsyncLLM, "pause_generation", old_pause)
    with pytest.raises(RuntimeError, match=r"pause_generation\(mode=\).*vllm==" + VLLM_VERSION):
        check_vllm_api()
