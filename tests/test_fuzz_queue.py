"""Bounded fuzz of a live queue process: mutated frames never kill it, and its counters agree
with the decoder about every frame (each bad one rejected and counted, each good one accepted).

The frame count is DASHRL_FUZZ_FRAMES (default 100,000, about half a minute here).
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from conftest import queue_process
from dashrl.protocol import (
    Completion,
    DecodeLimits,
    MicroBatchReply,
    MicroBatchRequest,
    ProtocolError,
    RolloutGroup,
    decode,
    encode,
)
from dashrl.protocol.config import Config
from dashrl.protocol.runtime import free_port

FRAMES = int(os.environ.get("DASHRL_FUZZ_FRAMES", "100000"))
MAX_FRAME = 4096


def valid_group(rng: random.Random) -> RolloutGroup:
    g = rng.randint(1, 4)
    comps = []
    for j in range(g):
        t = rng.randint(1, 12)
        comps.append(Completion(np.array([rng.randrange(50000) for _ in range(t)], np.int32),
                                -np.array([rng.random() for _ in range(t)], np.float32),
                                float(j % 2), rng.uniform(-2, 2), rng.choice(["stop", "length"]),
                                rng.randrange(3)))  # fmt: skip
    return RolloutGroup(f"p{rng.randrange(1000)}", np.arange(rng.randint(1, 9), dtype=np.int32),
                        comps, "fuzz", "t", 1.0)  # fmt: skip


def type_confused(rng: random.Random, frame: bytes) -> bytes:
    obj = msgpack.unpackb(frame, raw=False)
    body = obj["body"]
    target = body["completions"][0] if rng.random() < 0.5 else body
    key = rng.choice(sorted(target))
    target[key] = rng.choice([None, True, -1, 1.5, float("nan"), "x", b"\x00\x01", [1], {"a": 1}])
    return msgpack.packb(obj, use_bin_type=True)


def mutate(rng: random.Random, frame: bytes) -> bytes:
    kind = rng.randrange(9)
    b = bytearray(frame)
    if kind == 0:  # truncation
        return bytes(b[: rng.randrange(len(b))])
    if kind == 1:  # random bit flips
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 2:  # random bytes
        return rng.randbytes(rng.randint(0, 200))
    if kind == 3:  # oversized
        return frame + b"\x00" * MAX_FRAME
    if kind == 4:  # wrong schema version
        obj = msgpack.unpackb(frame, raw=False)
        obj["schema"] = rng.choice([0, 2, 99, -1])
        return msgpack.packb(obj, use_bin_type=True)
    if kind == 5:  # type confusion
        return type_confused(rng, frame)
    if kind == 6:  # a message of another kind on the rollout socket
        return encode(MicroBatchRequest(rng.randrange(10), 0, 1))
    if kind == 7:  # byte insertion
        i = rng.randrange(len(b) + 1)
        return bytes(b[:i] + rng.randbytes(rng.randint(1, 8)) + b[i:])
    return frame  # kind 8: a good frame


@pytest.mark.slow
def test_live_queue_survives_fuzzed_frames(tmp_path: Path) -> None:
    rng = random.Random(1234)
    limits = DecodeLimits(max_frame_bytes=MAX_FRAME)
    corpus = [encode(valid_group(rng)) for _ in range(64)]
    frames, good, accepted_samples = [], 0, 0
    q = Config().queue  # the live queue's value bounds
    for _ in range(FRAMES):
        frame = mutate(rng, rng.choice(corpus))
        frames.append(frame)
        try:  # what the decoder and the value bounds say is what the queue must do
            msg = decode(frame, limits, expect=RolloutGroup)
            if any(abs(c.reward) > q.max_abs_reward or abs(c.advantage) > q.max_abs_advantage
                   for c in msg.completions):  # fmt: skip
                continue  # decodes, but refused as out of range (queue/rejected_values)
            good += 1
            accepted_samples += sum(abs(c.advantage) > 0 and c.policy_version >= 0
                                    for c in msg.completions)  # fmt: skip
        except ProtocolError:
            pass
    assert 0 < good < FRAMES

    cfg = Config.model_validate({
        "run_dir": str(tmp_path),
        "queue": {"max_frame_bytes": MAX_FRAME, "capacity": 10**7, "max_staleness": 10**6,
                  "log_rollouts": False},
        "transport": {"rollout_port": free_port(), "request_port": free_port()},
    })  # fmt: skip
    with queue_process(cfg) as proc:
        _fuzz_live_queue(proc, cfg, frames, good, accepted_samples)
    assert proc.returncode == 0


def _fuzz_live_queue(proc, cfg: Config, frames, good: int, accepted_samples: int) -> None:
    ctx = zmq.Context()
    push, dealer = ctx.socket(zmq.PUSH), ctx.socket(zmq.DEALER)
    try:
        push.connect(f"tcp://127.0.0.1:{cfg.transport.rollout_port}")
        dealer.connect(f"tcp://127.0.0.1:{cfg.transport.request_port}")
        t0 = time.monotonic()
        for frame in frames:
            push.send(frame)
        deadline, rid = time.monotonic() + 120, 0
        while True:  # ask (without taking samples: size exceeds what is held) until all arrived
            rid += 1
            dealer.send(encode(MicroBatchRequest(rid, 0, 10**8, "sequences")))
            assert dealer.poll(10_000), "queue stopped answering"
            reply = decode(dealer.recv())
            assert isinstance(reply, MicroBatchReply)
            seen = reply.stats["queue/rejected_frames"] + reply.stats["queue/groups_received"]
            if seen >= FRAMES or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        elapsed = time.monotonic() - t0
        assert proc.poll() is None, "queue process died"
        assert reply.stats["queue/rejected_frames"] == FRAMES - good
        assert reply.stats["queue/groups_received"] == good
        assert reply.stats["queue/accepted"] == accepted_samples
        assert reply.stats["queue/handler_errors"] == 0
        print(f"{FRAMES} frames ({FRAMES - good} bad) through the live queue in {elapsed:.1f} s")
    finally:
        push.close(0)
        dealer.close(0)
        ctx.term()
