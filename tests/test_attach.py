"""A generator node attaches to a running job, streams rollouts with the learner's versions,
is killed with SIGKILL, is dropped by the learner, and the job goes on with nothing lost."""

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


def _wait(pred, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _node_groups(run_dir, node: str):
    path = run_dir / ROLLOUT_LOG
    if not path.exists():
        return []
    return [g for g in read_queue_log(path).groups if g.actor_id.startswith(node + "/")]


@pytest.mark.slow
def test_attach_then_sigkill_a_node_while_the_job_goes_on(tiny_cfg, tmp_path) -> None:
    run_dir = tiny_cfg.run_dir
    args = tiny_job_args(run_dir, **{"learner.steps": 400, "time-limit-s": 600})
    job = subprocess.Popen([sys.executable, START, *args], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
    node = None
    try:
        metrics = run_dir / "metrics.jsonl"
        _wait(lambda: metrics.exists() and read_jsonl(metrics), 120, "the first step")
        t = json.loads((run_dir / "config.json").read_text())["transport"]
        node = subprocess.Popen(
            [sys.executable, START, "attach", "--connect", f"127.0.0.1:{t['control_port']}",
             "--actors", "1", "--node-id", "n1", "--work-dir", str(tmp_path / "n1")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        # its rollouts reach the queue, generated with weights the learner published (v >= 1)
        fresh = lambda: any(  # noqa: E731
            c.policy_version >= 1 for g in _node_groups(run_dir, "n1") for c in g.completions
        )
        _wait(fresh, 120, "rollouts of the attached node")
        rows = read_jsonl(metrics)
        assert rows[-1]["learner/attached_nodes"] == 1.0
        for g in _node_groups(run_dir, "n1"):  # stamped with versions the learner had made
            assert all(0 <= c.policy_version <= rows[-1]["version"] + 1 for c in g.completions)

        # kill -9 the whole node: its actor first, then its supervisor (no "leave" is sent)
        for pid in [p for p, _ in children_of(node.pid)] + [node.pid]:
            os.kill(pid, signal.SIGKILL)
        node.wait(timeout=10)
        killed_at = time.monotonic()
        log_path = run_dir / "logs" / "learner.log"
        _wait(lambda: "node n1 dropped" in log_path.read_text(), 30, "the learner to drop n1")
        assert time.monotonic() - killed_at < t["node_timeout_s"] + 5
        steps_then = len(read_jsonl(metrics))
        _wait(lambda: len(read_jsonl(metrics)) >= steps_then + 3, 60, "training to go on")
        assert job.poll() is None  # the job is still running
    finally:
        if node is not None and node.poll() is None:
            node.kill()
        if job.poll() is None:
            job.send_signal(signal.SIGTERM)  # the launcher stops its children by pid
        job.wait(timeout=120)
    summary = json.loads((run_dir / "summary.json").read_text())
    qlog = read_queue_log(run_dir / ROLLOUT_LOG)
    logged = sum(len(g.completions) for g in qlog.groups)
    assert summary["rollouts_accepted"] == logged > 0  # every accepted rollout is in the log
    assert read_jsonl(run_dir / "metrics.jsonl")[-1]["learner/attached_nodes"] == 0.0
