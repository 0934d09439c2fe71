"""Held-out evaluation: mean reward of a model on the task's held-out prompts.

The figure is avg@k: k samples per prompt at the training temperature, scored by the
task's verifier, averaged over all samples. The launcher runs it before training (base
model) and after (final checkpoint) on the same prompts with the same sampling seed,
while no other role is using the cores.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from dashrl.actors.engine import HFEngine
from dashrl.actors.tasks import chat_prompt_ids, load_task
from dashrl.launch.config import Config


def heldout_reward(cfg: Config, model_path: Path, batch_prompts: int = 16) -> dict[str, float]:
    """Evaluate ``model_path`` on the held-out prompts of ``cfg.data``.

    Returns:
        {"reward_mean": avg@k reward, "pass_at_k": fraction of prompts with a correct
        sample, "prompts": n, "samples_per_prompt": k, "seconds": wall time}.
    """
    t0 = time.perf_counter()
    task = load_task(cfg.data, cfg.seed)
    engine = HFEngine(model_path, seed=cfg.seed + 777)
    torch.manual_seed(cfg.seed + 777)  # same sampling noise before and after training
    k = cfg.eval.samples_per_prompt
    rewards: list[float] = []
    solved = 0
    problems = task.heldout
    for i in range(0, len(problems), batch_prompts):
        chunk = problems[i : i + batch_prompts]
        prompts = [
            chat_prompt_ids(engine.tokenizer, p.question, cfg.data.prompt_suffix) for p in chunk
        ]
        gens = engine.generate(prompts, k, cfg.actor.max_new_tokens, cfg.actor.temperature)
        for p, group in zip(chunk, gens, strict=True):
            rs = [
                task.score(p, engine.tokenizer.decode(g.token_ids, skip_special_tokens=True))
                for g in group
            ]
            rewards.extend(rs)
            solved += max(rs) > 0
    return {
        "reward_mean": sum(rewards) / len(rewards),
        "pass_at_k": solved / len(problems),
        "prompts": float(len(problems)),
        "samples_per_prompt": float(k),
        "seconds": time.perf_counter() - t0,
    }
