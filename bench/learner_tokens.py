"""Learner throughput on the same rollouts, in one process: today's path (float32, one
padded sequence per sample) against bf16 mixed precision, the shared-prefix forward with
whole-group or (the default) per-sample queue units, and both (issue 17); judged against
this machine's own matmul peak. The shared-prefix forward packs a micro-batch as the token
trie of its samples (learner/prefix.py): with per-sample units that shares the prompts'
common template, with whole groups also the group's prompt.

Rollouts: a run's rollout log (``--run-dir``, e.g. a default job's), or, by default, fresh
ones: the default task's prompts, G samples each from SmolLM2-135M-Instruct with HF
``generate``, scored and given GRPO advantages as an actor would. Each path replays the
same rollouts through a :class:`~dashrl.queue.buffer.ReplayBuffer` with the default filter
(zero-|A| samples dropped) and the default length window, as singletons (today) or as
whole-group units (``queue.serve_groups``), pops micro-batches of
``learner.micro_batch_size`` sequences, and trains on the first ``--train-batches`` of
them after one warm-up micro-batch (plain torch backend, ``--threads`` threads).

Per path: sample tokens/s (prompt + completion of every sample trained on: the training
data's rate, comparable across paths), forward tokens/s (what the model computed: shared
prompts once), padding, achieved GFLOP/s (6 x body parameters x forward tokens + 6 x head
parameters x completion tokens) and its share of the measured matmul peak of the path's
dtype (1024^2 matmuls at the same thread count). Prints one table, writes JSON.

    python bench/learner_tokens.py
    python bench/learner_tokens.py --run-dir runs/xyz
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import header, print_table

PATHS = [  # name, dtype, shared prefix, whole-group queue units
    ("float32 per-sample (before)", "float32", False, False),
    ("bf16 per-sample", "bfloat16", False, False),
    ("float32 shared, group units", "float32", True, True),
    ("bf16 shared, group units", "bfloat16", True, True),
    ("float32 shared, sample units", "float32", True, False),
    ("bf16 shared, sample units (default)", "bfloat16", True, False),
]


def fresh_groups(cfg, prompts: int):
    """RolloutGroups of ``prompts`` default-task prompts, generated and scored here."""
    import numpy as np

    from dashrl.actors.actor import score_group
    from dashrl.actors.advantages import grpo_advantages
    from dashrl.actors.data import load_task
    from dashrl.actors.engine import HFEngine
    from dashrl.actors.rewards import Rewards
    from dashrl.actors.tasks import chat_prompt_ids
    from dashrl.protocol import Completion, RolloutGroup

    a = cfg.actor
    engine = HFEngine(cfg.model.path, seed=0)
    task = load_task(cfg.data, cfg.seed)
    rewards = Rewards(cfg.reward, task)
    problems = task.train[:prompts]
    ids = [chat_prompt_ids(engine.tokenizer, p.question) for p in problems]
    groups = []
    for i in range(0, prompts, 16):
        gens = engine.generate(ids[i : i + 16], a.group_size, a.max_new_tokens, a.temperature)
        for p, pid, gs in zip(problems[i : i + 16], ids[i : i + 16], gens, strict=True):
            texts = [engine.tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in gs]
            r, adv, _ = score_group(rewards, p, texts, a.advantage_eps, grpo_advantages)
            comps = [Completion(g.token_ids, g.logprobs, float(x), float(y), g.finish_reason, 0)
                     for g, x, y in zip(gs, r, adv, strict=True)]  # fmt: skip
            groups.append(RolloutGroup(p.id, np.asarray(pid, np.int32), comps, "bench", task.name))
    return groups


def micro_batches(groups, size: int, threshold, window: int, whole_groups: bool):
    """The micro-batches the queue would serve from ``groups``, until it is empty."""
    from dashrl.protocol import group_to_samples
    from dashrl.queue.buffer import ReplayBuffer
    from dashrl.queue.policies import unit_grouping

    units = unit_grouping("sample", whole_groups, threshold, size)
    buf = ReplayBuffer(10**6, threshold, 10**6, length_window=window)
    for g in groups:
        samples = group_to_samples(g)  # staleness 10**6: every version is served
        buf.add(samples, units([s.advantage for s in samples]))
    out = []
    while batch := buf.pop_micro_batch(size):
        out.append(batch)
    return out


def matmul_gflops(dtype, n: int = 1024, seconds: float = 2.0) -> float:
    """Sustained GFLOP/s of n x n matmuls in ``dtype`` on this process's threads."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def behaviour_mismatch(learner, groups, dtype, limit: int = 32) -> dict[str, float]:
    """Learner-vs-engine logprob mismatch in ``dtype`` on version-0 rollouts (generated by
    the initial weights, which the fresh learner holds: lag 0, so any difference is
    numerics): mean |log pi - log mu| (nats) and the std of the token ratio pi / mu."""
    import torch

    from dashrl.learner.batch import collate, token_logprobs
    from dashrl.learner.loss import logprob_mismatch
    from dashrl.protocol import group_to_samples

    fresh = [g for g in groups if all(c.policy_version == 0 for c in g.completions)][:limit]
    samples = [s for g in fresh for s in group_to_samples(g)]
    if not samples:
        return {}
    batch = collate(samples, learner.pad_id, share_prefix=True)
    with torch.no_grad():
        logp, _ = token_logprobs(learner.model, batch, learner.cfg.actor.temperature, dtype=dtype)
    lag = torch.zeros(len(samples), dtype=torch.long)
    return logprob_mismatch(logp, batch.behaviour_logprobs, batch.mask, lag)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run-dir", type=Path, default=None)
    ap.add_argument("--prompts", type=int, default=64, help="fresh rollouts: prompts")
    ap.add_argument("--train-batches", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/results/learner_tokens.json"))
    args = ap.parse_args()
    from dashrl.protocol.runtime import set_thread_budget

    set_thread_budget(args.threads)
    import tempfile

    import torch

    from dashrl.learner.learner import Learner
    from dashrl.protocol.config import Config
    from dashrl.protocol.hardware import native_bf16
    from dashrl.protocol.model import resolve_model
    from dashrl.queue.log import ROLLOUT_LOG, read_rollout_log

    run_dir = tempfile.mkdtemp(prefix="learner_tokens_")  # the learner writes nothing here
    cfg = Config.model_validate({"run_dir": run_dir, "eval": {"heldout": False},
                                 "learner": {"backend": "torch"}})  # fmt: skip
    cfg.model.path = resolve_model(cfg.model.name, cfg.model.cache_dir)
    t0 = time.perf_counter()
    if args.run_dir:
        groups = read_rollout_log(args.run_dir / ROLLOUT_LOG)
    else:
        groups = fresh_groups(cfg, args.prompts)
    gen_s = time.perf_counter() - t0
    peak = {"float32": matmul_gflops(torch.float32), "bfloat16": matmul_gflops(torch.bfloat16)}
    size, q = cfg.learner.micro_batch_size, cfg.queue
    learner = Learner(cfg, connect=False)
    embed = learner.model.get_input_embeddings().weight
    head_params = embed.numel()  # tied LM head: vocab x hidden, applied at completion positions
    body_params = sum(p.numel() for p in learner.model.parameters()) - embed.numel()
    rows = []
    for name, dtype, shared, whole_groups in PATHS:
        batches = micro_batches(groups, size, q.filter_threshold, q.length_window, whole_groups)
        train = batches[: args.train_batches + 1]
        learner.cfg.learner.share_prefix = shared
        learner.dtype = learner.backend.module.dtype = getattr(torch, dtype)
        learner.train_micro_batch(train[0], 1.0)  # warm-up: first-call allocations
        learner.backend.zero_grad()
        sample_toks = fwd_toks = comp_toks = slots = 0
        t0 = time.perf_counter()
        for i, mb in enumerate(train[1:]):
            m = learner.train_micro_batch(mb, 1.0 / len(train), last=i == len(train) - 2)
            sample_toks += m["learner/tokens"]
            fwd_toks += m["learner/forward_tokens"]
            comp_toks += m["learner/completion_tokens"]
            slots += m["learner/forward_tokens"] / (1 - m["learner/padding_frac"])
        seconds = time.perf_counter() - t0
        learner.backend.zero_grad()
        gflops = 6 * (body_params * fwd_toks + head_params * comp_toks) / seconds / 1e9
        mis = behaviour_mismatch(learner, groups, learner.dtype)
        rows.append({"path": name, "dtype": dtype, "shared_prefix": shared,
                     "group_units": whole_groups,
                     "micro_batches": len(batches), "padding_frac": round(1 - fwd_toks / slots, 4),
                     "sample_tokens_per_s": round(sample_toks / seconds, 1),
                     "forward_tokens_per_s": round(fwd_toks / seconds, 1),
                     "gflops": round(gflops, 1),
                     "peak_frac": round(gflops / peak[dtype], 3),
                     "logprob_diff_mean": round(mis.get("learner/logprob_diff_mean", -1), 5),
                     "is_ratio_std": round(mis.get("learner/is_ratio_std", -1), 5)})  # fmt: skip
    base = rows[0]["sample_tokens_per_s"]
    for r in rows:
        r["speedup"] = round(r["sample_tokens_per_s"] / base, 2)
    n = sum(len(g.completions) for g in groups)
    print(f"{len(groups)} groups, {n} rollouts ({gen_s:.0f} s to get them); micro-batch "
          f"{size} sequences; fwd+bwd on {args.train_batches} micro-batches after a warm-up, "
          f"{args.threads} thread(s); bf16 units: {native_bf16('cpu') or 'none'}; matmul peak "
          f"float32 {peak['float32']:.0f}, bfloat16 {peak['bfloat16']:.0f} GFLOP/s")  # fmt: skip
    print_table(rows, [("path", "path", ""), ("padding_frac", "padding", ".1%"),
                       ("sample_tokens_per_s", "sample tok/s", ".1f"),
                       ("forward_tokens_per_s", "fwd tok/s", ".1f"),
                       ("gflops", "GFLOP/s", ".1f"), ("peak_frac", "of peak", ".1%"),
                       ("speedup", "speedup", ".2f"), ("logprob_diff_mean", "|dlogp|", ".4f"),
                       ("is_ratio_std", "ratio std", ".4f")])  # fmt: skip
    result = {**header(), "source": str(args.run_dir or "fresh"), "groups": len(groups),
              "rollouts": n, "micro_batch_size": size, "threads": args.threads,
              "matmul_peak_gflops": peak, "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
