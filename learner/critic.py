"""PPO's critic and token-level rewards: value head, GAE, and the learned outcome reward model.

Havrilla et al. (2024) train PPO with a value head and GAE on sparse rewards (1 at the
last token of a correct answer) and on dense rewards from a learned outcome reward model
(ORM); Havrilla et al. 2024, "Teaching Large Language Models to Reason with Reinforcement
Learning", arXiv 2403.04642, section 2. This module holds the pure tensor functions
(token rewards, potential shaping, GAE, whitening, the losses) and the small scalar head
used for both the critic and the ORM.

Both heads read the policy's last hidden state at the position that predicts completion
token t, i.e. the state *before* token t is emitted (s_t). By default they read it
detached (``ppo.detach_critic``): the critic and the ORM are then probes on the policy's
features and cannot pull the policy's weights toward their own regression targets (a
shared-trunk critic with a large value loss is a known source of PPO instability on small
models). In an asynchronous system there are no "old values" from rollout time, so GAE
uses the current critic's values (detached) and the value loss is not clipped.

Shapes: B sequences, T completion positions (padded), H hidden size; float32.
"""

from __future__ import annotations

import torch
from torch import nn


class ScalarHead(nn.Module):
    """One scalar per position: Linear(H, hidden) -> tanh -> Linear(hidden, 1), or Linear(H, 1)
    when ``hidden`` is 0. The output layer starts at zero so a new critic predicts V = 0 and a
    new ORM predicts p = 0.5.

    Args:
        in_dim: H, the policy's hidden size.
        hidden: width of the hidden layer (0: linear head).
    """

    def __init__(self, in_dim: int, hidden: int = 256):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.Tanh()] if hidden else []
        out = nn.Linear(hidden or in_dim, 1)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*layers, out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """[B, T, H] hidden states -> [B, T] float32 scalars."""
        return self.net(h.float()).squeeze(-1)


def sparse_token_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Put each sequence's reward on its last completion token, 0 elsewhere (sparse reward).

    Args:
        rewards: [B] sequence rewards.
        mask: [B, T] completion mask (right-padded).

    Returns:
        [B, T] token rewards.
    """
    m = mask.float()
    last = (m.sum(1).long() - 1).clamp(min=0)
    out = torch.zeros_like(m)
    out[torch.arange(m.shape[0], device=m.device), last] = rewards.float()
    return out * m


def potential_shaping(
    potentials: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0
) -> torch.Tensor:
    """Dense reward from a potential: F_t = gamma * phi(s_{t+1}) - phi(s_t), phi(terminal) = 0.

    Potential-based shaping (Ng et al. 1999) leaves the optimal policy unchanged: over a
    sequence the terms telescope to -phi(s_0), which depends on the prompt only. With the
    ORM's p(correct | prefix) as phi, each token is rewarded by how much it raised the
    predicted chance of a correct final answer: the dense ORM reward of Havrilla et al.
    (2024), made policy-invariant.

    Args:
        potentials: [B, T] phi(s_t) at each completion position (no grad needed).
        mask: [B, T] completion mask.
        gamma: discount.

    Returns:
        [B, T] shaping rewards, 0 on padding.
    """
    m = mask.float()
    phi = potentials * m
    nxt = torch.zeros_like(phi)
    nxt[:, :-1] = phi[:, 1:]  # phi(s_{t+1}); 0 after the last token (terminal) and on padding
    return (gamma * nxt - phi) * m


def gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, Eq. 16) per token.

    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t), with V = 0 after the last token;
    A_t = delta_t + gamma * lam * A_{t+1}; returns R_t = A_t + V(s_t) (the critic's target).

    Args:
        token_rewards: [B, T] reward of each completion token.
        values: [B, T] V(s_t) (detached).
        mask: [B, T] completion mask, right-padded.
        gamma, lam: discount and GAE lambda.

    Returns:
        (advantages [B, T], returns [B, T]), 0 on padding.
    """
    m = mask.float()
    v = values * m
    r = token_rewards * m
    adv = torch.zeros_like(v)
    next_adv = torch.zeros_like(v[:, 0])
    next_v = torch.zeros_like(v[:, 0])
    for t in range(v.shape[1] - 1, -1, -1):
        delta = r[:, t] + gamma * next_v - v[:, t]
        adv[:, t] = (delta + gamma * lam * next_adv) * m[:, t]
        next_adv, next_v = adv[:, t], v[:, t]
    return adv, (adv + v) * m


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / (std + eps) over the masked entries (PPO's advantage normalisation)."""
    m = mask.float()
    n = m.sum().clamp(min=1)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / n
    return (x - mean) / (var.sqrt() + eps) * m


def value_loss(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """0.5 * masked token mean of (V(s_t) - R_t)^2 (PPO's critic regression), 0-d."""
    m = mask.float()
    return 0.5 * (((values - returns) ** 2) * m).sum() / m.sum().clamp(min=1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over masked tokens (1 is a perfect critic, <= 0 useless)."""
    m = mask.bool()
    r, v = returns[m], values[m]
    var = float(r.var(unbiased=False)) if r.numel() > 1 else 0.0
    return float("nan") if var == 0 else 1.0 - float((r - v).var(unbiased=False)) / var


def orm_loss(logits: torch.Tensor, correct: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Outcome-reward-model loss: binary cross-entropy of p(correct | prefix) at every
    completion position against the sequence's final correctness (Havrilla et al. 2024,
    "ORM": trained to predict final-answer correctness from every intermediate step).

    Args:
        logits: [B, T] ORM logits.
        correct: [B] 1.0 for a correct completion, 0.0 otherwise.
        mask: [B, T] completion mask.

    Returns:
        0-d masked token mean.
    """
    m = mask.float()
    target = correct.float()[:, None].expand_as(logits)
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (bce * m).sum() / m.sum().clamp(min=1)
