"""The replay queue on the default job: rate limiter off vs on, and reuse K = 1, 2, 4 under
greedy sampling and K = 2 under proportional sampling with IS weights (issue 16).

Each (config, seed) is one ordinary run of ``launch/start.py`` with the same wall-clock
budget. A run already recorded in the committed ``bench/replay_<experiment>.json`` (or whose
``summary.json`` exists under ``--runs``) is skipped, so the script resumes where it stopped,
on this machine or a new one (runs take ~18 minutes each here: run it in the background,
alone on the machine, from a checkout nobody edits meanwhile: each role imports the code
when it starts, e.g. ``git worktree add ../bench HEAD``). Each run records its machine.
Per run it records: the share of accepted samples evicted as stale, what was generated and
trained on, the held-out reward before / at the in-run evaluations / after (the same
evaluator for every run), and the training reward against wall time. Writes
``bench/replay_<experiment>.json`` and ``.md`` and a PNG of the curves.

    python bench/replay.py --experiment limiter          # limiter off, on
    python bench/replay.py --experiment pacing --seeds 0 1   # the limiter's slack, today's code
    python bench/replay.py --experiment reuse --seeds 0 1 --budget-s 600   # K = 1, 2, 4, ...
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from common import header  # noqa: E402  (bench/ scripts are run as files)

SPI = ["--queue.samples-per-insert", "1.0"]
LIMITER = [*SPI, "--queue.rate-error-buffer", "32"]
"""The limiter as these runs were made: two steps of slack (the default until 2026-12-04)."""
UNCAPPED = ["--learner.steps", "100000"]
CONFIGS: dict[str, list[str] | None] = {
    # None: kept as a record, never re-run (the code that made it is gone). "_v0": made
    # before issue 17, by the float32 per-sample learner with per-sample queue units and
    # the in-run evaluation stopping the learner (up to commit 3afc508); the first
    # limiter design (permits granted whenever the budget allowed, without counting
    # batches on their way; error buffer one step) ran on commit 3528aa2
    "limiter_off_v0": None, "limiter_on_v1_v0": None, "limiter_on_v2_v0": None,
    "greedy_k2_v0": None, "greedy_k4_v0": None,
    # "_v1": the limiter before expiring-first serving (commit 3be50d9 and earlier)
    "limiter_on_v1": None,
    "limiter_off": [],  # the default job
    "limiter_on_greedy": [*LIMITER, "--queue.expiring-first", "False"],  # plain greedy
    "limiter_on": LIMITER,  # expiring-first serving is on with the limiter
    "limiter_on_eb16": [*SPI, "--queue.rate-error-buffer", "16"],  # one step of slack
    # reuse: the wall-clock budget, not the default job's 60 steps, ends each run (the
    # learner got 3x faster in issue 17 and finishes 60 steps in ~5 minutes)
    "greedy_k1": [*UNCAPPED],
    "greedy_k2": [*UNCAPPED, "--queue.max-uses", "2"],
    "greedy_k4": [*UNCAPPED, "--queue.max-uses", "4"],
    "proportional_k2": [*UNCAPPED, "--queue.max-uses", "2", "--queue.sampling", "proportional",
                        "--queue.is-beta", "1.0"],
    # the learner's shared-prefix trie and its own core (commit a25c197 and the next): the
    # default job after them, and without the core of its own; against limiter_off (before)
    "default_trie_cores": [],
    "default_trie": ["--learner.own-cores", "False"],
    "default_trie_cores_limiter": LIMITER,
    # the limiter's error buffer on the code after issue 17 (one step, 16, is the default
    # since this experiment)
    "default_trie_cores_eb16": [*SPI, "--queue.rate-error-buffer", "16"],
    "default_trie_cores_eb24": [*SPI, "--queue.rate-error-buffer", "24"],
    # what in issue 17's new default path changes learning (ablations of the default job)
    "tis_2": ["--learner.tis-cap", "2.0"],
    "sample_units": ["--queue.serve-groups", "False"],
    "float32": ["--learner.dtype", "float32", "--actor.vllm.dtype", "float32"],
}  # fmt: skip
"""Config name -> flags on top of the default job."""
EXPERIMENTS: dict[str, list[str]] = {
    "limiter": [
        "limiter_off_v0",
        "limiter_on_v1_v0",
        "limiter_on_v2_v0",
        "limiter_off",
        "limiter_on_v1",
        "limiter_on_greedy",
        "limiter_on",
        "limiter_on_eb16",
    ],
    "ablation": ["limiter_off_v0", "limiter_off", "tis_2", "sample_units", "float32"],
    "throughput": [
        "limiter_off",
        "limiter_on",
        "default_trie",
        "default_trie_cores",
        "default_trie_cores_limiter",
    ],
    # issue 16's criterion on the code after issue 17: stale < 10% of accepted with the
    # limiter, and held-out reward rising at least as fast as with it off
    "pacing": [
        "default_trie_cores",
        "default_trie_cores_limiter",
        "default_trie_cores_eb24",
        "default_trie_cores_eb16",
    ],
    "reuse": [
        "limiter_off_v0",
        "greedy_k2_v0",
        "greedy_k4_v0",
        "greedy_k1",
        "greedy_k2",
        "greedy_k4",
        "proportional_k2",
    ],
}
"""Experiment -> its configs (a run shared by two experiments is made once)."""


def run_one(out: Path, flags: list[str] | None, seed: int, budget_s: float) -> dict | None:
    """One default-job run into ``out`` (skipped if it finished before); its figures, or
    None for a recorded-only config that has no run here."""
    if flags is None:
        return figures(out) if (out / "summary.json").exists() else None
    if not (out / "summary.json").exists():
        cmd = [sys.executable, str(REPO / "launch" / "start.py"), "--run-dir", str(out),
               "--seed", str(seed), "--time-limit-s", str(budget_s), *flags]  # fmt: skip
        (out.parent / f"{out.name}.commit").write_text(head_commit())
        with (out.parent / f"{out.name}.out").open("w") as log:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
    if not (out / "summary.json").exists() or not (out / "metrics.jsonl").exists() or \
            json.loads((out / "summary.json").read_text()).get("failed_role"):  # fmt: skip
        # the job died: say so, keep the others going (delete the run dir to re-run it)
        print(f"{out}: the job failed or left no metrics (see {out.name}.out)", file=sys.stderr)
        return None
    return figures(out)


def head_commit() -> str:
    """This checkout's HEAD (short), the code a run started here runs."""
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, check=False)  # fmt: skip
    return out.stdout.strip() or "unknown"


def commit_of(run: Path) -> str:
    """The commit of the code that made ``run`` (written beside it when it started)."""
    path = run.parent / f"{run.name}.commit"
    return path.read_text().strip() if path.exists() else "unknown"


def figures(run: Path) -> dict:
    """What one finished run measured (from its summary.json and metrics.jsonl)."""
    summary = json.loads((run / "summary.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    accepted = last.get("queue/accepted", 0.0)
    curve = [(0.0, summary.get("heldout_reward_before"))]
    curve += [(r.get("eval/wall_s", r["wall_s"]), r["eval/heldout_reward"])
              for r in rows if "eval/heldout_reward" in r]  # fmt: skip
    curve.append((summary.get("train_wall_s"), summary.get("heldout_reward_after")))
    return {
        "steps": last["step"],
        "train_wall_s": summary.get("train_wall_s"),
        "generated": last.get("queue/received"),
        "accepted": accepted,
        "served": last.get("queue/served"),
        "stale_frac_of_accepted": last.get("queue/evicted_stale", 0.0) / max(accepted, 1.0),
        "stale_on_arrival": last.get("queue/stale_on_arrival"),  # recorded from 2026-12-02
        "reused_frac": last.get("queue/reused_frac", 0.0),
        "paced_frac": last.get("actor/paced_frac", 0.0),
        "busy_frac": last.get("actor/busy_frac", 0.0),
        "step_s_median": sorted(r["learner/step_s"] for r in rows)[len(rows) // 2],
        "heldout_before": summary.get("heldout_reward_before"),
        "heldout_after": summary.get("heldout_reward_after"),
        "heldout_curve": curve,
        "train_reward_curve": [(r["wall_s"], r.get("actor/reward_mean")) for r in rows],
    }


def write(results: dict, path: Path) -> None:
    """results.json, a markdown table and the curves' PNG."""
    path.with_suffix(".json").write_text(json.dumps(results, indent=1))
    lines = ["| config | seed | commit | steps | median step s | generated | accepted | "
             "stale / accepted | reused | actor paced | held-out (s: reward) |",
             "|" + "---|" * 11]  # fmt: skip
    for key, f in results["runs"].items():
        name, seed = key.rsplit("/", 1)
        curve = ", ".join(f"{x:.0f}: {y:.3f}" for x, y in f["heldout_curve"] if y is not None)
        lines.append(
            f"| {name} | {seed} | {f.get('commit', '?')} | {f['steps']} | "
            f"{f['step_s_median']:.1f} | {f['generated']:.0f} | {f['accepted']:.0f} | "
            f"{f['stale_frac_of_accepted']:.1%} | {f['reused_frac']:.1%} | "
            f"{f['paced_frac']:.1%} | {curve} |"
        )
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key, f in results["runs"].items():
        xs, ys = zip(*[(x, y) for x, y in f["heldout_curve"] if y is not None], strict=True)
        a.plot(xs, ys, marker="o", label=key)
        pts = [(x, y) for x, y in f["train_reward_curve"] if y is not None]
        if pts:
            b.plot(*zip(*pts, strict=True), label=key)
    a.set(xlabel="wall s since training start", ylabel="held-out reward", title="held-out")
    b.set(xlabel="wall s", ylabel="actor/reward_mean", title="training reward")
    a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", choices=sorted(EXPERIMENTS), default="limiter")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--configs",
        nargs="+",
        default=None,
        help="run only these configs of the experiment (default: all of them)",
    )
    p.add_argument("--budget-s", type=float, default=900.0, help="training seconds per run")
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "bench_replay")
    p.add_argument("--report-only", action="store_true",
                   help="write the results of finished runs; start none")  # fmt: skip
    args = p.parse_args()
    unknown = set(args.configs or []) - set(EXPERIMENTS[args.experiment])
    if unknown:
        p.error(f"not configs of {args.experiment}: {sorted(unknown)}")
    out = REPO / "bench" / f"replay_{args.experiment}"  # .json, .md, .png (committed)
    out.parent.mkdir(parents=True, exist_ok=True)
    # runs/ is not committed and a new machine starts without it: what the committed JSONs
    # recorded (with the same budget) counts as done; a run shared with another experiment
    # is made once (this experiment's JSON first, then the others')
    recorded = out.with_suffix(".json")
    done: dict[str, dict] = {}
    for path in [recorded, *sorted(set(REPO.glob("bench/replay_*.json")) - {recorded})]:
        data = json.loads(path.read_text()) if path.exists() else {}
        for k, v in data.get("runs", {}).items():
            name = k.rsplit("/", 1)[0]  # a record, or a run with the same budget
            if (
                k not in done
                and name in EXPERIMENTS[args.experiment]
                and (
                    CONFIGS[name] is None
                    or v.get("budget_s", data.get("budget_s")) == args.budget_s
                )
            ):
                done[k] = v
    # every recorded run stays in the JSON, whichever seeds this call runs
    results = {**header(), "experiment": args.experiment, "budget_s": args.budget_s,
               "runs": dict(done)}  # fmt: skip
    for seed in args.seeds:
        for name in EXPERIMENTS[args.experiment]:
            if args.configs and name not in args.configs:
                continue  # a recorded run of it is in ``results`` already
            key, flags, run = f"{name}/{seed}", CONFIGS[name], args.runs / f"{name}_s{seed}"
            if key in done and not (run / "summary.json").exists():
                continue  # recorded, and in ``results``
            if args.report_only:
                flags = None  # read what exists, run nothing
            run.parent.mkdir(parents=True, exist_ok=True)
            got = run_one(run, flags, seed, args.budget_s)
            if got is None:
                continue
            got.setdefault("machine", f"{header()['machine']}, {header()['cpu']}")
            got.setdefault("commit", commit_of(run))
            got.setdefault("budget_s", args.budget_s)
            results["runs"][key] = got
            write(results, out)  # after every run: a stopped experiment keeps what it has
            print(json.dumps({k: v for k, v in got.items() if "curve" not in k}), flush=True)
    write(results, out)  # the report, also when every run was recorded before


if __name__ == "__main__":
    main()
