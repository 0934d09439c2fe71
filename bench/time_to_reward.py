"""Time to reward (the DASH claim): dashrl async vs dashrl sync vs TRL GRPOTrainer.

Three runs in turn on this machine, same model (SmolLM2-135M-Instruct), task and prompts,
G = 8, 16 sequences per optimizer step, lr, temperature and completion budget, each
given ``--budget-s`` of wall time from its launch (model loading and engine start-up
count):

- dashrl async: ``launch/start.py`` defaults (vLLM actor streaming into the priority
  queue; the learner steps on the top-|A| samples);
- dashrl sync: ``--mode sync`` (the standard GRPO loop: generate 2 prompts x 8, train one
  step on all 16, broadcast, repeat);
- TRL: ``bench/trl_grpo.py`` (GRPOTrainer with the same settings, HF generate on CPU).

Each saves checkpoints as it trains; afterwards every checkpoint (and the base model, at
t = 0) is evaluated on the same held-out prompts with the same sampler (HF engine,
``--heldout-prompts`` x ``--samples`` at the training temperature), so evaluation never
slows a run down. Reports each system's wall seconds to reach ``--target`` held-out
reward (or "not reached") and the speed-ups, writes the curves to a PNG and JSON.

    python bench/time_to_reward.py                 # 3 x 240 s + evaluation, ~15 min
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], budget_s: float, log: Path) -> float:
    """Run ``cmd`` until it exits or ``budget_s`` + 60 s pass (then SIGTERM by pid); returns
    its launch time (unix seconds)."""
    t0 = time.time()
    with log.open("w") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                             start_new_session=True)  # fmt: skip
        try:
            p.wait(budget_s + 120)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(120)
    return t0


def dashrl(run_dir: Path, budget_s: float, sync: bool, every: int) -> list[tuple[float, Path]]:
    args = [sys.executable, "launch/start.py", "--run-dir", str(run_dir), "--time-limit-s",
            str(budget_s), "--eval.heldout", "False", "--eval.every-steps", "0",
            "--learner.checkpoint-every", str(every), "--learner.steps", "100000"]  # fmt: skip
    if sync:
        args += ["--mode", "sync", "--actor.prompts-per-batch", "2", "--queue.filter-threshold",
                 "None", "--queue.max-staleness", "0"]  # fmt: skip
    t0 = _run(args, budget_s, run_dir.with_suffix(".log"))
    ckpts = [d for d in (run_dir / "checkpoints").glob("step_*")]
    return sorted((d.joinpath("dashrl_state.json").stat().st_mtime - t0, d) for d in ckpts)


def trl(out: Path, budget_s: float, every: int) -> list[tuple[float, Path]]:
    cmd = [sys.executable, "bench/trl_grpo.py", str(out), "--budget-s", str(budget_s),
           "--save-steps", str(every)]  # fmt: skip
    t0 = _run(cmd, budget_s, out.with_suffix(".log"))
    ckpts = [d for d in out.glob("checkpoint-*") if (d / "model.safetensors").exists()]
    return sorted(((d / "model.safetensors").stat().st_mtime - t0, d) for d in ckpts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--target", type=float, default=0.45, help="held-out mean reward")
    ap.add_argument("--heldout-prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/dashrl-time-to-reward"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/time_to_reward.json"))
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    runs = {
        "dashrl_async": dashrl(args.work / "async", args.budget_s, sync=False, every=3),
        "dashrl_sync": dashrl(args.work / "sync", args.budget_s, sync=True, every=2),
        "trl_grpo": trl(args.work / "trl", args.budget_s, every=1),
    }
    from dashrl.actors.engine import HFEngine
    from dashrl.launch.config import Config
    from dashrl.launch.evaluate import heldout_reward
    from dashrl.launch.model import resolve_model
    from dashrl.launch.runtime import set_thread_budget

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
    print(f"{'system':<14}{'checkpoints':>12}{'best':>7}{'seconds to target':>19}")
    for n, c in curves.items():
        t = reach[n]
        print(f"{n:<14}{len(c) - 1:>12}{max(r for _, r in c):>7.3f}"
              f"{(f'{t:.0f}' if t is not None else 'not reached'):>19}")  # fmt: skip
    speedup = {}
    a = reach["dashrl_async"]
    for other in ("dashrl_sync", "trl_grpo"):
        b = reach[other]
        if a is not None:  # not reached: at least budget / a
            bound = f">= {args.budget_s / a:.2f}x (not reached in budget)"
            speedup[other] = f"{b / a:.2f}x" if b is not None else bound
            print(f"async vs {other}: {speedup[other]}")
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
    result = {"date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()} {os.cpu_count()} cores",
              "budget_s": args.budget_s, "target": args.target, "base": base["reward_mean"],
              "curves": curves, "seconds_to_target": reach, "speedup": speedup}  # fmt: skip
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
