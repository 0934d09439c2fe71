"""The learner process: ``python -m dashrl.launch.learn <run_dir>/config.json``.

The learner package trains; this entry point adds what needs the actors' code: the in-run
held-out evaluation, which generates with the actors' HF engine and grades with the
task's verifier (launch/evaluate.py). By default it runs in a process of its own on a
snapshot of the broadcast weights (:class:`BackgroundEvaluator`), so learner steps go on
meanwhile; ``--eval.background False`` pauses the learner for it instead. The launcher
starts this directly, or through torchrun (``--module dashrl.launch.learn``) for several
learner ranks.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

from dashrl.actors.engine import HFEngine
from dashrl.launch.evaluate import heldout_reward
from dashrl.learner.backend import init_ranks
from dashrl.learner.learner import Evaluator, Learner, train
from dashrl.protocol.config import Config, load_config
from dashrl.protocol.runtime import StopFlag, pin_cores, set_thread_budget, setup_logging

log = logging.getLogger("dashrl.learner")

FINISH_TIMEOUT_S = 600.0
"""After the last step, how long the learner waits for an evaluation still running."""


def _due(cfg: Config, learner: Learner) -> bool:
    every = cfg.eval.every_steps
    return bool(every) and learner.step_count % every == 0 and not learner.done()


def _metrics(res: dict, version: int, step: int, wall_s: float) -> dict[str, float]:
    return {"eval/heldout_reward": res["reward_mean"], "eval/heldout_pass_at_k": res["pass_at_k"],
            "eval/seconds": res["seconds"], "eval/version": float(version),
            "eval/step": float(step), "eval/wall_s": wall_s}  # fmt: skip


def heldout_evaluator(cfg: Config) -> Evaluator:
    """Held-out avg@k reward of the learner's current weights, generated with its own model
    in the learner's process: the learner pauses for it (the actors keep generating)."""

    def evaluate(learner: Learner, wall_s: float) -> dict[str, float]:
        if not _due(cfg, learner):
            return {}
        engine = HFEngine(model=learner.model, tokenizer=learner.tokenizer)
        res = heldout_reward(cfg, engine)
        log.info("v%d held-out reward %.4f (%.0f s)", learner.version, res["reward_mean"],
                 res["seconds"])  # fmt: skip
        return _metrics(res, learner.version, learner.step_count, wall_s)

    return evaluate


class BackgroundEvaluator:
    """The in-run held-out evaluation off the learner's critical path.

    When an evaluation is due (every ``eval.every_steps`` steps), the learner writes its
    weights (the version it has just broadcast; ~1 s for 135M parameters) to
    ``<run_dir>/eval/v<version>`` and starts ``launch/heldout_worker.py`` on them, then
    goes on training. A finished evaluation's metrics go into the next step's row, with
    the version, step and wall time (``eval/wall_s``, seconds since training started) of
    the weights it evaluated. One evaluation runs at a time: one falling due while
    another runs is skipped and counted (``eval/skipped``). After the last step the
    learner waits for a running evaluation (at most :data:`FINISH_TIMEOUT_S`); a stop or
    the time limit ends it by its pid instead. A failed evaluation is logged and counted
    (``eval/failed``), never fatal.

    Args:
        cfg: the run config (its ``config.json`` in the run directory is what the worker
            reads).
    """

    def __init__(self, cfg: Config):
        self.cfg, self.dir = cfg, Path(cfg.run_dir) / "eval"
        self.proc: subprocess.Popen | None = None
        self.pending: tuple[int, int, float, Path] | None = None  # version, step, wall, dir
        self.skipped = self.failed = 0

    def __call__(self, learner: Learner, wall_s: float) -> dict[str, float]:
        out = self._collect(FINISH_TIMEOUT_S if learner.done() else None)
        if _due(self.cfg, learner):
            if self.proc is None:
                self._start(learner, wall_s)
            else:
                self.skipped += 1
                log.warning("evaluation at step %d skipped: the one of step %d still runs",
                            learner.step_count, self.pending[1])  # fmt: skip
        if self.skipped or self.failed:
            out.update({"eval/skipped": float(self.skipped), "eval/failed": float(self.failed)})
        return out

    def _start(self, learner: Learner, wall_s: float) -> None:
        snap = self.dir / f"v{learner.version}"
        learner.model.save_pretrained(snap)
        learner.tokenizer.save_pretrained(snap)
        config = Path(self.cfg.run_dir) / "config.json"
        cmd = [sys.executable, "-m", "dashrl.launch.heldout_worker", str(config), str(snap),
               str(snap / "result.json")]  # fmt: skip
        with (snap / "eval.log").open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        self.pending = (learner.version, learner.step_count, wall_s, snap)
        log.info("v%d held-out evaluation started in the background (pid %d)", learner.version,
                 self.proc.pid)  # fmt: skip

    def _collect(self, wait_s: float | None) -> dict[str, float]:
        """The finished evaluation's metrics ({} if none finished); waits up to ``wait_s``."""
        if self.proc is None:
            return {}
        if wait_s is not None:
            try:
                self.proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                log.warning("background evaluation still running after %.0f s", wait_s)
        if self.proc.poll() is None:
            return {}
        version, step, wall_s, snap = self.pending
        code, self.proc, self.pending = self.proc.returncode, None, None
        try:
            res = json.loads((snap / "result.json").read_text()) if code == 0 else None
        except (OSError, ValueError):
            res = None
        if res is None:
            self.failed += 1
            log.error("v%d background evaluation failed (exit code %s): see %s", version, code,
                      snap / "eval.log")  # fmt: skip
            return {}
        shutil.rmtree(snap, ignore_errors=True)
        log.info("v%d held-out reward %.4f (%.0f s, in the background)", version,
                 res["reward_mean"], res["seconds"])  # fmt: skip
        return _metrics(res, version, step, wall_s)

    def close(self) -> None:
        """End a running evaluation (by its pid) and remove its snapshot."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.pending is not None:
            shutil.rmtree(self.pending[3], ignore_errors=True)
        self.proc = self.pending = None


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m dashrl.launch.learn <config.json>``."""
    argv = argv if argv is not None else sys.argv[1:]
    rank, _ = init_ranks()
    setup_logging("learner" if rank == 0 else f"learner{rank}")
    cfg = load_config(Path(argv[0]))
    pin_cores(cfg.learner.cpus, "learner")
    set_thread_budget(cfg.learner.torch_threads)
    evaluate = BackgroundEvaluator(cfg) if cfg.eval.background else heldout_evaluator(cfg)
    train(cfg, StopFlag(), evaluate=evaluate)


if __name__ == "__main__":
    main()
