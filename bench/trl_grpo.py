"""TRL's GRPOTrainer on the default dashrl task, as the peer baseline of time_to_reward.py.

Same model (SmolLM2-135M-Instruct, float32, CPU), same prompts (the task's train split,
chat template, dashrl's prompt suffix), same verifier, and dashrl's hyper-parameters:
G = 8, 16 sequences (2 prompts) per optimizer step, lr, AdamW betas, temperature, max
completion tokens, no KL (beta 0), DAPO token-mean loss with clip 0.2 / 0.28, one update
per batch. Saves the model every ``--save-steps`` steps and stops after ``--budget-s``
seconds of wall time; time_to_reward.py evaluates the checkpoints afterwards.

    python bench/trl_grpo.py OUT_DIR --budget-s 240
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--save-steps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    t_start = time.time()
    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from dashrl.actors.data import load_task
    from dashrl.protocol.config import Config
    from dashrl.protocol.model import load_causal_lm, load_tokenizer, resolve_model

    cfg = Config()
    path = resolve_model(cfg.model.name, cfg.model.cache_dir)
    task = load_task(cfg.data, cfg.seed)
    suffix = cfg.data.prompt_suffix
    rows = [{"prompt": [{"role": "user", "content": p.question + suffix}], "idx": i}
            for i, p in enumerate(task.train)]  # fmt: skip

    def reward(completions, idx, **_) -> list[float]:
        return [float(task.score(task.train[i], c[0]["content"]))
                for c, i in zip(completions, idx, strict=True)]  # fmt: skip

    class Budget(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            if time.time() - t_start > args.budget_s:
                control.should_training_stop = True
                control.should_save = True
            return control

    a, lc = cfg.actor, cfg.learner
    targs = GRPOConfig(
        output_dir=str(args.out), use_cpu=True, bf16=False, seed=cfg.seed,
        per_device_train_batch_size=lc.micro_batch_size * lc.micro_batches_per_step,
        gradient_accumulation_steps=1, num_generations=a.group_size,
        max_completion_length=a.max_new_tokens, temperature=a.temperature, top_p=1.0,
        learning_rate=lc.lr, adam_beta1=lc.betas[0], adam_beta2=lc.betas[1],
        weight_decay=lc.weight_decay, max_grad_norm=lc.max_grad_norm, lr_scheduler_type="constant",
        warmup_steps=0, beta=0.0, epsilon=lc.clip_eps_low, epsilon_high=lc.clip_eps_high,
        loss_type="dapo", num_iterations=1, max_steps=100_000, save_strategy="steps",
        save_steps=args.save_steps, save_only_model=True, logging_steps=1, report_to=[],
        dataloader_num_workers=0,
    )  # fmt: skip
    trainer = GRPOTrainer(model=load_causal_lm(path, train=True), reward_funcs=reward,
                          args=targs, train_dataset=Dataset.from_list(rows),
                          processing_class=load_tokenizer(path), callbacks=[Budget()])  # fmt: skip
    trainer.train()


if __name__ == "__main__":
    main()
