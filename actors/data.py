"""The data source of a run: ``load_task`` builds the configured task (a reasoning-gym
task, GSM8K, or any ``datasets`` source). Kept apart from actors/tasks.py so that the
verifier helpers there never import ``datasets``' loader (actors/datasets_task.py)."""

from __future__ import annotations

from dashrl.actors.datasets_task import DatasetTask, GSM8KTask
from dashrl.actors.tasks import ReasoningGymTask, Task
from dashrl.protocol.config import DataConfig

__all__ = ["load_task"]


def load_task(cfg: DataConfig, seed: int) -> Task:
    """Build the configured task (train and held-out prompts are fixed by ``seed``).

    Raises:
        ValueError: unknown source or task name, or a malformed data row.
        FileNotFoundError: a data file is missing.
    """
    if cfg.source == "reasoning_gym":
        return ReasoningGymTask(cfg, seed)
    if cfg.source == "gsm8k":
        return GSM8KTask(cfg, seed)
    if cfg.source == "datasets":
        return DatasetTask(cfg, seed)
    raise ValueError(f"unknown data source {cfg.source!r}")
