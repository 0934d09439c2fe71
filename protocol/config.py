"""The one typed config tree of a dashrl run (pydantic, ``extra="forbid"``, parsed by tyro).

Its sections live in protocol/config_sections.py (model, data, actor, reward, eval) and
protocol/config_training.py (queue, learner, PPO, transport); this module assembles them
and checks what spans sections. The launcher resolves it (ports, run directory, model
path), writes it to ``<run_dir>/config.json`` and hands that file to every child process,
so every role runs with exactly the same settings. This module imports nothing heavy:
``--help`` must stay fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from dashrl.protocol.algorithms import AlgoName, algorithm_help, get_algorithm
from dashrl.protocol.config_sections import (
    LOOPBACK,
    PORT_FIELDS,
    ActorConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    RewardConfig,
    Strict,
    VLLMConfig,
)
from dashrl.protocol.config_training import LearnerConfig, PPOConfig, QueueConfig, TransportConfig
from dashrl.protocol.placement import placement_problem

__all__ = ["LOOPBACK", "PORT_FIELDS", "ActorConfig", "Config", "DataConfig", "EvalConfig",
           "LearnerConfig", "ModelConfig", "PPOConfig", "QueueConfig", "RewardConfig", "Strict",
           "TransportConfig", "VLLMConfig", "check_dash_mode", "load_config"]  # fmt: skip


class Config(Strict):
    """dashrl: asynchronous streaming RL (actors -> priority queue -> learner). This is the
    train subcommand (the default); the others are eval, replay, attach and keys
    (``start.py SUBCOMMAND --help``)."""

    algo: AlgoName = Field("grpo", description=algorithm_help())
    """Algorithm: its advantage estimator or sample selection (actors), serving unit (queue)
    and objective (learner); see protocol/algorithms.py."""
    run_dir: Path | None = None
    """Run directory; default runs/<timestamp> under the current directory."""
    seed: int = Field(0, ge=0, le=2**31 - 1)
    """Seed of the whole run (each actor adds its index)."""
    resume: bool = False
    """Set by ``start.py --resume RUN_DIR``: continue the run in run_dir from its newest
    checkpoint (weights, optimizer, version, RNG) and its queue log (pending samples reload;
    micro-batches served after the checkpoint are trained on again, in their logged order)."""
    time_limit_s: float = Field(900.0, gt=0, le=30 * 86400)
    """Wall-clock budget of training, in seconds; the learner stops cleanly when it runs out."""
    mode: Literal["async", "sync", "dash"] = "async"
    """async: actors stream without waiting for the learner (dashrl, the default). sync: the
    standard GRPO loop for comparison: each actor generates one batch, waits until the
    learner has trained on all of it and broadcast the new weights, and repeats (needs
    num_actors * prompts_per_batch * group_size == micro_batch_size *
    micro_batches_per_step sequences, no gradient filter and max_staleness 0). dash: DASH
    as published (Huang et al. 2025, arXiv 2505.17218, sec. 4): the sync loop with
    preemptive sampling and gradient filtering: each actor samples one large batch, the
    queue drops |A| <= filter_threshold, and the learner takes one optimizer step per
    batch over all its informative samples in micro-batches of micro_batch_size,
    accumulating gradients (micro_batches_per_step is ignored; max_staleness 0, one
    learner rank, no attached nodes)."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    actor: ActorConfig = Field(default_factory=ActorConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    transport: TransportConfig = Field(default_factory=TransportConfig)

    @model_validator(mode="after")
    def _check(self) -> Config:
        if not all(0 <= b < 1 for b in self.learner.betas):
            raise ValueError(f"learner.betas must be in [0, 1), got {self.learner.betas}")
        algo = get_algorithm(self.algo)
        if self.reward.dense != "none" and algo.objective != "ppo":
            raise ValueError("reward.dense needs token-level advantages: use it with --algo ppo")
        lc = self.learner
        if lc.num_ranks > 1 and lc.backend == "torch":
            raise ValueError("learner.num_ranks > 1 needs the DeepSpeed backend")
        if lc.micro_batch_unit == "sequences" and lc.micro_batch_size % algo.unit_size:
            raise ValueError(
                f"{algo.name} serves {algo.unit}s of {algo.unit_size} samples: "
                f"learner.micro_batch_size must be a multiple of {algo.unit_size}"
            )
        q = self.queue
        if q.max_uses > 1 and q.max_staleness == 0:
            raise ValueError("queue.max_uses > 1 reuses a sample at a later learner version: "
                             "it needs --queue.max-staleness >= 1")  # fmt: skip
        if self.mode != "async" and (q.max_uses > 1 or q.samples_per_insert is not None):
            raise ValueError(
                f"mode {self.mode} trains once on each sample, one batch per step: "
                "no --queue.max-uses or --queue.samples-per-insert"
            )
        if self.mode == "dash":
            check_dash_mode(self)
        if self.mode == "sync":
            a = self.actor
            batch = a.num_actors * a.prompts_per_batch * a.group_size
            step = lc.micro_batch_size * lc.micro_batches_per_step
            if lc.micro_batch_unit != "sequences" or batch != step:
                raise ValueError(
                    f"mode sync trains each step on exactly one generated batch: "
                    f"num_actors * prompts_per_batch * group_size ({batch}) must equal "
                    f"micro_batch_size * micro_batches_per_step ({step}) sequences"
                )
            if q.filter_threshold is not None or q.max_staleness != 0:
                raise ValueError(
                    "mode sync trains on every sample of the current version: "
                    "set --queue.filter-threshold None --queue.max-staleness 0"
                )
        problem = placement_problem(self.transport.weight_backend, lc.gpus, self.actor.gpus,
                                    self.actor.num_actors, lc.num_ranks)  # fmt: skip
        if problem:
            raise ValueError(problem)
        if self.transport.host not in LOOPBACK and self.transport.curve_dir is None:
            raise ValueError(
                f"transport.host {self.transport.host!r} is not loopback: binding there needs "
                "CurveZMQ keys (start.py keys DIR, then --transport.curve-dir DIR)"
            )
        return self


def check_dash_mode(cfg: Config) -> None:
    """What ``mode dash`` needs (see ``Config.mode``).

    Raises:
        ValueError: naming the field to change.
    """
    q, lc, a = cfg.queue, cfg.learner, cfg.actor
    if q.max_staleness != 0:
        raise ValueError("mode dash trains on the current version's batch only: "
                         "set --queue.max-staleness 0")  # fmt: skip
    if lc.micro_batch_unit != "sequences" or lc.num_ranks != 1:
        raise ValueError("mode dash needs --learner.micro-batch-unit sequences and one "
                         "learner rank (it sizes each step by the batch's samples)")  # fmt: skip
    batch = a.num_actors * a.prompts_per_batch * a.group_size
    if q.capacity < batch:
        raise ValueError(
            f"mode dash holds a whole batch: --queue.capacity ({q.capacity}) must "
            f"be at least num_actors * prompts_per_batch * group_size ({batch})"
        )


def load_config(path: Path) -> Config:
    """Read a resolved config written by the launcher.

    Raises:
        pydantic.ValidationError: the file does not match the config schema.
    """
    return Config.model_validate_json(Path(path).read_text())
