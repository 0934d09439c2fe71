"""Every ``--algo`` through the real launcher on the default model and task, for two learner steps.

Slow (about 40 s each: three processes load SmolLM2-135M-Instruct), so it is marked; the
unit tests of each algorithm's advantages and loss are in test_algorithms.py and
test_critic_dpo.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from typing import get_args

import pytest

from conftest import REPO
from dashrl.protocol.config import Config
from dashrl.protocol.runtime import read_jsonl
from dashrl.queue.log import ROLLOUT_LOG, read_rollout_log

START = str(REPO / "launch" / "start.py")
ALGOS = list(get_args(Config.model_fields["algo"].annotation))
VARIANTS = {algo: [] for algo in ALGOS}
VARIANTS["ppo_dense_orm"] = ["--algo", "ppo", "--reward.dense", "orm",
                             "--reward.format-coef", "0.1"]  # fmt: skip
SMALL = ["--learner.steps", "2", "--eval.heldout", "False", "--eval.every-steps", "0",
         "--actor.prompts-per-batch", "4", "--actor.group-size", "4", "--actor.max-new-tokens",
         "16", "--learner.micro-batch-size", "4", "--learner.micro-batches-per-step", "1",
         "--time-limit-s", "400", "--actor.engine", "hf"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_start_runs_every_algorithm_on_the_default_model(name: str, tmp_path) -> None:
    run_dir = tmp_path / "run"
    args = VARIANTS[name] or ["--algo", name]
    out = subprocess.run(
        [sys.executable, START, *args, "--run-dir", str(run_dir), *SMALL],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    logs = "\n".join(p.read_text()[-2000:] for p in (run_dir / "logs").glob("*.log"))
    assert out.returncode == 0, out.stderr[-3000:] + logs
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["learner_steps"] == 2 and summary["final_version"] == 2, summary
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert len(rows) == 2 and all(math.isfinite(r["learner/loss"]) for r in rows), rows
    assert all(r["learner/step_taken"] == 1.0 for r in rows)
    algo = json.loads((run_dir / "config.json").read_text())["algo"]

    if algo == "ppo":
        assert all("learner/value_loss" in r for r in rows)
        assert ("learner/orm_loss" in rows[0]) == (name == "ppo_dense_orm")
    if algo == "iterative_dpo":
        assert all(r["learner/dpo_pairs"] == 2 for r in rows)  # 4 sequences = 2 whole pairs
    groups = read_rollout_log(run_dir / ROLLOUT_LOG)
    if algo == "rcrl":  # every sample is logged under the tag of its own return
        from dashrl.protocol.model import load_tokenizer

        tok = load_tokenizer(summary["model"])
        for g in groups:
            good = g.prompt_id.endswith("#good")
            assert good or g.prompt_id.endswith("#bad")
            assert ("[GOOD]" if good else "[BAD]") in tok.decode(g.prompt_ids)
            assert all((c.reward >= 1) == good for c in g.completions)
    if algo == "sft":  # reference solutions, not samples
        assert all(len(g.completions) == 1 for g in groups)
