"""The run's plot: reward and staleness against wall-clock time, from metrics.jsonl."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_run(
    rows: list[dict[str, Any]], out: Path, before: float | None = None, after: float | None = None
) -> Path | None:
    """Write a PNG with reward (actor-side and learner-side) and version lag over time.

    Args:
        rows: metrics rows (one per learner step) with ``wall_s``.
        out: PNG path.
        before, after: held-out mean reward before/after training, drawn as markers.

    Returns:
        ``out``, or None when there are no rows to plot.
    """
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["wall_s"] / 60 for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for key, label in (
        ("actor/reward_mean", "reward of generated rollouts"),
        ("learner/reward_mean", "reward of trained samples"),
    ):
        pts = [(x, r[key]) for x, r in zip(t, rows, strict=True) if r.get(key) is not None]
        if pts:
            ax1.plot(*zip(*pts, strict=True), label=label, marker=".", linewidth=1)
    # at the time of the weights it evaluated (a background evaluation lands rows later)
    pts = [(r.get("eval/wall_s", r["wall_s"]) / 60, r["eval/heldout_reward"]) for r in rows
           if r.get("eval/heldout_reward") is not None]  # fmt: skip
    if pts:
        ax1.scatter(
            *zip(*pts, strict=True), color="green", marker="D", label="held-out during training"
        )
    if before is not None:
        ax1.scatter([0], [before], color="black", marker="s", label=f"held-out before {before:.3f}")
    if after is not None:
        ax1.scatter(
            [t[-1]], [after], color="red", marker="*", s=120, label=f"held-out after {after:.3f}"
        )
    ax1.set_ylabel("mean reward")
    ax1.legend(loc="lower right", fontsize=8)
    ax1.grid(alpha=0.3)
    for key, label in (
        ("learner/staleness_mean", "mean lag"),
        ("learner/staleness_max", "max lag"),
    ):
        pts = [(x, r[key]) for x, r in zip(t, rows, strict=True) if r.get(key) is not None]
        if pts:
            ax2.plot(*zip(*pts, strict=True), label=label, linewidth=1)
    ax2.set_ylabel("staleness (versions)")
    ax2.set_xlabel("wall-clock time (min)")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
