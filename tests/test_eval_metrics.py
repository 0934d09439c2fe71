"""pass@k, maj@k, avg@k and the confidence interval against values computed by hand."""

from __future__ import annotations

import math
import random

import pytest

from dashrl.launch.eval_metrics import avg_at_k, maj_at_k, mean_ci95, pass_at_k
from dashrl.launch.evaluate import Graded, ProblemResult, markdown_table, summarize


def test_pass_at_k_by_hand() -> None:
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)
    assert pass_at_k(8, 0, 4) == 0.0
    assert pass_at_k(8, 6, 4) == 1.0  # fewer than k wrong samples: always a hit
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_pass_at_k_matches_the_binomial_formula() -> None:
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 40)
        c, k = rng.randint(0, n), rng.randint(1, n)
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-9)


def test_maj_and_avg_at_k_by_hand() -> None:
    assert maj_at_k(["3", "4", "3", ""], [True, False, True, False]) == 1.0
    assert maj_at_k(["4", "4", "3", "3"], [False, False, True, True]) == 0.0  # tie: first seen
    assert maj_at_k(["", ""], [False, False]) == 0.0
    assert maj_at_k(["", "7"], [False, True]) == 1.0  # empty answers do not vote
    assert avg_at_k([True, False, False, True]) == 0.5
    with pytest.raises(ValueError):
        maj_at_k(["1"], [True, False])


def test_mean_ci95_by_hand() -> None:
    m, ci = mean_ci95([0.0, 1.0])
    assert m == 0.5 and ci == pytest.approx(1.96 * math.sqrt(0.5 / 2))
    m, ci = mean_ci95([1.0, 1.0, 1.0])
    assert m == 1.0 and ci == 0.0


def g(ans: str, ok: bool) -> Graded:
    return Graded(f"... {ans}", ans, float(ok), 5, "stop")


def test_summarize_overall_and_per_group() -> None:
    results = [
        ProblemResult("a", "1", {"level": "1"}, [g("1", True), g("2", False)], g("1", True)),
        ProblemResult("b", "5", {"level": "2"}, [g("4", False), g("4", False)], g("5", True)),
        ProblemResult("c", "7", {"level": "2"}, [g("7", True), g("7", True)], g("3", False)),
    ]
    s = summarize(results)
    assert s["all"]["n"] == 3 and s["level=2"]["n"] == 2
    assert s["all"]["avg@2"]["mean"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert s["all"]["pass@1"]["mean"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert s["all"]["pass@2"]["mean"] == pytest.approx((1 + 0 + 1) / 3)
    assert s["all"]["maj@2"]["mean"] == pytest.approx((1 + 0 + 1) / 3)  # "1" seen first in a
    assert s["all"]["greedy"]["mean"] == pytest.approx(2 / 3)
    assert s["level=2"]["greedy"]["mean"] == pytest.approx(0.5)
    table = markdown_table("demo", s)
    assert "| all | 3 |" in table and "| level=1 | 1 |" in table and "pass@2" in table


def test_maj_at_j_over_disjoint_blocks_by_hand() -> None:
    # 4 samples: blocks of 2 are ("3", "4") and ("4", "4"); the answer is 3
    samples = [g("3", True), g("4", False), g("4", False), g("4", False)]
    s = summarize([ProblemResult("a", "3", {}, samples, None)])["all"]
    assert s["maj@1"]["mean"] == pytest.approx(1 / 4)  # one sample at a time: 1 of 4 right
    assert s["maj@2"]["mean"] == pytest.approx((1 + 0) / 2)  # "3" wins the first block's tie
    assert s["maj@4"]["mean"] == 0.0  # "4" holds the majority of all four
    assert "maj@3" not in s  # 3 does not divide 4
