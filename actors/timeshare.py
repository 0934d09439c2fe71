"""Share of wall time during which at least one of several concurrent activities ran.

The actor runs several batch loops at once (``actor.batches_in_flight``); "the engine was
busy" or "a send was blocked" holds while *any* of them is in that state, so the time is
the union of their intervals, not the sum. Reported as ``actor/busy_frac`` and
``actor/paced_frac``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class TimeShare:
    """Union of the intervals spent inside :meth:`during`, as a share of wall time.

    Args:
        min_s: an interval shorter than this, in seconds, is not counted (a send that
            returns at once is not a blocked one).
    """

    def __init__(self, min_s: float = 0.0):
        self.min_s = min_s
        self.start = time.perf_counter()  # reset with :meth:`restart` when work begins
        self._total = self._since = 0.0
        self._inside = 0

    def restart(self) -> None:
        """Count wall time from now."""
        self.start = time.perf_counter()

    @contextmanager
    def during(self) -> Iterator[None]:
        """The block's time counts (overlapping blocks count once)."""
        if self._inside == 0:
            self._since = time.perf_counter()
        self._inside += 1
        try:
            yield
        finally:
            self._inside -= 1
            if self._inside == 0:
                spent = time.perf_counter() - self._since
                self._total += spent if spent >= self.min_s else 0.0

    def frac(self) -> float:
        """Share of wall time since :attr:`start` inside a block, in [0, 1]."""
        now = time.perf_counter()
        total = self._total + (now - self._since if self._inside else 0.0)
        return min(1.0, total / max(now - self.start, 1e-9))
