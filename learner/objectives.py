"""One loss per algorithm family, on a collated micro-batch: what ``--algo`` changes in the learner.

Every objective gets the same inputs (the micro-batch, the policy's hidden states at the
completion positions, the token logprobs and the version lag) and a small
:class:`ObjectiveContext` (the loss settings, the extra heads, the reference model), and
returns the scalar loss plus its metrics. ``Algorithm.objective`` (protocol/algorithms.py)
names the entry of :data:`OBJECTIVES` that an algorithm uses. The formulas live in
:mod:`dashrl.learner.loss` and :mod:`dashrl.learner.critic` as pure tensor functions; this
module only wires them:

- surrogate (grpo, dr_grpo, reinforce, reinforce_rej, raft_pp): PPO/DAPO clipped surrogate
  with the actor's sequence advantage and staleness-aware clipping;
- sft (raft, expert_iteration, rcrl, sft): weighted NLL of the selected samples;
- ppo: token-level GAE advantages from the learner's critic, clipped surrogate, value loss,
  and optionally a dense reward from the learned ORM (Havrilla et al. 2024);
- dpo (iterative_dpo): DPO on the (chosen, rejected) pairs the queue serves together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dashrl.learner import critic as C
from dashrl.learner.batch import MicroBatch, token_logprobs
from dashrl.learner.loss import (
    clipped_surrogate,
    dpo_loss,
    logprob_mismatch,
    sequence_logprobs,
    weighted_nll,
)
from dashrl.protocol.algorithms import Algorithm
from dashrl.protocol.config import Config, PPOConfig


@dataclass
class Inputs:
    """What every objective receives for one micro-batch.

    Attributes:
        batch: the collated micro-batch.
        hidden: [B, T, H] policy hidden states s_t at the completion positions.
        logprobs: [B, T] log pi_theta of the completion tokens (with grad).
        lag: int64 [B] version lag of each sample.
    """

    batch: MicroBatch
    hidden: torch.Tensor
    logprobs: torch.Tensor
    lag: torch.Tensor


@dataclass
class ObjectiveContext:
    """What an objective needs beyond its micro-batch.

    Attributes:
        clip_eps_low, clip_eps_high: PPO clip range of a fresh sample.
        staleness_clip_decay: eps(lag) = eps / (1 + decay * lag).
        tis_cap: truncated importance sampling cap (0: off); the learner sets the
            resolved one (:func:`auto_tis_cap`).
        loss_agg: token aggregation ("token_mean", "seq_mean_token_mean", "seq_sum_const").
        const_len: the constant normaliser of "seq_sum_const", in tokens (max_new_tokens).
        temperature: the sampling temperature the logprobs are computed at.
        dpo_beta: DPO's inverse temperature.
        ppo: PPO's critic settings.
        dense_coef: weight of the ORM's dense reward.
        heads: the learner's extra heads by name ("critic", "orm").
        ref_model: the frozen reference model (DPO, KL), or None.
        dtype: the learner's compute dtype (the reference model's forward uses it too).
    """

    clip_eps_low: float
    clip_eps_high: float
    staleness_clip_decay: float
    tis_cap: float
    loss_agg: str
    const_len: float
    temperature: float
    dpo_beta: float
    ppo: PPOConfig
    dense_coef: float
    heads: dict[str, torch.nn.Module] = field(default_factory=dict)
    ref_model: torch.nn.Module | None = None
    dtype: torch.dtype = torch.float32

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        algo: Algorithm,
        heads: dict[str, torch.nn.Module],
        ref_model: torch.nn.Module | None,
    ) -> ObjectiveContext:
        """The context of a run: ``learner.loss_agg`` when set, else the algorithm's."""
        lc = cfg.learner
        return cls(
            lc.clip_eps_low, lc.clip_eps_high, lc.staleness_clip_decay, lc.tis_cap or 0.0,
            lc.loss_agg or algo.loss_agg, float(cfg.actor.max_new_tokens),
            cfg.actor.temperature, lc.dpo_beta, cfg.ppo, cfg.reward.dense_coef, heads, ref_model,
        )  # fmt: skip


AUTO_TIS_CAP = 2.0
"""The TIS cap ``learner.tis_cap`` None means where an engine computes in reduced precision
(TIS uses C = 2..3, Yao et al. 2025; papers.md "Staleness")."""


def auto_tis_cap(
    setting: float | None, learner_dtype: torch.dtype, actor_dtype: torch.dtype
) -> float:
    """The truncated-IS cap a run uses: ``setting`` when given, else :data:`AUTO_TIS_CAP`
    when the learner or the actor computes in less than float32 (their logprobs then
    disagree by 0.03-0.04 nats per token at lag 0, measured; float32 engines agree to 1e-5)
    and 0 (the clipped surrogate of Eq. 7) when both run float32."""
    if setting is not None:
        return setting
    return 0.0 if learner_dtype == actor_dtype == torch.float32 else AUTO_TIS_CAP


Objective = Callable[[Inputs, ObjectiveContext], tuple[torch.Tensor, dict[str, float]]]


def _surrogate(ctx: ObjectiveContext, x: Inputs, advantages: torch.Tensor):
    return clipped_surrogate(
        x.logprobs, x.batch.behaviour_logprobs, advantages, x.batch.mask, x.lag,
        ctx.clip_eps_low, ctx.clip_eps_high, ctx.staleness_clip_decay, agg=ctx.loss_agg,
        const_len=ctx.const_len, tis_cap=ctx.tis_cap, sample_weights=x.batch.is_weights,
    )  # fmt: skip


def _diagnostics(out, x: Inputs) -> dict[str, float]:
    metrics = {
        "learner/clip_frac": float(out.clip_frac),
        "learner/approx_kl_behaviour": float(out.approx_kl),
        "learner/ratio_mean": float(out.ratio_mean),
        **logprob_mismatch(x.logprobs, x.batch.behaviour_logprobs, x.batch.mask, x.lag),
    }
    if out.tis_frac is not None:
        metrics["learner/tis_truncated_frac"] = float(out.tis_frac)
    return metrics


def surrogate_objective(x: Inputs, ctx: ObjectiveContext) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate with the actor's per-sequence advantages (GRPO and relatives)."""
    out = _surrogate(ctx, x, x.batch.advantages)
    return out.loss, _diagnostics(out, x)


def sft_objective(x: Inputs, ctx: ObjectiveContext) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted NLL on the selected samples (RAFT, Expert Iteration, RCRL, SFT).

    The surrogate's clip fraction and ratio are still reported as off-policyness
    diagnostics; they do not enter the loss."""
    weights = x.batch.advantages * x.batch.is_weights  # prioritized sampling's correction
    loss = weighted_nll(x.logprobs, weights, x.batch.mask, ctx.loss_agg, ctx.const_len)
    with torch.no_grad():
        diag = _diagnostics(_surrogate(ctx, x, x.batch.advantages), x)
    return loss, diag


def ppo_objective(x: Inputs, ctx: ObjectiveContext) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO with a critic (Havrilla et al. 2024; Schulman et al. 2017): token rewards (sparse
    verifier reward on the last token, plus ORM potential shaping when reward.dense is
    "orm"), GAE with the current critic, whitened advantages in the clipped surrogate, and
    vf_coef * value loss (+ the ORM's own BCE loss)."""
    pc = ctx.ppo
    b, mask = x.batch, x.batch.mask
    h = x.hidden.detach() if pc.detach_critic else x.hidden
    values = ctx.heads["critic"](h)  # [B, T]
    token_rewards = C.sparse_token_rewards(b.rewards, mask)
    metrics: dict[str, float] = {}
    loss = torch.zeros((), device=mask.device)
    orm_head = ctx.heads.get("orm")
    if orm_head is not None:
        orm_logits = orm_head(x.hidden.detach())
        correct = (b.rewards >= 1).float()
        orm = C.orm_loss(orm_logits, correct, mask)
        loss = loss + orm
        with torch.no_grad():
            phi = torch.sigmoid(orm_logits)
            token_rewards = token_rewards + ctx.dense_coef * C.potential_shaping(
                phi, mask, pc.gamma
            )
            last = (mask.sum(1).long() - 1).clamp(min=0)
            p_end = phi[torch.arange(len(last), device=last.device), last]
            metrics["learner/orm_loss"] = float(orm.detach())
            metrics["learner/orm_acc"] = float(((p_end > 0.5).float() == correct).float().mean())
    adv, returns = C.gae(token_rewards, values.detach(), mask, pc.gamma, pc.lam)
    out = _surrogate(ctx, x, C.whiten(adv, mask))
    vloss = C.value_loss(values, returns, mask)
    loss = loss + out.loss + pc.vf_coef * vloss
    n = mask.sum()
    metrics.update(_diagnostics(out, x))
    metrics.update({
        "learner/policy_loss": float(out.loss.detach()),
        "learner/value_loss": float(vloss.detach()),
        "learner/value_mean": float((values.detach() * mask).sum() / n),
        "learner/explained_var": C.explained_variance(values.detach(), returns, mask),
        "learner/gae_adv_mean": float((adv * mask).sum() / n),
    })  # fmt: skip
    return loss, metrics


def dpo_pairs(prompt_ids: list[str], advantages: list[float]) -> list[tuple[int, int]]:
    """(chosen, rejected) index pairs of a DPO micro-batch: the queue serves each pair as
    adjacent samples of the same prompt with advantages of opposite sign. Anything else
    (e.g. half a pair dropped by the learner's vocabulary check) is left unpaired."""
    pairs, i = [], 0
    while i + 1 < len(advantages):
        a, b = advantages[i], advantages[i + 1]
        if prompt_ids[i] == prompt_ids[i + 1] and a * b < 0:
            pairs.append((i, i + 1) if a > 0 else (i + 1, i))
            i += 2
        else:
            i += 1
    return pairs


def dpo_objective(x: Inputs, ctx: ObjectiveContext) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO (Rafailov et al. 2023, Eq. 7) on the micro-batch's pairs against the reference
    model (iterative/online DPO: Xiong et al. 2025's baseline). A micro-batch without a
    complete pair contributes a zero loss (and ``learner/dpo_pairs`` 0) instead of failing."""
    b = x.batch
    pairs = dpo_pairs(b.prompt_keys, b.advantages.tolist())
    if not pairs:
        return x.logprobs.sum() * 0.0, {"learner/dpo_pairs": 0.0}
    w, lo = (torch.tensor(i, device=b.mask.device) for i in zip(*pairs, strict=True))
    seq = sequence_logprobs(x.logprobs, b.mask)
    with torch.no_grad():
        ref_logp, _ = token_logprobs(ctx.ref_model, b, ctx.temperature, dtype=ctx.dtype)
        ref = sequence_logprobs(ref_logp, b.mask)
    out = dpo_loss(seq[w], seq[lo], ref[w], ref[lo], ctx.dpo_beta)
    return out.loss, {
        "learner/dpo_margin": float(out.margin),
        "learner/dpo_acc": float(out.accuracy),
        "learner/dpo_pairs": float(len(pairs)),
    }


OBJECTIVES: dict[str, Objective] = {
    "surrogate": surrogate_objective,
    "sft": sft_objective,
    "ppo": ppo_objective,
    "dpo": dpo_objective,
}
"""The learner's loss families by ``Algorithm.objective``."""
