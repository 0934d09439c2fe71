"""The queue's log: every accepted group, and what happened to its samples, for replay and restart.

``<run_dir>/queue/rollouts.msgpack`` is a stream of protocol frames (msgpack, schema
versioned, no pickle): a RolloutGroup frame for every accepted group (its accepted
completions only), and a QueueEvent frame whenever samples leave the queue: "served" (one
micro-batch, in the order it was sent to the learner) or "evicted_stale" /
"evicted_capacity". Samples are named by (log index of their group frame, completion
index in it). From the log alone one can therefore rebuild every micro-batch the learner
received, in order (``launch/start.py replay``), and the set of samples that were accepted
but neither served nor evicted (what a restarted queue must hold again).

Each frame carries its schema version; a log written by an older schema is still read
(protocol/codec.py ``LOG_UPGRADES``), so a run recorded before a protocol change can be
replayed after it. The writer flushes after every frame, so a queue killed with SIGKILL
leaves at most one truncated frame at the end, which the reader reports and skips.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np

from dashrl.protocol import ProtocolError, QueueEvent, RolloutGroup, Sample, decode_object, encode
from dashrl.protocol import group_to_samples as _group_to_samples

log = logging.getLogger("dashrl.queue")

ROLLOUT_LOG = "queue/rollouts.msgpack"
"""Path of the log inside a run directory."""


def _frames(path: Path) -> Iterator[object]:
    with Path(path).open("rb") as f:
        unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=True, max_buffer_size=1 << 30)
        try:
            yield from unpacker
        except (msgpack.OutOfData, ValueError) as e:  # a frame cut short by a crash
            log.warning("%s: stopped at a truncated or corrupt frame (%s)", path, e)


@dataclass
class QueueLog:
    """The decoded contents of a queue log.

    Attributes:
        groups: accepted groups in acceptance order (index = log index).
        events: QueueEvents in the order they happened.
        order: ("group", i) / ("event", j) in file order.
    """

    groups: list[RolloutGroup] = field(default_factory=list)
    events: list[QueueEvent] = field(default_factory=list)
    order: list[tuple[str, int]] = field(default_factory=list)

    def sample(self, ref: tuple[int, int]) -> Sample:
        """The sample a (log index, completion index) names.

        Raises:
            IndexError: the reference points outside the log.
        """
        g, c = int(ref[0]), int(ref[1])
        return _group_to_samples(self.groups[g])[c]

    def served(self) -> list[tuple[QueueEvent, list[Sample]]]:
        """Every served micro-batch, in the order the learner received them."""
        return [(e, [self.sample(r) for r in e.refs]) for e in self.events if e.kind == "served"]

    def pending_refs(self) -> list[tuple[int, int]]:
        """Samples accepted but never served nor evicted, in acceptance order."""
        gone = {(int(g), int(c)) for e in self.events for g, c in e.refs}
        return [(g, c) for g, grp in enumerate(self.groups)
                for c in range(len(grp.completions)) if (g, c) not in gone]  # fmt: skip


def read_queue_log(path: Path) -> QueueLog:
    """Decode a queue log.

    Raises:
        ProtocolError: a complete frame does not decode (a corrupt log).
        FileNotFoundError: no log at ``path``.
    """
    out = QueueLog()
    for obj in _frames(path):
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
    their log indices), so a restarted queue writes on after its predecessor.

    Args:
        path: the log file.
    """

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.num_groups = len(read_queue_log(path).groups) if path.exists() else 0
        self._f = path.open("ab")

    def append_group(self, group: RolloutGroup, frame: bytes | None = None) -> int:
        """Write an accepted group; returns its log index. ``frame``: the group's own valid
        encoding, written as is (re-encoding every group was half the queue's time in
        bench/transport.py)."""
        self._write(frame if frame is not None else encode(group))
        self.num_groups += 1
        return self.num_groups - 1

    def append_event(self, kind: str, refs: list[tuple[int, int]], version: int,
                     request_id: int = 0) -> None:  # fmt: skip
        """Write a QueueEvent (see :class:`~dashrl.protocol.QueueEvent`)."""
        arr = np.asarray(refs, dtype=np.int32).reshape(-1, 2)
        self._write(encode(QueueEvent(kind, arr, version, request_id)))

    def _write(self, frame: bytes) -> None:
        self._f.write(frame)
        self._f.flush()

    def close(self) -> None:
        self._f.close()


__all__ = [
    "ROLLOUT_LOG",
    "ProtocolError",
    "QueueLog",
    "RolloutLog",
    "read_queue_log",
    "read_rollout_log",
]
