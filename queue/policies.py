"""The replay queue's policies, each a small pure function: filtering, staleness, priority,
micro-batch sizing, greedy and proportional selection, importance weights, rate limiting.

:class:`dashrl.queue.buffer.ReplayBuffer` composes them; each is tested on its own.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dashrl.protocol import Sample


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


def group_units(
    advantages: list[float], threshold: float | None, max_size: int | None = None
) -> list[tuple[int, ...]]:
    """Whole-group serving: the group's samples that pass the DASH gradient filter each
    (:func:`passes_gradient_filter`), as one unit, cut into slices of at most ``max_size``.

    Why: the learner forwards each shared prefix of a micro-batch once
    (learner/prefix.py), so a micro-batch of one group's completions costs one prompt
    instead of G. Ranking by single samples would split groups: a 1-of-8-correct group's
    correct sample (|A| = 2.5) outranks its seven incorrect ones (|A| = 0.35) and every
    sample of a 4-of-8 group (|A| = 1). The unit's priority is its largest |A|
    (:func:`unit_priority`), so groups are still served by how informative they are.

    Args:
        advantages: the group's advantages, in order.
        threshold: the gradient filter's threshold (None: keep every sample).
        max_size: most samples per unit (a micro-batch's size in sequences; None: no cut).

    Returns:
        Index tuples; filtered samples belong to none.
    """
    keep = [i for i, a in enumerate(advantages) if passes_gradient_filter(a, threshold)]
    step = max_size or max(len(keep), 1)
    return [tuple(keep[i : i + step]) for i in range(0, len(keep), step)]


UNITS = {"sample": singleton_units, "pair": dpo_pair_units}
"""The buffer's grouping for each ``Algorithm.unit`` (protocol/algorithms.py)."""


def unit_grouping(
    unit: str, serve_groups: bool, threshold: float | None, max_size: int | None
) -> Callable[[list[float]], list[tuple[int, ...]]]:
    """How the queue cuts an arriving group into units: whole groups (:func:`group_units`)
    for a sample-unit algorithm when ``queue.serve_groups`` is on, else ``UNITS[unit]``.

    Raises:
        KeyError: an unknown unit."""
    if unit == "sample" and serve_groups:
        return functools.partial(group_units, threshold=threshold, max_size=max_size)
    return UNITS[unit]


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


def expiring_first_pick(
    expiring: list[bool], lengths: list[int], sizes: list[int], size: int
) -> list[int]:
    """Greedy micro-batch under the rate limiter: the units on their last servable version
    first (highest priority first), the rest of the micro-batch by :func:`length_aware_pick`.

    With greedy ranking by |A| and a steady stream of arrivals, the low-|A| units at the
    bottom of a small paced buffer are outranked by every new group and age until the
    staleness rule evicts them (measured on the default job with the limiter on: 23% of
    accepted samples, none stale on arrival). Serving a unit in the version before it
    would be evicted (earliest deadline first) trains on it instead of throwing away a
    sample the actor paid for; the higher-|A| units it displaces are still fresh and go in
    the next micro-batch. A rate limiter is what keeps the expiring share small: without
    one, a large queue would make every micro-batch the oldest samples'.

    Args:
        expiring: per unit of the window, whether it is evicted at the next version advance.
        lengths: longest sequence of each unit (tokens), in priority order.
        sizes: samples in each unit.
        size: sequences wanted.

    Returns:
        Indices into the window in priority order; [] when it holds fewer than ``size``.
    """
    if sum(sizes) < size:
        return []
    picked, n = [], 0
    for i, x in enumerate(expiring):
        if x and n < size:
            picked.append(i)
            n += sizes[i]
    if n >= size:
        return picked
    if not picked:
        return length_aware_pick(lengths, sizes, size)
    rest = [i for i in range(len(sizes)) if not expiring[i]]
    sub = length_aware_pick([lengths[i] for i in rest], [sizes[i] for i in rest], size - n)
    return sorted(picked + [rest[j] for j in sub])


def proportional_pick(
    priorities: list[float], sizes: list[int], size: int, alpha: float, rng: np.random.Generator
) -> list[int]:
    """Prioritized sampling (Schaul et al. 2016, "Prioritized Experience Replay", arXiv
    1511.05952, Eq. 1): units drawn without replacement with P(i) = p_i^alpha / sum_k
    p_k^alpha until they hold ``size`` sequences.

    Args:
        priorities: p_i >= 0 of each unit (a unit with p = 0 is never drawn while any
            other is left).
        sizes: samples in each unit.
        size: sequences wanted.
        alpha: the priority exponent (0: uniform; 1: proportional to p).
        rng: the queue's random generator (seeded by the run seed, so a run is repeatable).

    Returns:
        Indices of the drawn units in the order drawn; [] when the units hold fewer than
        ``size`` sequences.
    """
    if sum(sizes) < size:
        return []
    p = np.power(np.asarray(priorities, dtype=np.float64), alpha)
    p = np.where(p > 0, p, 1e-12)  # zero-priority units come last, not never
    picked, n = [], 0
    # Efraimidis-Spirakis: the k largest u^(1/w) are a weighted draw without replacement
    keys = np.log(rng.random(len(p))) / p
    for i in np.argsort(-keys, kind="stable"):
        if n >= size:
            break
        picked.append(int(i))
        n += sizes[i]
    return picked


def sampling_probabilities(priorities: list[float], alpha: float) -> np.ndarray:
    """P(i) = p_i^alpha / sum_k p_k^alpha over the held units (Schaul et al. 2016, Eq. 1);
    float64 [N]. All-zero priorities give the uniform distribution."""
    p = np.power(np.asarray(priorities, dtype=np.float64), alpha)
    total = p.sum()
    return p / total if total > 0 else np.full(len(p), 1.0 / max(len(p), 1))


def importance_weights(probs: np.ndarray, picked: list[int], beta: float) -> list[float]:
    """Importance weights w_i = (N * P(i))^-beta / max_j w_j of the picked units (Schaul et
    al. 2016, Sec. 3.4): they undo the bias of drawing by priority (beta = 1: fully),
    normalised by the largest weight any held unit could get (the least likely one's) so
    they only scale updates down, in (0, 1].

    Args:
        probs: P over all N held units (:func:`sampling_probabilities`).
        picked: indices of the drawn units.
        beta: the correction exponent in [0, 1] (0: no correction, every weight 1).
    """
    n = len(probs)
    positive = probs[probs > 0]
    if not picked or beta == 0 or positive.size == 0:
        return [1.0] * len(picked)
    w_max = (n * positive.min()) ** -beta
    return [float(min(1.0, (n * max(probs[i], positive.min())) ** -beta / w_max)) for i in picked]


@dataclass(frozen=True)
class RateLimit:
    """Reverb's SampleToInsertRatio (Cassirer et al. 2021, "Reverb: A Framework for
    Experience Replay", arXiv 2102.04736), counted in samples.

    The state is the *serve budget*: sum over held samples of (samples_per_insert - uses).
    An insert adds samples_per_insert per sample, a serve takes one per sample, and a
    sample that leaves unserved or partly served writes off what it had left (Reverb has
    no eviction of unsampled items; without the write-off, stale evictions would stall
    intake for ever). Inserts are allowed while budget <= spi * min_size + error_buffer
    (generation runs ahead of training by at most the error buffer); a micro-batch of n
    is allowed while budget - n >= spi * min_size - error_buffer and at least min_size
    samples are held (training runs ahead of generation by at most the error buffer).

    Attributes:
        samples_per_insert: average serves per inserted sample the limiter aims at.
        error_buffer: allowed deviation, in serves.
        min_size: samples held before any micro-batch is served.
    """

    samples_per_insert: float
    error_buffer: float
    min_size: int = 0

    def can_insert(self, budget: float) -> bool:
        """Whether the queue may take in another group now."""
        return budget <= self.samples_per_insert * self.min_size + self.error_buffer

    def can_sample(self, budget: float, held: int, n: int) -> bool:
        """Whether a micro-batch of ``n`` samples may be served now."""
        floor = self.samples_per_insert * self.min_size - self.error_buffer
        return held >= self.min_size and budget - n >= floor - 1e-9


def replay_priority(advantage: float, active_frac: float) -> float:
    """A served sample's new priority: |A| times the fraction of its completion tokens that
    still get a gradient under the clipped surrogate (learner/loss.py ``active_token_frac``).

    PPO's clip (Schulman et al. 2017, Eq. 7) zeroes the gradient of a token whose ratio
    left the clip range in the advantage's direction; a sample whose tokens are all
    clipped teaches nothing on its next serve, so it sinks to the bottom (and below the
    gradient filter it leaves the queue). NaN counts as 0."""
    p = abs(advantage) * active_frac
    return p if math.isfinite(p) else 0.0
