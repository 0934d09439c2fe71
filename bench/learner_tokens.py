"""Learner throughput and padding: forward+backward tokens/s at the configured micro-batch,
and how much of each padded micro-batch is padding, for strict-priority micro-batches
against length-aware ones (``--queue.length-window``).

Rollouts: a run's rollout log (``--run-dir``), or, by default, fresh ones: the default
task's prompts, G samples each from SmolLM2-135M-Instruct with HF ``generate`` and the
default completion budget, scored and given GRPO advantages as an actor would. Each
window size replays the same rollouts through a :class:`~dashrl.queue.buffer.ReplayBuffer`
(default filter: zero-|A| samples dropped) and pops micro-batches of
``learner.micro_batch_size`` sequences until it is empty. Padding = 1 - real tokens /
(B x padded length), summed over the micro-batches. Then the learner trains on the
first ``--train-batches`` micro-batches of each window (one thread, plain torch backend)
and reports real tokens/s. Prints one table, writes JSON.

    python bench/learner_tokens.py
    python bench/learner_tokens.py --run-dir runs/xyz
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import header, print_table


def fresh_groups(cfg, prompts: int):
    """RolloutGroups of ``prompts`` default-task prompts, generated and scored here."""
    import numpy as np

    from dashrl.actors.actor import score_group
    from dashrl.actors.advantages import grpo_advantages
    from dashrl.actors.engine import HFEngine
    from dashrl.actors.tasks import chat_prompt_ids, load_task
    from dashrl.protocol import Completion, RolloutGroup

    a = cfg.actor
    engine = HFEngine(cfg.model.path, seed=0)
    task = load_task(cfg.data, cfg.seed)
    problems = task.train[:prompts]
    ids = [chat_prompt_ids(engine.tokenizer, p.question) for p in problems]
    groups = []
    for i in range(0, prompts, 16):
        gens = engine.generate(ids[i : i + 16], a.group_size, a.max_new_tokens, a.temperature)
        for p, pid, gs in zip(problems[i : i + 16], ids[i : i + 16], gens, strict=True):
            texts = [engine.tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in gs]
            r, adv = score_group(task, p, texts, a.advantage_eps, grpo_advantages)
            comps = [Completion(g.token_ids, g.logprobs, float(x), float(y), g.finish_reason, 0)
                     for g, x, y in zip(gs, r, adv, strict=True)]  # fmt: skip
            groups.append(RolloutGroup(p.id, np.asarray(pid, np.int32), comps, "bench", task.name))
    return groups


def micro_batches(groups, window: int, size: int, threshold):
    from dashrl.protocol import group_to_samples
    from dashrl.queue.buffer import ReplayBuffer

    samples = [s for g in groups for s in group_to_samples(g)]
    for s in samples:
        s.policy_version = 0
    buf = ReplayBuffer(len(samples) + 1, threshold, 10**6, length_window=window)
    buf.add(samples)
    out = []
    while batch := buf.pop_micro_batch(size):
        out.append(batch)
    return out


def padding(batches) -> float:
    real = sum(s.num_tokens for b in batches for s in b)
    padded = sum(len(b) * max(s.num_tokens for s in b) for b in batches)
    return 1.0 - real / padded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run-dir", type=Path, default=None)
    ap.add_argument("--prompts", type=int, default=64, help="fresh rollouts: prompts")
    ap.add_argument("--windows", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--train-batches", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/results/learner_tokens.json"))
    args = ap.parse_args()
    from dashrl.protocol.runtime import set_thread_budget

    set_thread_budget(args.threads)
    from dashrl.learner.learner import Learner
    from dashrl.protocol.config import Config
    from dashrl.protocol.model import resolve_model
    from dashrl.queue.log import ROLLOUT_LOG, read_rollout_log

    cfg = Config.model_validate({"eval": {"heldout": False}, "learner": {"backend": "torch"}})
    cfg.model.path = resolve_model(cfg.model.name, cfg.model.cache_dir)
    t0 = time.perf_counter()
    if args.run_dir:
        groups = read_rollout_log(args.run_dir / ROLLOUT_LOG)
    else:
        groups = fresh_groups(cfg, args.prompts)
    gen_s = time.perf_counter() - t0
    size = cfg.learner.micro_batch_size
    learner = Learner(cfg, connect=False)
    rows = []
    for window in args.windows:
        batches = micro_batches(groups, window, size, cfg.queue.filter_threshold)
        train = batches[: args.train_batches]
        real = sum(s.num_tokens for b in train for s in b)
        t0 = time.perf_counter()
        for i, mb in enumerate(train):
            learner.train_micro_batch(mb, 1.0 / len(train), last=i == len(train) - 1)
        seconds = time.perf_counter() - t0
        learner.backend.zero_grad()
        rows.append({"length_window": window, "micro_batches": len(batches),
                     "padding_frac": round(padding(batches), 4),
                     "train_tokens_per_s": round(real / seconds, 1)})  # fmt: skip
    n = sum(len(g.completions) for g in groups)
    print(f"{len(groups)} groups, {n} rollouts ({gen_s:.0f} s to get them); micro-batch "
          f"{size} sequences; fwd+bwd on {args.train_batches} micro-batches, "
          f"{args.threads} thread(s)")  # fmt: skip
    print_table(rows, [("length_window", "window", "d"), ("micro_batches", "micro-batches", "d"),
                       ("padding_frac", "padding", ".1%"),
                       ("train_tokens_per_s", "tokens/s", ".1f")])  # fmt: skip
    result = {**header(), "source": str(args.run_dir or "fresh"), "groups": len(groups),
              "rollouts": n, "micro_batch_size": size, "threads": args.threads,
              "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
