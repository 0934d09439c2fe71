"""Sample-based accuracy metrics as the seed papers report them, with 95% confidence intervals.

Each function takes the per-sample results of one problem; the benchmark figure is the
mean over problems, with a normal-approximation 95% interval over problems.
"""

from __future__ import annotations

import math
from collections import Counter


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. 2021 ("Evaluating LLMs trained on code", Eq. 1).

    pass@k = 1 - C(n - c, k) / C(n, k): the probability that at least one of k samples
    drawn without replacement from the n generated (c of them correct) is correct.
    Computed as a product to avoid huge binomials.

    Raises:
        ValueError: unless 0 <= c <= n and 1 <= k <= n.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def avg_at_k(correct: list[bool]) -> float:
    """avg@k (Minimal-RL's "average@16"): mean accuracy over the k samples of a problem."""
    if not correct:
        raise ValueError("avg@k of no samples")
    return sum(correct) / len(correct)


def maj_at_k(answers: list[str], correct: list[bool]) -> float:
    """maj@k (Havrilla et al.'s maj@1 generalised): 1 if the most frequent extracted answer
    among the k samples is correct, else 0. Empty answers do not vote; ties go to the
    answer seen first; no vote at all scores 0.

    Raises:
        ValueError: ``answers`` and ``correct`` differ in length.
    """
    if len(answers) != len(correct):
        raise ValueError("answers and correct must have the same length")
    votes = Counter(a for a in answers if a)
    if not votes:
        return 0.0
    top = max(votes.values())
    winner = next(a for a in answers if a and votes[a] == top)  # first-seen among the tied
    return float(next(c for a, c in zip(answers, correct, strict=True) if a == winner))


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% interval (1.96 * s / sqrt(n))."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, 1.96 * math.sqrt(var / n)
