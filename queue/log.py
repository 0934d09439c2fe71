"""The queue's log: every accepted group, and what happened to its samples, for replay and restart.

``<run_dir>/queue/rollouts.msgpack`` is a stream of protocol frames (msgpack, schema
versioned, no pickle): a RolloutGroup frame for every accepted group (its accepted
completions only), and a QueueEvent frame for everything that happens to them: "served"
(one micro-batch, in the order it was sent to the learner, with its importance weights;
a sample is served up to ``queue.max_uses`` times), "priority" (the learner's update), and
the evictions "evicted_stale" / "evicted_capacity" / "evicted_low_priority". Samples are
named by (log index of their group frame, completion index in it). From the log alone one
can therefore rebuild every micro-batch the learner received, in order (``launch/start.py
replay``), and the samples that were accepted and neither evicted nor used up, with their
use counts and priorities (what a restarted queue must hold again).

On disk the file starts with :data:`MAGIC` and holds one record per frame: a little-endian
uint32 length, the CRC-32 of the frame, then the frame. The reader checks both; a record
cut short at the end (a crash mid-write) is a *torn tail*, anything else that fails is
*damage*, and the reader resynchronises at the next record whose length and checksum
hold, reporting exactly which byte ranges it dropped (:class:`LogReport`). A torn tail is
accounted for (it never completed, so nothing in memory depended on it) and the writer
truncates it before appending; damage in the middle is not (log indices after it may be
off), so replay and ``--resume`` refuse such a log with its report. The writer writes a
record, flushes and, for serve records, fsyncs before the queue sends the micro-batch; a
write that fails is cut back to the last whole record and raised as :class:`LogWriteError`.

Each frame carries its schema version; a log written by an older schema (including the
unframed version-1 files, read as a bare msgpack stream) is still read (protocol/codec.py
``LOG_UPGRADES``), so a run recorded before a format change can be replayed after it.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np

from dashrl.protocol import ProtocolError, QueueEvent, RolloutGroup, Sample, decode_object, encode
from dashrl.protocol import group_to_samples as _group_to_samples

log = logging.getLogger("dashrl.queue")

ROLLOUT_LOG = "queue/rollouts.msgpack"
"""Path of the log inside a run directory."""


MAGIC = b"DASHRLQ\x02"
"""The first bytes of a framed log (older logs are bare msgpack streams)."""
_HEADER = struct.Struct("<II")  # frame length in bytes, CRC-32 of the frame
MAX_RECORD = 1 << 31
"""Longest record a reader accepts, in bytes."""


class LogWriteError(OSError):
    """A record could not be written (a full disk, EFBIG...); the file holds whole records
    only (the partial one was cut off)."""


@dataclass
class LogReport:
    """What a reader had to drop.

    Attributes:
        records: whole records read.
        torn_tail: bytes of an incomplete last record (a crash mid-write), or of a tail
            holding no valid record (zeros, garbage).
        damaged: (offset, bytes) of each region skipped before a later valid record.
        undecodable: records whose checksum held but whose frame did not decode.
        legacy: the file is an unframed (schema 1) msgpack stream.
        good_bytes: offset just past the last whole record (where appending continues).
    """

    records: int = 0
    torn_tail: int = 0
    damaged: list[tuple[int, int]] = field(default_factory=list)
    undecodable: int = 0
    legacy: bool = False
    good_bytes: int = 0

    @property
    def accountable(self) -> bool:
        """True when nothing but a torn tail was lost (log indices are all exact)."""
        return not self.damaged and not self.undecodable

    def describe(self) -> str:
        """One line: what was dropped."""
        parts = [f"{self.records} records"]
        if self.torn_tail:
            parts.append(f"torn tail of {self.torn_tail} bytes dropped")
        if self.damaged:
            regions = ", ".join(f"{n} bytes at {o}" for o, n in self.damaged)
            parts.append(f"damaged regions skipped: {regions}")
        if self.undecodable:
            parts.append(f"{self.undecodable} undecodable records dropped")
        return "; ".join(parts)


class DamagedLogError(ValueError):
    """A log damaged beyond a torn tail: its log indices cannot be trusted."""


def _valid_at(data: bytes, pos: int) -> int:
    """Length of the valid record at ``pos``, or 0."""
    if pos + _HEADER.size > len(data):
        return 0
    n, crc = _HEADER.unpack_from(data, pos)
    end = pos + _HEADER.size + n
    if n < 1 or n > MAX_RECORD or end > len(data):
        return 0
    return n if zlib.crc32(data[pos + _HEADER.size : end]) == crc else 0


def scan_records(data: bytes) -> tuple[list[bytes], LogReport]:
    """The frames of a framed log's bytes, resynchronising past damage (see module doc)."""
    report, frames, pos = LogReport(), [], len(MAGIC)
    report.good_bytes = pos
    while pos < len(data):
        n = _valid_at(data, pos)
        if n:
            frames.append(data[pos + _HEADER.size : pos + _HEADER.size + n])
            pos += _HEADER.size + n
            report.good_bytes = pos
            continue
        nxt = next((p for p in range(pos + 1, len(data)) if _valid_at(data, p)), None)
        if nxt is None:  # nothing valid follows: an incomplete or garbage tail
            report.torn_tail = len(data) - pos
            break
        report.damaged.append((pos, nxt - pos))
        pos = nxt
    report.records = len(frames)
    return frames, report


def _objects(path: Path) -> tuple[list[object], LogReport]:
    data = Path(path).read_bytes()
    if data.startswith(MAGIC):
        frames, report = scan_records(data)
        objs = []
        for f in frames:
            try:
                objs.append(msgpack.unpackb(f, raw=False, strict_map_key=True))
            except Exception:  # a checksum collision or a writer bug
                report.undecodable += 1
        return objs, report
    report, objs = LogReport(legacy=True), []  # an unframed version-1 log
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=1 << 30)
    unpacker.feed(data)
    try:
        for obj in unpacker:
            objs.append(obj)
            report.good_bytes = unpacker.tell()
    except (msgpack.OutOfData, ValueError) as e:  # a frame cut short by a crash
        log.warning("%s: stopped at a truncated or corrupt frame (%s)", path, e)
    report.torn_tail = len(data) - report.good_bytes
    report.records = len(objs)
    return objs, report


@dataclass
class QueueLog:
    """The decoded contents of a queue log.

    Attributes:
        groups: accepted groups in acceptance order (index = log index).
        events: QueueEvents in the order they happened.
        order: ("group", i) / ("event", j) in file order.
        report: what the reader dropped (torn tail, damaged regions).
    """

    groups: list[RolloutGroup] = field(default_factory=list)
    events: list[QueueEvent] = field(default_factory=list)
    order: list[tuple[str, int]] = field(default_factory=list)
    report: LogReport = field(default_factory=LogReport)

    def sample(self, ref: tuple[int, int]) -> Sample:
        """The sample a (log index, completion index) names.

        Raises:
            IndexError: the reference points outside the log.
        """
        g, c = int(ref[0]), int(ref[1])
        return _group_to_samples(self.groups[g])[c]

    def served(self) -> list[tuple[QueueEvent, list[Sample]]]:
        """Every served micro-batch, in the order the learner received them, each sample
        with the importance weight it was served with (``Sample.is_weight``)."""
        out = []
        for e in self.events:
            if e.kind == "served":
                samples = [self.sample(r) for r in e.refs]
                for s, w in zip(samples, e.values, strict=False):  # empty values: all 1
                    s.is_weight = float(w)
                out.append((e, samples))
        return out

    def pending(self, max_uses: int = 1) -> dict[tuple[int, int], tuple[int, float | None]]:
        """Samples accepted and neither evicted nor served ``max_uses`` times, in acceptance
        order: ref -> (times served, last logged priority or None)."""
        uses: dict[tuple[int, int], int] = {}
        prio: dict[tuple[int, int], float] = {}
        gone: set[tuple[int, int]] = set()
        for e in self.events:
            refs = [(int(g), int(c)) for g, c in e.refs]
            if e.kind == "served":
                for r in refs:
                    uses[r] = uses.get(r, 0) + 1
            elif e.kind == "priority":
                prio.update(zip(refs, (float(v) for v in e.values), strict=True))
            else:  # an eviction
                gone.update(refs)
        return {(g, c): (uses.get((g, c), 0), prio.get((g, c)))
                for g, grp in enumerate(self.groups) for c in range(len(grp.completions))
                if (g, c) not in gone and uses.get((g, c), 0) < max_uses}  # fmt: skip

    def pending_refs(self, max_uses: int = 1) -> list[tuple[int, int]]:
        """The refs of :meth:`pending`, in acceptance order."""
        return list(self.pending(max_uses))


def read_queue_log(path: Path, strict: bool = False) -> QueueLog:
    """Decode a queue log; ``QueueLog.report`` says what had to be dropped.

    Args:
        strict: raise instead of reading past damage (replay and resume need exact indices).

    Raises:
        DamagedLogError: ``strict`` and the log is damaged beyond a torn tail.
        ProtocolError: a record's frame is not a valid message (a corrupt legacy log).
        FileNotFoundError: no log at ``path``.
    """
    out = QueueLog()
    objs, out.report = _objects(path)
    if not out.report.accountable or out.report.torn_tail:
        log.warning("%s: %s", path, out.report.describe())
    if strict and not out.report.accountable:
        raise DamagedLogError(f"{path}: damaged beyond a torn tail: {out.report.describe()}")
    for obj in objs:
        msg = decode_object(obj, expect=(RolloutGroup, QueueEvent), upgrade=True)
        if isinstance(msg, RolloutGroup):
            out.order.append(("group", len(out.groups)))
            out.groups.append(msg)
        else:
            out.order.append(("event", len(out.events)))
            out.events.append(msg)
    return out


def read_rollout_log(path: Path) -> list[RolloutGroup]:
    """The accepted groups of a queue log, in acceptance order.

    Raises:
        ProtocolError: a frame in the log does not decode.
    """
    return read_queue_log(path).groups


class RolloutLog:
    """Appends groups and events to the log; an existing log is continued (its groups keep
    their log indices, a torn tail is cut off first), so a restarted queue writes on after
    its predecessor. An unframed (version-1) log is continued unframed.

    Args:
        path: the log file.
    """

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.legacy = False
        self.num_groups = 0
        if path.exists() and path.stat().st_size:
            qlog = read_queue_log(path)
            self.num_groups, self.legacy = len(qlog.groups), qlog.report.legacy
            if qlog.report.good_bytes < path.stat().st_size:  # cut the torn tail off
                log.warning("%s: truncating %d bytes after the last whole record", path,
                            path.stat().st_size - qlog.report.good_bytes)  # fmt: skip
                os.truncate(path, qlog.report.good_bytes)
        self._f = path.open("ab")
        if self._f.tell() == 0:
            self._f.write(MAGIC)
            self._f.flush()
        self._good = self._f.tell()
        self.write_errors = 0

    def append_group(self, group: RolloutGroup, frame: bytes | None = None) -> int:
        """Write an accepted group; returns its log index. ``frame``: the group's own valid
        encoding, written as is (re-encoding every group was half the queue's time in
        bench/transport.py).

        Raises:
            LogWriteError: the write failed (nothing of it stays in the file).
        """
        self.write_frame(frame if frame is not None else encode(group))
        self.num_groups += 1
        return self.num_groups - 1

    def append_event(self, kind: str, refs: list[tuple[int, int]], version: int,
                     request_id: int = 0, durable: bool = False) -> None:  # fmt: skip
        """Write a QueueEvent (see :class:`~dashrl.protocol.QueueEvent`); ``durable``:
        fsync before returning (a serve record, before its micro-batch is sent).

        Raises:
            LogWriteError: the write failed (nothing of it stays in the file).
        """
        arr = np.asarray(refs, dtype=np.int32).reshape(-1, 2)
        self.write_frame(encode(QueueEvent(kind, arr, version, request_id)), durable)

    def write_frame(self, frame: bytes, durable: bool = False) -> None:
        """Append one frame as a record (or bare, for a legacy log).

        Raises:
            LogWriteError: the write failed; the file is cut back to its last whole record.
        """
        record = frame if self.legacy else _HEADER.pack(len(frame), zlib.crc32(frame)) + frame
        try:
            self._f.write(record)
            self._f.flush()
            if durable:
                os.fsync(self._f.fileno())
        except OSError as e:
            self.write_errors += 1
            self._rollback()
            raise LogWriteError(e.errno, f"{self.path}: {e.strerror or e}") from e
        self._good += len(record)

    def _rollback(self) -> None:
        """Drop whatever part of a failed record reached the file (buffer and disk)."""
        try:
            self._f.close()
        except OSError:
            pass  # the buffered bytes could not be written either: good
        try:
            os.truncate(self.path, self._good)
        except OSError as e:
            log.error("%s: could not cut back to %d bytes: %s", self.path, self._good, e)
        self._f = self.path.open("ab")

    def close(self) -> None:
        try:
            self._f.close()
        except OSError as e:
            log.error("%s: closing: %s", self.path, e)


__all__ = [
    "MAGIC",
    "ROLLOUT_LOG",
    "DamagedLogError",
    "LogReport",
    "LogWriteError",
    "ProtocolError",
    "QueueLog",
    "RolloutLog",
    "read_queue_log",
    "read_rollout_log",
    "scan_records",
]
