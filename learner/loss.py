"""Policy losses: the PPO clipped surrogate with staleness-aware clipping, and the k3 KL.

All functions are pure tensor functions so they can be checked against hand-computed
values. Shapes: B sequences, T completion positions (padded), float32 unless stated.

Staleness-aware clipping (dashrl's rule). A sample generated ``lag`` policy versions ago
gets the clip range

    eps_low(lag)  = eps_low  / (1 + decay * lag)
    eps_high(lag) = eps_high / (1 + decay * lag)

Reasoning: the importance ratio pi_theta / mu corrects the distribution shift of an
off-policy sample in expectation, but its variance grows with the drift between mu and
pi_theta, and the drift grows with the lag. PPO's clip bounds how far one sample may
push the policy away from the policy that generated it; shrinking that bound with the
lag makes a stale sample move the policy less than a fresh one, like a per-sample trust
region that tightens with age (cf. TIS, which truncates the ratio itself). Fresh samples
(lag 0) get exactly the PPO/DAPO clip. ``decay = 0`` recovers plain PPO clipping; samples
past ``queue.max_staleness`` never reach the loss at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 5e8: keeps a corrupted logprob from overflowing exp
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_sum_const")


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean", const_len: float = 1.0
) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar over the masked tokens.

    - "token_mean": sum / number of tokens in the batch (DAPO, Yu et al. 2025, arXiv
      2503.14476): every token weighs the same, so long completions are not down-weighted.
    - "seq_mean_token_mean": mean over sequences of each sequence's token mean (the
      original GRPO objective).
    - "seq_sum_const": mean over sequences of each sequence's token sum / ``const_len``
      (Dr.GRPO: a constant normaliser, e.g. the max completion length, instead of |o_i|).

    Raises:
        ValueError: unknown mode, or an empty mask.
    """
    m = mask.float()
    if m.sum() <= 0:
        raise ValueError("empty mask: no completion tokens")
    if mode == "token_mean":
        return (per_token * m).sum() / m.sum()
    if mode == "seq_mean_token_mean":
        return ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    if mode == "seq_sum_const":
        return ((per_token * m).sum(1) / const_len).mean()
    raise ValueError(f"unknown loss aggregation {mode!r}; known: {LOSS_AGGREGATIONS}")


def staleness_clip_bounds(
    lag: torch.Tensor, eps_low: float, eps_high: float, decay: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper ratio bounds per sample, [B] each, from the staleness rule above.

    Args:
        lag: int or float tensor [B], version lag (learner version - policy version) >= 0.
        eps_low, eps_high: clip epsilons of a fresh sample (PPO: 0.2/0.2; DAPO: 0.2/0.28).
        decay: how fast the range shrinks with lag (0: no staleness dependence).
    """
    scale = 1.0 / (1.0 + decay * lag.clamp(min=0).float())
    return 1.0 - eps_low * scale, 1.0 + eps_high * scale


@dataclass
class SurrogateOutput:
    """Loss and diagnostics of the clipped surrogate (all 0-d tensors)."""

    loss: torch.Tensor
    clip_frac: torch.Tensor
    """Fraction of tokens where the clipped term is the active (smaller) one."""
    approx_kl: torch.Tensor
    """k3 estimate of KL(mu || pi_theta) over tokens, a measure of off-policyness."""
    ratio_mean: torch.Tensor
    tis_frac: torch.Tensor | None = None
    """Fraction of tokens whose TIS weight pi_prox / mu was truncated at the cap (TIS on)."""


def active_token_frac(
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    lag: torch.Tensor,
    eps_low: float,
    eps_high: float,
    decay: float = 0.0,
) -> torch.Tensor:
    """Per sample, the share of its completion tokens whose clipped-surrogate gradient is
    not zero: float32 [B] in [0, 1] (0 for a sample without tokens).

    PPO's min(rho A, clip(rho, lo, hi) A) (Schulman et al. 2017, "Proximal Policy
    Optimization Algorithms", arXiv 1707.06347, Eq. 7) takes the clipped, constant branch
    exactly when rho > hi with A > 0 or rho < lo with A < 0; those tokens contribute no
    gradient. The replay queue uses this to re-rank a served sample (queue/policies.py
    ``replay_priority``). Bounds lo, hi per sample from :func:`staleness_clip_bounds`.

    Args:
        logprobs, behaviour_logprobs, mask: [B, T] as in :func:`clipped_surrogate`.
        advantages: [B] per-sequence advantages.
        lag: [B] version lag.
    """
    with torch.no_grad():
        ratio = torch.exp((logprobs - behaviour_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        lo, hi = staleness_clip_bounds(lag, eps_low, eps_high, decay)
        adv = advantages[:, None]
        dead = ((ratio > hi[:, None]) & (adv > 0)) | ((ratio < lo[:, None]) & (adv < 0))
        m = mask.float()
        return ((~dead).float() * m).sum(1) / m.sum(1).clamp(min=1)


def clipped_surrogate(
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    lag: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    decay: float = 0.0,
    agg: str = "token_mean",
    const_len: float = 1.0,
    tis_cap: float = 0.0,
    sample_weights: torch.Tensor | None = None,
) -> SurrogateOutput:
    """PPO clipped surrogate with a token-level mean, on off-policy samples.

    L = - sum_{b,t} mask * min(rho * A_b, clip(rho, lo_b, hi_b) * A_b) / sum mask,
    rho = exp(logprobs - behaviour_logprobs). The clipped objective is PPO's (Schulman et
    al. 2017, Eq. 7) as used by GRPO; the token-level mean over the batch and the
    asymmetric eps_low/eps_high are DAPO's (Yu et al. 2025, arXiv 2503.14476); the
    per-sample bounds lo_b, hi_b are dashrl's staleness rule (module docstring).

    Args:
        logprobs: [B, T] log pi_theta of the sampled tokens (requires grad).
        behaviour_logprobs: [B, T] log mu of the same tokens, from the actor.
        advantages: [B] advantage of each sequence, or [B, T] per-token advantages (PPO
            with a critic and GAE, see :mod:`dashrl.learner.critic`).
        mask: [B, T] 1 for completion tokens, 0 for padding (bool or float).
        lag: [B] version lag of each sequence.
        eps_low, eps_high, decay: see :func:`staleness_clip_bounds`.
        agg, const_len: how tokens are averaged, see :func:`aggregate` (default: the
            token-level mean above).
        tis_cap: C > 0 switches to the decoupled form with truncated importance sampling
            (papers.md "Staleness": AReaL's decoupled PPO, TIS of Yao et al. 2025):
            L = -agg(w_t * min(u_t A, clip(u_t, lo_b, hi_b) A)), u_t = pi_theta / pi_prox,
            w_t = min(pi_prox / mu, C), with pi_prox = the learner's own logprobs of this
            forward, detached. pi_prox / mu is the mismatch between the generation engine
            (vLLM) and the learner (plus the staleness of the sample); truncating it at C
            bounds the variance it adds. Every sample is used once, so u_t = 1 in value
            and the gradient is w_t * A * grad log pi_theta.
        sample_weights: [B] importance weights of prioritized sampling (Schaul et al.
            2016, "Prioritized Experience Replay", arXiv 1511.05952, Sec. 3.4), multiplied
            into each sample's per-token loss; None: all 1.

    Returns:
        SurrogateOutput with the scalar loss and diagnostics.

    Raises:
        ValueError: shapes do not match or the mask is empty.
    """
    if logprobs.shape != behaviour_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(f"shape mismatch {logprobs.shape} {behaviour_logprobs.shape} {mask.shape}")
    B = logprobs.shape[:1]
    if advantages.shape not in (B, logprobs.shape) or lag.shape != B:
        raise ValueError("advantages must be [B] or [B, T], and lag [B]")
    m = mask.float()
    n = m.sum()
    if n <= 0:
        raise ValueError("empty mask: no completion tokens")
    log_ratio = (logprobs - behaviour_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    lo, hi = staleness_clip_bounds(lag, eps_low, eps_high, decay)
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    if tis_cap > 0:  # decoupled: clip against pi_prox, correct pi_prox vs mu by truncated IS
        u = torch.exp(logprobs - logprobs.detach())
        weight = ratio.detach().clamp(max=tis_cap)
        truncated = ratio.detach() > tis_cap
    else:
        u, weight, truncated = ratio, torch.ones_like(ratio), None
    unclipped = u * adv
    clipped = torch.minimum(torch.maximum(u, lo[:, None]), hi[:, None]) * adv
    per_token = -weight * torch.minimum(unclipped, clipped)
    if sample_weights is not None:
        per_token = per_token * sample_weights[:, None]
    loss = aggregate(per_token, m, agg, const_len)
    with torch.no_grad():
        clip_frac = ((clipped < unclipped).float() * m).sum() / n
        approx_kl = ((ratio - 1 - log_ratio) * m).sum() / n
        ratio_mean = (ratio * m).sum() / n
        tis_frac = None if truncated is None else (truncated.float() * m).sum() / n
    return SurrogateOutput(loss, clip_frac, approx_kl, ratio_mean, tis_frac)


def logprob_mismatch(
    logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor, lag: torch.Tensor
) -> dict[str, float]:
    """How far the engine's behaviour logprobs are from the learner's under the same weights.

    Only samples with lag 0 count: their weights are exactly the learner's current ones, so
    any difference is numerics (vLLM kernels, dtype, batch shape), not staleness.

    Args:
        logprobs: [B, T] learner log pi of the sampled tokens; behaviour_logprobs: [B, T]
            the engine's; mask: [B, T]; lag: [B].

    Returns:
        {} when no token has lag 0, else mean and max |log pi - log mu| (nats) and the
        standard deviation of the token importance ratio pi / mu.
    """
    with torch.no_grad():
        m = mask.bool() & (lag == 0)[:, None]
        if not m.any():
            return {}
        diff = (logprobs.detach() - behaviour_logprobs)[m].float()
        ratio = torch.exp(diff.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        return {
            "learner/logprob_diff_mean": float(diff.abs().mean()),
            "learner/logprob_diff_max": float(diff.abs().max()),
            "learner/is_ratio_std": float(ratio.std()) if ratio.numel() > 1 else 0.0,
        }


def weighted_nll(
    logprobs: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    agg: str = "token_mean",
    const_len: float = 1.0,
) -> torch.Tensor:
    """Supervised (SFT) loss on sampled completions, each weighted: L = agg(-w_b * log pi).

    RAFT (Minimal-RL, Xiong et al. 2025, "RAFT": rejection-sampling fine-tuning on the
    best samples) uses it with w = 1 on the kept samples and 0 elsewhere.

    Args:
        logprobs: [B, T] log pi_theta of the completion tokens.
        weights: [B] per-sequence weights (the advantages of the selection estimator).
        mask: [B, T] completion-token mask.
        agg, const_len: see :func:`aggregate`.
    """
    return aggregate(-weights[:, None] * logprobs, mask, agg, const_len)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean k3 estimate of KL(pi_theta || pi_ref) (Schulman 2020, "Approximating KL
    Divergence", blog note).

    KL ~ exp(log pi_ref - log pi_theta) - (log pi_ref - log pi_theta) - 1, per token, >= 0.

    Args:
        logprobs: [B, T] log pi_theta of the sampled tokens.
        ref_logprobs: [B, T] log pi_ref of the same tokens (no grad).
        mask: [B, T] completion-token mask.

    Returns:
        0-d tensor, the masked mean over tokens.
    """
    d = (ref_logprobs - logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    m = mask.float()
    return ((torch.exp(d) - d - 1) * m).sum() / m.sum().clamp(min=1)


def sequence_logprobs(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(o | x) of each whole completion: the masked sum over tokens, [B]."""
    return (logprobs * mask.float()).sum(1)


@dataclass
class DPOOutput:
    """Loss and diagnostics of the DPO objective (0-d tensors)."""

    loss: torch.Tensor
    margin: torch.Tensor
    """Mean implicit-reward margin beta * (h_chosen - h_rejected)."""
    accuracy: torch.Tensor
    """Fraction of pairs whose chosen completion has the larger implicit reward."""


def dpo_loss(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    beta: float = 0.1,
) -> DPOOutput:
    """DPO loss (Rafailov et al. 2023, Eq. 7) on chosen/rejected pairs of one prompt's group.

    L = -mean_pairs log sigmoid(beta * [(log pi(y_w) - log pi_ref(y_w))
                                        - (log pi(y_l) - log pi_ref(y_l))]).

    Iterative (online) DPO, the Minimal-RL baseline (Xiong et al. 2025, "A Minimalist
    Approach to LLM Reasoning", arXiv 2504.11343): the pairs are the best and the worst
    sample of a freshly generated group, so the preference data follows the current policy.

    Args:
        chosen_logp, rejected_logp: [N] sequence logprobs under pi_theta (with grad).
        ref_chosen_logp, ref_rejected_logp: [N] the same under the reference model.
        beta: inverse temperature of the implicit reward (> 0).

    Raises:
        ValueError: shapes differ, no pairs, or beta <= 0.
    """
    shapes = {chosen_logp.shape, rejected_logp.shape, ref_chosen_logp.shape,
              ref_rejected_logp.shape}  # fmt: skip
    if len(shapes) != 1 or chosen_logp.dim() != 1 or chosen_logp.numel() == 0 or beta <= 0:
        raise ValueError(f"need four equal non-empty [N] tensors, beta > 0: {shapes}, {beta}")
    logits = beta * ((chosen_logp - ref_chosen_logp) - (rejected_logp - ref_rejected_logp))
    loss = -torch.nn.functional.logsigmoid(logits).mean()
    with torch.no_grad():
        margin = logits.mean()
        accuracy = (logits > 0).float().mean()
    return DPOOutput(loss, margin, accuracy)
