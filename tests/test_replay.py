"""Replay: a real short run's learner metrics are reproduced bit for bit from its queue log."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO
from dashrl.launch.replay import compare
from dashrl.protocol.runtime import read_jsonl

START = str(REPO / "launch" / "start.py")


def test_compare_finds_the_first_difference() -> None:
    a = [{"step": 1, "version": 1, "learner/loss": 0.5, "learner/grad_norm": float("nan")},
         {"step": 2, "version": 2, "learner/loss": 0.25, "learner/grad_norm": 1.0}]  # fmt: skip
    assert compare(a, [dict(r) for r in a])["identical"]  # NaN == NaN for this purpose
    b = [dict(r) for r in a]
    b[1]["learner/loss"] = 0.25000001
    res = compare(a, b)
    assert not res["identical"]
    assert res["first_difference"] == {"step": 2, "metric": "learner/loss", "original": 0.25,
                                       "replayed": 0.25000001}  # fmt: skip
    assert not compare(a, a[:1])["identical"]  # a replay that stops early is not identical


@pytest.mark.slow
def test_replay_of_a_real_run_is_bit_identical(tmp_path) -> None:
    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), "--learner.steps", "3", "--eval.heldout", "False",
            "--eval.every-steps", "0", "--actor.prompts-per-batch", "4", "--actor.group-size",
            "4", "--actor.max-new-tokens", "16", "--learner.micro-batch-size", "4",
            "--learner.lr", "1e-4"]  # fmt: skip
    out = subprocess.run([sys.executable, START, *args], capture_output=True, text=True,
                         timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert len(rows) == 3 and all(r["learner/grad_norm"] > 0 for r in rows)  # real updates

    rep = subprocess.run([sys.executable, START, "replay", str(run_dir)], capture_output=True,
                         text=True, timeout=900)  # fmt: skip
    assert rep.returncode == 0, rep.stdout[-2000:] + rep.stderr[-3000:]
    result = json.loads((run_dir / "replay" / "replay.json").read_text())
    assert result["identical"] and result["steps_compared"] == 3, result
    assert result["micro_batches_logged"] >= 6 and result["version_mismatches"] == 0
    replayed = read_jsonl(run_dir / "replay" / "metrics.jsonl")
    assert [r["learner/loss"] for r in replayed] == [r["learner/loss"] for r in rows]
    assert all(math.isfinite(r["learner/loss"]) for r in rows)

    ins = subprocess.run([sys.executable, START, "replay", str(run_dir), "--inspect", "--show",
                          "2"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert ins.returncode == 0, ins.stderr[-2000:]
    assert f"micro_batches: {result['micro_batches_logged']}" in ins.stdout
    assert ins.stdout.count("--- [") == 2 and "completion:" in ins.stdout
