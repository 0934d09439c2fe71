"""One held-out evaluation in a process of its own:
``python -m dashrl.launch.heldout_worker <config.json> <weights dir> <result.json>``.

The learner (launch/learn.py ``BackgroundEvaluator``) snapshots the weights it has just
broadcast and starts this, so that its optimizer steps go on while the evaluation
generates (issue 17: the in-run evaluation used to stop the learner for 61-160 s). It
uses the same evaluator as the evaluations before and after training
(launch/evaluate.py ``heldout_reward``) on one thread, and writes its result atomically.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from dashrl.actors.engine import HFEngine
from dashrl.launch.evaluate import heldout_reward
from dashrl.protocol.config import load_config
from dashrl.protocol.runtime import pin_cores, set_thread_budget, setup_logging

THREADS = 1
"""Torch threads of a background evaluation: it shares the cores with the learner and the
actors, so it takes the smallest share."""


def main(argv: list[str] | None = None) -> None:
    """Entry point (see the module docstring); exits non-zero on any failure."""
    config, weights, out = (Path(a) for a in (argv if argv is not None else sys.argv[1:]))
    log = setup_logging("eval")
    cfg = load_config(config)
    pin_cores(cfg.actor.cpus, "eval")  # started by the learner: off its cores, onto the others'
    set_thread_budget(THREADS)
    res = heldout_reward(cfg, HFEngine(weights))
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res))
    os.replace(tmp, out)
    log.info("held-out reward %.4f of %s (%.0f s)", res["reward_mean"], weights, res["seconds"])


if __name__ == "__main__":
    main()
