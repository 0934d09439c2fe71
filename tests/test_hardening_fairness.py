"""Hostile load on the queue's sockets: request floods that must not starve rollout intake
or delay the learner, bounded per-peer inboxes, and a connection limit (split from
test_hardening.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import zmq
from test_hardening import group

from conftest import queue_process
from dashrl.protocol import (
    MicroBatchRequest,
    decode,
    encode,
)
from dashrl.protocol.config import Config

# ------------------------------------------------------------------ 3. fairness


@pytest.mark.slow
def test_request_floods_do_not_starve_rollout_intake(tmp_path: Path) -> None:
    """Four clients flood micro-batch requests and never read a reply; 3,000 groups pushed
    meanwhile must still all be taken in within seconds."""
    cfg, rollout, req_port = _flood_queue_config(tmp_path)
    with queue_process(cfg):
        _flood_and_push(rollout, req_port)


def _flood_queue_config(tmp_path: Path) -> tuple[Config, int, int]:
    """A queue on free ports with room for everything and no log; (config, ports)."""
    from dashrl.protocol.runtime import free_ports

    rollout, req_port = free_ports(2)
    cfg = Config.model_validate({
        "run_dir": str(tmp_path),
        "queue": {"capacity": 10**6, "log_rollouts": False},
        "transport": {"rollout_port": rollout, "request_port": req_port},
    })  # fmt: skip
    return cfg, rollout, req_port


def _flood_and_push(rollout: int, req_port: int) -> None:
    ctx = zmq.Context()
    floods = [ctx.socket(zmq.DEALER) for _ in range(4)]
    push, probe = ctx.socket(zmq.PUSH), ctx.socket(zmq.DEALER)
    try:
        for s in [*floods, probe]:
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 100_000)
            s.connect(f"tcp://127.0.0.1:{req_port}")
        push.connect(f"tcp://127.0.0.1:{rollout}")
        request_frame = encode(MicroBatchRequest(1, 0, 10**8, "sequences"))  # takes nothing
        for _ in range(20_000):
            for s in floods:
                s.send(request_frame, zmq.NOBLOCK)
        frames = [encode(group(i, [1.0, 0.0], [1.0, -1.0])) for i in range(3000)]
        t0 = time.monotonic()
        for f in frames:
            push.send(f)
        received, rid = 0.0, 1
        while received < 3000 and time.monotonic() - t0 < 60:
            rid += 1
            probe.send(encode(MicroBatchRequest(rid, 0, 10**8, "sequences")))
            while probe.poll(10_000):
                reply = decode(probe.recv())
                if reply.request_id == rid:
                    received = reply.stats["queue/groups_received"]
                    break
            time.sleep(0.1)
        elapsed = time.monotonic() - t0
        assert received == 3000 and elapsed < 20, (received, elapsed)
        print(f"3000 groups taken in under a request flood in {elapsed:.1f} s")
    finally:
        for s in [*floods, push, probe]:
            s.close(0)
        ctx.term()


def test_each_peer_holds_a_bounded_inbox_and_peers_are_served_in_turn() -> None:
    from dashrl.queue.peers import RequestInbox

    inbox = RequestInbox(max_pending=2, max_peers=3)
    for i in range(5):  # a flooder: only its two newest survive
        inbox.put(b"flood", b"f%d" % i)
    inbox.put(b"learner", b"l0")
    inbox.put(b"other", b"o0")
    inbox.put(b"fourth", b"x0")  # a fourth peer while three are waiting: dropped
    assert inbox.dropped == 4 and len(inbox) == 4
    # one per peer per round: the learner is answered second, not after the flood
    assert inbox.take(3) == [(b"flood", b"f3"), (b"learner", b"l0"), (b"other", b"o0")]
    assert inbox.take(8) == [(b"flood", b"f4")] and len(inbox) == 0
    inbox.put(b"fourth", b"x1")  # slots free again
    assert inbox.take(1) == [(b"fourth", b"x1")]
    with pytest.raises(ValueError, match="max_pending"):
        RequestInbox(0)


@pytest.mark.slow
def test_a_request_flood_neither_delays_the_learner_nor_grows_the_queue(tmp_path: Path) -> None:
    """Four peers send 20,000 requests each and read no reply; the learner's requests are
    still answered within a second each (the queue reads requests into a bounded inbox
    per peer and answers peers in turn; queue/peers.py)."""
    cfg, _, req_port = _flood_queue_config(tmp_path)
    with queue_process(cfg) as proc:
        ctx = zmq.Context()
        floods = [ctx.socket(zmq.DEALER) for _ in range(4)]
        learner = ctx.socket(zmq.DEALER)
        try:
            for s in [*floods, learner]:
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.SNDHWM, 100_000)
                s.connect(f"tcp://127.0.0.1:{req_port}")
            frame = encode(MicroBatchRequest(1, 0, 8, "sequences"))
            for _ in range(20_000):
                for s in floods:
                    s.send(frame, zmq.NOBLOCK)
            waits, stats = [], {}
            for rid in range(2, 12):
                t0 = time.monotonic()
                learner.send(encode(MicroBatchRequest(rid, 0, 8, "sequences")))
                assert learner.poll(10_000), "the learner's request was never answered"
                reply = decode(learner.recv())
                assert reply.request_id == rid
                waits.append(time.monotonic() - t0)
                stats = reply.stats
            rss_kib = int(
                Path(f"/proc/{proc.pid}/status").read_text().split("VmRSS:")[1].split()[0]
            )
        finally:
            for s in [*floods, learner]:
                s.close(0)
            ctx.term()
    print(f"learner's request under a flood: max {max(waits):.3f} s; queue RSS {rss_kib} KiB; "
          f"{stats['queue/dropped_requests']:.0f} requests dropped")  # fmt: skip
    assert max(waits) < 1.0, waits


@pytest.mark.slow
def test_connections_beyond_the_limit_are_refused_and_silent_ones_closed(tmp_path) -> None:
    """1,100 idle connections (60 ZeroMQ peers, 1,040 raw TCP sockets that never greet)
    against a limit of 32: the queue admits 32, refuses and counts the rest, holds a
    bounded number of file descriptors, closes the silent sockets after handshake_s, and a
    new actor gets in once the idle peers leave."""
    import socket

    from dashrl.protocol.runtime import free_ports
    from dashrl.queue.server import raise_fd_limit

    if raise_fd_limit() < 1400:  # this test process holds the clients' 1,100 sockets
        pytest.skip("the open-file limit is too low for 1,100 client sockets")
    rollout, req_port = free_ports(2)
    cfg = Config.model_validate({
        "run_dir": str(tmp_path),
        "queue": {"log_rollouts": False},
        "transport": {"rollout_port": rollout, "request_port": req_port,
                      "max_connections": 32, "handshake_s": 1.0},
    })  # fmt: skip
    with queue_process(cfg) as proc:
        ctx = zmq.Context()
        idle = [ctx.socket(zmq.PUSH) for _ in range(60)]
        raw = []
        try:
            for s in idle:
                s.setsockopt(zmq.LINGER, 0)
                s.connect(f"tcp://127.0.0.1:{rollout}")
            deadline = time.monotonic() + 30
            while True:  # the queue process binds a moment after it starts
                try:
                    raw = [socket.create_connection(("127.0.0.1", rollout))]
                    break
                except ConnectionRefusedError:
                    assert time.monotonic() < deadline, "the queue never bound its port"
                    time.sleep(0.1)
            raw += [socket.create_connection(("127.0.0.1", rollout)) for _ in range(1039)]
            time.sleep(0.5)
            fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
            time.sleep(2.5)  # past handshake_s: every raw socket has been closed by the queue
            for r in raw:
                r.settimeout(5)
                while r.recv(64):  # the ZMTP greeting, then end of stream
                    pass
            fds_after = len(os.listdir(f"/proc/{proc.pid}/fd"))
            for s in idle:
                s.close(0)
            time.sleep(0.5)
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(f"tcp://127.0.0.1:{rollout}")
            push.send(encode(group(0, [1.0, 0.0], [1.0, -1.0])))
            probe = ctx.socket(zmq.DEALER)
            probe.setsockopt(zmq.LINGER, 0)
            probe.connect(f"tcp://127.0.0.1:{req_port}")
            deadline, stats = time.monotonic() + 10, {}
            while time.monotonic() < deadline and not stats.get("queue/groups_received"):
                probe.send(encode(MicroBatchRequest(1, 0, 10**8, "sequences")))
                if probe.poll(2000):
                    stats = decode(probe.recv()).stats
                time.sleep(0.2)
            push.close(0)
            probe.close(0)
        finally:
            for r in raw:
                r.close()
            for s in idle:
                s.close(0)
            ctx.term()
    print(
        f"queue fds: {fds} with 1,100 idle connections, {fds_after} once the raw ones were "
        f"closed; {stats.get('queue/refused_connections', 0):.0f} handshakes refused"
    )
    assert fds_after < 32 + 60, fds_after  # admitted peers plus the process's own files
    assert stats["queue/groups_received"] == 1  # a new actor got in
    assert stats["queue/refused_connections"] >= 60 - 32
