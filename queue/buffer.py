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
from collections.abc import Callable
from dataclasses import dataclass, field

from sortedcontainers import SortedList

from dashrl.protocol import Sample

# --------------------------------------------------------------------------- policies


def priority(sample: Sample) -> float:
    """Ranking key of a sample: |advantage| (larger is served first)."""
    return abs(sample.advantage)


def unit_priority(unit: tuple[Sample, ...]) -> float:
    """Ranking key of a unit (samples served together): its largest |advantage|."""
    return max(priority(s) for s in unit)


def singleton_units(advantages: list[float]) -> list[tuple[int, ...]]:
    """The default grouping: every sample is its own unit."""
    return [(i,) for i in range(len(advantages))]


def dpo_pair_units(advantages: list[float]) -> list[tuple[int, ...]]:
    """Iterative DPO's grouping (actors/advantages.py ``dpo_pair``): the k-th positive-advantage
    sample (chosen) with the k-th negative one (rejected), as one unit that is always
    stored, evicted and served together; zero-advantage samples belong to no unit."""
    pos = [i for i, a in enumerate(advantages) if a > 0]
    neg = [i for i, a in enumerate(advantages) if a < 0]
    return list(zip(pos, neg, strict=False))


UNITS = {"sample": singleton_units, "pair": dpo_pair_units}
"""The buffer's grouping for each ``Algorithm.unit`` (protocol/algorithms.py)."""


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
    samples: tuple[Sample, ...]  # one unit: served, evicted and counted together
    seq: int  # arrival order; later is larger

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.samples)

    oldest_version: int = field(init=False)  # computed once: staleness scans read it often

    def __post_init__(self) -> None:
        self.oldest_version = min(s.policy_version for s in self.samples)


@dataclass
class AddResult:
    """What happened to the completions of one arriving group (counts of samples)."""

    accepted: list[int]
    """Indices (in the offered list) of the accepted samples."""
    filtered: int = 0
    stale: int = 0
    evicted: int = 0
    evicted_samples: list[Sample] = field(default_factory=list)
    """The samples evicted for capacity (possibly some of this group's own)."""


@dataclass
class BufferCounters:
    """Cumulative counts since the buffer started, in samples."""

    received: int = 0
    accepted: int = 0
    filtered: int = 0
    evicted_stale: int = 0
    evicted_capacity: int = 0
    served: int = 0


def length_aware_pick(lengths: list[int], sizes: list[int], size: int) -> list[int]:
    """Which units of a priority-ordered window form one micro-batch with little padding.

    The learner pads a micro-batch to its longest sequence, so serving the top ``size``
    samples by |A| alone wastes compute on padding whenever their lengths differ. This
    keeps the top-priority unit (so the queue never starves it) and adds the units of the
    window whose length is closest to it (ties: higher priority first), until the
    micro-batch holds ``size`` sequences. A window of exactly ``size`` units is strict
    priority order.

    Args:
        lengths: the longest sequence of each unit (prompt + completion tokens), in
            priority order (highest first).
        sizes: samples in each unit.
        size: sequences wanted.

    Returns:
        Indices into the window, in priority order; [] when the window holds fewer than
        ``size`` sequences.
    """
    if sum(sizes) < size:
        return []
    anchor = lengths[0]
    order = sorted(range(1, len(lengths)), key=lambda i: (abs(lengths[i] - anchor), i))
    picked, n = [0], sizes[0]
    for i in order:
        if n >= size:
            break
        picked.append(i)
        n += sizes[i]
    return sorted(picked)


class ReplayBuffer:
    """Priority queue of samples ranked by |A| with filtering, staleness eviction and a capacity.

    It stores *units*: one sample each by default, or a (chosen, rejected) pair for
    iterative DPO, which must reach the learner together. Capacity and counters count
    samples.

    Args:
        capacity: most samples held; beyond it the lowest-priority ones are evicted.
        filter_threshold: DASH gradient-filter threshold on |A|, None for no filtering.
        max_staleness: most version lag a held sample may have.
        length_window: micro-batches by sequences are chosen among the top
            ``length_window * size`` units by :func:`length_aware_pick` (1: strict priority).

    Raises:
        ValueError: capacity < 1, negative threshold or staleness, length_window < 1.
    """

    def __init__(
        self,
        capacity: int,
        filter_threshold: float | None = 0.0,
        max_staleness: int = 4,
        length_window: int = 1,
    ):
        if capacity < 1 or (filter_threshold or 0) < 0 or max_staleness < 0 or length_window < 1:
            raise ValueError("capacity >= 1, filter_threshold >= 0, max_staleness >= 0, "
                             "length_window >= 1 required")  # fmt: skip
        self.length_window = length_window
        self.capacity = capacity
        self.filter_threshold = filter_threshold
        self.max_staleness = max_staleness
        self.learner_version = 0
        self.counters = BufferCounters()
        self._seq = itertools.count()
        # Highest |A| first; among equals, the newest first.
        self._items: SortedList = SortedList(key=lambda e: (-unit_priority(e.samples), -e.seq))
        self._tokens = 0
        self._samples = 0

    def __len__(self) -> int:
        """Samples held."""
        return self._samples

    def _insert(self, e: _Entry) -> None:
        self._items.add(e)
        self._tokens += e.num_tokens
        self._samples += len(e.samples)

    def _remove_at(self, index: int) -> _Entry:
        e = self._items.pop(index)
        self._tokens -= e.num_tokens
        self._samples -= len(e.samples)
        return e

    @property
    def num_tokens(self) -> int:
        """Tokens (prompt + completion) held, summed over samples."""
        return self._tokens

    def add(self, samples: list[Sample], units: list[tuple[int, ...]] | None = None) -> AddResult:
        """Offer the samples of one group; returns which were accepted and why others were not.

        Args:
            samples: the group's samples.
            units: indices of the samples that form each unit (default: one unit per
                sample, see :func:`singleton_units`); samples in no unit count as filtered.

        A unit is accepted when it passes the gradient filter (on its largest |A|) and none
        of its samples is stale. If the buffer then exceeds its capacity, the
        lowest-priority units are evicted (possibly ones accepted just now: they still
        count as accepted).
        """
        units = singleton_units([s.advantage for s in samples]) if units is None else units
        result = AddResult(accepted=[])
        self.counters.received += len(samples)
        result.filtered += len(samples) - sum(len(u) for u in units)
        for u in units:
            unit = tuple(samples[i] for i in u)
            if not passes_gradient_filter(unit_priority(unit), self.filter_threshold):
                result.filtered += len(u)
            elif any(is_stale(s.policy_version, self.learner_version, self.max_staleness)
                     for s in unit):  # fmt: skip
                result.stale += len(u)
            else:
                self._insert(_Entry(unit, next(self._seq)))
                result.accepted += list(u)
        while self._samples > self.capacity:
            gone = self._remove_at(-1).samples
            result.evicted += len(gone)
            result.evicted_samples += gone
        result.accepted.sort()
        c = self.counters
        c.accepted += len(result.accepted)
        c.filtered += result.filtered
        c.evicted_stale += result.stale
        c.evicted_capacity += result.evicted
        return result

    def set_learner_version(self, version: int) -> list[Sample]:
        """Advance the learner version and evict samples that became stale; returns them.

        Only an advance can make a held sample stale, so a repeated version (every
        micro-batch request of a step carries the same one) costs nothing; an advance scans
        the buffer once (the transport benchmark found this scan on every request taking
        94% of the queue's time).
        """
        if version <= self.learner_version:
            return []
        self.learner_version = version
        stale = [
            e
            for e in self._items
            if is_stale(e.oldest_version, self.learner_version, self.max_staleness)
        ]
        out: list[Sample] = []
        for e in stale:
            self._remove_at(self._items.index(e))
            out += e.samples
        self.counters.evicted_stale += len(out)
        return out

    def pop_micro_batch(
        self,
        size: int,
        unit: str = "sequences",
        commit: Callable[[list[Sample]], None] | None = None,
    ) -> list[Sample]:
        """Remove and return the highest-priority micro-batch, or [] if too few samples are held.

        Args:
            commit: called with the micro-batch before anything is removed (the queue writes
                its serve record there); if it raises, the buffer is left as it was and the
                exception propagates.

        Raises:
            ValueError: unknown unit.
        """
        if unit == "sequences":
            window = list(itertools.islice(self._items, self.length_window * size))
            lengths = [max(s.num_tokens for s in e.samples) for e in window]
            picked = length_aware_pick(lengths, [len(e.samples) for e in window], size)
        else:
            counts, total = [], 0
            for e in self._items:  # only walk as far as one micro-batch reaches
                counts.append(e.num_tokens)
                total += counts[-1]
                if total > size:
                    break
            picked = list(range(micro_batch_count(counts, size, unit)))
            window = list(itertools.islice(self._items, len(picked)))
        taken = [s for i in picked for s in window[i].samples]
        if taken and commit is not None:
            commit(taken)
        for i in reversed(picked):  # from the back, so earlier positions stay valid
            self._remove_at(i)
        self.counters.served += len(taken)
        return taken

    def peek_priorities(self) -> list[float]:
        """Priorities of held samples in serving order (for tests and inspection)."""
        return [priority(s) for e in self._items for s in e.samples]
