"""TRL's GRPOTrainer as a runner of the experiment runner: the ladder's standard GRPO rung.

``start.py sweep`` runs a configuration with ``runner = "trl"`` as
``python bench/trl_grpo.py --config RUN.json``: the same resolved dashrl config as every
other run, so the same model, task, prompts (train split, chat template, dashrl's prompt
suffix), verifier and hyper-parameters: G = ``actor.group_size``, ``micro_batch_size x
micro_batches_per_step`` sequences per optimizer step, lr, AdamW betas and weight decay,
grad clip, temperature, completion budget, clip range (DAPO token-mean loss, clip-higher),
``learner.kl_coef`` as TRL's beta, one update per batch. Its compute dtype follows
``learner.dtype`` (auto: bf16 autocast where the CPU has bf16 matrix units, as dashrl's
learner), logged at start.

It writes what a dashrl run writes for the runner: ``metrics.jsonl`` (one row per step
with ``step``, ``wall_s`` from the start of training, ``unix_s``, ``learner/step_s``,
``learner/checkpoint_s``, ``actor/reward_mean``, ``actor/completion_len``,
``learner/entropy``), a weights-only checkpoint every ``learner.checkpoint_every_s``
seconds of training under ``checkpoints/step_N`` (HF ``save_pretrained``), the final
weights under ``checkpoints/final``, ``config.json`` and ``summary.json``; it stops after
``time_limit_s`` seconds of training (checkpoint writing not counted), so it is evaluated
and timed exactly like the dashrl rungs. Generation is HF ``generate`` (TRL's CPU path).
Needs the ``bench`` extra (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("dashrl.trl")


def lone_rank_env() -> None:
    """Drop a stray ``LOCAL_RANK``/``RANK`` when no launcher set ``WORLD_SIZE``.

    This runner is one process. accelerate (under TRL) reads ``LOCAL_RANK`` as "started by
    a distributed launcher" and then waits on an env:// rendezvous that nobody set up
    (``MASTER_ADDR expected, but not set``); a parent that ran DeepSpeed in-process (which
    insists on ``LOCAL_RANK``) leaves exactly that behind.
    """
    if "WORLD_SIZE" in os.environ:
        return
    for var in ("LOCAL_RANK", "RANK"):
        if os.environ.pop(var, None) is not None:
            log.warning("%s was set without WORLD_SIZE: dropped, this runner is one process", var)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", type=Path, required=True, help="a resolved dashrl config (JSON)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [trl] %(message)s")
    lone_rank_env()
    import torch

    from dashrl.protocol.config import load_config
    from dashrl.protocol.hardware import resolve_dtype

    cfg = load_config(args.config)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=1))
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    dtype = resolve_dtype(cfg.learner.dtype, "cpu", "learner")
    bf16 = dtype == torch.bfloat16
    log.info("TRL GRPOTrainer, compute dtype %s, %d threads", dtype, torch.get_num_threads())
    trainer, clock = build_trainer(cfg, run_dir, bf16)
    trainer.train()
    clock.finish(trainer)
    (run_dir / "summary.json").write_text(json.dumps({"failed_role": None, "runner": "trl",
                                                      "bf16": bf16}) + "\n")  # fmt: skip


def build_trainer(cfg, run_dir: Path, bf16: bool):
    """(a GRPOTrainer on the config's task, its SweepClock callback)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from dashrl.actors.data import load_task
    from dashrl.protocol.model import load_causal_lm, load_tokenizer, resolve_model

    path = resolve_model(cfg.model.name, cfg.model.cache_dir)
    task = load_task(cfg.data, cfg.seed)
    suffix = cfg.data.prompt_suffix
    rows = [{"prompt": [{"role": "user", "content": p.question + suffix}], "idx": i}
            for i, p in enumerate(task.train)]  # fmt: skip

    def reward(completions, idx, **_) -> list[float]:
        return [float(task.score(task.train[i], c[0]["content"]))
                for c, i in zip(completions, idx, strict=True)]  # fmt: skip

    class SweepClock(TrainerCallback):
        """Metrics rows, checkpoints on the training clock, and the time limit."""

        def __init__(self) -> None:
            self.metrics = (run_dir / "metrics.jsonl").open("a", buffering=1)
            self.t0 = self.last_save = self.step_t0 = time.monotonic()
            self.saved_s, self.ckpt_s, self.step_s = 0.0, 0.0, 0.0

        def _save(self, model, out: Path) -> float:
            t = time.monotonic()
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            return time.monotonic() - t

        def on_train_begin(self, targs, state, control, **kw):
            self.t0 = self.last_save = self.step_t0 = time.monotonic()

        def on_step_begin(self, targs, state, control, **kw):
            self.step_t0 = time.monotonic()

        def on_step_end(self, targs, state, control, model=None, **kw):
            now = time.monotonic()
            self.step_s, self.ckpt_s = now - self.step_t0, 0.0
            if now - self.last_save >= cfg.learner.checkpoint_every_s:
                self.ckpt_s = self._save(
                    model, run_dir / "checkpoints" / f"step_{state.global_step}"
                )
                self.saved_s += self.ckpt_s
                self.last_save = time.monotonic()
            if time.monotonic() - self.t0 - self.saved_s >= cfg.time_limit_s:
                control.should_training_stop = True
            return control

        def on_log(self, targs, state, control, logs=None, **kw):
            logs = logs or {}
            if "reward" not in logs:  # the end-of-training summary
                return
            row = {"step": state.global_step, "version": state.global_step,
                   "wall_s": time.monotonic() - self.t0, "unix_s": time.time(),
                   "learner/step_s": self.step_s, "learner/checkpoint_s": self.ckpt_s,
                   "actor/reward_mean": logs["reward"]}  # fmt: skip
            for src, dst in (("completions/mean_length", "actor/completion_len"),
                             ("entropy", "learner/entropy")):  # fmt: skip
                if src in logs:
                    row[dst] = logs[src]
            self.metrics.write(json.dumps(row) + "\n")

        def finish(self, trainer) -> None:
            self._save(trainer.model, run_dir / "checkpoints" / "final")
            self.metrics.close()

    a, lc = cfg.actor, cfg.learner
    tokenizer = load_tokenizer(path)
    targs = GRPOConfig(
        output_dir=str(run_dir / "trl"), use_cpu=True, bf16=bf16, seed=cfg.seed,
        per_device_train_batch_size=lc.micro_batch_size * lc.micro_batches_per_step,
        gradient_accumulation_steps=1, num_generations=a.group_size,
        max_completion_length=a.max_new_tokens, temperature=a.temperature, top_p=1.0,
        learning_rate=lc.lr, adam_beta1=lc.betas[0], adam_beta2=lc.betas[1],
        weight_decay=lc.weight_decay, max_grad_norm=lc.max_grad_norm, lr_scheduler_type="constant",
        warmup_steps=0, beta=lc.kl_coef, epsilon=lc.clip_eps_low, epsilon_high=lc.clip_eps_high,
        loss_type="dapo", num_iterations=1, max_steps=lc.steps, save_strategy="no",
        logging_steps=1, report_to=[], dataloader_num_workers=0,
    )  # fmt: skip
    clock = SweepClock()
    trainer = GRPOTrainer(model=load_causal_lm(path, train=True), reward_funcs=reward,
                          args=targs, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, callbacks=[clock])  # fmt: skip
    return trainer, clock


if __name__ == "__main__":
    main()
