"""The in-run evaluation off the learner's critical path (launch/learn.py BackgroundEvaluator):
it starts a process on a snapshot and returns at once, its result lands in a later row
with the version it evaluated, one runs at a time, and a failed one is counted, not fatal."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from dashrl.launch.learn import BackgroundEvaluator
from dashrl.protocol.model import load_causal_lm, load_tokenizer


@dataclass
class _Learner:  # what the evaluator reads of a learner
    model: object
    tokenizer: object
    version: int = 0
    step_count: int = 0
    steps: int = 10

    def done(self) -> bool:
        return self.step_count >= self.steps


def _setup(tiny_cfg, tiny_model_path: Path) -> tuple[BackgroundEvaluator, _Learner]:
    tiny_cfg.eval.every_steps = 1
    run = Path(tiny_cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(tiny_cfg.model_dump_json())
    learner = _Learner(load_causal_lm(tiny_model_path), load_tokenizer(tiny_model_path))
    return BackgroundEvaluator(tiny_cfg), learner


def test_background_evaluation_does_not_block_and_reports_its_version(
    tiny_cfg, tiny_model_path
) -> None:
    ev, learner = _setup(tiny_cfg, tiny_model_path)
    learner.version = learner.step_count = 1
    t0 = time.monotonic()
    assert ev(learner, 12.5) == {}  # started, not waited for
    assert time.monotonic() - t0 < 5 and ev.proc is not None
    pid = ev.proc.pid
    learner.version = learner.step_count = 2
    ev(learner, 20.0)  # due again while the first runs: skipped and counted
    assert ev.skipped == 1 and ev.proc.pid == pid
    learner.step_count = learner.steps  # the last step: the learner waits for it
    row = ev(learner, 30.0)
    assert row["eval/version"] == 1 and row["eval/step"] == 1 and row["eval/wall_s"] == 12.5
    assert 0.0 <= row["eval/heldout_reward"] <= 1.0 and row["eval/skipped"] == 1
    assert not (Path(tiny_cfg.run_dir) / "eval" / "v1").exists()  # snapshot removed
    ev.close()


def test_a_failed_background_evaluation_is_counted_not_fatal(tiny_cfg, tiny_model_path) -> None:
    ev, learner = _setup(tiny_cfg, tiny_model_path)
    (Path(tiny_cfg.run_dir) / "config.json").write_text("{not json")
    learner.step_count = 1
    ev(learner, 1.0)
    learner.step_count = learner.steps
    row = ev(learner, 2.0)
    assert row == {"eval/skipped": 0.0, "eval/failed": 1.0}
    ev.close()
    assert ev.proc is None


def test_close_stops_a_running_evaluation_by_its_pid(tiny_cfg, tiny_model_path) -> None:
    ev, learner = _setup(tiny_cfg, tiny_model_path)
    learner.step_count = 1
    ev(learner, 1.0)
    proc = ev.proc
    ev.close()
    assert proc.poll() is not None and ev.proc is None
    assert not list((Path(tiny_cfg.run_dir) / "eval").iterdir())
