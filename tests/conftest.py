"""Shared fixtures: a tiny random model (built once, cached) and configs that use it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dashrl.protocol.config import Config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_environ() -> Iterator[None]:
    """Give every test the environment it started with: an in-process DeepSpeed rank sets
    ``LOCAL_RANK`` (and the hardware setup thread counts) in ``os.environ``, which would
    leak into the subprocesses of every later test."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    from dashrl.protocol.model import TINY, resolve_model

    return resolve_model(TINY, Config().model.cache_dir)


@pytest.fixture
def tiny_cfg(tiny_model_path: Path, tmp_path: Path) -> Config:
    """A config on the tiny model, small enough for a few-second end-to-end run."""
    cfg = Config.model_validate(
        {
            "run_dir": str(tmp_path / "run"),
            "time_limit_s": 240,
            "model": {"name": "tiny-random", "path": str(tiny_model_path)},
            "data": {"train_size": 200, "heldout_size": 8},
            "actor": {"group_size": 4, "prompts_per_batch": 4, "max_new_tokens": 8, "engine": "hf"},
            # A random model never earns a reward, so every advantage is 0: turn the
            # gradient filter off so that samples still flow to the learner.
            "queue": {"filter_threshold": None, "capacity": 256},
            # float32: unit tests compare against hand-computed values on every machine
            # (auto would pick bf16 on one with bf16 units and fp32 on the next)
            "learner": {
                "steps": 3,
                "micro_batch_size": 4,
                "micro_batches_per_step": 2,
                "dtype": "float32",
            },
            "eval": {"heldout": False},
        }
    )
    return cfg


def children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live child processes of ``pid`` (from ``ps``)."""
    import subprocess

    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True,
                         text=True).stdout  # fmt: skip
    return [(int(line.split(maxsplit=1)[0]), line.split(maxsplit=1)[1])
            for line in out.splitlines() if line.strip()]  # fmt: skip


def tiny_job_args(run_dir: Path, **fields: object) -> list[str]:
    """Command-line flags of a small launcher job on the tiny model (the tests that start,
    kill, attach to or flood a whole job); ``fields`` ("learner.steps": 12, ...) override."""
    flags: dict[str, object] = {
        "run-dir": run_dir, "model.name": "tiny-random", "data.train-size": 200,
        "data.heldout-size": 8, "actor.group-size": 4, "actor.prompts-per-batch": 4,
        "actor.max-new-tokens": 8, "queue.filter-threshold": None,
        "learner.micro-batch-size": 4, "eval.heldout": False, "eval.every-steps": 0,
        "actor.engine": "hf",  # vLLM has its own tests (test_vllm_engine, test_replay)
    }  # fmt: skip
    flags.update({k.replace("_", "-"): v for k, v in fields.items()})
    return [f"--{k}={v}" for k, v in flags.items()]


@contextlib.contextmanager
def queue_process(cfg: Config) -> Iterator[subprocess.Popen]:
    """A live queue process for ``cfg`` (its config written to run_dir/config.json, its
    output to run_dir/queue.log), stopped by its pid with SIGTERM on exit."""
    run_dir = Path(cfg.run_dir)
    (run_dir / "config.json").write_text(cfg.model_dump_json())
    with (run_dir / "queue.log").open("wb") as log:
        cmd = [sys.executable, "-m", "dashrl.queue.server", str(run_dir / "config.json")]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(30)
