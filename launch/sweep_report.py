"""The experiment runner's write-up: NAME.json (every run's record), NAME.md (a table of
mean ± 95% interval over seeds per configuration) and NAME.png (the curves).

The interval is Student's t over seeds (mean ± t_{0.975, n-1} s / sqrt(n)): with two seeds
t is 12.7, so only effects larger than the seed-to-seed spread by an order of magnitude
show as separated. That is the honest width for two runs; more seeds narrow it. With one
seed no interval is given.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

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


def _eval_at(run: dict, label: str) -> dict:
    return next((e for e in run["evals"] if e["label"] == label), {})


def summary_rows(state: dict) -> list[dict]:
    """One row per configuration: mean and interval over its seeds of the final
    checkpoint's metrics, the first evaluated fraction's reward, and the last logged
    entropy and completion length."""
    by_config: dict[str, list[dict]] = {}
    for run in state["runs"].values():
        by_config.setdefault(run["config"], []).append(run)
    labels = [f"{f:g}" for f in state["eval"]["at"]]
    rows = []
    for name, runs in by_config.items():
        row: dict = {"config": name, "seeds": len(runs)}
        final = [_eval_at(r, labels[-1]) for r in runs]
        metrics = [m for m in final[0] if not m.endswith("_ci95") and isinstance(final[0][m],
                   float) and m not in ("k", "eval_s", "prompts")]  # fmt: skip
        for m in metrics:
            vals = [f[m] for f in final if m in f]
            if vals:
                row[m] = t_interval(vals)
        if len(labels) > 1:
            early = [_eval_at(r, labels[0]).get("reward_mean") for r in runs]
            if all(v is not None for v in early):
                row[f"reward_at_{labels[0]}"] = t_interval(early)
        for key, col in (("learner/entropy", "entropy"), ("actor/completion_len", "train_len")):
            last = [next((c[key] for c in reversed(r["curve"]) if key in c), None) for r in runs]
            if all(v is not None for v in last):
                row[col] = t_interval(last)
        row["steps"] = t_interval([float(r["steps"]) for r in runs])
        rows.append(row)
    return rows


def _cell(v: tuple[float, float], pct: bool) -> str:
    m, h = v
    scale = 100 if pct else 1
    fmt = "{:.1f}" if pct or abs(m) >= 10 else "{:.3f}"
    return fmt.format(m * scale) + ("" if h != h else " ± " + fmt.format(h * scale))


def markdown(state: dict) -> str:
    """The results table (percent for rates, tokens for lengths)."""
    rows = summary_rows(state)
    base = state.get("base") or {}
    lines = [f"# Experiment `{state['experiment']}`", "", state["description"], "",
             f"Budget {state['budget_s']:.0f} training seconds per run; held-out: "
             f"{state['eval']['prompts']} prompts, k = {state['eval']['k']} at "
             f"{', '.join(f'{f:g}' for f in state['eval']['at'][:-1]) or '-'} of the budget, "
             f"k = {state['eval']['final_k']} at the end. Mean ± 95% t-interval over seeds.",
             ""]  # fmt: skip
    if base:
        lines += [f"Base model: reward {100 * base['reward_mean']:.1f}%, "
                  f"pass@1 {100 * base.get('pass@1', float('nan')):.1f}%, completion length "
                  f"{base['completion_len']:.1f} tokens.", ""]  # fmt: skip
    if not rows:
        return "\n".join([*lines, "No run recorded yet.", ""])
    cols = [c for c in rows[0] if c not in ("config", "seeds")]
    lines += ["| config | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            pct = not (c.startswith(("completion_len", "train_len", "steps", "entropy")))
            cells.append(_cell(r[c], pct) if c in r else "-")
        lines.append(f"| {r['config']} | {r['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(state: dict, path: Path) -> None:
    """Held-out reward at the evaluated times, training reward, entropy and completion
    length against training seconds; one line per run, one colour per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    names = sorted({r["config"] for r in state["runs"].values()})
    colours = {n: f"C{i % 10}" for i, n in enumerate(names)}
    labelled: set[str] = set()
    for run in state["runs"].values():
        c = colours[run["config"]]
        lab = None if run["config"] in labelled else run["config"]  # one legend entry each
        labelled.add(run["config"])
        pts = [(e["train_s"], e["reward_mean"]) for e in run["evals"] if "reward_mean" in e]
        if state.get("base"):
            pts = [(0.0, state["base"]["reward_mean"]), *pts]
        if pts:
            axes[0].plot(*zip(*pts, strict=True), marker="o", color=c, label=lab)
        for ax, key in zip(axes[1:], ("actor/reward_mean", "learner/entropy",
                                       "actor/completion_len"), strict=True):  # fmt: skip
            xy = [(p["train_s"], p[key]) for p in run["curve"] if key in p]
            if xy:
                ax.plot(*zip(*xy, strict=True), color=c, alpha=0.7, linewidth=1)
    titles = ("held-out reward", "training reward", "entropy", "completion length (tokens)")
    for ax, t in zip(axes, titles, strict=True):
        ax.set_title(t)
        ax.set_xlabel("training seconds")
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_report(state: dict, out: Path) -> None:
    """Write ``out`` (.json) and its .md and .png siblings."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(state, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(state))
    if state["runs"]:
        plot(state, out.with_suffix(".png"))
