"""The learner: micro-batches in, clipped off-policy steps, weights out.

Each optimizer step (DASH preemptive sampling: actors sample large batches, the learner
backprops small ones) is owned by :meth:`Learner.step`:
  1. for each of ``micro_batches_per_step`` micro-batches: take the highest-|A| samples
     from the feed (learner/sources.py), recompute their logprobs under the current
     policy, and backprop the algorithm's objective scaled by 1/micro_batches_per_step, so
     the accumulated gradient is the mean over micro-batches (``--mode dash``: every
     informative sample of the actors' current batch, each micro-batch scaled by its share
     of the batch's samples; ``Feed.step_slices``);
  2. skip the step (counted; the last good weights stay, the version does not move) if a
     loss or the gradient norm is not finite, else clip and take an AdamW step through the
     backend (DeepSpeed ZeRO or plain torch, learner/backend.py);
  3. bump the policy version, send the weights through the weight channel
     (learner/channel.py), refresh the reference model if due, and checkpoint if due.
:func:`train` is the loop around it, with one metrics row per step. SIGTERM/SIGINT or the
time limit ends the loop after the current step; the final weights are saved either way.

With several learner ranks (``learner.num_ranks``, started by torchrun) only rank 0 holds
a micro-batch source, the actors' channel and the metrics file; the feed shares each
micro-batch with the other ranks (learner/ranks.py). The process entry point is
``dashrl.launch.learn``, which adds the in-run held-out evaluation.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dashrl.learner.backend import init_ranks, make_backend
from dashrl.learner.batch import PolicyForward, collate, token_logprobs
from dashrl.learner.channel import NoChannel, open_weight_channel, wire_dtype_for
from dashrl.learner.checkpoint import (
    load_checkpoint_state,
    resumable_checkpoint,
    save_checkpoint,
    truncate_metrics,
)
from dashrl.learner.critic import ScalarHead
from dashrl.learner.loss import active_token_frac, k3_kl
from dashrl.learner.objectives import OBJECTIVES, Inputs, ObjectiveContext, auto_tis_cap
from dashrl.learner.ranks import all_ranks_agree, shard
from dashrl.learner.sources import Feed, MicroBatchSource, ResumeSource
from dashrl.protocol import Sample
from dashrl.protocol.algorithms import get_algorithm
from dashrl.protocol.config import Config
from dashrl.protocol.hardware import local_device, resolve_dtype
from dashrl.protocol.model import load_causal_lm, load_tokenizer
from dashrl.protocol.placement import role_device
from dashrl.protocol.runtime import MetricsWriter, StopFlag
from dashrl.protocol.security import client_setup
from dashrl.queue.client import QueueClient
from dashrl.queue.log import ROLLOUT_LOG, read_queue_log
from dashrl.queue.policies import replay_priority

log = logging.getLogger("dashrl.learner")

Evaluator = Callable[["Learner", float], dict[str, float]]
"""Called on rank 0 after every step with the learner and the step's wall time (seconds
since training started); returns the ``eval/*`` metrics that are ready for this step's row
(an evaluation it ran or started when due, possibly of an earlier version: ``eval/version``
says which). It may have a ``close()``, called when training ends."""


class Learner:
    """Model, heads, optimizer, micro-batch feed and weight channel of one learner process.

    Args:
        cfg: the resolved run config.
        connect: when False, no queue and no actors (unit tests drive
            :meth:`train_micro_batch` directly; a replay passes its own source to train).

    Raises:
        ImportError: ``learner.backend`` is "deepspeed" and DeepSpeed does not import.
    """

    def __init__(self, cfg: Config, connect: bool = True):
        self.cfg, lc = cfg, cfg.learner
        self.algo = get_algorithm(cfg.algo)
        torch.manual_seed(cfg.seed)
        self.rank, self.world = init_ranks()
        self.tokenizer = load_tokenizer(cfg.model.path)
        self.pad_id = int(self.tokenizer.pad_token_id)
        # a resumed run starts from its newest checkpoint's weights (optimizer state below)
        self.resume_from = resumable_checkpoint(Path(cfg.run_dir)) if cfg.resume else None
        weights = self.resume_from or cfg.model.path
        # one device for the role (cuda:LOCAL_RANK where there is a GPU); the policy,
        # reference and heads go there before any optimizer is built over them
        self.device = role_device(lc.device)
        log.info("learner rank %d on %s", self.rank, self.device)
        # mixed precision where the hardware has bf16 matrix units (protocol/hardware.py)
        self.dtype = resolve_dtype(lc.dtype, self.device.type, "learner")
        policy = PolicyForward(load_causal_lm(weights, train=True).to(self.device), self.dtype)
        self.backend = make_backend(policy, lc, rendezvous_port=cfg.transport.learner_port)
        self.model = self.backend.module.model  # the HF model (eval, checkpoints)
        needs_ref = lc.kl_coef > 0 or self.algo.reference
        self.ref_model = load_causal_lm(cfg.model.path).to(self.device) if needs_ref else None
        # PPO's critic and the dense-reward ORM: small heads on the policy's hidden states,
        # with their own AdamW and clipping (a fresh critic's large gradient must not shrink
        # the policy's step through a shared global norm; they are never sharded).
        hidden, pc = self.model.config.hidden_size, cfg.ppo
        names = [*self.algo.heads, *(["orm"] if cfg.reward.dense == "orm" else [])]
        self.heads = {name: ScalarHead(hidden, pc.head_hidden).to(self.device) for name in names}
        head_params = [p for h in self.heads.values() for p in h.parameters()]
        self.head_optimizer = (
            torch.optim.AdamW(head_params, lr=pc.head_lr, betas=lc.betas) if head_params else None
        )
        self.objective = OBJECTIVES[self.algo.objective]
        self.context = ObjectiveContext.from_config(cfg, self.algo, self.heads, self.ref_model)
        self.context.dtype = self.dtype
        # tis_cap None (auto): on where bf16 makes the engines' logprobs disagree
        # (learner/objectives.py); the actor's dtype is resolved only then
        a, actor = cfg.actor, torch.float32
        auto_wire = cfg.transport.weight_dtype == "auto"
        if (lc.tis_cap is None or auto_wire) and a.engine == "vllm":
            actor = resolve_dtype(a.vllm.dtype, local_device(), "actor (as the learner expects)")
        self.context.tis_cap = auto_tis_cap(lc.tis_cap, self.dtype, actor)
        self.wire_dtype = wire_dtype_for(cfg.transport.weight_dtype, self.dtype, actor)
        log.info("truncated importance sampling cap %s", self.context.tis_cap or "off")
        self.version = self.step_count = self.skipped_steps = self.empty_batches = 0
        self.checkpoints = Path(cfg.run_dir) / "checkpoints"
        self._last_save = 0.0  # monotonic time of the last periodic checkpoint (0: none yet)
        q = cfg.queue
        # With reuse, each served sample's new priority goes back to the queue. With several
        # ranks each holds only its shard's ratios: priorities then stay |A| (not gathered).
        self.reports_priorities = q.max_uses > 1 and q.priority_updates and self.world == 1
        self.priorities: dict[int, float] = {}  # id(sample) -> priority, last micro-batch
        if self.resume_from is not None:
            self.load_state(self.resume_from)
            log.info("resumed from %s: step %d, version %d", self.resume_from, self.step_count,
                     self.version)  # fmt: skip
        self.source: MicroBatchSource | None = None
        self.channel = NoChannel()
        if connect and self.rank == 0:
            self.source = self._open_source()
            log.info("waiting for %d actor(s) to join the weight group", cfg.actor.num_actors)
            self.channel = open_weight_channel(
                cfg, self.backend.parameter_shapes(), lambda: self.version, self.wire_dtype
            )

    def _open_source(self) -> MicroBatchSource:
        """The queue client; after a resume, first the micro-batches served after the
        checkpoint (from the queue log), whose updates died with the old learner."""
        t = self.cfg.transport
        queue = QueueClient(f"tcp://{t.host}:{t.request_port}", configure=client_setup(t.curve_dir))
        if not self.cfg.resume:
            return queue
        path = Path(self.cfg.run_dir) / ROLLOUT_LOG
        served = read_queue_log(path, strict=True).served() if path.exists() else []
        done = self.step_count * self.cfg.learner.micro_batches_per_step
        if self.cfg.mode == "dash":  # steps of any length: the checkpoint's version says
            done = sum(e.learner_version < self.version for e, _ in served)
        log.info("re-training on %d logged micro-batches served after step %d",
                 max(len(served) - done, 0), self.step_count)  # fmt: skip
        rest = served[done:]
        return ResumeSource([mb for _, mb in rest], queue, [e.learner_version for e, _ in rest])

    def feed(self, source: MicroBatchSource | None = None) -> Feed:
        """The micro-batch feed of this rank: ``source`` (default: the learner's own)."""
        vocab = self.model.get_input_embeddings().num_embeddings
        return Feed(source or self.source, self.cfg.learner, self.rank, self.world, vocab,
                    on_idle=self.channel.idle)  # fmt: skip

    def broadcast_weights(self) -> float:
        """Send the full weights as the current version (all ranks call it: ZeRO-3 gathers
        parameter by parameter; rank 0 sends). Returns seconds taken."""
        return self.channel.send(self.version, self.backend.iter_full_parameters())

    def train_micro_batch(
        self, samples: list[Sample], scale: float, last: bool = True
    ) -> dict[str, float]:
        """Forward + backward of one micro-batch with its loss multiplied by ``scale``;
        ``last`` marks the micro-batch that ends the gradient accumulation.

        The loss is the algorithm's objective (learner/objectives.py), plus the k3 KL to
        the reference model when ``learner.kl_coef`` > 0. Returns the micro-batch's metrics
        (loss, clip fraction, KL, entropy, staleness...).
        """
        lc, temperature = self.cfg.learner, self.cfg.actor.temperature
        batch = collate(samples, self.pad_id, share_prefix=lc.share_prefix).to(self.device)
        lag = self.version - batch.policy_versions
        h, logp, entropy = self.backend.forward(batch, temperature, with_entropy=True)
        loss, metrics = self.objective(Inputs(batch, h, logp, lag), self.context)
        if self.reports_priorities:  # the replay queue re-ranks what it will serve again
            c = self.context
            active = active_token_frac(logp, batch.behaviour_logprobs, batch.advantages,
                                       batch.mask, lag, c.clip_eps_low, c.clip_eps_high,
                                       c.staleness_clip_decay)  # fmt: skip
            self.priorities = {id(s): replay_priority(s.advantage, float(f))
                               for s, f in zip(samples, active, strict=True)}  # fmt: skip
            metrics["learner/replay_active_frac"] = float(active.mean())
        m = batch.mask
        n = m.sum()
        if lc.kl_coef > 0:
            with torch.no_grad():
                ref_logp, _ = token_logprobs(self.ref_model, batch, temperature, dtype=self.dtype)
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
                "learner/is_weight_mean": float(batch.is_weights.mean()),
                "learner/staleness_mean": float(lag.float().mean()),
                "learner/staleness_max": float(lag.max()),
                "learner/tokens": float(batch.num_tokens),  # every sample's, in full
                "learner/forward_tokens": float(batch.forward_tokens),  # shared prompts once
                # share of the forward's token slots spent on padding (bench/learner_tokens.py)
                "learner/padding_frac": 1.0 - batch.forward_tokens / batch.padded_tokens,
                "learner/completion_tokens": float(n),
            }
        )
        return metrics

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
        return norm, ok

    def zero_grad(self) -> None:
        """Abandon the accumulated gradients (a partial or non-finite step)."""
        self.backend.zero_grad()
        if self.head_optimizer is not None:
            self.head_optimizer.zero_grad(set_to_none=True)

    def step(self, feed: Feed, stop: StopFlag, deadline: float = math.inf) -> dict | None:
        """One whole optimizer step (see the module docstring): accumulate, NaN-skip, step,
        version bump, broadcast, reference refresh, checkpoint. Returns the step's metrics,
        or None when the feed ran dry (stopped or out of time) and the partial step was
        dropped."""
        lc, t0 = self.cfg.learner, time.perf_counter()
        rows, waited, queue_stats, ended = [], 0.0, {}, False
        for sl in feed.step_slices(self.version, stop, self.cfg.mode == "dash", deadline):
            waited += sl.waited_s
            queue_stats.update(sl.stats)
            ended = sl.last
            if not sl.samples:  # mode dash: the filter left nothing of this batch
                break
            mine, weight = shard(sl.samples, self.rank, self.world, self.algo.unit_size)
            rows.append(self.train_micro_batch(mine, weight * sl.share, last=sl.last))
            if self.reports_priorities:
                feed.report_priorities(self.priorities)
        if not ended:  # the feed ran dry: drop the partial step
            self.zero_grad()
            return None
        grad_norm, took = float("nan"), False
        if not rows:
            # An empty dash batch: nothing to step on, but a new version sends the actors
            # (waiting for one) to sample the next batch, from the same weights.
            self.empty_batches += 1
        elif all_ranks_agree(all(math.isfinite(r["learner/loss"]) for r in rows), self.world):
            grad_norm, took = self.optimizer_step()
        else:
            self.zero_grad()  # a NaN/inf loss: skip the step, keep the last good weights
        if rows and not took:
            self.skipped_steps += 1
            log.warning("non-finite loss or gradient: step skipped (%d so far)",
                        self.skipped_steps)  # fmt: skip
        self.step_count += 1
        broadcast_s = 0.0
        if took or not rows:  # a skipped step changes no weight: no new version to send
            self.version += 1
            broadcast_s = self.broadcast_weights()
            self.update_reference()
        step_s = time.perf_counter() - t0
        ckpt_s, now = 0.0, time.monotonic()
        self._last_save = self._last_save or now - step_s  # the clock starts with step 1
        if (lc.checkpoint_every and self.step_count % lc.checkpoint_every == 0) or (
            lc.checkpoint_every_s and now - self._last_save >= lc.checkpoint_every_s
        ):
            self.save(self.checkpoints / f"step_{self.step_count}", full=lc.checkpoint_optimizer)
            self._last_save = time.monotonic()
            ckpt_s = self._last_save - now  # reported, so a clock can leave saving out
        out = {**mean_rows(rows), **queue_stats, "learner/grad_norm": grad_norm,
               "learner/step_taken": float(took), "learner/step_s": step_s,
               "learner/queue_wait_s": waited, "learner/broadcast_s": broadcast_s,
               "learner/checkpoint_s": ckpt_s,
               "learner/micro_batches_per_step": float(len(rows)),
               "learner/empty_batches": float(self.empty_batches)}  # fmt: skip
        compute_s = max(step_s - waited, 1e-9)
        out["learner/tokens_per_s"] = out.get("learner/tokens", 0.0) * self.world / compute_s
        return out

    def done(self) -> bool:
        """Whether ``learner.steps`` optimizer steps have been taken (or skipped)."""
        return self.step_count >= self.cfg.learner.steps

    def update_reference(self) -> bool:
        """Copy the policy into the reference model every ``learner.ref_update_every`` steps
        (iterative DPO's new reference each round); returns whether it did."""
        every = self.cfg.learner.ref_update_every
        if self.ref_model is None or not every or self.step_count % every:
            return False
        self.ref_model.load_state_dict(self.model.state_dict())
        return True

    def save(self, out: Path, full: bool = True) -> Path:
        """Checkpoint to ``out`` at the current step and version (every rank calls it)."""
        return save_checkpoint(out, self.step_count, self.version, self.backend, self.tokenizer,
                               self.heads, self.head_optimizer, self.rank, full)  # fmt: skip

    def load_state(self, ckpt: Path) -> int:
        """Optimizer state, heads, RNG and version from ``ckpt`` (the policy weights were
        loaded from it when ``model.path`` points there); returns the step it was saved at.

        Raises:
            FileNotFoundError: a part of the checkpoint is missing.
        """
        self.version, self.step_count = load_checkpoint_state(
            ckpt, self.backend, self.heads, self.head_optimizer
        )
        return self.step_count


def mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    """One step's metrics from its micro-batches' rows: means, maxima for ``*_max`` keys,
    and totals for the token counts."""
    keys = {k for r in rows for k in r}
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if k in r]
        out[k] = max(vals) if k.endswith("_max") else sum(vals) / len(vals)
    for k in ("learner/tokens", "learner/forward_tokens", "learner/completion_tokens"):
        if k in out:
            out[k] *= len(rows)  # totals per step, not means
    return out


def train(
    cfg: Config,
    stop: StopFlag,
    learner: Learner | None = None,
    source: MicroBatchSource | None = None,
    evaluate: Evaluator | None = None,
) -> dict[str, float]:
    """The learner's main loop (see the module docstring). Returns the last metrics row.

    Args:
        cfg: the resolved run config.
        stop: set by SIGTERM/SIGINT (or by a replayed log running out).
        learner: a prepared learner; default: a connected learner built from ``cfg``.
        source: where micro-batches come from (a replay's log); default: the learner's own.
        evaluate: the in-run held-out evaluation (rank 0, after every step; see
            :data:`Evaluator`).
    """
    learner = learner or Learner(cfg)
    lead, feed, run_dir = learner.rank == 0, learner.feed(source), Path(cfg.run_dir)
    if lead and cfg.resume:  # rows the dead learner wrote after its checkpoint go
        truncate_metrics(run_dir / "metrics.jsonl", learner.step_count)
    metrics = MetricsWriter(run_dir / "metrics.jsonl") if lead else None
    learner.broadcast_weights()  # actors start from exactly the learner's weights
    start = time.monotonic()
    deadline, row = start + cfg.time_limit_s, {}
    try:
        # rank 0 decides when training ends; the other ranks follow its empty micro-batch
        while not (lead and (learner.done() or stop)):
            if lead and time.monotonic() > deadline:
                log.info("time limit of %.0f s reached after %d steps", cfg.time_limit_s,
                         learner.step_count)  # fmt: skip
                break
            out = learner.step(feed, stop, deadline)
            if out is None:  # stopped or out of time while waiting for data
                break
            if not lead:
                continue
            row = {"step": learner.step_count, "version": learner.version,
                   "wall_s": time.monotonic() - start, "unix_s": time.time(), **out,
                   "learner/skipped_steps": float(learner.skipped_steps),
                   "learner/rejected_replies": float(feed.rejected_replies),
                   "learner/rejected_samples": float(feed.rejected_samples),
                   "learner/ranks": float(learner.world),
                   "learner/attached_nodes": float(learner.channel.attached_nodes())}  # fmt: skip
            if evaluate:  # never of the last step's weights: the launcher evaluates those
                row.update(evaluate(learner, row["wall_s"]))
            metrics.write(row)
    finally:
        if lead and evaluate is not None and hasattr(evaluate, "close"):
            evaluate.close()
        feed.stop_ranks()
        learner.save(learner.checkpoints / "final")
        log.info("saved final checkpoint at step %d (version %d)", learner.step_count,
                 learner.version)  # fmt: skip
        if lead:
            metrics.close()
            feed.close()
            learner.channel.close()
    return row
