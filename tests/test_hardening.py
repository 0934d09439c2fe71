"""Hostile input that decodes, from outside: extreme values, memory bombs, spoofed nodes,
nonsense settings, readable keys, and a launcher that must say when a role failed."""

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

from conftest import REPO, queue_process
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


# ------------------------------------------------------------------ 4. a full disk


class FlakyDisk:
    """Wraps the log's file: while ``full``, every write fails with ENOSPC after letting
    ``partial`` bytes through (a real full disk leaves partial records)."""

    def __init__(self, f, partial: int = 5):
        self.f, self.full, self.partial = f, False, partial

    def write(self, data: bytes) -> int:
        if self.full:
            self.f.write(data[: self.partial])
            self.f.flush()
            raise OSError(28, "No space left on device")
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_a_full_disk_pauses_the_queue_and_loses_nothing(tmp_path: Path) -> None:
    from dashrl.queue.log import read_queue_log
    from dashrl.queue.server import QueueServer

    cfg = Config.model_validate({"queue": {"max_staleness": 100}})
    server = QueueServer(cfg, tmp_path)
    disk = FlakyDisk(server.log._f)
    server.log._f = disk
    for i in range(40):
        server.on_rollout_frame(encode(group(i, [1.0, 0.0], [1.0, -1.0])))
    assert len(request(server, 0, 0, 8).samples) == 8
    disk.full = True
    served = [request(server, r, 0, 8) for r in range(1, 11)]  # ten requests on a full disk
    assert all(reply.samples == [] for reply in served)  # nothing served that is not logged
    assert server.blocked and server.stats()["queue/log_blocked"] == 1.0
    for i in range(40, 50):  # rollouts that arrive meanwhile are held, not lost
        server.on_rollout_frame(encode(group(i, [1.0, 0.0], [1.0, -1.0])))
    assert len(server.buffer) == 72
    disk = FlakyDisk(server.log._f)  # the failed write reopened the file: wrap it again
    disk.full = True
    server.log._f = disk
    assert not server.flush_backlog()  # still full: the first held group waits in the backlog
    assert server.blocked and server.stats()["queue/log_backlog"] >= 1
    server.log._f = FlakyDisk(server.log._f)  # space returns (writes succeed again)
    assert server.flush_backlog() and not server.blocked
    assert len(server.buffer) == 92  # the held rollouts went in, in order
    assert len(request(server, 11, 0, 8).samples) == 8
    server.close()
    qlog = read_queue_log(tmp_path / ROLLOUT_LOG, strict=True)
    assert qlog.report.accountable and not qlog.report.torn_tail
    served_refs = {tuple(r) for e in qlog.events if e.kind == "served" for r in e.refs.tolist()}
    assert len(served_refs) == 16 and len(qlog.pending_refs()) == 100 - 16  # 0 lost
    restarted = QueueServer(cfg, tmp_path, reload=True)
    assert restarted.reloaded == 84  # every held sample came back
    restarted.close()


# ------------------------------------------------------------------ 5. log recovery


def _framed_log(tmp_path: Path, groups: int = 6) -> Path:
    from dashrl.queue.server import QueueServer

    server = QueueServer(Config(), tmp_path)
    for i in range(groups):
        server.on_rollout_frame(encode(group(i, [1.0, 0.0], [1.0, -1.0])))
    request(server, 1, 0, 4)
    server.close()
    return tmp_path / ROLLOUT_LOG


@pytest.mark.parametrize("tail", [b"\x00" * 4096, os.urandom(3000), b"\x05\x00\x00"])
def test_a_torn_or_garbage_tail_is_cut_and_appending_continues(tmp_path: Path, tail) -> None:
    from dashrl.queue.log import read_queue_log
    from dashrl.queue.server import QueueServer

    path = _framed_log(tmp_path)
    with path.open("ab") as f:
        f.write(tail)
    qlog = read_queue_log(path, strict=True)  # a tail is accounted for
    assert len(qlog.groups) == 6 and qlog.report.torn_tail == len(tail)
    restarted = QueueServer(Config(), tmp_path, reload=True)  # must not die at start
    assert restarted.reloaded == 8
    restarted.on_rollout_frame(encode(group(99, [1.0, 0.0], [1.0, -1.0])))
    restarted.close()
    again = read_queue_log(path, strict=True)  # what it appended is readable
    assert [g.prompt_id for g in again.groups][-1] == "p99" and not again.report.torn_tail


def test_a_damaged_record_is_skipped_reported_and_refused_by_replay(tmp_path: Path) -> None:
    from dashrl.queue.log import MAGIC, DamagedLogError, read_queue_log

    path = _framed_log(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(MAGIC)] ^= 0x01  # one flipped length byte in the first record
    path.write_bytes(bytes(data))
    qlog = read_queue_log(path)
    assert len(qlog.groups) == 5 and len(qlog.report.damaged) == 1  # resynchronised
    assert qlog.report.damaged[0][0] == len(MAGIC)
    with pytest.raises(DamagedLogError, match="damaged regions skipped"):
        read_queue_log(path, strict=True)
    out = subprocess.run([sys.executable, START, "replay", str(path), "--inspect"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2 and "damaged" in out.stderr, out.stderr


def test_an_unframed_version_1_log_still_reads(tmp_path: Path) -> None:
    """Logs written before the framing (bare schema-1 msgpack frames) are read as before."""
    from dashrl.queue.log import read_queue_log

    raw = msgpack.unpackb(encode(group(0, [1.0, 0.0], [1.0, -1.0])), raw=False)
    raw["schema"] = 1
    raw["body"]["timings"] = {"generate_s": 1.0}
    path = tmp_path / "rollouts.msgpack"
    path.write_bytes(msgpack.packb(raw, use_bin_type=True) * 3 + b"\x92")
    qlog = read_queue_log(path)
    assert len(qlog.groups) == 3 and qlog.report.legacy and qlog.report.torn_tail == 1


# ------------------------------------------------------------------ 6. checkpoints


def _saved(tiny_cfg, tmp_path: Path, backend: str = "torch", stage: int = 0):
    from dashrl.learner.learner import Learner

    cfg = tiny_cfg.model_copy(deep=True)
    cfg.learner.backend, cfg.learner.zero_stage = backend, stage
    learner = Learner(cfg, connect=False)
    ckpt = learner.save(tmp_path / "run" / "checkpoints" / "step_1")
    return learner, ckpt


def test_a_checkpoint_is_whole_or_absent_and_verified(tiny_cfg, tmp_path: Path) -> None:
    from dashrl.learner.checkpoint import (
        CheckpointError,
        latest_checkpoint,
        resumable_checkpoint,
        verify_checkpoint,
    )

    _, ckpt = _saved(tiny_cfg, tmp_path)
    run = tmp_path / "run"
    assert json.loads((ckpt / "manifest.json").read_text())["model.safetensors"]["bytes"] > 0
    crashed = run / "checkpoints" / "step_9.partial"  # a save cut short by a crash
    crashed.mkdir()
    (crashed / "dashrl_state.json").write_text('{"version": 9, "step": 9}')
    assert latest_checkpoint(run) == ckpt and resumable_checkpoint(run) == ckpt
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: .* bytes, the manifest says"):
        verify_checkpoint(ckpt)
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="model.safetensors: contents differ"):
        verify_checkpoint(ckpt)
    weights.write_bytes(data)
    (ckpt / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="optimizer.pt: missing"):
        resumable_checkpoint(run)


def test_a_resume_without_a_checkpoint_never_starts_over(tiny_cfg, tmp_path: Path) -> None:
    from dashrl.learner.checkpoint import CheckpointError
    from dashrl.learner.learner import Learner

    cfg = tiny_cfg.model_copy(update={"resume": True})
    with pytest.raises(CheckpointError, match="nothing to resume"):
        Learner(cfg, connect=False)


def test_deepspeed_states_are_loaded_without_unpickling_objects(tiny_cfg, tmp_path) -> None:
    """A planted pickle in DeepSpeed's checkpoint (manifest rewritten too, as an attacker
    with the folder would) is refused, and its code never runs."""
    import pickle

    from dashrl.learner.checkpoint import MANIFEST, _sha256

    learner, ckpt = _saved(tiny_cfg, tmp_path, "deepspeed", 2)
    learner.load_state(ckpt)  # DeepSpeed's own states load as tensors and plain data
    marker = tmp_path / "pwned"

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    states = next((ckpt / "deepspeed").rglob("*model_states.pt"))
    states.write_bytes(pickle.dumps({"module": Planted()}))
    manifest = json.loads((ckpt / MANIFEST).read_text())
    rel = str(states.relative_to(ckpt))
    manifest[rel] = {"bytes": states.stat().st_size, "sha256": _sha256(states)}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(pickle.UnpicklingError):
        learner.load_state(ckpt)
    assert not marker.exists()


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
