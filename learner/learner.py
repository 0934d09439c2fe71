"""The learner process: micro-batches from the queue -> clipped off-policy steps -> weights out.

Each optimizer step (DASH preemptive sampling: actors sample large batches, the learner
backprops small ones):
  1. for each of ``micro_batches_per_step`` micro-batches: ask the queue for the
     highest-|A| samples, recompute their logprobs under the current policy, and
     backprop the staleness-aware clipped surrogate, scaled by 1/micro_batches_per_step
     so the accumulated gradient is the mean over micro-batches;
  2. clip the gradient norm and take an AdamW step (skipped, and counted, if the loss or
     gradient is not finite: the last good weights stay and the version does not move);
  3. bump the policy version and broadcast the weights to every actor;
  4. write one metrics row to ``metrics.jsonl``.
SIGTERM/SIGINT or the time limit ends the loop after the current step; the final
weights are saved as an HF checkpoint either way.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

from dashrl.launch.config import Config, load_config
from dashrl.launch.runtime import MetricsWriter, StopFlag, set_thread_budget, setup_logging
from dashrl.learner.batch import collate, completion_hidden, logprobs_from_hidden, token_logprobs
from dashrl.learner.critic import ScalarHead
from dashrl.learner.loss import k3_kl
from dashrl.learner.objectives import Inputs, objective_for
from dashrl.learner.weights import WeightSender
from dashrl.protocol import Sample
from dashrl.queue.client import QueueClient

log = logging.getLogger("dashrl.learner")


def save_checkpoint(
    model, tokenizer, out: Path, version: int, step: int, heads: dict | None = None
) -> Path:
    """Save an HF-format checkpoint (``save_pretrained``) with the policy version next to it,
    and the critic/ORM heads (PPO) in ``heads.pt`` (a dict of state dicts)."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if heads:
        torch.save({k: h.state_dict() for k, h in heads.items()}, out / "heads.pt")
    (out / "dashrl_state.json").write_text(json.dumps({"version": version, "step": step}))
    return out


class Learner:
    """Model, optimizer, queue client and weight sender of one learner process.

    Args:
        cfg: the resolved run config.
        connect: when False, skip the queue and weight group (unit tests drive
            :meth:`train_micro_batch` directly).
    """

    def __init__(self, cfg: Config, connect: bool = True):
        from dashrl.launch.model import load_causal_lm, load_tokenizer

        self.cfg = cfg
        lc = cfg.learner
        torch.manual_seed(cfg.seed)
        self.tokenizer = load_tokenizer(cfg.model.path)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.model = load_causal_lm(cfg.model.path, train=True)
        needs_ref = lc.kl_coef > 0 or cfg.algo == "iterative_dpo"
        self.ref_model = load_causal_lm(cfg.model.path) if needs_ref else None
        # PPO's critic and the dense-reward ORM: small heads on the policy's hidden states
        hidden, pc = self.model.config.hidden_size, cfg.ppo
        self.heads: dict[str, ScalarHead] = {}
        if cfg.algo == "ppo":
            self.heads["critic"] = ScalarHead(hidden, pc.head_hidden)
        if cfg.reward.dense == "orm":
            self.heads["orm"] = ScalarHead(hidden, pc.head_hidden)
        self.critic, self.orm = self.heads.get("critic"), self.heads.get("orm")
        groups = [{"params": list(self.model.parameters()), "lr": lc.lr}]
        if self.heads:
            head_params = [p for h in self.heads.values() for p in h.parameters()]
            groups.append({"params": head_params, "lr": pc.head_lr})
        self.optimizer = torch.optim.AdamW(groups, betas=lc.betas, weight_decay=lc.weight_decay)
        self.objective = objective_for(cfg.algo)
        self.version = 0
        self.skipped_steps = 0
        self.rejected_samples = 0
        self.queue = self.sender = None
        if connect:
            t = cfg.transport
            self.queue = QueueClient(f"tcp://{t.host}:{t.request_port}")
            log.info("waiting for %d actor(s) to join the weight group", cfg.actor.num_actors)
            self.sender = WeightSender(
                list(self.model.parameters()),
                init_method=f"tcp://{t.host}:{t.dist_port}",
                world_size=1 + cfg.actor.num_actors,
                timeout_s=lc.weight_sync_timeout_s,
            )

    def next_micro_batch(
        self, stop: StopFlag, deadline: float = math.inf
    ) -> tuple[list[Sample], dict[str, float], float]:
        """Block until the queue serves a full micro-batch, ``stop`` is set or the monotonic
        ``deadline`` passes; returns (samples (empty if none came), queue stats, wait s)."""
        lc = self.cfg.learner
        t0 = time.perf_counter()
        while not stop and time.monotonic() < deadline:
            try:
                reply = self.queue.request(self.version, lc.micro_batch_size, lc.micro_batch_unit)
            except TimeoutError as e:
                log.warning("%s; asking again", e)
                continue
            samples = self.valid_samples(reply.samples)
            if samples:
                return samples, reply.stats, time.perf_counter() - t0
            time.sleep(lc.queue_poll_s)
        return [], {}, time.perf_counter() - t0

    def valid_samples(self, samples: list[Sample]) -> list[Sample]:
        """Drop (and count) samples with token ids outside the model's vocabulary.

        The protocol only knows ids are non-negative; an id past the embedding table would
        crash the forward pass, so the learner checks before collating.
        """
        vocab = self.model.get_input_embeddings().num_embeddings
        ok = [s for s in samples if max(s.prompt_ids.max(), s.completion_ids.max()) < vocab]
        if len(ok) < len(samples):
            self.rejected_samples += len(samples) - len(ok)
            log.warning("dropped %d samples with token ids >= vocab size %d (%d so far)",
                        len(samples) - len(ok), vocab, self.rejected_samples)  # fmt: skip
        return ok

    def train_micro_batch(self, samples: list[Sample], scale: float) -> dict[str, float]:
        """Forward + backward of one micro-batch with its loss multiplied by ``scale``.

        The loss is the algorithm's objective (learner/objectives.py), plus the k3 KL to
        the reference model when ``learner.kl_coef`` > 0. Returns the micro-batch's metrics
        (loss, clip fraction, KL, entropy, staleness...).
        """
        lc, ac = self.cfg.learner, self.cfg.actor
        batch = collate(samples, self.pad_id)
        lag = self.version - batch.policy_versions
        h = completion_hidden(self.model, batch)
        logp, entropy = logprobs_from_hidden(
            self.model, h, batch.targets, ac.temperature, with_entropy=True
        )
        loss, metrics = self.objective(self, Inputs(batch, h, logp, lag))
        m = batch.mask
        n = m.sum()
        if lc.kl_coef > 0:
            with torch.no_grad():
                ref_logp, _ = token_logprobs(self.ref_model, batch, ac.temperature)
            kl = k3_kl(logp, ref_logp, m)
            loss = loss + lc.kl_coef * kl
            metrics["learner/kl_ref"] = float(kl.detach())
        (loss * scale).backward()
        with torch.no_grad():
            mismatch = ((logp - batch.behaviour_logprobs).abs() * m).sum() / n
        metrics.update(
            {
                "learner/loss": float(loss.detach()),
                "learner/logprob_abs_diff": float(mismatch),
                "learner/entropy": float((entropy * m).sum() / n),
                "learner/reward_mean": float(batch.rewards.mean()),
                "learner/adv_abs_mean": float(batch.advantages.abs().mean()),
                "learner/staleness_mean": float(lag.float().mean()),
                "learner/staleness_max": float(lag.max()),
                "learner/tokens": float(batch.num_tokens),
                "learner/completion_tokens": float(n),
            }
        )
        return metrics

    def update_reference(self, step: int) -> bool:
        """Copy the policy into the reference model every ``learner.ref_update_every`` steps
        (iterative DPO's new reference each round); returns whether it did."""
        every = self.cfg.learner.ref_update_every
        if self.ref_model is None or not every or step % every:
            return False
        self.ref_model.load_state_dict(self.model.state_dict())
        return True

    def evaluate_heldout(self) -> dict[str, float]:
        """Held-out avg@k reward of the current weights, generated with the learner's own model.

        The learner pauses training for it; the actors keep generating into the queue.
        """
        from dashrl.actors.engine import HFEngine
        from dashrl.launch.evaluate import heldout_reward

        res = heldout_reward(self.cfg, HFEngine(model=self.model, tokenizer=self.tokenizer))
        log.info(
            "v%d held-out reward %.4f (%.0f s)", self.version, res["reward_mean"], res["seconds"]
        )
        return {
            "eval/heldout_reward": res["reward_mean"],
            "eval/heldout_pass_at_k": res["pass_at_k"],
            "eval/seconds": res["seconds"],
        }

    def optimizer_step(self) -> tuple[float, bool]:
        """Clip gradients and step; returns (grad norm, whether the step was taken)."""
        # Policy and heads are clipped separately: a fresh critic's large gradient must not
        # shrink the policy's step through a shared global norm. The policy's norm is reported.
        norms = [
            float(torch.nn.utils.clip_grad_norm_(g["params"], self.cfg.learner.max_grad_norm))
            for g in self.optimizer.param_groups
        ]
        norm = norms[0]
        ok = all(math.isfinite(x) for x in norms)
        if ok:
            self.optimizer.step()
        else:
            self.skipped_steps += 1
            log.warning("non-finite gradient norm: step skipped (%d so far)", self.skipped_steps)
        self.optimizer.zero_grad(set_to_none=True)
        return norm, ok


def _mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for r in rows for k in r}
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if k in r]
        out[k] = max(vals) if k.endswith("_max") else sum(vals) / len(vals)
    for k in ("learner/tokens", "learner/completion_tokens"):
        if k in out:
            out[k] *= len(rows)  # totals per step, not means
    return out


def train(cfg: Config, stop: StopFlag) -> dict[str, float]:
    """The learner's main loop (see module docstring). Returns the last metrics row."""
    run_dir = Path(cfg.run_dir)
    lc = cfg.learner
    learner = Learner(cfg)
    metrics = MetricsWriter(run_dir / "metrics.jsonl")
    learner.sender.send(learner.version)  # actors start from exactly the learner's weights
    start = time.monotonic()
    row: dict[str, float] = {}
    step = 0
    try:
        while step < lc.steps and not stop:
            if time.monotonic() - start > cfg.time_limit_s:
                log.info("time limit of %.0f s reached after %d steps", cfg.time_limit_s, step)
                break
            t_step = time.perf_counter()
            mb_rows, wait_s, queue_stats = [], 0.0, {}
            for _ in range(lc.micro_batches_per_step):
                samples, stats, waited = learner.next_micro_batch(stop, start + cfg.time_limit_s)
                if not samples:
                    break
                wait_s += waited
                queue_stats.update(stats)
                mb_rows.append(learner.train_micro_batch(samples, 1.0 / lc.micro_batches_per_step))
            # Stopped or out of time while waiting for data: drop the partial step.
            if len(mb_rows) < lc.micro_batches_per_step:
                learner.optimizer.zero_grad(set_to_none=True)
                break
            if all(math.isfinite(r["learner/loss"]) for r in mb_rows):
                grad_norm, took = learner.optimizer_step()
            else:  # a NaN/inf loss: skip the step, keep the last good weights
                learner.optimizer.zero_grad(set_to_none=True)
                learner.skipped_steps += 1
                grad_norm, took = float("nan"), False
            step += 1
            broadcast_s = 0.0
            if took:  # a skipped step changes no weight: no new version to send
                learner.version += 1
                broadcast_s = learner.sender.send(learner.version)
                learner.update_reference(step)
            step_s = time.perf_counter() - t_step
            row = {
                "step": step,
                "version": learner.version,
                "wall_s": time.monotonic() - start,
                **_mean_rows(mb_rows),
                **queue_stats,
                "learner/grad_norm": grad_norm,
                "learner/step_taken": float(took),
                "learner/skipped_steps": float(learner.skipped_steps),
                "learner/rejected_replies": float(learner.queue.rejected_replies),
                "learner/rejected_samples": float(learner.rejected_samples),
                "learner/micro_batches_per_step": float(len(mb_rows)),
                "learner/step_s": step_s,
                "learner/queue_wait_s": wait_s,
                "learner/broadcast_s": broadcast_s,
            }
            row["learner/tokens_per_s"] = row["learner/tokens"] / max(step_s - wait_s, 1e-9)
            every = cfg.eval.every_steps
            if every and step % every == 0 and step < lc.steps:
                row.update(learner.evaluate_heldout())
            metrics.write(row)
            if lc.checkpoint_every and step % lc.checkpoint_every == 0:
                save_checkpoint(
                    learner.model,
                    learner.tokenizer,
                    run_dir / "checkpoints" / f"step_{step}",
                    learner.version,
                    step,
                    learner.heads,
                )
    finally:
        save_checkpoint(
            learner.model,
            learner.tokenizer,
            run_dir / "checkpoints" / "final",
            learner.version,
            step,
            learner.heads,
        )
        log.info("saved final checkpoint at step %d (version %d)", step, learner.version)
        metrics.close()
        learner.queue.close()
        learner.sender.close()
    return row


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m dashrl.learner.learner <config.json>``."""
    argv = argv if argv is not None else sys.argv[1:]
    setup_logging("learner")
    cfg = load_config(Path(argv[0]))
    set_thread_budget(cfg.learner.torch_threads)
    train(cfg, StopFlag())


if __name__ == "__main__":
    main()
