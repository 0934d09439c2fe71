"""SIGTERM to the launcher stops every child by pid and leaves a usable checkpoint."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from dashrl.protocol.runtime import read_jsonl


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie counts as gone
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ")[1][0] != "Z"


@pytest.mark.slow
def test_sigterm_stops_children_and_leaves_checkpoint(tiny_cfg) -> None:
    run_dir = tiny_cfg.run_dir
    args = [
        sys.executable, str(REPO / "launch" / "start.py"),
        "--run-dir", str(run_dir), "--model.name", str(tiny_cfg.model.path),
        "--learner.steps", "100000", "--queue.filter-threshold", "None",
        "--actor.group-size", "4", "--actor.prompts-per-batch", "4",
        "--actor.max-new-tokens", "8", "--learner.micro-batch-size", "4",
        "--data.train-size", "200", "--eval.heldout", "False", "--actor.engine", "hf",
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while len(read_jsonl(run_dir / "metrics.jsonl")) < 2 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, out
    pids = [int(p) for p in re.findall(r"started \w+ \(pid (\d+)\)", out)]
    assert len(pids) == 3  # queue, actor0, learner
    assert not [p for p in pids if alive(p)]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["learner_steps"] >= 2
    state = json.loads((run_dir / "checkpoints" / "final" / "dashrl_state.json").read_text())
    assert state["step"] == summary["learner_steps"]
    from dashrl.protocol.model import load_causal_lm

    load_causal_lm(run_dir / "checkpoints" / "final")  # the checkpoint loads
