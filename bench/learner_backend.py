"""Learner step speed: the plain torch backend against DeepSpeed (ZeRO 0, 1, 2, 3) on one rank.

Each backend runs the same micro-batches through ``Learner.train_micro_batch`` and
``optimizer_step`` (2 micro-batches of 8 sequences of prompt 40 + completion 24 tokens)
for ``--steps`` optimizer steps after one warm-up step, on the same model, thread count
and process (backends in turn). Prints tokens/s per backend and the ratio to torch.

    python bench/learner_backend.py --steps 5
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--out", default="bench/results/learner_backend.json")
    args = ap.parse_args()

    from dashrl.protocol.runtime import set_thread_budget

    set_thread_budget(args.threads)
    import numpy as np
    import torch

    from dashrl.learner.learner import Learner
    from dashrl.protocol import Sample
    from dashrl.protocol.config import Config
    from dashrl.protocol.model import resolve_model

    path = resolve_model(args.model, Config().model.cache_dir)
    rng = np.random.default_rng(0)

    def sample(i: int) -> Sample:
        c = rng.integers(100, 2000, 24).astype(np.int32)
        return Sample.make(f"p{i}", rng.integers(100, 2000, 40).astype(np.int32), c,
                      np.full(24, -1.0, np.float32), 1.0, 1.0 if i % 2 else -1.0, 0)  # fmt: skip

    batches = [[sample(8 * b + i) for i in range(8)] for b in range(2)]
    tokens_per_step = sum(s.num_tokens for mb in batches for s in mb)
    rows = []
    for backend, stage in (("torch", 0), ("deepspeed", 0), ("deepspeed", 1), ("deepspeed", 2),
                           ("deepspeed", 3)):  # fmt: skip
        cfg = Config.model_validate({"model": {"path": str(path)}, "eval": {"heldout": False}})
        cfg.learner.backend, cfg.learner.zero_stage = backend, stage
        learner = Learner(cfg, connect=False)
        times = []
        for step in range(args.steps + 1):
            t0 = time.perf_counter()
            for i, mb in enumerate(batches):
                learner.train_micro_batch(mb, 0.5, last=i == 1)
            learner.optimizer_step()
            if step:  # the first step warms up
                times.append(time.perf_counter() - t0)
        rows.append({"backend": backend, "zero_stage": stage,
                     "tokens_per_s": tokens_per_step / float(np.median(times)),
                     "step_s_median": float(np.median(times)),
                     "torch_threads": torch.get_num_threads()})  # fmt: skip
        del learner
    base = rows[0]["tokens_per_s"]
    print(f"{'backend':<12}{'zero':>5}{'tokens/s':>10}{'step s':>8}{'vs torch':>10}{'threads':>8}")
    for r in rows:
        r["ratio_vs_torch"] = r["tokens_per_s"] / base
        print(f"{r['backend']:<12}{r['zero_stage']:>5}{r['tokens_per_s']:>10.1f}"
              f"{r['step_s_median']:>8.2f}{r['ratio_vs_torch']:>10.2f}"
              f"{r['torch_threads']:>8}")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"steps": args.steps, "threads": args.threads, "rows": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
