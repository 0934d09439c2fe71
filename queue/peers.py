"""Fair service of micro-batch requests: a bounded inbox per peer, answered in turn.

Why: the queue's ROUTER socket delivers requests in arrival order, so one peer that
floods requests (a stuck client, a stranger on the loopback) would put thousands of them
ahead of the learner's one, and every answer costs a pop, a log record and an encode.
Here each peer (its ZeroMQ routing id) keeps at most ``max_pending`` waiting requests:
a newer request replaces its oldest (a client that re-asks after a timeout wants the new
answer, and the learner's client discards replies to older request ids anyway), and the
dropped ones are counted. Requests are then taken one per peer per round, so a flooder
gets no more service than the learner. Reading a frame to drop it costs far less than
answering it, and frames are not decoded until they are answered.
"""

from __future__ import annotations

from collections import OrderedDict, deque


class RequestInbox:
    """Waiting request frames per peer, taken round-robin.

    Args:
        max_pending: most frames kept per peer (>= 1).
        max_peers: most peers with waiting frames; a frame from one more peer is dropped
            (counted) until a slot frees, so the inbox's memory is bounded.

    Raises:
        ValueError: ``max_pending`` or ``max_peers`` below 1.
    """

    def __init__(self, max_pending: int, max_peers: int = 4096):
        if max_pending < 1 or max_peers < 1:
            raise ValueError(f"max_pending={max_pending}, max_peers={max_peers}: need >= 1")
        self.max_pending, self.max_peers = max_pending, max_peers
        self._peers: OrderedDict[bytes, deque[bytes]] = OrderedDict()
        self.dropped = 0  # requests dropped: a peer over its bound, or too many peers

    def __len__(self) -> int:
        return sum(len(q) for q in self._peers.values())

    def put(self, peer: bytes, frame: bytes) -> None:
        """Hold ``frame`` from ``peer``; its oldest waiting frame goes if it is over bound."""
        q = self._peers.get(peer)
        if q is None:
            if len(self._peers) >= self.max_peers:
                self.dropped += 1
                return
            q = self._peers[peer] = deque()
        q.append(frame)
        if len(q) > self.max_pending:
            q.popleft()
            self.dropped += 1

    def take(self, n: int) -> list[tuple[bytes, bytes]]:
        """Up to ``n`` (peer, frame) pairs, oldest first within a peer, one per peer per
        round; a peer served in this call moves behind the others for the next call."""
        out: list[tuple[bytes, bytes]] = []
        while len(out) < n and self._peers:
            for peer in list(self._peers):
                if len(out) >= n:
                    break
                q = self._peers[peer]
                out.append((peer, q.popleft()))
                if q:
                    self._peers.move_to_end(peer)
                else:
                    del self._peers[peer]
        return out
