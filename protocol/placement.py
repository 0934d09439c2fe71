"""Which device each role runs on, and how the learner's weights travel to the actors.

Every rule here is decided once, from the config, before any child process starts, so
that no two processes can reach different answers on their own (the failure mode of a
learner on a GPU choosing NCCL while its CPU actor chose gloo: both then wait for a peer
that never comes, until the weight-sync timeout).

- **Placement.** ``learner.gpus`` and ``actor.gpus`` become each child's
  ``CUDA_VISIBLE_DEVICES`` (:func:`child_gpu_env`), so each process sees only its own
  GPUs and numbers them from 0; a learner rank then trains on ``cuda:LOCAL_RANK``
  (:func:`role_device`). Left unset, a process inherits the launcher's environment, and
  on a one-GPU machine every role shares ``cuda:0``.
- **Weight transport** (:func:`resolve_weight_backend`). NCCL is picked only when the
  learner and every actor sit on GPUs of their own (NCCL refuses two ranks of one group on
  one GPU, "Duplicate GPU detected", NVIDIA/nccl#418: TRL's vllm_serve refuses it before
  init for the same reason); otherwise gloo, which broadcasts host tensors and so works
  for CPU actors, GPU actors and a GPU shared by the learner and an actor alike. "zmq"
  sends through the learner's ZeroMQ publisher (host memory) to every actor.

- **CPU cores** (:func:`resolve_cpus`). Without a GPU the learner computes on cores, and
  on a small machine it is the bottleneck: it gets cores of its own (``learner.cpus``) and
  every other process the rest (``actor.cpus``), applied by each role at start
  (protocol/runtime.py ``pin_cores``).

:func:`placement_problem` turns a placement that cannot work into one config error that
says what to do (pydantic reports it at parse time).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dashrl.protocol.runtime import actor_env

WEIGHT_BACKENDS = ("auto", "gloo", "nccl", "zmq")


def actor_gpu(actor_gpus: Sequence[int] | None, index: int) -> int | None:
    """The GPU actor ``index`` runs on: ``actor_gpus[index % len]`` (None: unplaced)."""
    if not actor_gpus:
        return None
    return int(actor_gpus[index % len(actor_gpus)])


def weight_group_gpus(
    learner_gpus: Sequence[int] | None, actor_gpus: Sequence[int] | None, num_actors: int
) -> list[int | None]:
    """The GPU of each member of the weight group, rank order: learner rank 0 (the first of
    ``learner_gpus``), then actors 0..num_actors-1. None where the role is not placed."""
    first = int(learner_gpus[0]) if learner_gpus else None
    return [first, *(actor_gpu(actor_gpus, i) for i in range(num_actors))]


def placement_problem(
    backend: str,
    learner_gpus: Sequence[int] | None,
    actor_gpus: Sequence[int] | None,
    num_actors: int,
    num_ranks: int,
) -> str | None:
    """Why this placement cannot work (one sentence that says what to do), or None.

    Args:
        backend: transport.weight_backend (auto, gloo, nccl, zmq).
        learner_gpus, actor_gpus: the config's GPU lists (None: not placed).
        num_actors: actor.num_actors; num_ranks: learner.num_ranks.
    """
    if learner_gpus is not None and len(learner_gpus) < num_ranks:
        return (f"learner.gpus {list(learner_gpus)} lists fewer GPUs than learner.num_ranks "
                f"({num_ranks}): give one GPU per rank")  # fmt: skip
    for name, gpus in (("learner.gpus", learner_gpus), ("actor.gpus", actor_gpus)):
        if gpus is not None and (not gpus or min(gpus) < 0):
            return f"{name} must list GPU indices >= 0 (got {list(gpus)}); unset it to inherit"
        if gpus is not None and len(set(gpus)) != len(gpus):
            return f"{name} {list(gpus)} names a GPU twice"
    if backend != "nccl":
        return None
    if learner_gpus is None or actor_gpus is None:
        return ("transport.weight_backend nccl needs --learner.gpus and --actor.gpus (GPUs of "
                "their own): unplaced roles all land on cuda:0, where NCCL refuses two ranks "
                "of one group; use --transport.weight-backend gloo (or auto) there")  # fmt: skip
    members = weight_group_gpus(learner_gpus, actor_gpus, num_actors)
    learner_side = set(learner_gpus[:num_ranks])
    shared = sorted({g for g in members[1:] if g in learner_side} |
                    {g for g in members[1:] if members[1:].count(g) > 1})  # fmt: skip
    if shared:
        return (f"transport.weight_backend nccl with GPU(s) {shared} shared between the "
                f"learner and an actor or between actors (learner.gpus {list(learner_gpus)}, "
                f"actor.gpus {list(actor_gpus)}, {num_actors} actors): NCCL refuses two ranks "
                "on one GPU. Give each role its own GPUs, or use --transport.weight-backend "
                "gloo (auto picks it), which works on a shared GPU")  # fmt: skip
    return None


def resolve_weight_backend(
    setting: str,
    learner_gpus: Sequence[int] | None,
    actor_gpus: Sequence[int] | None,
    num_actors: int,
    engine: str,
    cuda_available: bool,
    num_ranks: int = 1,
) -> str:
    """The weight transport ``setting`` means for this placement ("auto" -> gloo or nccl).

    auto is NCCL only when CUDA is there, the actors run a model (not the fake engine) and
    the placement passes :func:`placement_problem` for NCCL (every actor on a GPU of its
    own, none of the learner's ranks' GPUs); else gloo. Never NCCL for two processes on
    one GPU.

    Raises:
        ValueError: an unknown setting.
    """
    if setting not in WEIGHT_BACKENDS:
        raise ValueError(f"weight backend {setting!r}: expected one of {WEIGHT_BACKENDS}")
    if setting != "auto":
        return setting
    if not cuda_available or engine == "fake":
        return "gloo"
    problem = placement_problem("nccl", learner_gpus, actor_gpus, num_actors, num_ranks)
    return "gloo" if problem else "nccl"


def cuda_available() -> bool:
    """Whether this process's torch sees a GPU (placement and each child's environment)."""
    import torch

    return torch.cuda.is_available()


def resolve_cpus(
    learner_cpus: Sequence[int] | None,
    actor_cpus: Sequence[int] | None,
    own_cores: bool,
    learner_threads: int,
    available: Sequence[int],
    gpu: bool,
) -> tuple[list[int] | None, list[int] | None]:
    """The cores of the learner and of everything else (None: not pinned), as
    ``learner.own_cores`` asks: where neither list is set, on a machine without a GPU and
    with more cores than ``learner_threads``, the learner takes the first
    ``learner_threads`` of ``available`` and the rest go to the others; where one list is
    set, the other gets the remaining cores.

    Args:
        learner_cpus, actor_cpus: the config's lists (None: unset).
        own_cores: learner.own_cores.
        learner_threads: cores the learner needs (torch_threads x num_ranks).
        available: the cores this process may run on (``os.sched_getaffinity(0)``).
        gpu: whether the learner trains on a GPU (then nothing is pinned by default).

    Raises:
        ValueError: a list names a core outside ``available``.
    """
    cores = sorted(int(c) for c in available)
    for name, cpus in (("learner.cpus", learner_cpus), ("actor.cpus", actor_cpus)):
        if cpus is not None and (not cpus or not set(cpus) <= set(cores)):
            raise ValueError(f"{name} {list(cpus)}: this machine's cores are {cores}")
    learner = list(learner_cpus) if learner_cpus is not None else None
    others = list(actor_cpus) if actor_cpus is not None else None
    if not own_cores or (learner is None and others is None and
                         (gpu or len(cores) <= learner_threads)):  # fmt: skip
        return learner, others
    if learner is None and others is None:
        return cores[:learner_threads], cores[learner_threads:]
    rest = lambda taken: [c for c in cores if c not in taken] or None  # noqa: E731
    return (learner, others or rest(learner)) if learner is not None else (rest(others), others)


def child_gpu_env(gpus: Sequence[int] | None) -> dict[str, str]:
    """The environment that pins a child process to ``gpus`` ({} when None: inherit)."""
    if gpus is None:
        return {}
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(int(g)) for g in gpus)}


def role_device(setting: str, local_rank: int | None = None) -> Any:
    """The torch device of this process's role.

    Args:
        setting: "auto" (``cuda:LOCAL_RANK`` where torch sees a GPU, else CPU), "cpu" or
            "cuda" (then the GPU must exist).
        local_rank: the rank on this node (default: LOCAL_RANK from the environment, as
            torchrun sets it; 0 without it).

    Raises:
        RuntimeError: "cuda" asked for and torch sees no GPU.
        ValueError: an unknown setting.
    """
    import os

    import torch

    if setting not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device {setting!r}: expected auto, cpu or cuda")
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device cuda asked for, but torch sees no GPU (CUDA_VISIBLE_DEVICES "
                           f"={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch "
                           f"{torch.__version__})")  # fmt: skip
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def child_env(cfg: Any, role: str, cuda_available: bool) -> dict[str, str]:
    """Extra environment of the child process ``role`` ("learner" or "actor<i>"): its
    CUDA_VISIBLE_DEVICES from ``learner.gpus`` / ``actor.gpus``, and for a vLLM actor on
    the CPU the allocator and OpenMP preloads of protocol/runtime.py ``actor_env`` (never
    on a GPU, where they only change the host allocator under CUDA's).

    Args:
        cfg: the resolved run config (protocol/config.py ``Config``).
        role: the child's role name.
        cuda_available: whether the launcher's torch sees a GPU.
    """
    if role == "learner":
        return child_gpu_env(cfg.learner.gpus)
    index = int(role.removeprefix("actor"))
    gpu = actor_gpu(cfg.actor.gpus, index)
    env = child_gpu_env(None if gpu is None else [gpu])
    if not cuda_available:
        env.update(actor_env(cfg.actor.engine))
    return env
