"""The live queue process: malformed frames are rejected and counted while it keeps serving."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import zmq

from dashrl.protocol import (
    Completion,
    MicroBatchReply,
    MicroBatchRequest,
    RolloutGroup,
    decode,
    encode,
)
from dashrl.protocol.config import Config
from dashrl.protocol.runtime import free_port
from dashrl.queue.log import ROLLOUT_LOG, read_rollout_log


def group(i: int, rewards: list[float]) -> RolloutGroup:
    r = np.array(rewards)
    adv = (r - r.mean()) / (r.std() + 1e-6)
    comps = [
        Completion(
            np.array([1, 2, 3 + j], np.int32),
            np.full(3, -0.3, np.float32),
            float(x),
            float(a),
            "stop",
            0,
        )
        for j, (x, a) in enumerate(zip(r, adv, strict=True))
    ]
    return RolloutGroup(f"p{i}", np.arange(5, dtype=np.int32), comps, "test-actor")


def request(dealer: zmq.Socket, rid: int, size: int) -> MicroBatchReply:
    dealer.send(encode(MicroBatchRequest(rid, 0, size, "sequences")))
    assert dealer.poll(10_000), "queue did not answer"
    reply = decode(dealer.recv())
    assert isinstance(reply, MicroBatchReply) and reply.request_id == rid
    return reply


def test_queue_process_survives_bad_frames_and_keeps_serving(tmp_path: Path) -> None:
    cfg = Config.model_validate(
        {
            "run_dir": str(tmp_path),
            "transport": {"rollout_port": free_port(), "request_port": free_port()},
            "queue": {"serve_groups": False},  # asserts the order of single samples
        }
    )
    (tmp_path / "config.json").write_text(cfg.model_dump_json())
    proc = subprocess.Popen(
        [sys.executable, "-m", "dashrl.queue.server", str(tmp_path / "config.json")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    ctx = zmq.Context()
    push, dealer = ctx.socket(zmq.PUSH), ctx.socket(zmq.DEALER)
    try:
        push.connect(f"tcp://127.0.0.1:{cfg.transport.rollout_port}")
        dealer.connect(f"tcp://127.0.0.1:{cfg.transport.request_port}")
        good = encode(group(0, [1, 0, 0, 1]))
        bad_version = bytearray(good)
        bad_version[bad_version.index(b"schema") + 6] = 9  # schema 1 -> 9
        bad = [
            b"",
            b"\xff\x00garbage",
            good[: len(good) // 2],
            bytes(bad_version),
            encode(MicroBatchRequest(0, 0, 1)),
        ]  # a request on the rollout socket
        for frame in bad:
            push.send(frame)
        push.send(good)
        push.send(encode(group(1, [1, 1, 1, 1])))  # all equal: A = 0, filtered
        push.send(encode(group(2, [0, 0, 0, 1])))
        dealer.send(b"not a request")  # a bad frame on the request socket, too
        deadline = time.monotonic() + 20
        while True:
            reply = request(dealer, 1, 8)
            if reply.stats.get("queue/accepted") == 8 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert reply.stats["queue/rejected_frames"] == len(bad) + 1
        assert reply.stats["queue/filtered"] == 4 and reply.stats["queue/accepted"] == 8
        assert len(reply.samples) == 8
        # group 2's lone correct sample has the largest |A| (sqrt(3)) and is served first
        assert reply.samples[0].prompt_id == "p2" and reply.samples[0].reward == 1.0
        assert reply.stats["actor/reward_mean"] == (2 + 4 + 1) / 12
        assert proc.poll() is None  # still alive after every bad frame
    finally:
        push.close(0)
        dealer.close(0)
        ctx.term()
        os.kill(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=20)[0].decode()
    assert proc.returncode == 0, out
    assert out.count("rejected") >= len(bad) + 1
    logged = read_rollout_log(tmp_path / ROLLOUT_LOG)
    assert [g.prompt_id for g in logged] == ["p0", "p2"]  # p1 had nothing accepted
    assert sum(len(g.completions) for g in logged) == 8


def test_a_handler_error_is_counted_and_the_queue_goes_on(tmp_path: Path) -> None:
    from dashrl.queue.server import QueueServer

    server = QueueServer(Config(), tmp_path)
    real_add = server.buffer.add
    server.buffer.add = lambda *args: 1 / 0  # a bug while handling one group
    server.on_rollout_frame(encode(group(0, [1, 0])))
    assert server.handler_errors == 1
    server.buffer.add = real_add
    server.on_rollout_frame(encode(group(1, [1, 0])))
    assert len(server.buffer) == 2 and server.stats()["queue/handler_errors"] == 1
    server.close()


def _req(server, rid: int, version: int, size: int) -> MicroBatchReply:
    frame = server.on_request_frame(encode(MicroBatchRequest(rid, version, size, "sequences")))
    return decode(frame)


def test_the_log_names_every_served_and_evicted_sample(tmp_path: Path) -> None:
    from dashrl.queue.log import read_queue_log
    from dashrl.queue.server import QueueServer

    cfg = Config.model_validate(
        {
            "queue": {
                "capacity": 6,
                "max_staleness": 1,
                "max_version_jump": 8,
                "serve_groups": False,
            }
        }  # fmt: skip
    )
    server = QueueServer(cfg, tmp_path)
    server.on_rollout_frame(encode(group(0, [1, 0, 0, 0])))  # 4 accepted
    server.on_rollout_frame(encode(group(1, [1, 1, 0, 0])))  # 4 more: 2 evicted for capacity
    served = [_req(server, 1, 0, 3).samples, _req(server, 2, 0, 2).samples]
    old = group(2, [1, 0])
    for c in old.completions:
        c.policy_version = 1
    server.on_rollout_frame(encode(old))
    late = group(3, [0, 1])
    for c in late.completions:
        c.policy_version = 2
    server.on_rollout_frame(encode(late))  # held, never served: pending at the end
    assert _req(server, 3, 3, 8).samples == []  # version 3: group 2 (lag 2) is stale now
    server.close()

    log = read_queue_log(tmp_path / ROLLOUT_LOG)
    assert [g.prompt_id for g in log.groups] == ["p0", "p1", "p2", "p3"]
    kinds = [e.kind for e in log.events]
    assert kinds == ["evicted_capacity", "served", "served", "evicted_stale"]
    replayed = [samples for _, samples in log.served()]
    assert [[(s.prompt_id, s.completion_ids.tolist()) for s in mb] for mb in replayed] == [
        [(s.prompt_id, s.completion_ids.tolist()) for s in mb] for mb in served
    ]
    assert [e.request_id for e, _ in log.served()] == [1, 2]
    everything = {(g, c) for g, grp in enumerate(log.groups) for c in range(len(grp.completions))}
    gone = [tuple(r) for e in log.events for r in e.refs.tolist()]
    # 2 evicted for capacity, 5 served, 3 stale (p2 and the last v0 sample); none twice
    assert len(gone) == len(set(gone)) == 2 + 5 + 3
    assert set(log.pending_refs()) == everything - set(gone)
    assert [log.sample(r).prompt_id for r in log.pending_refs()] == ["p3", "p3"]
