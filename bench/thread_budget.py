"""Thread budgets on a small CPU: actor generation and learner backprop running at the same time.

For each (actor threads, learner threads) pair, starts two processes together for a fixed
time: one runs HF ``generate`` (G samples per prompt, the actor's work), the other runs
forward+backward micro-batches (the learner's work). Prints tokens/s of each and their
ratio to the (1, 1) budget measured in the same script.

    python bench/thread_budget.py --seconds 60
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time


def _actor(threads: int, seconds: float, model_path: str, out) -> None:
    from dashrl.protocol.runtime import set_thread_budget

    set_thread_budget(threads)
    from dashrl.actors.engine import HFEngine

    engine = HFEngine(model_path, seed=0)
    prompts = [[1, 504, 3374, 28, 2, 1724, 9, 1730, 28, 17, 1072, 28, 3063]] * 8
    engine.generate(prompts[:1], 2, 4, 0.7)  # warm-up
    tokens, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        gens = engine.generate(prompts, 8, 32, 0.7)
        tokens += sum(len(g.token_ids) for group in gens for g in group)
    out.put(("actor", tokens / (time.perf_counter() - t0)))


def _learner(threads: int, seconds: float, model_path: str, out) -> None:
    from dashrl.protocol.runtime import set_thread_budget

    set_thread_budget(threads)
    import torch

    from dashrl.protocol.model import load_causal_lm

    model = load_causal_lm(model_path, train=True)
    x = torch.randint(0, 49152, (8, 80))
    tokens, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        model(input_ids=x, labels=x).loss.backward()
        tokens += x.numel()
    out.put(("learner", tokens / (time.perf_counter() - t0)))


def measure(actor_threads: int, learner_threads: int, seconds: float, model_path: str) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_actor, args=(actor_threads, seconds, model_path, out)),
        ctx.Process(target=_learner, args=(learner_threads, seconds, model_path, out)),
    ]
    for p in procs:
        p.start()
    res = dict(out.get() for _ in procs)
    for p in procs:
        p.join()
    return {
        "actor_threads": actor_threads,
        "learner_threads": learner_threads,
        "actor_tok_s": res["actor"],
        "learner_tok_s": res["learner"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="measuring time per budget (s)")
    ap.add_argument("--out", default="bench/results/thread_budget.json")
    args = ap.parse_args()
    from pathlib import Path

    from dashrl.protocol.config import Config
    from dashrl.protocol.model import resolve_model

    model = str(resolve_model(Config().model.name, Config().model.cache_dir))
    rows = [
        measure(a, learner, args.seconds, model) for a, learner in ((1, 1), (2, 2), (2, 1), (1, 2))
    ]
    base = rows[0]
    print(
        f"{'actor thr':>9} {'learner thr':>11} {'actor tok/s':>12} {'learner tok/s':>14} "
        f"{'actor ratio':>12} {'learner ratio':>14}"
    )
    for r in rows:
        r["actor_ratio"] = r["actor_tok_s"] / base["actor_tok_s"]
        r["learner_ratio"] = r["learner_tok_s"] / base["learner_tok_s"]
        print(
            f"{r['actor_threads']:>9} {r['learner_threads']:>11} {r['actor_tok_s']:>12.1f} "
            f"{r['learner_tok_s']:>14.1f} {r['actor_ratio']:>12.2f} {r['learner_ratio']:>14.2f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
