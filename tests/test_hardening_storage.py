"""Hostile conditions around storage: a full disk under the queue, torn or damaged replay
logs, and checkpoints that must be whole or absent (split from test_hardening.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
from test_hardening import group, request

from conftest import REPO
from dashrl.protocol import (
    encode,
)
from dashrl.protocol.config import Config
from dashrl.queue.log import ROLLOUT_LOG

START = str(REPO / "launch" / "start.py")


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
