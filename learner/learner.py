"""The learner process: micro-batches from the queue -> clipped off-policy steps -> weights out.

Each optimizer step (DASH preemptive sampling: actors sample large batches, the learner
backprops small ones):
  1. for each of ``micro_batches_per_step`` micro-batches: ask the queue for the
     highest-|A| samples, recompute their logprobs under the current policy, and
     backprop the staleness-aware clipped surrogate, scaled by 1/micro_batches_per_step
     so the accumulated gradient is the mean over micro-batches;
  2. clip the gradient norm and take an AdamW step through the backend (DeepSpeed ZeRO or
     plain torch, learner/backend.py; skipped, and counted, if the loss or gradient is not
     finite: the last good weights stay and the version does not move);
  3. bump the policy version and broadcast the weights to every actor;
  4. write one metrics row to ``metrics.jsonl``.
SIGTERM/SIGINT or the time limit ends the loop after the current step; the final
weights are saved as an HF checkpoint either way.

With several learner ranks (``learner.num_ranks``, started by torchrun) only rank 0 talks to
the queue, the actors and the metrics file; learner/ranks.py shares each micro-batch.
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
from dashrl.learner.backend import init_ranks, make_backend
from dashrl.learner.batch import PolicyForward, collate, token_logprobs
from dashrl.learner.checkpoint import (
    ResumeQueue,
    latest_checkpoint,
    save_checkpoint,
    truncate_metrics,
)
from dashrl.learner.critic import ScalarHead
from dashrl.learner.loss import k3_kl
from dashrl.learner.objectives import Inputs, objective_for
from dashrl.learner.ranks import shard, share_micro_batch
from dashrl.learner.weights import WeightSender
from dashrl.protocol import NodeWelcome, Sample
from dashrl.queue.client import QueueClient

log = logging.getLogger("dashrl.learner")


class Learner:
    """Model, optimizer, queue client and weight sender of one learner process.

    Args:
        cfg: the resolved run config.
        connect: when False, skip the queue and weight group (unit tests drive
            :meth:`train_micro_batch` directly).

    Raises:
        ImportError: ``learner.backend`` is "deepspeed" and DeepSpeed does not import.
    """

    def __init__(self, cfg: Config, connect: bool = True):
        from dashrl.launch.model import load_causal_lm, load_tokenizer

        self.cfg = cfg
        lc = cfg.learner
        torch.manual_seed(cfg.seed)
        self.rank, self.world = init_ranks()
        self.tokenizer = load_tokenizer(cfg.model.path)
        self.pad_id = int(self.tokenizer.pad_token_id)
        # a resumed run starts from its newest checkpoint's weights (optimizer state below)
        self.resume_from = latest_checkpoint(Path(cfg.run_dir)) if cfg.resume else None
        weights = self.resume_from or cfg.model.path
        self.backend = make_backend(PolicyForward(load_causal_lm(weights, train=True)), lc)
        self.model = self.backend.module.model  # the HF model (eval, checkpoints)
        needs_ref = lc.kl_coef > 0 or cfg.algo == "iterative_dpo"
        self.ref_model = load_causal_lm(cfg.model.path) if needs_ref else None
        # PPO's critic and the dense-reward ORM: small heads on the policy's hidden states,
        # with their own AdamW and clipping (a fresh critic's large gradient must not shrink
        # the policy's step through a shared global norm; they are never sharded).
        hidden, pc = self.model.config.hidden_size, cfg.ppo
        self.heads: dict[str, ScalarHead] = {}
        if cfg.algo == "ppo":
            self.heads["critic"] = ScalarHead(hidden, pc.head_hidden)
        if cfg.reward.dense == "orm":
            self.heads["orm"] = ScalarHead(hidden, pc.head_hidden)
        self.critic, self.orm = self.heads.get("critic"), self.heads.get("orm")
        head_params = [p for h in self.heads.values() for p in h.parameters()]
        self.head_optimizer = (
            torch.optim.AdamW(head_params, lr=pc.head_lr, betas=lc.betas) if head_params else None
        )
        self.objective = objective_for(cfg.algo)
        self.version = 0
        self.start_step = 0
        self.skipped_steps = 0
        self.rejected_samples = 0
        if self.resume_from is not None:
            self.start_step = self.load_state(self.resume_from)
            log.info("resumed from %s: step %d, version %d", self.resume_from, self.start_step,
                     self.version)  # fmt: skip
        self.queue = self.sender = self.publisher = self.nodes = None
        self._published_at = 0.0
        if connect and self.rank == 0:
            t = cfg.transport
            from dashrl.launch.security import client_setup

            self.queue = QueueClient(
                f"tcp://{t.host}:{t.request_port}", configure=client_setup(t.curve_dir)
            )
            if cfg.resume:  # micro-batches served after the checkpoint come back from the log
                from dashrl.queue.log import ROLLOUT_LOG, read_queue_log

                path = Path(cfg.run_dir) / ROLLOUT_LOG
                served = read_queue_log(path).served() if path.exists() else []
                done = self.start_step * lc.micro_batches_per_step
                self.queue = ResumeQueue([mb for _, mb in served[done:]], self.queue)
                log.info("re-training on %d logged micro-batches served after step %d",
                         max(len(served) - done, 0), self.start_step)  # fmt: skip
            log.info("waiting for %d actor(s) to join the weight group", cfg.actor.num_actors)
            self.sender = WeightSender(
                self.backend.parameter_shapes(),
                init_method=f"tcp://127.0.0.1:{t.dist_port}",  # launch-time actors are local
                world_size=1 + cfg.actor.num_actors,
                timeout_s=lc.weight_sync_timeout_s,
            )
            # nodes attached later: control socket + ZeroMQ weight publisher (learner/nodes.py)
            from dashrl.learner.nodes import NodeRegistry, WeightPublisher

            weights_at = f"tcp://{t.host}:{t.weights_port}"
            self.publisher = WeightPublisher(weights_at, self.sender.layout, t.curve_dir)
            self.nodes = NodeRegistry(
                f"tcp://{t.host}:{t.control_port}",
                lambda node: NodeWelcome(node, self.version, cfg.model_dump_json(), weights_at),
                t.node_timeout_s,
                t.curve_dir,
            )

    def load_state(self, ckpt: Path) -> int:
        """Continue from a checkpoint written by :func:`save_checkpoint` (the policy weights
        were loaded from it when ``model.path`` points there): optimizer state, heads and
        policy version. Returns the step it was saved at.

        Raises:
            FileNotFoundError: a part of the checkpoint is missing.
        """
        self.backend.load_state(ckpt)
        if self.heads:
            saved = torch.load(ckpt / "heads.pt", weights_only=True)
            for k, h in self.heads.items():
                h.load_state_dict(saved[k])
            self.head_optimizer.load_state_dict(saved["optimizer"])
        if (ckpt / "rng.pt").exists():
            torch.set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True))
        info = json.loads((ckpt / "dashrl_state.json").read_text())
        self.version = int(info["version"])
        return int(info["step"])

    def broadcast_weights(self) -> float:
        """Send the full weights to the actors as the current version (all ranks call it:
        ZeRO-3 gathers parameter by parameter; rank 0 sends). Returns seconds taken."""
        params = self.backend.iter_full_parameters()
        if self.sender is None:
            for _ in params:  # other ranks take part in the gathers only
                pass
            return 0.0
        return self.sender.send(self.version, params) + self._publish()

    def _publish(self) -> float:
        """Publish the weights the sender just packed to ZeroMQ subscribers, when anyone
        needs them (attached nodes, or actors cut off by a broken launch-time group)."""
        if self.nodes is None or not (self.nodes.alive() or self.sender.broken):
            return 0.0
        self._published_at = time.monotonic()
        return self.publisher.publish(self.version, self.sender.flat)

    def republish_if_idle(self, every_s: float = 3.0) -> None:
        """While waiting for data, re-send the current weights to subscribers every
        ``every_s``: a node that (re)joined after the last step must not wait for a step
        that needs its rollouts to happen."""
        if time.monotonic() - self._published_at >= every_s:
            self._publish()

    def next_micro_batch(
        self, stop: StopFlag, deadline: float = math.inf
    ) -> tuple[list[Sample], dict[str, float], float]:
        """Block until the queue serves a full micro-batch, ``stop`` is set or the monotonic
        ``deadline`` passes; returns (samples (empty if none came), queue stats, wait s)."""
        lc = self.cfg.learner
        t0 = time.perf_counter()
        while not stop and time.monotonic() < deadline:
            try:
                reply = self.queue.request(self.version, lc.micro_batch_size, lc.micro_batch_unit,
                                           timeout_s=lc.queue_timeout_s)  # fmt: skip
            except TimeoutError as e:  # the queue died or is restarting: ask again
                log.warning("%s; asking again", e)
                self.republish_if_idle()
                continue
            samples = self.valid_samples(reply.samples)
            if samples:
                return samples, reply.stats, time.perf_counter() - t0
            self.republish_if_idle()
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

    def train_micro_batch(
        self, samples: list[Sample], scale: float, last: bool = True
    ) -> dict[str, float]:
        """Forward + backward of one micro-batch with its loss multiplied by ``scale``;
        ``last`` marks the micro-batch that ends the gradient accumulation.

        The loss is the algorithm's objective (learner/objectives.py), plus the k3 KL to
        the reference model when ``learner.kl_coef`` > 0. Returns the micro-batch's metrics
        (loss, clip fraction, KL, entropy, staleness...).
        """
        lc, ac = self.cfg.learner, self.cfg.actor
        batch = collate(samples, self.pad_id)
        lag = self.version - batch.policy_versions
        h, logp, entropy = self.backend.forward(batch, ac.temperature, with_entropy=True)
        loss, metrics = self.objective(self, Inputs(batch, h, logp, lag))
        m = batch.mask
        n = m.sum()
        if lc.kl_coef > 0:
            with torch.no_grad():
                ref_logp, _ = token_logprobs(self.ref_model, batch, ac.temperature)
            kl = k3_kl(logp, ref_logp, m)
            loss = loss + lc.kl_coef * kl
            metrics["learner/kl_ref"] = float(kl.detach())
        self.backend.backward(loss * scale, last)
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
                # share of the padded [B, L] forward spent on padding (bench/learner_tokens.py)
                "learner/padding_frac": 1.0 - batch.num_tokens / batch.input_ids.numel(),
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
        """Clip gradients and step the policy (through the backend) and the heads; returns
        (policy grad norm, whether the step was taken). A non-finite gradient anywhere skips
        both and keeps the last good weights."""
        head_ok = True
        if self.head_optimizer is not None:
            params = [p for g in self.head_optimizer.param_groups for p in g["params"]]
            hn = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.learner.max_grad_norm))
            head_ok = math.isfinite(hn)
        if head_ok:
            norm, ok = self.backend.step()
        else:
            self.backend.zero_grad()
            norm, ok = float("nan"), False
        if self.head_optimizer is not None:
            if ok:
                self.head_optimizer.step()
            self.head_optimizer.zero_grad(set_to_none=True)
        if not ok:
            self.skipped_steps += 1
            log.warning("non-finite gradient norm: step skipped (%d so far)", self.skipped_steps)
        return norm, ok

    def zero_grad(self) -> None:
        """Abandon the accumulated gradients (a partial or non-finite step)."""
        self.backend.zero_grad()
        if self.head_optimizer is not None:
            self.head_optimizer.zero_grad(set_to_none=True)


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


def _any_rank(flag: bool, world: int) -> bool:
    """True if ``flag`` holds on any learner rank (all ranks must agree to skip a step)."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def train(cfg: Config, stop: StopFlag, learner: Learner | None = None) -> dict[str, float]:
    """The learner's main loop (see module docstring). Returns the last metrics row.

    Args:
        cfg: the resolved run config.
        stop: set by SIGTERM/SIGINT (or by a replayed log running out).
        learner: a prepared learner (replay passes one whose queue is the log); default:
            a connected learner built from ``cfg``.
    """
    run_dir = Path(cfg.run_dir)
    lc = cfg.learner
    learner = learner or Learner(cfg)
    rank, world = learner.rank, learner.world
    unit = 2 if cfg.algo == "iterative_dpo" else 1  # DPO pairs stay on one rank
    step = learner.start_step
    if rank == 0 and cfg.resume:  # rows the dead learner wrote after its checkpoint go
        truncate_metrics(run_dir / "metrics.jsonl", step)
    metrics = MetricsWriter(run_dir / "metrics.jsonl") if rank == 0 else None
    learner.broadcast_weights()  # actors start from exactly the learner's weights
    start = time.monotonic()
    deadline = start + cfg.time_limit_s
    row: dict[str, float] = {}
    try:
        while True:
            if rank == 0:  # rank 0 decides when training ends; the others follow
                if step >= lc.steps or stop:
                    break
                if time.monotonic() > deadline:
                    log.info("time limit of %.0f s reached after %d steps", cfg.time_limit_s, step)
                    break
            t_step = time.perf_counter()
            mb_rows, wait_s, queue_stats = [], 0.0, {}
            n = lc.micro_batches_per_step
            for i in range(n):
                samples: list[Sample] = []
                if rank == 0:
                    samples, stats, waited = learner.next_micro_batch(stop, deadline)
                    wait_s += waited
                    queue_stats.update(stats)
                if world > 1:
                    samples = share_micro_batch(samples, rank)
                if not samples:
                    break
                mine, weight = shard(samples, rank, world, unit)
                mb_rows.append(learner.train_micro_batch(mine, weight / n, last=i == n - 1))
            # Stopped or out of time while waiting for data: drop the partial step.
            if len(mb_rows) < n:
                learner.zero_grad()
                break
            if _any_rank(not all(math.isfinite(r["learner/loss"]) for r in mb_rows), world):
                learner.zero_grad()  # a NaN/inf loss: skip the step, keep the last good weights
                learner.skipped_steps += 1
                grad_norm, took = float("nan"), False
            else:
                grad_norm, took = learner.optimizer_step()
            step += 1
            broadcast_s = 0.0
            if took:  # a skipped step changes no weight: no new version to send
                learner.version += 1
                broadcast_s = learner.broadcast_weights()
                learner.update_reference(step)
            step_s = time.perf_counter() - t_step
            if lc.checkpoint_every and step % lc.checkpoint_every == 0:
                save_checkpoint(learner, run_dir / "checkpoints" / f"step_{step}", step,
                                full=lc.checkpoint_optimizer)  # fmt: skip
            if rank != 0:
                continue
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
                "learner/ranks": float(world),
                "learner/attached_nodes": float(len(learner.nodes.alive()) if learner.nodes else 0),
                "learner/step_s": step_s,
                "learner/queue_wait_s": wait_s,
                "learner/broadcast_s": broadcast_s,
            }
            row["learner/tokens_per_s"] = row["learner/tokens"] * world / max(step_s - wait_s, 1e-9)
            every = cfg.eval.every_steps
            if every and step % every == 0 and step < lc.steps:
                row.update(learner.evaluate_heldout())
            metrics.write(row)
    finally:
        if rank == 0 and world > 1:
            share_micro_batch([], rank)  # tell the other ranks to stop
        save_checkpoint(learner, run_dir / "checkpoints" / "final", step)
        log.info("saved final checkpoint at step %d (version %d)", step, learner.version)
        if rank == 0:
            metrics.close()
            learner.queue.close()
            if learner.sender is not None:
                learner.sender.close()
                learner.nodes.close()
                learner.publisher.close()
    return row


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m dashrl.learner.learner <config.json>``."""
    argv = argv if argv is not None else sys.argv[1:]
    rank, _ = init_ranks()
    setup_logging("learner" if rank == 0 else f"learner{rank}")
    cfg = load_config(Path(argv[0]))
    set_thread_budget(cfg.learner.torch_threads)
    train(cfg, StopFlag())


if __name__ == "__main__":
    main()
