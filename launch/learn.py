"""The learner process: ``python -m dashrl.launch.learn <run_dir>/config.json``.

The learner package trains; this entry point adds what needs the actors' code: the in-run
held-out evaluation, which generates with the actors' HF engine and grades with the
task's verifier (launch/evaluate.py). The launcher starts it directly, or through
torchrun (``--module dashrl.launch.learn``) for several learner ranks.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from dashrl.actors.engine import HFEngine
from dashrl.launch.evaluate import heldout_reward
from dashrl.learner.backend import init_ranks
from dashrl.learner.learner import Evaluator, Learner, train
from dashrl.protocol.config import Config, load_config
from dashrl.protocol.runtime import StopFlag, set_thread_budget, setup_logging

log = logging.getLogger("dashrl.learner")


def heldout_evaluator(cfg: Config) -> Evaluator:
    """Held-out avg@k reward of the learner's current weights, generated with its own model.

    The learner pauses training for it; the actors keep generating into the queue.
    """

    def evaluate(learner: Learner) -> dict[str, float]:
        engine = HFEngine(model=learner.model, tokenizer=learner.tokenizer)
        res = heldout_reward(cfg, engine)
        log.info("v%d held-out reward %.4f (%.0f s)", learner.version, res["reward_mean"],
                 res["seconds"])  # fmt: skip
        return {
            "eval/heldout_reward": res["reward_mean"],
            "eval/heldout_pass_at_k": res["pass_at_k"],
            "eval/seconds": res["seconds"],
        }

    return evaluate


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m dashrl.launch.learn <config.json>``."""
    argv = argv if argv is not None else sys.argv[1:]
    rank, _ = init_ranks()
    setup_logging("learner" if rank == 0 else f"learner{rank}")
    cfg = load_config(Path(argv[0]))
    set_thread_budget(cfg.learner.torch_threads)
    train(cfg, StopFlag(), evaluate=heldout_evaluator(cfg))


if __name__ == "__main__":
    main()
