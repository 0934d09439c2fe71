"""The replay buffer: units ranked by priority, filtered, aged, bounded, served up to K times.

Why rank by |A|: a sample's policy-gradient contribution scales with its advantage, so
when the learner can only backprop a fraction of what the actors generate, the largest
|A| carry the most signal. DASH gradient filtering (Huang et al. 2025, arXiv 2505.17218,
Sec. "gradient filtering") drops |A| <= threshold outright; the ranking makes that
filter continuous. Ties (e.g. every sample of a 1-of-8 correct GRPO group) go to the
newest sample, which has the smallest version lag.

Why serve a sample more than once (``max_uses`` K > 1): PPO takes several epochs of
gradient steps on each batch of rollouts (Schulman et al. 2017, "Proximal Policy
Optimization Algorithms", arXiv 1707.06347, Sec. 5), and DASH finds such off-policy
updates raise accuracy (Huang et al. 2025, finding ii). A reused sample is simply an older
off-policy sample: the learner's ratio pi_theta / mu against its behaviour logprobs, with
the staleness-aware clip (learner/loss.py), makes each reuse a correct clipped update, and
the clip (tighter as the lag grows) bounds how far it can move the policy. A served unit
is *lent* until the learner's version advances (so a sample is never used twice in one
optimizer step) and meanwhile takes the learner's priority update (:meth:`update_priorities`).

The entry is the algorithm's serving unit (``Algorithm.unit``; a sample, or DPO's
(chosen, rejected) pair), the one thing stored, served, reused, evicted and counted
together. Policies are pure functions in queue/policies.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from sortedcontainers import SortedList

from dashrl.protocol import Sample
from dashrl.queue.policies import (
    UNITS,
    RateLimit,
    dpo_pair_units,
    expiring_first_pick,
    importance_weights,
    is_stale,
    length_aware_pick,
    micro_batch_count,
    passes_gradient_filter,
    priority,
    proportional_pick,
    sampling_probabilities,
    singleton_units,
    unit_priority,
    version_lag,
)

__all__ = ["UNITS", "AddResult", "BufferCounters", "ReplayBuffer", "dpo_pair_units",
           "length_aware_pick", "singleton_units", "version_lag"]  # fmt: skip


@dataclass(eq=False)
class _Entry:
    samples: tuple[Sample, ...]  # one unit: served, evicted and counted together
    seq: int  # arrival order; later is larger
    prio: float = 0.0  # the unit's priority: the largest of its samples'
    uses: int = 0  # times served
    oldest_version: int = field(init=False)  # computed once: staleness scans read it often

    def __post_init__(self) -> None:
        self.oldest_version = min(s.policy_version for s in self.samples)
        if not self.prio:
            self.prio = unit_priority(self.samples)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.samples)


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
    """Cumulative counts since the buffer started, in samples (``served`` counts serves:
    a sample served twice counts twice)."""

    received: int = 0
    accepted: int = 0
    filtered: int = 0
    evicted_stale: int = 0
    stale_on_arrival: int = 0  # of evicted_stale: refused on arrival, never held
    evicted_capacity: int = 0
    evicted_low_priority: int = 0
    served: int = 0
    reused: int = 0  # serves of a sample that had been served before


class ReplayBuffer:
    """Priority replay buffer with filtering, staleness eviction, a capacity, reuse, greedy or
    proportional sampling and an optional rate limiter.

    Args:
        capacity: most samples held (lent ones included); beyond it the lowest-priority
            units are evicted.
        filter_threshold: DASH gradient-filter threshold on |A| (and on updated
            priorities), None for no filtering.
        max_staleness: most version lag a held sample may have.
        length_window: greedy micro-batches by sequences are chosen among the top
            ``length_window * size`` units by :func:`length_aware_pick` (1: strict order).
        max_uses: K, the most times a unit is served.
        sampling: "greedy" (top priority first) or "proportional" (P ~ p^alpha).
        alpha, beta: proportional sampling's priority exponent and importance-weight
            exponent (queue/policies.py).
        rate_limit: pace inserts to serves (None: off).
        seed: seed of proportional sampling.
        expiring_first: greedy micro-batches by sequences take the units on their last
            servable version first (queue/policies.py expiring_first_pick).

    Raises:
        ValueError: capacity < 1, negative threshold or staleness, length_window < 1,
            max_uses < 1, unknown sampling.
    """

    def __init__(self, capacity: int, filter_threshold: float | None = 0.0,
                 max_staleness: int = 4, length_window: int = 1, max_uses: int = 1,
                 sampling: str = "greedy", alpha: float = 1.0, beta: float = 0.0,
                 rate_limit: RateLimit | None = None, seed: int = 0,
                 expiring_first: bool = False):  # fmt: skip
        if capacity < 1 or (filter_threshold or 0) < 0 or max_staleness < 0 or length_window < 1:
            raise ValueError("capacity >= 1, filter_threshold >= 0, max_staleness >= 0, "
                             "length_window >= 1 required")  # fmt: skip
        if max_uses < 1 or sampling not in ("greedy", "proportional"):
            raise ValueError(f"max_uses={max_uses} (>= 1), sampling={sampling!r} "
                             "(greedy or proportional)")  # fmt: skip
        self.capacity, self.filter_threshold = capacity, filter_threshold
        self.max_staleness, self.length_window = max_staleness, length_window
        self.max_uses, self.sampling, self.alpha, self.beta = max_uses, sampling, alpha, beta
        self.rate_limit, self.expiring_first = rate_limit, expiring_first
        self.rng = np.random.default_rng(seed)
        self.learner_version = 0
        self.counters = BufferCounters()
        self.budget = 0.0  # the rate limiter's serve budget (queue/policies.py RateLimit)
        self._seq = itertools.count()
        # Highest priority first; among equals, the newest first.
        self._items: SortedList = SortedList(key=lambda e: (-e.prio, -e.seq))
        self._lent: list[_Entry] = []  # served, back once the learner's version advances
        self._by_sample: dict[int, _Entry] = {}  # id(sample) -> its lent entry
        self._tokens = self._samples = 0

    def __len__(self) -> int:
        """Samples held (lent ones included)."""
        return self._samples

    @property
    def num_tokens(self) -> int:
        """Tokens (prompt + completion) held, summed over samples."""
        return self._tokens

    @property
    def _spi(self) -> float:
        return self.rate_limit.samples_per_insert if self.rate_limit else 1.0

    def _insert(self, e: _Entry) -> None:
        self._items.add(e)
        self._tokens += e.num_tokens
        self._samples += len(e.samples)

    def _drop(self, e: _Entry) -> list[Sample]:
        """Account for ``e`` leaving the buffer (already out of the list); its samples."""
        self._tokens -= e.num_tokens
        self._samples -= len(e.samples)
        self.budget -= len(e.samples) * (self._spi - e.uses)  # write off what it had left
        return list(e.samples)

    def accepting(self, expected: float = 0.0) -> bool:
        """Whether the rate limiter lets more rollouts in now (True when off); ``expected``:
        samples already on their way (batches permitted but not yet arrived)."""
        return self.rate_limit is None or self.rate_limit.can_insert(
            self.budget + expected * self._spi
        )

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
                self.budget += len(u) * self._spi
                result.accepted += list(u)
        while self._samples > self.capacity and self._items:
            gone = self._drop(self._items.pop(-1))
            result.evicted += len(gone)
            result.evicted_samples += gone
        result.accepted.sort()
        c = self.counters
        c.accepted += len(result.accepted)
        c.filtered += result.filtered
        c.evicted_stale += result.stale
        c.stale_on_arrival += result.stale
        c.evicted_capacity += result.evicted
        return result

    def restore(self, samples: list[Sample], uses: int, prio: float | None) -> bool:
        """Put back one unit a restarted queue reloads from its log, with its use count and
        last priority; False (nothing held) if it is used up."""
        if uses >= self.max_uses:
            return False
        e = _Entry(tuple(samples), next(self._seq), prio or 0.0, uses)
        self._insert(e)
        self.budget += len(samples) * (self._spi - uses)
        return True

    def set_learner_version(self, version: int) -> list[Sample]:
        """Advance the learner version: lent units come back (a new step may reuse them)
        and units that became stale are evicted; returns the evicted samples.

        Only an advance can make a held sample stale, so a repeated version (every
        micro-batch request of a step carries the same one) costs nothing; an advance scans
        the buffer once (the transport benchmark found this scan on every request taking
        94% of the queue's time).
        """
        if version <= self.learner_version:
            return []
        self.learner_version = version
        back, self._lent = self._lent, []
        for e in back:  # still counted in len() and num_tokens while lent
            for s in e.samples:
                self._by_sample.pop(id(s), None)
            self._items.add(e)
        stale = [e for e in self._items
                 if is_stale(e.oldest_version, version, self.max_staleness)]  # fmt: skip
        out: list[Sample] = []
        for e in stale:
            self._items.remove(e)
            out += self._drop(e)
        self.counters.evicted_stale += len(out)
        return out

    def update_priorities(self, samples: list[Sample], priorities: list[float]) -> list[Sample]:
        """The learner's new priorities for samples it was served (unknown ones, e.g. used
        up, are ignored); a unit whose new priority fails the gradient filter leaves the
        buffer. Returns the samples removed."""
        touched: dict[int, _Entry] = {}
        for s, p in zip(samples, priorities, strict=True):
            e = self._by_sample.get(id(s))
            if e is not None:
                if id(e) not in touched:
                    touched[id(e)], e.prio = e, 0.0
                e.prio = max(e.prio, float(p))
        out: list[Sample] = []
        for e in touched.values():
            if not passes_gradient_filter(e.prio, self.filter_threshold):
                self._lent.remove(e)
                for s in e.samples:
                    self._by_sample.pop(id(s), None)
                out += self._drop(e)
        self.counters.evicted_low_priority += len(out)
        return out

    def _select(self, size: int, unit: str) -> tuple[list[_Entry], list[float]]:
        """The units of the next micro-batch and their importance weights."""
        if unit not in ("sequences", "tokens"):
            raise ValueError(f"unknown micro-batch unit {unit!r}")
        if self.sampling == "proportional":
            entries = list(self._items)
            prios = [e.prio for e in entries]
            sizes = [len(e.samples) if unit == "sequences" else e.num_tokens for e in entries]
            picked = proportional_pick(prios, sizes, size, self.alpha, self.rng)
            weights = importance_weights(sampling_probabilities(prios, self.alpha), picked,
                                         self.beta)  # fmt: skip
            return [entries[i] for i in picked], weights
        if unit == "sequences":
            window = list(itertools.islice(self._items, self.length_window * size))
            expiring: list[bool] = []
            if self.expiring_first:  # every held unit on its last version joins the window
                last = [e for e in self._items if version_lag(
                    e.oldest_version, self.learner_version) >= self.max_staleness]  # fmt: skip
                top = {id(e) for e in window}
                window += [e for e in last if id(e) not in top]
                window.sort(key=lambda e: (-e.prio, -e.seq))
                ids = {id(e) for e in last}
                expiring = [id(e) in ids for e in window]
            lengths = [max(s.num_tokens for s in e.samples) for e in window]
            sizes = [len(e.samples) for e in window]
            picked = (expiring_first_pick(expiring, lengths, sizes, size) if any(expiring)
                      else length_aware_pick(lengths, sizes, size))  # fmt: skip
        else:
            counts, total = [], 0
            for e in self._items:  # only walk as far as one micro-batch reaches
                counts.append(e.num_tokens)
                total += counts[-1]
                if total > size:
                    break
            picked = list(range(micro_batch_count(counts, size, unit)))
            window = list(itertools.islice(self._items, len(picked)))
        return [window[i] for i in picked], [1.0] * len(picked)

    def pop_micro_batch(self, size: int, unit: str = "sequences",
                        commit: Callable[[list[Sample], list[float]], None] | None = None,
                        ) -> list[Sample]:  # fmt: skip
        """Serve the next micro-batch, or [] if too few samples are held (or the rate
        limiter holds sampling back). Each sample's ``is_weight`` is set to its importance
        weight (1 under greedy sampling). A unit served fewer than ``max_uses`` times is
        lent (see the module docstring); one served ``max_uses`` times leaves.

        Args:
            commit: called with the micro-batch and its weights before anything changes
                (the queue writes its serve record there); if it raises, the buffer is left
                as it was and the exception propagates.

        Raises:
            ValueError: unknown unit.
        """
        entries, weights = self._select(size, unit)
        taken = [s for e in entries for s in e.samples]
        if (
            self.rate_limit
            and taken
            and not self.rate_limit.can_sample(self.budget, len(self), len(taken))
        ):
            return []
        per_sample = [w for e, w in zip(entries, weights, strict=True) for _ in e.samples]
        if taken and commit is not None:
            commit(taken, per_sample)
        for s, w in zip(taken, per_sample, strict=True):
            s.is_weight = w
        for e in entries:
            self._items.remove(e)
            self.counters.reused += len(e.samples) * (e.uses > 0)
            e.uses += 1
            self.budget -= len(e.samples)
            if e.uses >= self.max_uses:
                self._drop(e)
            else:
                self._lent.append(e)
                self._by_sample.update((id(s), e) for s in e.samples)
        self.counters.served += len(taken)
        return taken

    def uses_of(self, sample: Sample) -> int:
        """Times a lent sample has been served (0 if it is not lent)."""
        e = self._by_sample.get(id(sample))
        return e.uses if e is not None else 0

    def peek_priorities(self) -> list[float]:
        """Priorities of the samples ready to serve, in greedy serving order (for tests)."""
        return [priority(s) if e.uses == 0 else e.prio for e in self._items for s in e.samples]
