"""Load: 16 actor processes with a fake engine stream rollouts as fast as they can into one
queue and one learner; the queue's and the learner's memory stay under a bound, and every
sample that does not reach the learner is a counted drop by policy (filter, staleness,
capacity), visible in the queue log."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, children_of, tiny_job_args
from dashrl.protocol.runtime import read_jsonl
from dashrl.queue.log import ROLLOUT_LOG, read_queue_log

START = str(REPO / "launch" / "start.py")
ACTORS = 16
QUEUE_RSS_BOUND_MB = 600  # capacity 512 samples of <= 48 tokens, plus Python, torch, zmq
LEARNER_RSS_BOUND_MB = 2000


def _peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of a live process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _children(pid: int) -> dict[str, int]:
    roles = {"dashrl.queue.server": "queue", "dashrl.launch.learn": "learner"}
    return {role: p for p, args in children_of(pid) for m, role in roles.items() if m in args}


@pytest.mark.slow
def test_sixteen_fake_actors_keep_queue_and_learner_memory_bounded(tiny_cfg) -> None:
    run_dir = tiny_cfg.run_dir
    args = tiny_job_args(run_dir, **{
        "actor.num-actors": ACTORS, "actor.engine": "fake", "actor.max-new-tokens": 32,
        "queue.capacity": 512, "learner.steps": 3, "learner.micro-batch-size": 16,
        # 18 processes share the cores: the learner's steps are slow under the flood (the
        # first one came 34 s after its start on 2 cores), so it stops by steps, not time
        "time-limit-s": 200})  # fmt: skip
    out = (run_dir.parent / "launch.out").open("wb")  # the launcher's own log, to debug a failure
    job = subprocess.Popen([sys.executable, START, *args], stdout=out, stderr=subprocess.STDOUT)
    peak = {"queue": 0.0, "learner": 0.0}
    try:
        deadline = time.monotonic() + 400
        while job.poll() is None and time.monotonic() < deadline:
            for role, pid in _children(job.pid).items():
                try:
                    peak[role] = max(peak[role], _peak_rss_mb(pid))
                except (FileNotFoundError, ProcessLookupError):
                    pass
            time.sleep(0.5)
    finally:
        if job.poll() is None:
            job.send_signal(signal.SIGTERM)
        job.wait(timeout=180)
        out.close()
    assert job.returncode == 0
    final = json.loads((run_dir / "queue" / "final_stats.json").read_text())
    rows = read_jsonl(run_dir / "metrics.jsonl")
    print(f"peak RSS MB {peak}; queue {final}; steps {len(rows)}")
    assert final["queue/received"] > 10 * final["queue/served"] > 0  # actors outran the learner
    assert len(rows) >= 2  # and the learner still got its micro-batches under the flood
    assert 0 < peak["queue"] < QUEUE_RSS_BOUND_MB and 0 < peak["learner"] < LEARNER_RSS_BOUND_MB
    # every received sample is accepted or filtered/stale on arrival; every accepted one is
    # served, evicted by policy, or still held: no silent drop anywhere
    qlog = read_queue_log(run_dir / ROLLOUT_LOG)
    accepted = sum(len(g.completions) for g in qlog.groups)
    assert accepted == final["queue/accepted"]
    kinds = {k: sum(len(e.refs) for e in qlog.events if e.kind == k)
             for k in ("served", "evicted_stale", "evicted_capacity")}  # fmt: skip
    assert kinds["served"] == final["queue/served"]
    assert kinds["evicted_capacity"] == final["queue/evicted_capacity"] > 0
    assert accepted == sum(kinds.values()) + len(qlog.pending_refs())
    assert len(qlog.pending_refs()) == final["queue/size"]
