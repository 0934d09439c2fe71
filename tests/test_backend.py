"""The DeepSpeed learner path against the plain torch path: same loss, same parameters.

DeepSpeed runs here on its CPU accelerator (gloo), in this process's default group.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dashrl.learner.learner import Learner
from dashrl.protocol import Sample

pytest.importorskip("deepspeed")


def _sample(adv: float, completion: list[int], reward: float = 1.0) -> Sample:
    c = np.array(completion, np.int32)
    return Sample.make("p", np.array([1, 50, 60], np.int32), c, np.full(len(c), -2.0, np.float32),
                  reward, adv, 0)  # fmt: skip


MICRO_BATCHES = [
    [_sample(1.0, [5, 6, 7]), _sample(-1.0, [8, 9], 0.0)],
    [_sample(0.5, [10, 11, 12, 13])],
]


def _learner(tiny_cfg, backend: str, stage: int = 0, algo: str = "grpo") -> Learner:
    cfg = tiny_cfg.model_copy(update={"algo": algo}, deep=True)
    cfg.learner.backend, cfg.learner.zero_stage = backend, stage
    cfg.learner.lr = 1e-3  # large enough that a wrong update would show
    return Learner(cfg, connect=False)


def _two_steps(learner: Learner, nan_first: bool = False) -> tuple[list[float], list[bool]]:
    losses, took = [], []
    for step in range(2):
        for i, mb in enumerate(MICRO_BATCHES):
            if nan_first and step == 0 and i == 0:  # a corrupted sample: NaN loss and gradient
                mb = [_sample(float("nan"), [5, 6])]
            m = learner.train_micro_batch(mb, 0.5, last=i == len(MICRO_BATCHES) - 1)
            losses.append(m["learner/loss"])
        took.append(learner.optimizer_step()[1])  # the backend's own non-finite check
    return losses, took


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_step_matches_the_torch_step(tiny_cfg, stage: int) -> None:
    ref = _learner(tiny_cfg, "torch")
    ds = _learner(tiny_cfg, "deepspeed", stage)
    assert ds.backend.name == "deepspeed" and ref.backend.name == "torch"
    ref_losses, _ = _two_steps(ref)
    ds_losses, _ = _two_steps(ds)
    np.testing.assert_allclose(ds_losses, ref_losses, rtol=1e-5, atol=1e-6)
    want = ref.backend.full_state_dict()
    got = ds.backend.full_state_dict()
    assert want.keys() == got.keys()
    init = _learner(tiny_cfg, "torch").backend.full_state_dict()
    moved = max(float((want[k] - init[k]).abs().max()) for k in want)
    assert moved > 1e-4  # the two steps really changed the weights
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_non_finite_gradient_is_skipped_on_both_paths(tiny_cfg, stage: int) -> None:
    ref = _learner(tiny_cfg, "torch")
    ds = _learner(tiny_cfg, "deepspeed", stage)
    init = ref.backend.full_state_dict()
    _, took_ref = _two_steps(ref, nan_first=True)
    _, took_ds = _two_steps(ds, nan_first=True)
    assert took_ref == took_ds == [False, True]
    want, got = ref.backend.full_state_dict(), ds.backend.full_state_dict()
    assert max(float((want[k] - init[k]).abs().max()) for k in want) > 1e-4  # step 2 applied
    for k in want:
        assert torch.isfinite(got[k]).all()
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_ppo_heads_step_with_the_deepspeed_policy(tiny_cfg) -> None:
    ds = _learner(tiny_cfg, "deepspeed", 2, algo="ppo")
    ref = _learner(tiny_cfg, "torch", algo="ppo")
    for learner in (ds, ref):
        learner.train_micro_batch(MICRO_BATCHES[0], 1.0)
        assert learner.optimizer_step()[1]
    for a, b in zip(ds.heads["critic"].parameters(), ref.heads["critic"].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("backend", "stage", "algo"), [("torch", 0, "ppo"), ("deepspeed", 2, "grpo")]
)
def test_a_checkpoint_resumes_the_same_optimizer_trajectory(
    tiny_cfg, tmp_path, backend: str, stage: int, algo: str
) -> None:
    first = _learner(tiny_cfg, backend, stage, algo)
    first.train_micro_batch(MICRO_BATCHES[0], 1.0)
    first.optimizer_step()
    first.version = 1
    first.step_count = 1
    first.save(tmp_path / "ckpt")
    first.train_micro_batch(MICRO_BATCHES[1], 1.0)  # the step the resumed learner must repeat
    first.optimizer_step()

    cfg = tiny_cfg.model_copy(update={"algo": algo}, deep=True)
    cfg.learner.backend, cfg.learner.zero_stage, cfg.learner.lr = backend, stage, 1e-3
    cfg.model.path = tmp_path / "ckpt"
    resumed = Learner(cfg, connect=False)
    assert resumed.load_state(tmp_path / "ckpt") == 1 and resumed.version == 1
    resumed.train_micro_batch(MICRO_BATCHES[1], 1.0)
    resumed.optimizer_step()
    want, got = first.backend.full_state_dict(), resumed.backend.full_state_dict()
    for k in want:  # Adam's moments came back too: same second step, not a fresh one
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    for a, b in zip(first.heads.values(), resumed.heads.values(), strict=True):
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(p, q)


def test_a_weights_only_checkpoint_loads_but_is_never_resumed_from(tiny_cfg, tmp_path) -> None:
    """learner.checkpoint_optimizer=False: the periodic checkpoint holds weights a model
    loader reads, no optimizer state, and latest_checkpoint (--resume) skips it."""
    from dashrl.learner.checkpoint import latest_checkpoint
    from dashrl.protocol.model import load_causal_lm

    learner = _learner(tiny_cfg, "torch")
    learner.train_micro_batch(MICRO_BATCHES[0], 1.0)
    learner.optimizer_step()
    run = tmp_path / "run"
    learner.step_count = 1
    learner.save(run / "checkpoints" / "step_1")
    learner.step_count = 2
    learner.save(run / "checkpoints" / "step_2", full=False)
    light, full = run / "checkpoints" / "step_2", run / "checkpoints" / "step_1"
    assert not (light / "optimizer.pt").exists() and not (light / "rng.pt").exists()
    assert (full / "optimizer.pt").exists()
    assert latest_checkpoint(run) == full  # the newer one cannot continue a run
    want = learner.model.state_dict()
    for k, v in load_causal_lm(light).state_dict().items():  # the trained weights, not the base
        torch.testing.assert_close(v, want[k], msg=k)
