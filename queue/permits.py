"""Generation permits: how the rate limiter paces the actors before they generate.

An actor asks the queue for a ``GenerationPermit`` before each batch and generates only
once it is granted. The queue grants one while its rate limiter (queue/policies.py
``RateLimit``, Reverb's SampleToInsertRatio) would let in what it holds plus what the
batches already permitted but not yet arrived will bring, so several actor loops cannot
all be let go at once. Pacing before generation rather than by refusing to read the
rollout socket keeps the samples fresh: socket buffers count bytes, and held hundreds of
small groups that then arrived stale (replay issue, measured on the fake-engine job).
"""

from __future__ import annotations

import time
from collections import deque

from dashrl.queue.buffer import ReplayBuffer

MAX_WAITING_PERMITS = 4096
"""Most generation permits waiting at once (an actor asks for one per batch loop)."""
PERMIT_TTL_S = 300.0
"""Seconds after which a granted permit whose batch never arrived no longer counts."""


class PermitDesk:
    """Waiting and granted generation permits.

    Args:
        buffer: the queue's replay buffer (its limiter and acceptance counts decide).
    """

    def __init__(self, buffer: ReplayBuffer):
        self.buffer = buffer
        self.waiting: deque[tuple[bytes, bytes]] = deque(maxlen=MAX_WAITING_PERMITS)
        self.out: deque[float] = deque()  # grant times of batches not arrived yet
        self.batches_arrived = 0  # ActorStats frames received (one per generated batch)

    def on_batch_end(self) -> None:
        """An actor's batch arrived (its ``ActorStats``): one granted permit is used."""
        self.batches_arrived += 1
        if self.out:
            self.out.popleft()

    def may_permit(self, blocked: bool) -> bool:
        """Whether one more batch may be generated now (never while the queue is
        ``blocked``): the limiter must let in what is held plus what the permitted batches
        will bring (their mean number of accepted samples so far)."""
        per_batch = self.buffer.counters.accepted / max(self.batches_arrived, 1)
        while self.out and self.out[0] < time.monotonic() - PERMIT_TTL_S:
            self.out.popleft()  # its actor died or was stopped: stop waiting for it
        return not blocked and self.buffer.accepting(len(self.out) * per_batch)

    def request(self, peer: bytes, frame: bytes, blocked: bool) -> bytes | None:
        """A permit request from ``peer``: the grant (the request echoed) now if allowed,
        else None and it waits; a resend replaces the one it repeats (one per loop)."""
        if self.may_permit(blocked):
            self.out.append(time.monotonic())
            return frame
        self.waiting = deque(((p, f) for p, f in self.waiting if p != peer),
                             maxlen=MAX_WAITING_PERMITS)  # fmt: skip
        self.waiting.append((peer, frame))
        return None

    def grant(self, blocked: bool) -> list[tuple[bytes, bytes]]:
        """(peer, grant) for waiting permits, oldest first, as many as the limiter allows."""
        out = []
        while self.waiting and self.may_permit(blocked):
            out.append(self.waiting.popleft())
            self.out.append(time.monotonic())
        return out
