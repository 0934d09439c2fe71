"""Hostile input that decodes, from outside: extreme values, memory bombs, spoofed nodes,
nonsense settings, readable keys, and a launcher that must say when a role failed. A full
disk, damaged logs and checkpoints: test_hardening_storage.py; floods and idle
connections: test_hardening_fairness.py."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from pydantic import ValidationError

from conftest import REPO
from dashrl.protocol import (
    Completion,
    DecodeLimits,
    MicroBatchReply,
    MicroBatchRequest,
    NodeHello,
    ProtocolError,
    RolloutGroup,
    decode,
    encode,
)
from dashrl.protocol.config import Config
from dashrl.protocol.runtime import free_port
from dashrl.queue.log import ROLLOUT_LOG

START = str(REPO / "launch" / "start.py")


def group(i: int, rewards, advantages, version: int = 0) -> RolloutGroup:
    comps = [
        Completion(np.array([5, 6], np.int32), np.full(2, -0.5, np.float32), r, a, "stop", version)
        for r, a in zip(rewards, advantages, strict=True)
    ]
    return RolloutGroup(f"p{i}", np.arange(4, dtype=np.int32), comps, "hostile")


def request(server, rid: int, version: int, size: int = 2) -> MicroBatchReply | None:
    frame = server.on_request_frame(encode(MicroBatchRequest(rid, version, size)))
    return None if frame is None else decode(frame)


# ------------------------------------------------------------------ 1. extreme values


@pytest.mark.parametrize(
    ("rewards", "advantages"),
    [([1e15, 0.0], [1.0, -1.0]), ([1.0, 0.0], [1e30, -1.0]), ([0.0, -1e8], [-1e3, 0.5])],
)
def test_groups_with_huge_rewards_or_advantages_are_refused_and_counted(
    tmp_path: Path, rewards, advantages
) -> None:
    from dashrl.queue.server import QueueServer

    server = QueueServer(Config(), tmp_path)
    server.on_rollout_frame(encode(group(0, [1.0, 0.0], [1.0, -1.0])))  # a good group first
    server.on_rollout_frame(encode(group(1, rewards, advantages)))
    stats = server.stats()
    assert len(server.buffer) == 2 and stats["queue/rejected_values"] == 1
    assert stats["queue/rejected_frames"] == 1 and stats["queue/accepted"] == 2
    reply = request(server, 1, 0)
    assert [s.prompt_id for s in reply.samples] == ["p0", "p0"]  # nothing accepted was lost
    assert all(np.isfinite(v) for v in reply.stats.values())  # the learner decodes it
    server.close()


def test_a_request_that_jumps_the_learner_version_is_refused(tmp_path: Path) -> None:
    """A stray client claiming learner_version 2**40 must not evict everything as stale."""
    from dashrl.queue.server import QueueServer

    server = QueueServer(Config(), tmp_path)
    for i in range(3):
        server.on_rollout_frame(encode(group(i, [1.0, 0.0], [1.0, -1.0])))
    assert request(server, 1, 0).samples  # the learner's first request
    assert request(server, 2, 2**40) is None  # refused: no reply, nothing evicted
    assert request(server, 3, 2**53 + 1) is None  # beyond the wire bound: refused at decode
    stats = server.stats()
    assert stats["queue/rejected_requests"] == 1 and stats["queue/evicted_stale"] == 0
    assert len(server.buffer) == 4
    assert len(request(server, 4, 1).samples) == 2  # the learner's next step goes through
    server.close()


def test_the_first_request_of_a_restarted_queue_may_carry_any_version(tmp_path: Path) -> None:
    from dashrl.queue.server import QueueServer

    server = QueueServer(Config(), tmp_path)
    server.on_rollout_frame(encode(group(0, [1.0, 0.0], [1.0, -1.0], version=40)))
    assert len(request(server, 1, 41).samples) == 2
    server.close()


def test_a_stranger_can_neither_detach_a_node_nor_flood_the_registry() -> None:
    from dashrl.learner.nodes import NodeRegistry
    from dashrl.protocol import NodeWelcome

    bind = f"tcp://127.0.0.1:{free_port()}"
    registry = NodeRegistry(bind, lambda n: NodeWelcome(n, 0, "{}", "tcp://x:1"), 30.0,
                            max_nodes=3)  # fmt: skip
    ctx = zmq.Context()
    owner, stranger = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    for s in (owner, stranger):
        s.setsockopt(zmq.LINGER, 0)
        s.connect(bind)
    try:
        owner.send(encode(NodeHello("node-a", "register", 1)))
        assert owner.poll(5000) and decode(owner.recv()).node_id == "node-a"
        stranger.send(encode(NodeHello("node-a", "leave")))
        stranger.send(encode(NodeHello("node-a", "register")))  # no hijack either
        for i in range(50):
            stranger.send(encode(NodeHello(f"fake-{i}", "register")))
        deadline = time.monotonic() + 5
        while registry.refused < 1 + 1 + 48 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert registry.alive() == ["fake-0", "fake-1", "node-a"]  # capped at max_nodes
        assert registry.refused == 50 and registry.left == 0
        owner.send(encode(NodeHello("node-a", "leave")))  # its owner may
        deadline = time.monotonic() + 5
        while registry.left == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "node-a" not in registry.alive()
    finally:
        owner.close()
        stranger.close()
        ctx.term()
        registry.close()


# ------------------------------------------------------------------ 2. decoder memory


def _bombs() -> dict[str, bytes]:
    n = 16 << 20
    env = {"schema": 2, "type": "rollout_group"}
    inner = [[] for _ in range(65536)]
    return {
        "flat empty arrays": msgpack.packb({**env, "body": [[]] * n}),
        "nested empty arrays": msgpack.packb({**env, "body": [inner] * (n // 65536)}),
        "short strings": msgpack.packb({**env, "body": [["ab"] * 65536] * (n // (3 * 65536))}),
        "empty maps": msgpack.packb({**env, "body": [{}] * 65536}),
        "small ints": msgpack.packb({**env, "body": [[300] * 65536] * (n // (3 * 65536))}),
    }


@pytest.mark.parametrize("name", list(_bombs()))
def test_a_frame_of_tiny_items_is_refused_within_a_small_multiple_of_its_size(name) -> None:
    frame = _bombs()[name]
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError):
            decode(frame, DecodeLimits(max_frame_bytes=64 << 20))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 6 * len(frame) + (8 << 20), (name, peak / len(frame))


def test_real_frames_stay_well_inside_the_item_budget() -> None:
    g = group(0, [1.0] * 1024, [0.5] * 1024)  # the largest group the queue accepts
    assert len(decode(encode(g)).completions) == 1024
    from dashrl.protocol import Sample

    s = Sample.make("p", np.arange(3, dtype=np.int32), np.array([1], np.int32),
                    np.zeros(1, np.float32), 1.0, 1.0, 0)  # fmt: skip
    stats = {f"queue/k{i}": float(i) for i in range(200)}
    assert len(decode(encode(MicroBatchReply(1, [s] * 512, stats))).samples) == 512


# ------------------------------------------------------------------ 8. config values


@pytest.mark.parametrize(
    ("section", "values", "field"),
    [
        ("learner", {"lr": float("nan")}, "learner.lr"),
        ("learner", {"lr": float("inf")}, "learner.lr"),
        ("learner", {"max_grad_norm": -1}, "learner.max_grad_norm"),
        ("learner", {"betas": (1.0, 0.5)}, "betas"),
        ("queue", {"max_seq_len": -1}, "queue.max_seq_len"),
        ("queue", {"max_frame_bytes": 0}, "queue.max_frame_bytes"),
        ("transport", {"rollout_port": 70000}, "transport.rollout_port"),
        ("actor", {"temperature": float("nan")}, "actor.temperature"),
    ],
)
def test_nonsense_settings_are_refused_naming_the_field(section, values, field) -> None:
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        Config.model_validate({section: values})


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--learner.lr", "nan"], "error: --learner.lr: Input should be a finite number (got nan)"),
        (["--transport.rollout-port", "70000"],
         "error: --transport.rollout-port: Input should be less than or equal to 65535 "
         "(got 70000)"),
        (["--queue.max-frame-bytes", "0"],
         "error: --queue.max-frame-bytes: Input should be greater than or equal to 4096 (got 0)"),
        (["--actor.vllm.kv-cache-gib", "-3"],
         "error: --actor.vllm.kv-cache-gib: Input should be greater than 0 (got -3.0)"),
    ],
)  # fmt: skip
def test_a_refused_value_is_one_line_naming_the_flag_in_seconds(args, line) -> None:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, START, *args], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert out.returncode == 2 and out.stderr.strip() == line, out.stderr
    assert time.monotonic() - t0 < 30


def test_a_validation_message_becomes_one_line_per_field() -> None:
    from dashrl.launch.cli import one_line
    from dashrl.protocol.config import LearnerConfig

    with pytest.raises(ValidationError) as section:  # a section's error, as tyro reports it
        LearnerConfig.model_validate({"lr": -1, "max_grad_norm": float("inf")})
    assert one_line(str(section.value)) == (
        "--learner.lr: Input should be greater than 0 (got -1); "
        "--learner.max-grad-norm: Input should be a finite number (got inf)"
    )
    with pytest.raises(ValidationError) as whole:
        Config.model_validate({"queue": {"capacity": 0}})
    assert one_line(str(whole.value)) == (
        "--queue.capacity: Input should be greater than or equal to 1 (got 0)"
    )
    assert one_line("plain text\nsecond line") == "plain text second line"


def test_an_unknown_task_fails_before_any_child_starts(tmp_path: Path) -> None:
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, START, "--run-dir", str(tmp_path / "run"), "--eval.heldout", "False",
         "--data.task", "no_such_task", "--model.name", "tiny-random"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and "no_such_task" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and time.monotonic() - t0 < 60
    assert not (tmp_path / "run" / "logs").exists()  # nothing was spawned


# ------------------------------------------------------------------ 9. keys


def test_keys_are_private_and_readable_keys_are_refused(tmp_path: Path) -> None:
    from dashrl.protocol.security import generate_keys, load_keys

    out = generate_keys(tmp_path / "keys")
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for secret in out.glob("*.key_secret"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    load_keys(out)
    os.chmod(out / "client.key_secret", 0o644)
    with pytest.raises(PermissionError, match="readable by others"):
        load_keys(out)


# ------------------------------------------------------------------ 7. the launcher's word


@pytest.mark.slow
def test_a_learner_that_dies_makes_the_launcher_fail_and_say_why(tiny_cfg) -> None:
    """A damaged checkpoint is refused by the launcher in one line naming the file; a
    damaged queue log kills the resumed learner, and the launcher then exits 1 with the
    learner's error line, and summary.json names the role."""
    from dashrl.queue.log import MAGIC

    run_dir = tiny_cfg.run_dir
    base = [sys.executable, START]
    flags = ["--model.name", str(tiny_cfg.model.path), "--learner.steps", "2",
             "--queue.filter-threshold", "None", "--actor.group-size", "4",
             "--actor.prompts-per-batch", "4", "--actor.max-new-tokens", "8",
             "--learner.micro-batch-size", "4", "--data.train-size", "200",
             "--eval.heldout", "False", "--actor.engine", "hf"]  # fmt: skip
    first = subprocess.run([*base, "--run-dir", str(run_dir), *flags], capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    weights = run_dir / "checkpoints" / "final" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"damaged")
    refused = subprocess.run([*base, "--resume", str(run_dir)], capture_output=True,
                             text=True, timeout=120)  # fmt: skip
    assert refused.returncode == 2 and "model.safetensors: 7 bytes" in refused.stderr
    assert not (run_dir / "logs" / "learner.log").read_text().count("resumed from")
    weights.write_bytes(good)
    log_path = run_dir / ROLLOUT_LOG
    data = bytearray(log_path.read_bytes())
    data[len(MAGIC)] ^= 0x01  # the first record's length
    log_path.write_bytes(bytes(data))
    resumed = subprocess.run([*base, "--resume", str(run_dir)], capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 1, resumed.stderr[-3000:]
    assert "error: learner failed" in resumed.stderr and "damaged" in resumed.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["failed_role"] == "learner" and "DamagedLogError" in summary["failure"]["error"]
