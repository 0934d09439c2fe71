"""Time to reward (the DASH claim): dashrl async vs dashrl sync vs TRL GRPOTrainer.

Three runs in turn on this machine, same model (SmolLM2-135M-Instruct), task and prompts,
G = 8, 16 sequences per optimizer step, lr, temperature and completion budget, each
given ``--budget-s`` of wall time from its launch (model loading and engine start-up
count; the script stops the run then, and only checkpoints written within the budget
count). Each saves a weights-only checkpoint every ``--save-steps`` steps:

- dashrl async: ``launch/start.py`` defaults (vLLM actor streaming into the priority
  queue; the learner steps on the top-|A| samples), with vLLM's compile skipped
  (``--actor.vllm.enforce-eager``: 14 s less start-up, a budget of minutes is short);
- dashrl sync: ``--mode sync`` (the standard GRPO loop: generate 2 prompts x 8, train one
  step on all 16, broadcast, repeat);
- TRL: ``bench/trl_grpo.py`` (GRPOTrainer with the same settings, HF generate on CPU).

Afterwards at most ``--max-evals`` evenly spaced checkpoints per system (and the base
model, at t = 0) are evaluated on the same held-out prompts with the same sampler (HF engine,
``--heldout-prompts`` x ``--samples`` at the training temperature), so evaluation never
slows a run down. Reports each system's wall seconds to reach ``--target`` held-out
reward (or "not reached") and the speed-ups, the generator and learner utilisation of the
two dashrl runs, and writes the curves to a PNG and JSON.

Disk: about 0.5 GB per checkpoint under ``--work`` (plus one full final checkpoint per
dashrl run, about 2 GB), 12 GB for the defaults; the checkpoints are deleted once they are
evaluated unless ``--keep-checkpoints`` (which ``--eval-only`` needs later). The run logs
and metrics stay.

    python bench/time_to_reward.py                 # 3 x 180 s + evaluation, < 15 min
    python bench/time_to_reward.py --eval-only     # evaluate the last runs again
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import header

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], budget_s: float, log: Path) -> float:
    """Run ``cmd`` until it exits or ``budget_s`` pass, then SIGTERM it by pid (a graceful
    stop; SIGKILL to its process group if it is not gone 120 s later); returns its launch
    time (unix seconds), also written to ``<log>.t0`` for ``--eval-only``."""
    t0 = time.time()
    log.with_suffix(".t0").write_text(f"{t0}\n")
    with log.open("w") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                             start_new_session=True)  # fmt: skip
        try:
            p.wait(budget_s)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGTERM)
            try:
                p.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return t0


def dashrl(run_dir: Path, budget_s: float, sync: bool, every: int) -> list[tuple[float, Path]]:
    args = [sys.executable, "launch/start.py", "--run-dir", str(run_dir), "--time-limit-s",
            str(budget_s), "--eval.heldout", "False", "--eval.every-steps", "0",
            "--learner.checkpoint-every", str(every), "--learner.checkpoint-optimizer", "False",
            "--actor.vllm.enforce-eager", "True", "--learner.steps", "100000"]  # fmt: skip
    if sync:
        args += ["--mode", "sync", "--actor.prompts-per-batch", "2", "--queue.filter-threshold",
                 "None", "--queue.max-staleness", "0"]  # fmt: skip
    _run(args, budget_s, run_dir.with_suffix(".log"))
    return dashrl_checkpoints(run_dir)


def dashrl_checkpoints(run_dir: Path) -> list[tuple[float, Path]]:
    """(seconds since launch, path) of a dashrl run's step checkpoints, in time order."""
    t0 = float(run_dir.with_suffix(".t0").read_text())
    ckpts = [d for d in (run_dir / "checkpoints").glob("step_*")
             if d.joinpath("dashrl_state.json").exists()]  # fmt: skip
    return sorted((d.joinpath("dashrl_state.json").stat().st_mtime - t0, d) for d in ckpts)


def utilisation(run_dir: Path) -> dict[str, float]:
    """Generator and learner utilisation of a dashrl run, from its metrics.jsonl: the
    actors' busy fraction (``actor/busy_frac``: share of wall time the engine held
    requests, last value) and the learner's (1 - time waiting for the queue / step time)."""
    from dashrl.protocol.runtime import read_jsonl

    rows = read_jsonl(run_dir / "metrics.jsonl")
    busy = [r["actor/busy_frac"] for r in rows if "actor/busy_frac" in r]
    step = sum(r["learner/step_s"] for r in rows)
    wait = sum(r["learner/queue_wait_s"] for r in rows)
    return {"generator_busy": round(busy[-1], 3) if busy else float("nan"),
            "learner_busy": round(1 - wait / step, 3) if step else float("nan"),
            "steps": len(rows)}  # fmt: skip


def trl(out: Path, budget_s: float, every: int) -> list[tuple[float, Path]]:
    cmd = [sys.executable, "bench/trl_grpo.py", str(out), "--budget-s", str(budget_s),
           "--save-steps", str(every)]  # fmt: skip
    _run(cmd, budget_s, out.with_suffix(".log"))
    return trl_checkpoints(out)


def trl_checkpoints(out: Path) -> list[tuple[float, Path]]:
    """(seconds since launch, path) of the TRL run's checkpoints, in time order."""
    t0 = float(out.with_suffix(".t0").read_text())
    ckpts = [d for d in out.glob("checkpoint-*") if (d / "model.safetensors").exists()]
    return sorted(((d / "model.safetensors").stat().st_mtime - t0, d) for d in ckpts)


def spaced(ckpts: list, n: int) -> list:
    """At most ``n`` of ``ckpts``, evenly spaced, the last always included."""
    if len(ckpts) <= n:
        return ckpts
    step = len(ckpts) / n
    return [ckpts[min(len(ckpts) - 1, round((i + 1) * step) - 1)] for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=180, help="wall seconds per system")
    ap.add_argument("--save-steps", type=int, default=2, help="checkpoint interval, all systems")
    ap.add_argument("--target", type=float, default=0.45, help="held-out mean reward")
    ap.add_argument("--heldout-prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--systems", nargs="+", default=["dashrl_async", "dashrl_sync", "trl_grpo"])
    ap.add_argument("--max-evals", type=int, default=5, help="checkpoints evaluated per system")
    ap.add_argument("--eval-only", action="store_true",
                    help="evaluate the checkpoints already in --work (no new runs)")  # fmt: skip
    ap.add_argument("--keep-checkpoints", action="store_true",
                    help="keep them after evaluation (for a later --eval-only)")  # fmt: skip
    ap.add_argument("--work", type=Path, default=Path("/tmp/dashrl-time-to-reward"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/time_to_reward.json"))
    args = ap.parse_args()
    t_script = time.time()
    w = args.work
    if args.eval_only:
        found = {"dashrl_async": lambda: dashrl_checkpoints(w / "async"),
                 "dashrl_sync": lambda: dashrl_checkpoints(w / "sync"),
                 "trl_grpo": lambda: trl_checkpoints(w / "trl")}  # fmt: skip
    else:
        shutil.rmtree(w, ignore_errors=True)
        w.mkdir(parents=True)
        b, every = args.budget_s, args.save_steps
        found = {"dashrl_async": lambda: dashrl(w / "async", b, sync=False, every=every),
                 "dashrl_sync": lambda: dashrl(w / "sync", b, sync=True, every=every),
                 "trl_grpo": lambda: trl(w / "trl", b, every=every)}  # fmt: skip
    t_start = time.time()
    in_budget = {n: [(t, p) for t, p in found[n]() if t <= args.budget_s] for n in args.systems}
    train_s = time.time() - t_start
    runs = {name: spaced(ckpts, args.max_evals) for name, ckpts in in_budget.items()}
    from dashrl.actors.engine import HFEngine
    from dashrl.launch.evaluate import heldout_reward
    from dashrl.protocol.config import Config
    from dashrl.protocol.model import resolve_model
    from dashrl.protocol.runtime import set_thread_budget

    set_thread_budget(2)
    cfg = Config.model_validate({"data": {"heldout_size": args.heldout_prompts},
                                 "eval": {"samples_per_prompt": args.samples}})  # fmt: skip
    base = heldout_reward(cfg, HFEngine(resolve_model(cfg.model.name, cfg.model.cache_dir)))
    curves: dict[str, list[tuple[float, float]]] = {}
    for name, ckpts in runs.items():
        curves[name] = [(0.0, base["reward_mean"])]
        for t, path in ckpts:
            r = heldout_reward(cfg, HFEngine(path))["reward_mean"]
            curves[name].append((round(t, 1), r))
            print(f"{name} {path.name}: t={t:.0f} s held-out reward {r:.3f}", flush=True)
    reach = {n: next((t for t, r in c if r >= args.target), None) for n, c in curves.items()}
    print(f"\ntarget held-out reward {args.target} (base {base['reward_mean']:.3f}); "
          f"budget {args.budget_s:.0f} s each")  # fmt: skip
    print(f"{'system':<14}{'saved':>6}{'evaluated':>10}{'best':>7}{'seconds to target':>19}")
    for n, c in curves.items():
        t = reach[n]
        print(f"{n:<14}{len(in_budget[n]):>6}{len(c) - 1:>10}{max(r for _, r in c):>7.3f}"
              f"{(f'{t:.0f}' if t is not None else 'not reached'):>19}")  # fmt: skip
    speedup = {}
    a = reach.get("dashrl_async")
    for other in [n for n in ("dashrl_sync", "trl_grpo") if n in reach]:
        b = reach[other]
        if a is not None:  # not reached: at least budget / a
            bound = f">= {args.budget_s / a:.2f}x (not reached in budget)"
            speedup[other] = f"{b / a:.2f}x" if b is not None else bound
            print(f"async vs {other}: {speedup[other]}")
    util = {n: utilisation(args.work / d) for n, d in (("dashrl_async", "async"),
            ("dashrl_sync", "sync")) if n in runs}  # fmt: skip
    for n, u in util.items():
        print(f"{n}: generator busy {u['generator_busy']:.1%}, learner busy "
              f"{u['learner_busy']:.1%} over {u['steps']} steps")  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for n, c in curves.items():
        ax.plot([t for t, _ in c], [r for _, r in c], marker="o", label=n)
    ax.axhline(args.target, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("wall seconds since launch")
    ax.set_ylabel(f"held-out reward ({args.heldout_prompts} x {args.samples})")
    ax.legend()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out.with_suffix(".png"), dpi=120, bbox_inches="tight")
    total_s = time.time() - t_script
    print(f"script wall time {total_s:.0f} s (training {train_s:.0f} s)")
    result = {**header(), "budget_s": args.budget_s, "target": args.target,
              "save_steps": args.save_steps, "checkpoints_in_budget":
              {n: len(c) for n, c in in_budget.items()}, "script_s": round(total_s),
              "train_s": round(train_s),
              "base": base["reward_mean"], "curves": curves, "seconds_to_target": reach,
              "speedup": speedup, "utilisation": util}  # fmt: skip
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.keep_checkpoints:  # every number above is computed; the weights are 12 GB
        dirs = [w / "async" / "checkpoints", w / "sync" / "checkpoints"]
        for d in [*dirs, *w.glob("trl/checkpoint-*")]:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
