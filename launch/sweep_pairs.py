"""Intervals over seeds, and paired differences between an experiment's configurations.

A claim such as "RAFT converges faster than GRPO" is a statement about a - b, not about
a and b separately. Two configurations run at one seed share that seed's task sample and
data order and, when the runner runs a seed's configurations in one sitting, the machine
and its speed (a wall-clock budget buys a different number of learner steps on each
host), so the per-seed difference cancels what the seeds have in common. The report's
paired table (an experiment's ``comparisons``) gives, per pair, the mean of the per-seed
differences with its Student's t interval. A seed whose two runs were made on different
machines is left out of that pair: a difference across CPUs mixes the algorithm with
the hardware.
"""

from __future__ import annotations

import math

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip
"""Two-sided 95% critical values of Student's t by degrees of freedom (1.96 beyond 30)."""


def t_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval) over seeds; half-width NaN for one value.

    Raises:
        ValueError: no values.
    """
    if not values:
        raise ValueError("no values")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    df = n - 1
    t = T975.get(df) or next((T975[d] for d in sorted(T975) if d >= df), 1.96)
    return mean, t * sd / math.sqrt(n)


def eval_at(run: dict, label: str) -> dict:
    """A run's evaluation record at budget fraction ``label`` ("0.25", "1"); {} if none."""
    return next((e for e in run["evals"] if e["label"] == label), {})


def last_logged(run: dict, key: str) -> float | None:
    """The last value of metric ``key`` in a run's curve; None if it never logged it."""
    return next((c[key] for c in reversed(run["curve"]) if key in c), None)


def run_value(run: dict, column: str, labels: list[str]) -> float | None:
    """One run's value of a paired-table column: ``entropy`` (the last logged
    learner/entropy), ``steps``, ``reward_early`` (held-out reward_mean at the first
    evaluated fraction ``labels[0]``) or a metric of the final evaluation (``labels[-1]``);
    None when the run did not record it."""
    if column == "entropy":
        return last_logged(run, "learner/entropy")
    if column == "steps":
        return float(run["steps"])
    if column == "reward_early":
        return eval_at(run, labels[0]).get("reward_mean")
    return eval_at(run, labels[-1]).get(column)


def _fmt(values: list[float], prec: int) -> str:
    m, h = t_interval(values)
    return f"{m:+.{prec}f}" + ("" if h != h else f" ± {h:.{prec}f}")


def comparison_lines(state: dict) -> list[str]:
    """The paired-differences section for ``state["comparisons"]`` (pairs [a, b]): per
    pair, the seeds where both ran on one machine, a - b per seed in the first column, and
    mean ± 95% t-interval of the per-seed differences for the final avg@k, maj@k and pass@k
    (percentage points), the reward at the first evaluated fraction, the last entropy and
    the learner steps. Empty without comparisons."""
    pairs = state.get("comparisons") or []
    if not pairs:
        return []
    labels = [f"{f:g}" for f in state["eval"]["at"]]
    k = state["eval"]["final_k"]
    cols = [f"avg@{k}", f"maj@{k}", f"pass@{k}"] + (["reward_early"] if len(labels) > 1 else [])
    cols += ["entropy", "steps"]
    heads = [f"reward at {labels[0]}" if c == "reward_early" else c for c in cols]
    by_seed = {(r["config"], r["seed"]): r for r in state["runs"].values()}
    lines = ["", "## Paired differences", "",
             "a - b per seed (runs of one seed on one machine only), then mean ± 95% "
             "t-interval over those seeds; rates in percentage points.", "",
             f"| a - b | seeds | {cols[0]} per seed | " + " | ".join(heads) + " |",
             "|---|---|---|" + "---|" * len(cols)]  # fmt: skip
    for a, b in pairs:
        seeds = sorted(s for (c, s) in by_seed if c == a and (b, s) in by_seed)
        seeds = [s for s in seeds if by_seed[a, s].get("machine") == by_seed[b, s].get("machine")]
        cells, first = [], "-"
        for col in cols:
            scale, prec = (1, 3) if col == "entropy" else (1, 0) if col == "steps" else (100, 1)
            d = []
            for s in seeds:
                va, vb = (run_value(by_seed[x, s], col, labels) for x in (a, b))
                if va is not None and vb is not None:
                    d.append(scale * (va - vb))
            if col == cols[0] and d:
                first = " / ".join(f"{x:+.1f}" for x in d)
            part = f" ({len(d)} of {len(seeds)} seeds)" if d and len(d) < len(seeds) else ""
            cells.append(_fmt(d, prec) + part if d else "-")
        lines.append(f"| {a} - {b} | {len(seeds)} | {first} | " + " | ".join(cells) + " |")
    return lines
