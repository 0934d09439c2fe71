"""A learner killed with SIGKILL is resumed from its checkpoint and the queue log: the version
and optimizer continue, and every logged micro-batch is trained on exactly once."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from conftest import REPO, children_of, tiny_job_args
from dashrl.protocol.runtime import read_jsonl
from dashrl.queue.log import ROLLOUT_LOG, read_queue_log

START = str(REPO / "launch" / "start.py")


@pytest.mark.slow
@pytest.mark.parametrize("max_uses", [1, 2])
def test_sigkilled_learner_resumes_without_losing_or_repeating_rollouts(
    tiny_cfg, max_uses: int
) -> None:
    """With reuse (K = 2) the restarted queue also restores every unit's use count and
    priority from the log: across the kill no sample is served more than K times."""
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.learner.steps, cfg.learner.checkpoint_every, cfg.learner.lr = 12, 2, 1e-3
    cfg.queue.capacity = 64  # capacity evictions happen too
    args = tiny_job_args(cfg.run_dir, **{
        "queue.capacity": 64, "learner.steps": 12, "learner.checkpoint-every": 2,
        "learner.micro-batches-per-step": 2, "queue.max-uses": max_uses})  # fmt: skip
    first = subprocess.Popen([sys.executable, START, *args], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
    metrics = cfg.run_dir / "metrics.jsonl"
    learner_log = cfg.run_dir / "logs" / "learner.log"
    deadline = time.monotonic() + 300
    pid = None
    while time.monotonic() < deadline:
        rows = read_jsonl(metrics) if metrics.exists() else []
        if len(rows) >= 3 and (cfg.run_dir / "checkpoints" / "step_2" / "rng.pt").exists():
            break
        time.sleep(0.05)
    # the learner's pid, from the process table of the launcher's children
    for p, args in children_of(first.pid):
        if "dashrl.launch.learn" in args:
            pid = p
    assert pid is not None, children_of(first.pid)
    os.kill(pid, signal.SIGKILL)
    out = first.communicate(timeout=120)[0]
    killed_at = len(read_jsonl(metrics))
    assert 3 <= killed_at < 12, out[-2000:]

    resumed = subprocess.run([sys.executable, START, "--resume", str(cfg.run_dir)],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    text = learner_log.read_text()
    ckpt_step = int(re.search(r"resumed from \S+step_(\d+): step (\d+), version (\d+)", text)[1])
    assert 2 <= ckpt_step <= killed_at

    rows = read_jsonl(metrics)
    assert [r["step"] for r in rows] == list(range(1, 13))  # every step once, none repeated
    assert [r["version"] for r in rows] == list(range(1, 13))  # the version continued
    state = json.loads((cfg.run_dir / "checkpoints" / "final" / "dashrl_state.json").read_text())
    assert state["version"] == 12 and state["step"] == 12

    qlog = read_queue_log(cfg.run_dir / ROLLOUT_LOG)
    served = [e for e in qlog.events if e.kind == "served"]
    # every micro-batch the queue served is in the final trajectory exactly once: those the
    # dead learner had consumed after its checkpoint were re-trained from the log
    assert len(served) == 12 * 2
    serves = Counter(tuple(r) for e in served for r in e.refs.tolist())
    assert max(serves.values()) <= max_uses  # use counts survived the restart
    if max_uses > 1:
        assert max(serves.values()) == max_uses  # and reuse really happened
    left = [tuple(r) for e in qlog.events if e.kind.startswith("evicted") for r in e.refs.tolist()]
    assert len(left) == len(set(left))  # no sample evicted twice
    used_up = {r for r, n in serves.items() if n == max_uses}
    assert not used_up & set(left)  # nor evicted after it had left used up
    everything = {(g, c) for g, grp in enumerate(qlog.groups) for c in range(len(grp.completions))}
    # none lost: used up, evicted, or still held (pending, with the uses it has had)
    assert used_up | set(left) | set(qlog.pending_refs(max_uses)) == everything
