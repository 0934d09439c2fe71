"""The learner's side of the queue: ask for a micro-batch, wait for the reply.

A DEALER socket rather than REQ: REQ locks up if one reply never arrives, whereas here
a reply whose request id is not the one outstanding is simply discarded.
"""

from __future__ import annotations

import itertools
import logging
import time

import numpy as np
import zmq

from dashrl.protocol import (
    DecodeLimits,
    MicroBatchReply,
    MicroBatchRequest,
    PriorityUpdate,
    ProtocolError,
    decode,
    encode,
)

log = logging.getLogger("dashrl.queue.client")


class QueueClient:
    """Blocking micro-batch requests to the queue process.

    Args:
        endpoint: the queue's ROUTER address, e.g. "tcp://127.0.0.1:5556".
        limits: decode limits for replies.
        configure: applied to the socket before connecting (CurveZMQ client keys).
    """

    def __init__(self, endpoint: str, limits: DecodeLimits | None = None, configure=None):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if configure is not None:  # CurveZMQ client keys (protocol/security.py)
            configure(self.sock)
        self.sock.connect(endpoint)
        self.limits = limits or DecodeLimits()
        self._ids = itertools.count()
        self.rejected_replies = 0

    def request(
        self, learner_version: int, size: int, unit: str, timeout_s: float = 30.0
    ) -> MicroBatchReply:
        """One request/reply round trip; the reply may hold no samples (queue too empty).

        Raises:
            TimeoutError: no valid reply within ``timeout_s`` seconds.
        """
        rid = next(self._ids)
        self.sock.send(encode(MicroBatchRequest(rid, learner_version, size, unit)))
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000)):
                break
            frame = self.sock.recv()
            try:
                reply = decode(frame, self.limits, expect=MicroBatchReply)
            except ProtocolError as e:
                self.rejected_replies += 1
                log.warning("rejected reply: %s", e)
                continue
            if reply.request_id == rid:
                return reply
        raise TimeoutError(f"queue did not answer request {rid} within {timeout_s:.0f} s")

    def update_priorities(self, request_id: int, priorities: list[float]) -> None:
        """Send the new priority of each sample of the reply to ``request_id`` (aligned with
        its samples; no reply comes back)."""
        msg = PriorityUpdate(request_id, np.asarray(priorities, dtype=np.float32))
        self.sock.send(encode(msg))

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()
