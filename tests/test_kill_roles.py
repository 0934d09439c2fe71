"""Kill tests under load: SIGKILL the actor, then the queue, while the job streams; the
launcher restarts each, training goes on, and the queue log accounts for every rollout.
(The learner's SIGKILL-and-resume is tests/test_resume.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, children_of, tiny_job_args
from dashrl.protocol.runtime import read_jsonl
from dashrl.queue.log import ROLLOUT_LOG, read_queue_log

START = str(REPO / "launch" / "start.py")
STEPS, MICRO = 24, 2


def _wait(pred, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _child(launcher_pid: int, module: str) -> int:
    pids = [p for p, args in children_of(launcher_pid) if module in args]
    assert pids, children_of(launcher_pid)
    return pids[-1]


@pytest.mark.slow
def test_actor_and_queue_are_killed_and_restarted_while_training_goes_on(tiny_cfg) -> None:
    run_dir = tiny_cfg.run_dir
    args = tiny_job_args(run_dir, **{
        "queue.capacity": 64, "learner.steps": STEPS, "learner.micro-batches-per-step": MICRO,
        "learner.queue-timeout-s": 2, "time-limit-s": 400})  # fmt: skip
    log_file = (run_dir.parent / "launcher.log").open("w")
    job = subprocess.Popen([sys.executable, START, *args], stdout=log_file,
                           stderr=subprocess.STDOUT)  # fmt: skip
    metrics = run_dir / "metrics.jsonl"
    steps = lambda: len(read_jsonl(metrics)) if metrics.exists() else 0  # noqa: E731
    try:
        _wait(lambda: steps() >= 2, 120, "two steps")
        os.kill(_child(job.pid, "dashrl.actors.actor"), signal.SIGKILL)
        at = steps()
        _wait(lambda: steps() >= at + 3, 120, "training after the actor's restart")
        os.kill(_child(job.pid, "dashrl.queue.server"), signal.SIGKILL)
        at = steps()
        _wait(lambda: steps() >= at + 3, 120, "training after the queue's restart")
        job.wait(timeout=300)
    finally:
        if job.poll() is None:
            job.send_signal(signal.SIGTERM)
            job.wait(timeout=120)
        log_file.close()
    out = (run_dir.parent / "launcher.log").read_text()
    assert "restarted actor0" in out and "restarted queue" in out, out[-3000:]
    assert job.returncode == 0, out[-3000:]
    rows = read_jsonl(metrics)
    assert [r["version"] for r in rows] == list(range(1, STEPS + 1))  # every step, in order
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["learner_steps"] == STEPS

    qlog = read_queue_log(run_dir / ROLLOUT_LOG)
    gone = [tuple(r) for e in qlog.events for r in e.refs.tolist()]
    assert len(gone) == len(set(gone))  # nothing served or evicted twice, across the restart
    everything = {(g, c) for g, grp in enumerate(qlog.groups) for c in range(len(grp.completions))}
    assert set(gone) | set(qlog.pending_refs()) == everything  # nothing accepted went missing
    served = sum(e.kind == "served" for e in qlog.events)
    # the learner trained on STEPS * MICRO micro-batches; at most the one in flight when the
    # queue died was logged as served but never reached it
    assert STEPS * MICRO <= served <= STEPS * MICRO + 1
    # the restarted actor streams with weights from the learner's publisher
    restarted = [c for g in qlog.groups if g.actor_id == "launcher/actor0" for c in g.completions]
    assert restarted and max(c.policy_version for c in restarted) >= 1
