"""The experiment runner's write-up: NAME.json (every run's record), NAME.md (a table of
mean ± 95% interval over seeds per configuration) and NAME.png (the curves).

The interval is Student's t over seeds (mean ± t_{0.975, n-1} s / sqrt(n)): with two seeds
t is 12.7, so only effects larger than the seed-to-seed spread by an order of magnitude
show as separated. That is the honest width for two runs; more seeds narrow it. With one
seed no interval is given.

With ``comparisons`` it adds a table of paired differences between configurations
(launch/sweep_pairs.py). With ``targets`` the report adds seconds to each held-out reward
level per configuration and the speed-up over each baseline: per seed, baseline seconds /
configuration seconds, summarised as the geometric mean with the t-interval taken on the
log ratios (a ratio's interval is not symmetric). And "where the time went": start-up,
learner compute, the learner's waits for data and for the weight broadcast, and the
actors' busy share.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from dashrl.launch.sweep_pairs import comparison_lines, eval_at, last_logged, t_interval


def runs_by_config(state: dict) -> dict[str, list[dict]]:
    """The recorded runs grouped by configuration, in recording order."""
    out: dict[str, list[dict]] = {}
    for run in state["runs"].values():
        out.setdefault(run["config"], []).append(run)
    return out


def machines_of(state: dict) -> list[str]:
    """The machines the recorded runs were made on (``-`` for a run that did not say)."""
    return sorted({r.get("machine") or "-" for r in state["runs"].values()})


def row_groups(state: dict) -> list[tuple[str, str, list[dict]]]:
    """(configuration, machine, runs) per row of a timing table: one row per configuration,
    split by machine when the runs were made on several, since seconds measured on two
    CPUs do not pool into one mean."""
    out: dict[tuple[str, str], list[dict]] = {}
    for c, runs in runs_by_config(state).items():
        for r in runs:
            out.setdefault((c, r.get("machine") or "-"), []).append(r)
    return [(c, m, runs) for (c, m), runs in out.items()]


def time_to_target(points: list[tuple[float, float]], target: float) -> float | None:
    """Seconds at which a curve of (seconds, reward) points, in time order, first reaches
    ``target``: linear between the last point below and the first at or above it; None
    if it never does. A curve that starts at or above it reaches it at its first point."""
    prev = None
    for t, r in points:
        if r >= target:
            if prev is None:
                return t
            (t0, r0) = prev
            return t0 + (t - t0) * (target - r0) / (r - r0)
        prev = (t, r)
    return None


def ratio_interval(pairs: list[tuple[float, float]]) -> tuple[float, float, float]:
    """(geometric mean, low, high) of a / b over seed-paired (a, b) seconds: the 95%
    t-interval of log(a / b), exponentiated; low = high = NaN for one pair.

    Raises:
        ValueError: no pairs, or a non-positive time.
    """
    if not pairs or any(a <= 0 or b <= 0 for a, b in pairs):
        raise ValueError(f"need positive seconds, got {pairs}")
    m, h = t_interval([math.log(a / b) for a, b in pairs])
    return math.exp(m), math.exp(m - h), math.exp(m + h)


def curve_points(state: dict, run: dict) -> list[tuple[float, float]]:
    """A run's held-out reward against the report's clock, the base model at 0 s."""
    clock = "launch_s" if state.get("clock") == "launch" else "train_s"
    pts = [(e[clock], e["reward_mean"]) for e in run["evals"]
           if "reward_mean" in e and clock in e]  # fmt: skip
    if state.get("base"):
        pts = [(0.0, state["base"]["reward_mean"]), *pts]
    return pts


def target_lines(state: dict) -> list[str]:
    """The time-to-target table and the speed-ups over the baselines (markdown lines)."""
    targets = state.get("targets") or []
    if not targets:
        return []
    by_config = runs_by_config(state)
    times = {c: {r["seed"]: [time_to_target(curve_points(state, r), t) for t in targets]
                 for r in runs} for c, runs in by_config.items()}  # fmt: skip
    machine = {(c, r["seed"]): r.get("machine") for c, runs in by_config.items() for r in runs}
    clock = "seconds since launch" if state.get("clock") == "launch" else "training seconds"
    head = " | ".join(f"to {t:g}" for t in targets)
    split = len(machines_of(state)) > 1
    mcol, mrule = ("machine | ", "---|") if split else ("", "")
    lines = [f"## Time to held-out reward ({clock}; mean ± 95% t-interval over seeds)", "",
             f"| config | {mcol}seeds | {head} |",
             f"|---|{mrule}---|" + "---|" * len(targets)]  # fmt: skip
    for c, m, runs in row_groups(state):
        per_seed = {r["seed"]: times[c][r["seed"]] for r in runs}
        cells = []
        for i in range(len(targets)):
            got = [ts[i] for ts in per_seed.values() if ts[i] is not None]
            if len(got) < len(per_seed):
                cells.append(f"{len(got)}/{len(per_seed)} seeds reached it")
            else:
                cells.append(_cell(t_interval(got), pct=False))
        mcell = f"{m} | " if split else ""
        lines.append(f"| {c} | {mcell}{len(per_seed)} | " + " | ".join(cells) + " |")
    if split:
        lines += ["", f"These runs were made on {len(machines_of(state))} machines: each row "
                  "above pools only one machine's runs, and a speed-up pairs two runs of one "
                  "seed only when they ran on the same machine."]  # fmt: skip
    for b in state.get("baselines") or []:
        if b not in times:
            continue
        lines += ["", f"Speed-up over `{b}` (its seconds / the configuration's, paired by "
                  "seed; geometric mean [95% interval]):", "",
                  f"| config | {head} |", "|---|" + "---|" * len(targets)]  # fmt: skip
        for c, per_seed in times.items():
            if c == b:
                continue
            cells = []
            for i in range(len(targets)):
                pairs = [
                    (times[b][s][i], ts[i])
                    for s, ts in per_seed.items()
                    if s in times[b]
                    and ts[i] is not None
                    and times[b][s][i] is not None
                    and machine[(b, s)] == machine[(c, s)]  # a ratio across CPUs means little
                ]
                if not pairs:
                    cells.append("-")
                    continue
                g, lo, hi = ratio_interval(pairs)
                ci = "" if lo != lo else f" [{lo:.2f}, {hi:.2f}]"
                cells.append(f"{g:.2f}x{ci} ({len(pairs)} seeds)")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return ["", *lines]


def _mean_over(runs: list[dict], f: Callable[[dict], float | None]) -> float:
    vals = [v for v in (f(r) for r in runs) if v is not None]
    return sum(vals) / len(vals) if vals else float("nan")


def _total(run: dict, key: str) -> float:
    return sum(p.get(key, 0.0) for p in run["curve"])


def time_lines(state: dict) -> list[str]:
    """Where each configuration's time went, from its runs' own metrics (mean over seeds)."""
    split = len(machines_of(state)) > 1
    mcol, mrule = ("machine | ", "---|") if split else ("", "")
    lines = [
        "",
        "## Where the time went (seconds per run, mean over seeds)",
        "",
        f"| config | {mcol}start-up | learner compute | waiting for data | weight broadcast | "
        "actor busy | evaluation (after the run) |",
        f"|---|{mrule}---|---|---|---|---|---|",
    ]
    for c, m, runs in row_groups(state):
        wait = _mean_over(runs, lambda r: _total(r, "learner/queue_wait_s"))
        bcast = _mean_over(runs, lambda r: _total(r, "learner/broadcast_s"))
        compute = _mean_over(runs, lambda r: _total(r, "learner/step_s")) - wait - bcast
        busy = _mean_over(runs, lambda r: last_logged(r, "actor/busy_frac"))
        evals = _mean_over(runs, lambda r: sum(e.get("eval_s", 0.0) for e in r["evals"]))
        start = _mean_over(runs, lambda r: r.get("startup_s"))
        busy_cell = "-" if busy != busy else f"{100 * busy:.0f}%"  # no actors (TRL): -
        mcell = f"{m} | " if split else ""
        lines.append(f"| {c} | {mcell}{start:.0f} | {compute:.0f} | {wait:.0f} | {bcast:.0f} | "
                     f"{busy_cell} | {evals:.0f} |")  # fmt: skip
    return lines


def run_lines(state: dict) -> list[str]:
    """One line per recorded run: its steps, the commit its code was at, when it finished
    (UTC) and the machine it ran on; ``-`` for what a run recorded before the runner kept
    these lacks."""
    lines = ["", "## Runs", "", "| config | seed | steps | commit | finished (UTC) | machine |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for c, runs in runs_by_config(state).items():
        for r in sorted(runs, key=lambda r: r["seed"]):
            lines.append(f"| {c} | {r['seed']} | {r['steps']} | {r.get('commit', '-')} | "
                         f"{r.get('finished', '-')} | {r.get('machine', '-')} |")  # fmt: skip
    return lines + superseded_lines(state)


def superseded_lines(state: dict) -> list[str]:
    """A note counting the runs moved to ``superseded`` (empty when there are none)."""
    old = state.get("superseded") or {}
    if not old:
        return []
    return ["", f"{sum(map(len, old.values()))} earlier run(s) made under a config or "
            "evaluation plan that has changed since are kept in the JSON under "
            "`superseded` and left out of every table.", ""]  # fmt: skip


NOT_METRICS = ("k", "eval_s", "prompts", "train_s", "launch_s", "step")
"""Fields of an evaluation record that are not held-out metrics (times, sizes)."""


def summary_rows(state: dict) -> list[dict]:
    """One row per configuration (per configuration and machine when the runs were made on
    several: a fixed wall-clock budget buys a different number of steps on each CPU): mean
    and interval over its seeds of the final checkpoint's metrics, the first evaluated
    fraction's reward, and the last logged entropy and completion length."""
    labels = [f"{f:g}" for f in state["eval"]["at"]]
    rows = []
    for name, machine, runs in row_groups(state):
        row: dict = {"config": name, "machine": machine, "seeds": len(runs)}
        final = [eval_at(r, labels[-1]) for r in runs]
        # the union over the seeds' records: a run recorded before a metric existed must
        # neither hide it nor be averaged in silently (``partial`` says how many seeds have it)
        full = sorted(final, key=len, reverse=True)  # the newest record's column order
        metrics = dict.fromkeys(m for f in full for m in f if not m.endswith("_ci95") and
                                isinstance(f[m], float) and m not in NOT_METRICS)  # fmt: skip
        for m in metrics:
            vals = [f[m] for f in final if m in f]
            row[m] = t_interval(vals)
            if len(vals) < len(runs):
                row.setdefault("partial", {})[m] = len(vals)
        if len(labels) > 1:
            early = [eval_at(r, labels[0]).get("reward_mean") for r in runs]
            if all(v is not None for v in early):
                row[f"reward_at_{labels[0]}"] = t_interval(early)
        for key, col in (("learner/entropy", "entropy"), ("actor/completion_len", "train_len")):
            last = [last_logged(r, key) for r in runs]
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
        return "\n".join([*lines, "No run recorded yet.", *superseded_lines(state), ""])
    # every row's columns, in the order of the row that has the most (a config recorded
    # before a metric existed must not hide it, nor push it to the end)
    ordered = sorted(rows, key=len, reverse=True)
    not_cols = ("config", "machine", "seeds", "partial")
    cols = list(dict.fromkeys(c for r in ordered for c in r if c not in not_cols))
    split = len(machines_of(state)) > 1
    mcol, mrule = ("machine | ", "---|") if split else ("", "")
    lines += [f"| config | {mcol}seeds | " + " | ".join(cols) + " |",
              f"|---|{mrule}---|" + "---|" * len(cols)]  # fmt: skip
    for r in rows:
        cells = []
        for c in cols:
            pct = not (c.startswith(("completion_len", "train_len", "steps", "entropy")))
            part = r.get("partial", {}).get(c)
            cells.append(
                "-"
                if c not in r
                else _cell(r[c], pct) + (f" ({part} of {r['seeds']} seeds)" if part else "")
            )
        mcell = f"{r['machine']} | " if split else ""
        lines.append(f"| {r['config']} | {mcell}{r['seeds']} | " + " | ".join(cells) + " |")
    lines += comparison_lines(state)
    lines += target_lines(state)
    if state.get("targets") or state.get("clock") == "launch":
        lines += time_lines(state)
    lines += run_lines(state)
    return "\n".join(lines) + "\n"


def plot(state: dict, path: Path) -> None:
    """Held-out reward at the evaluated times, training reward, entropy and completion
    length against training seconds; one line per run, one colour per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    clock = "launch_s" if state.get("clock") == "launch" else "train_s"
    names = sorted({r["config"] for r in state["runs"].values()})
    colours = {n: f"C{i % 10}" for i, n in enumerate(names)}
    labelled: set[str] = set()
    for run in state["runs"].values():
        c = colours[run["config"]]
        lab = None if run["config"] in labelled else run["config"]  # one legend entry each
        labelled.add(run["config"])
        pts = curve_points(state, run)
        if pts:
            axes[0].plot(*zip(*pts, strict=True), marker="o", color=c, label=lab)
        for ax, key in zip(axes[1:], ("actor/reward_mean", "learner/entropy",
                                       "actor/completion_len"), strict=True):  # fmt: skip
            xy = [(p[clock], p[key]) for p in run["curve"] if key in p and clock in p]
            if xy:
                ax.plot(*zip(*xy, strict=True), color=c, alpha=0.7, linewidth=1)
    _mean_bands(state, axes[0], colours)
    titles = ("held-out reward", "training reward", "entropy", "completion length (tokens)")
    for ax, t in zip(axes, titles, strict=True):
        ax.set_title(t)
        ax.set_xlabel("seconds since launch" if clock == "launch_s" else "training seconds")
    axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _mean_bands(state: dict, ax, colours: dict[str, str]) -> None:
    """Per configuration with several seeds (per machine, when there are several: dashed for
    the machine with the most runs, dotted for the others): the mean held-out curve and the
    band between the seeds' lowest and highest reward at each evaluated fraction."""
    machines = machines_of(state)
    count = {m: sum((r.get("machine") or "-") == m for r in state["runs"].values())
             for m in machines}  # fmt: skip
    main = max(machines, key=lambda m: count[m]) if machines else "-"
    for c, m, runs in row_groups(state):
        curves = [curve_points(state, r) for r in runs]
        n = min(len(pts) for pts in curves)
        if len(runs) < 2 or n < 2:
            continue
        t = [sum(pts[i][0] for pts in curves) / len(curves) for i in range(n)]
        ys = [[pts[i][1] for pts in curves] for i in range(n)]
        style = "--" if m == main else ":"
        ax.plot(t, [sum(y) / len(y) for y in ys], color=colours[c], linestyle=style, linewidth=2)
        ax.fill_between(t, [min(y) for y in ys], [max(y) for y in ys], color=colours[c],
                        alpha=0.15)  # fmt: skip


def write_report(state: dict, out: Path) -> None:
    """Write ``out`` (.json) and its .md and .png siblings."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(state, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(state))
    if state["runs"]:
        plot(state, out.with_suffix(".png"))
