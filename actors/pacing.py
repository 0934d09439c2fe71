"""Generation permits: an actor asks the queue before each batch when the queue's rate
limiter is on (``queue.samples_per_insert``), and generates only once it is granted.

Why ask before generating rather than let the queue stop reading rollouts: frames a queue
does not read still wait in the sockets' buffers (ZeroMQ's high-water marks count frames,
the kernel's buffers bytes, so hundreds of small groups fit), and there they age while the
learner moves on. Measured on the fake-engine job of tests/test_replay_queue.py: 1,251 of
1,295 samples arrived stale when the queue paced by not reading, 12 of 48 with permits.
"""

from __future__ import annotations

import logging
import time

import zmq
import zmq.asyncio

from dashrl.protocol import GenerationPermit, ProtocolError, decode, encode
from dashrl.protocol.config import Config
from dashrl.protocol.runtime import StopFlag
from dashrl.protocol.security import client_setup

log = logging.getLogger("dashrl.actor")

RESEND_S = 30.0
"""Seconds after which an unanswered permit request is sent again (the queue restarted)."""


class Permits:
    """One batch loop's DEALER to the queue's request socket, for its permits only (so it
    reads no other loop's grants).

    Args:
        dealer: a connected zmq.asyncio DEALER.
        actor_id: the actor's id, sent with each request.
    """

    def __init__(self, dealer: zmq.asyncio.Socket, actor_id: str):
        self.dealer, self.actor_id, self._next_id = dealer, actor_id, 0
        self.rejected = 0  # grants that failed to decode

    @classmethod
    def open(cls, ctx: zmq.asyncio.Context, cfg: Config, actor_id: str) -> Permits | None:
        """Permits for a run with the rate limiter on, else None."""
        if cfg.queue.samples_per_insert is None:
            return None
        t = cfg.transport
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        if secure := client_setup(t.curve_dir):  # CurveZMQ beyond the loopback
            secure(dealer)
        dealer.connect(f"tcp://{t.host}:{t.request_port}")
        return cls(dealer, actor_id)

    async def wait(self, stop: StopFlag) -> bool:
        """Ask for a permit and wait for a grant; False if ``stop`` was set first."""
        while not stop:
            self._next_id += 1
            rid = self._next_id
            await self.dealer.send(encode(GenerationPermit(self.actor_id, rid)))
            deadline = time.monotonic() + RESEND_S
            while not stop and time.monotonic() < deadline:
                if not await self.dealer.poll(1000):
                    continue
                try:
                    grant = decode(await self.dealer.recv(), expect=GenerationPermit)
                except ProtocolError as e:
                    self.rejected += 1
                    log.warning("rejected a permit grant: %s", e)
                    continue
                # any grant will do, also one for a request this loop sent again since: the
                # queue counted it as a batch on its way, and dropping it would stall pacing
                log.debug("permit %d granted (asked as %d)", grant.request_id, rid)
                return True
        return False

    def close(self) -> None:
        """Close the socket (before its context is terminated)."""
        self.dealer.close()
