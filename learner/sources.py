"""Where the learner's micro-batches come from: one interface, three sources, one feed.

:class:`MicroBatchSource` is the interface; it has three implementations:

- ``dashrl.queue.client.QueueClient``: the live queue process (the normal run);
- :class:`ResumeSource`: a resumed learner first re-trains on the micro-batches its dead
  predecessor was served after its checkpoint (from the queue log), then asks the queue;
- :class:`LogSource`: ``start.py replay`` answers each request with the next logged
  micro-batch, so the learner's computation is the original run's.

:class:`Feed` is what the learner loop calls: it waits on a source (asking again after
a timeout or an empty reply, and running the weight channel's idle hook meanwhile),
drops samples the model cannot embed, and, with several ranks, hands rank 0's
micro-batch to every rank (learner/ranks.py). Only rank 0 ever holds a source.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from dashrl.learner.ranks import share_micro_batch
from dashrl.protocol import MicroBatchReply, QueueEvent, Sample
from dashrl.protocol.config import LearnerConfig
from dashrl.protocol.runtime import StopFlag
from dashrl.queue.batches import BATCH_LEFT

log = logging.getLogger("dashrl.learner")


class MicroBatchSource(Protocol):
    """Anything that answers micro-batch requests like the queue does.

    Attributes:
        rejected_replies: replies that failed to decode (counted, never raised).
    """

    rejected_replies: int

    def request(
        self, learner_version: int, size: int, unit: str, timeout_s: float = 30.0
    ) -> MicroBatchReply:
        """One micro-batch of ``size`` (in ``unit``: "sequences" or "tokens"); an empty reply
        means "not enough yet, ask again".

        Raises:
            TimeoutError: no answer within ``timeout_s`` seconds (ask again).
        """
        ...

    def update_priorities(self, request_id: int, priorities: list[float]) -> None:
        """The learner's new priority for each sample of the reply to ``request_id``
        (queue/policies.py ``replay_priority``); a source without a queue ignores it."""
        ...

    def close(self) -> None:
        """Release sockets and files."""
        ...


class ResumeSource:
    """The source a resumed learner asks: first the micro-batches its dead predecessor was
    served after the checkpoint (from the queue log, in order; their updates were lost
    with it), then the live source. So no logged sample is trained on twice or dropped.

    Args:
        logged: the micro-batches to re-train on, in their logged order.
        live: the queue client asked once they are used up.
        versions: the learner version each was served at; given, each logged reply says
            how much of its ``--mode dash`` batch the log still holds (:func:`batch_left`).
            A dash learner that died in the middle of a step has the rest of that batch
            in the live queue, which the log cannot count: that one step is weighted by
            the logged part alone.
    """

    def __init__(self, logged: list[list[Sample]], live: MicroBatchSource,
                 versions: list[int] | None = None):  # fmt: skip
        self._logged, self.live = list(logged), live
        self._left = batch_left(versions, [len(m) for m in logged]) if versions else []
        self._from_log = False

    @property
    def rejected_replies(self) -> int:
        return self.live.rejected_replies

    def request(
        self, learner_version: int, size: int, unit: str, timeout_s: float = 30.0
    ) -> MicroBatchReply:
        """The next logged micro-batch while any is left, then the live source's answer."""
        self._from_log = bool(self._logged)
        if self._logged:
            samples = self._logged.pop(0)
            stats = {BATCH_LEFT: self._left.pop(0)} if self._left else {}
            return MicroBatchReply(0, samples, stats, np.asarray([s.is_weight for s in samples],
                                                                 dtype=np.float32))  # fmt: skip
        return self.live.request(learner_version, size, unit, timeout_s)

    def update_priorities(self, request_id: int, priorities: list[float]) -> None:
        """Passed on for live micro-batches; the queue already logged the re-trained ones."""
        if not self._from_log:
            self.live.update_priorities(request_id, priorities)

    def close(self) -> None:
        self.live.close()


class LogSource:
    """A replay's source: each request gets the next logged micro-batch.

    Args:
        served: the logged (event, samples) micro-batches, in order.
        stop: set when the log runs out, which ends the learner's loop.
    """

    def __init__(self, served: list[tuple[QueueEvent, list[Sample]]], stop: StopFlag):
        self._served, self._next, self.stop = served, 0, stop
        self.rejected_replies = 0
        self.version_mismatches = 0
        # a --mode dash step spans its batch's micro-batches: the log says where each ends
        self._left = batch_left([e.learner_version for e, _ in served],
                                [len(m) for _, m in served])  # fmt: skip

    def request(
        self, learner_version: int, size: int, unit: str, timeout_s: float = 0.0
    ) -> MicroBatchReply:
        """The next logged micro-batch (empty, and ``stop`` set, after the last)."""
        if self._next >= len(self._served):
            self.stop.stop = True
            return MicroBatchReply(0, [])
        event, samples = self._served[self._next]
        left = self._left[self._next]
        self._next += 1
        if event.learner_version != learner_version:  # the replay has drifted from the run
            self.version_mismatches += 1
        return MicroBatchReply(event.request_id, samples, {BATCH_LEFT: left}, event.values)

    def update_priorities(self, request_id: int, priorities: list[float]) -> None:
        """Nothing to update: the log already holds what the queue did with them."""

    def close(self) -> None:
        """Nothing to release."""


def batch_left(versions: list[int], sizes: list[int]) -> list[float]:
    """Per logged micro-batch: the samples served after it at the same learner version,
    i.e. what the queue's :data:`BATCH_LEFT` said under ``--mode dash`` (one step per
    version there). Other modes ignore it."""
    out, after = [0.0] * len(sizes), 0
    for i in range(len(sizes) - 1, -1, -1):
        if i + 1 < len(sizes) and versions[i + 1] != versions[i]:
            after = 0
        out[i] = float(after)
        after += sizes[i]
    return out


def valid_samples(samples: list[Sample], vocab_size: int) -> list[Sample]:
    """The samples whose token ids all fit the model's embedding table.

    The protocol only knows ids are non-negative; an id past the embedding table would
    crash the forward pass, so the learner checks before collating.
    """
    return [s for s in samples if max(s.prompt_ids.max(), s.completion_ids.max()) < vocab_size]


@dataclass
class Slice:
    """One micro-batch of an optimizer step.

    Attributes:
        samples: this rank's view of the micro-batch ([] only for an empty dash batch).
        stats: the queue's reply stats.
        waited_s: seconds spent waiting for it.
        share: its weight in the step's mean loss (1/micro_batches_per_step, or under
            ``--mode dash`` its samples over the batch's).
        last: it ends the gradient accumulation.
    """

    samples: list[Sample]
    stats: dict[str, float]
    waited_s: float
    share: float
    last: bool


class Feed:
    """The learner loop's supply of micro-batches (see the module docstring).

    Args:
        source: rank 0's source (None on the other ranks, or for a learner without one).
        lc: the learner config (micro-batch size and unit, timeouts).
        rank, world: this process's learner rank and the number of ranks.
        vocab_size: the model's embedding rows; samples with larger ids are dropped.
        on_idle: called while waiting (the weight channel re-publishes for late nodes).
    """

    def __init__(
        self,
        source: MicroBatchSource | None,
        lc: LearnerConfig,
        rank: int,
        world: int,
        vocab_size: int,
        on_idle: Callable[[], None] = lambda: None,
    ):
        self.source, self.lc, self.rank, self.world = source, lc, rank, world
        self.vocab_size, self.on_idle = vocab_size, on_idle
        self.rejected_samples = 0
        self.last_reply: MicroBatchReply | None = None  # rank 0: the reply last handed out

    @property
    def rejected_replies(self) -> int:
        return self.source.rejected_replies if self.source is not None else 0

    def next(
        self, version: int, stop: StopFlag, deadline: float = math.inf
    ) -> tuple[list[Sample], dict[str, float], float]:
        """This rank's view of the next micro-batch: (samples, queue stats, seconds waited).

        Rank 0 blocks until its source serves a non-empty micro-batch, ``stop`` is set or
        the monotonic ``deadline`` passes (then it returns no samples, which tells every
        rank that the step is abandoned).
        """
        samples, stats, waited = [], {}, 0.0
        if self.rank == 0:
            samples, stats, waited = self._wait(version, stop, deadline)
        if self.world > 1:
            samples = share_micro_batch(samples, self.rank)
        return samples, stats, waited

    def _wait(
        self, version: int, stop: StopFlag, deadline: float
    ) -> tuple[list[Sample], dict[str, float], float]:
        lc = self.lc
        t0 = time.perf_counter()
        while not stop and time.monotonic() < deadline:
            try:
                reply = self.source.request(version, lc.micro_batch_size, lc.micro_batch_unit,
                                            timeout_s=lc.queue_timeout_s)  # fmt: skip
            except TimeoutError as e:  # the queue died or is restarting: ask again
                log.warning("%s; asking again", e)
                self.on_idle()
                continue
            samples = valid_samples(reply.samples, self.vocab_size)
            if len(samples) < len(reply.samples):
                self.rejected_samples += len(reply.samples) - len(samples)
                log.warning("dropped %d samples with token ids >= vocab size %d (%d so far)",
                            len(reply.samples) - len(samples), self.vocab_size,
                            self.rejected_samples)  # fmt: skip
            if samples:
                self.last_reply = reply
                return samples, reply.stats, time.perf_counter() - t0
            if not reply.samples and reply.stats.get(BATCH_LEFT) == 0:  # an empty dash batch
                return [], reply.stats, time.perf_counter() - t0
            self.on_idle()
            time.sleep(lc.queue_poll_s)
        return [], {}, time.perf_counter() - t0

    def step_slices(
        self, version: int, stop: StopFlag, whole_batch: bool, deadline: float = math.inf
    ) -> Iterator[Slice]:
        """The micro-batches of one optimizer step, the last with ``last`` set; it ends
        early (no slice marked last) when the feed runs dry (``stop`` or ``deadline``).

        Normally ``micro_batches_per_step`` micro-batches of equal share. With
        ``whole_batch`` (``--mode dash``, DASH's preemptive sampling: Huang et al. 2025,
        arXiv 2505.17218, sec. 4) every informative sample of the learner's current batch,
        however many micro-batches that takes, each weighted by its share of the batch's
        samples so the accumulated gradient is the batch's per-sample mean; a batch the
        gradient filter emptied yields one empty slice (marked last).
        """
        if not whole_batch:
            n = self.lc.micro_batches_per_step
            for i in range(n):
                samples, stats, waited = self.next(version, stop, deadline)
                if not samples:
                    return
                yield Slice(samples, stats, waited, 1.0 / n, i == n - 1)
            return
        total = 0
        while True:
            samples, stats, waited = self.next(version, stop, deadline)
            left = stats.get(BATCH_LEFT)
            if not samples:
                if left == 0 and not total:
                    yield Slice([], stats, waited, 0.0, True)
                return
            total = total or len(samples) + int(left or 0)
            yield Slice(samples, stats, waited, len(samples) / total, not left)
            if not left:
                return

    def report_priorities(self, priorities: dict[int, float]) -> None:
        """Rank 0: send the new priorities of the last micro-batch, keyed by ``id(sample)``,
        aligned with its reply; samples the learner dropped (bad token ids) get 0, which
        takes them out of the queue."""
        reply = self.last_reply
        if self.rank != 0 or reply is None or self.source is None:
            return
        aligned = [priorities.get(id(s), 0.0) for s in reply.samples]
        self.source.update_priorities(reply.request_id, aligned)

    def stop_ranks(self) -> None:
        """Rank 0: tell the other ranks that training ended (an empty micro-batch)."""
        if self.rank == 0 and self.world > 1:
            share_micro_batch([], self.rank)

    def close(self) -> None:
        """Close the source."""
        if self.source is not None:
            self.source.close()
