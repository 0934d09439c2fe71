"""The priority replay buffer: samples ranked by |advantage|, filtered, aged and bounded.

Policies are small pure functions (filtering, staleness, priority, micro-batch sizing)
so they can be tested and swapped one at a time; :class:`ReplayBuffer` only composes
them over a ``SortedList``.

Why rank by |A|: a sample's policy-gradient contribution scales with its advantage, so
when the learner can only backprop a fraction of what the actors generate, the largest
|A| carry the most signal. DASH gradient filtering (Huang et al. 2025, arXiv 2505.17218,
Sec. "gradient filtering") drops |A| <= threshold outright; the ranking makes that
filter continuous. Ties (e.g. every sample of a 1-of-8 correct GRPO group) go to the
newest sample, which has the smallest version lag.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from sortedcontainers import SortedList

from dashrl.protocol import Sample

# --------------------------------------------------------------------------- policies


def priority(sample: Sample) -> float:
    """Ranking key of a sample: |advantage| (larger is served first)."""
    return abs(sample.advantage)


def passes_gradient_filter(advantage: float, threshold: float | None) -> bool:
    """DASH gradient filtering (Huang et al. 2025, "gradient filtering"): keep iff |A| > threshold.

    With threshold 0 this drops exactly the zero-advantage samples, i.e. GRPO groups whose
    completions all got the same reward, which carry no policy gradient. None keeps
    everything (filtering off).
    """
    return threshold is None or abs(advantage) > threshold


def version_lag(policy_version: int, learner_version: int) -> int:
    """Staleness of a sample: learner version minus the version that generated it."""
    return learner_version - policy_version


def is_stale(policy_version: int, learner_version: int, max_staleness: int) -> bool:
    """True when the sample's version lag exceeds ``max_staleness`` (it is evicted)."""
    return version_lag(policy_version, learner_version) > max_staleness


def micro_batch_count(token_counts: list[int], size: int, unit: str) -> int:
    """How many of the ranked samples (given by their token counts) form one micro-batch.

    Args:
        token_counts: prompt+completion tokens of the samples, highest priority first.
        size: the micro-batch size, in sequences or tokens.
        unit: "sequences" or "tokens".

    Returns:
        The number of leading samples to take, or 0 when there are not enough for a
        full micro-batch (the caller then waits for more). By tokens, samples are taken
        while the total stays <= size, and the batch is full when the next one would
        not fit (a single sample larger than ``size`` is taken alone).

    Raises:
        ValueError: unknown unit.
    """
    if unit == "sequences":
        return size if len(token_counts) >= size else 0
    if unit != "tokens":
        raise ValueError(f"unknown micro-batch unit {unit!r}")
    total = 0
    for i, n in enumerate(token_counts):
        if total + n > size:
            return max(i, 1)
        total += n
    return 0  # everything fits with room to spare: not a full micro-batch yet


# --------------------------------------------------------------------------- buffer


@dataclass
class _Entry:
    sample: Sample
    seq: int  # arrival order; later is larger


@dataclass
class AddResult:
    """What happened to the completions of one arriving group (counts of samples)."""

    accepted: list[int]
    """Indices (in the offered list) of the accepted samples."""
    filtered: int = 0
    stale: int = 0
    evicted: int = 0


@dataclass
class BufferCounters:
    """Cumulative counts since the buffer started, in samples."""

    received: int = 0
    accepted: int = 0
    filtered: int = 0
    evicted_stale: int = 0
    evicted_capacity: int = 0
    served: int = 0


class ReplayBuffer:
    """Priority queue of samples ranked by |A| with filtering, staleness eviction and a capacity.

    Args:
        capacity: most samples held; beyond it the lowest-priority ones are evicted.
        filter_threshold: DASH gradient-filter threshold on |A|, None for no filtering.
        max_staleness: most version lag a held sample may have.

    Raises:
        ValueError: capacity < 1, negative threshold or staleness.
    """

    def __init__(self, capacity: int, filter_threshold: float | None = 0.0, max_staleness: int = 4):
        if capacity < 1 or (filter_threshold or 0) < 0 or max_staleness < 0:
            raise ValueError("capacity >= 1, filter_threshold >= 0, max_staleness >= 0 required")
        self.capacity = capacity
        self.filter_threshold = filter_threshold
        self.max_staleness = max_staleness
        self.learner_version = 0
        self.counters = BufferCounters()
        self._seq = itertools.count()
        # Highest |A| first; among equals, the newest first.
        self._items: SortedList = SortedList(key=lambda e: (-priority(e.sample), -e.seq))
        self._tokens = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def num_tokens(self) -> int:
        """Tokens (prompt + completion) held, summed over samples."""
        return self._tokens

    def add(self, samples: list[Sample]) -> AddResult:
        """Offer the samples of one group; returns which were accepted and why others were not.

        A sample is accepted when it passes the gradient filter and is not stale. If the
        buffer then exceeds its capacity, the lowest-priority samples are evicted (this
        may include samples accepted just now: they still count as accepted).
        """
        result = AddResult(accepted=[])
        for i, s in enumerate(samples):
            self.counters.received += 1
            if not passes_gradient_filter(s.advantage, self.filter_threshold):
                result.filtered += 1
            elif is_stale(s.policy_version, self.learner_version, self.max_staleness):
                result.stale += 1
            else:
                self._items.add(_Entry(s, next(self._seq)))
                self._tokens += s.num_tokens
                result.accepted.append(i)
        while len(self._items) > self.capacity:
            self._tokens -= self._items.pop(-1).sample.num_tokens
            result.evicted += 1
        c = self.counters
        c.accepted += len(result.accepted)
        c.filtered += result.filtered
        c.evicted_stale += result.stale
        c.evicted_capacity += result.evicted
        return result

    def set_learner_version(self, version: int) -> int:
        """Advance the learner version and evict samples that became stale; returns how many."""
        self.learner_version = max(self.learner_version, version)
        stale = [
            e
            for e in self._items
            if is_stale(e.sample.policy_version, self.learner_version, self.max_staleness)
        ]
        for e in stale:
            self._items.remove(e)
            self._tokens -= e.sample.num_tokens
        self.counters.evicted_stale += len(stale)
        return len(stale)

    def pop_micro_batch(self, size: int, unit: str = "sequences") -> list[Sample]:
        """Remove and return the highest-priority micro-batch, or [] if too few samples are held.

        Raises:
            ValueError: unknown unit.
        """
        if unit == "sequences":
            counts = [e.sample.num_tokens for e in self._items[:size]]
            count = micro_batch_count(counts, size, unit)
        else:
            counts, total = [], 0
            for e in self._items:  # only walk as far as one micro-batch reaches
                counts.append(e.sample.num_tokens)
                total += counts[-1]
                if total > size:
                    break
            count = micro_batch_count(counts, size, unit)
        taken = [self._items.pop(0).sample for _ in range(count)]
        self._tokens -= sum(s.num_tokens for s in taken)
        self.counters.served += len(taken)
        return taken

    def peek_priorities(self) -> list[float]:
        """Priorities of held samples in serving order (for tests and inspection)."""
        return [priority(e.sample) for e in self._items]
