"""Losses and advantages against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dashrl.actors.advantages import grpo_advantages
from dashrl.learner.loss import clipped_surrogate, k3_kl, logprob_mismatch, staleness_clip_bounds

# Two sequences: seq 0 fresh (lag 0, A=+1, 2 tokens); seq 1 two versions old (lag 2, A=-2,
# 1 real token and 1 padding position).
LOGP = [[-1.0, -2.0], [-0.5, -3.0]]
BEHAV = [[-1.2, -1.9], [-0.1, 0.0]]
ADV = [1.0, -2.0]
MASK = [[1.0, 1.0], [1.0, 0.0]]
LAG = [0, 2]


def run(decay: float):
    logp = torch.tensor(LOGP, requires_grad=True)
    out = clipped_surrogate(
        logp,
        torch.tensor(BEHAV),
        torch.tensor(ADV),
        torch.tensor(MASK),
        torch.tensor(LAG),
        eps_low=0.2,
        eps_high=0.28,
        decay=decay,
    )
    out.loss.backward()
    return out, logp.grad


def test_staleness_clip_bounds() -> None:
    lo, hi = staleness_clip_bounds(torch.tensor([0, 1, 2]), 0.2, 0.28, 0.5)
    torch.testing.assert_close(lo, torch.tensor([0.8, 1 - 0.2 / 1.5, 0.9]))
    torch.testing.assert_close(hi, torch.tensor([1.28, 1 + 0.28 / 1.5, 1.14]))
    lo0, hi0 = staleness_clip_bounds(torch.tensor([0, 5]), 0.2, 0.28, 0.0)
    torch.testing.assert_close(lo0, torch.tensor([0.8, 0.8]))


def test_clipped_surrogate_with_staleness_clip_by_hand() -> None:
    out, grad = run(decay=0.5)
    r00, r01, r10 = math.exp(0.2), math.exp(-0.1), math.exp(-0.4)
    # seq 0, lag 0: bounds [0.8, 1.28]; both ratios inside -> unclipped terms.
    # seq 1, lag 2: bounds [0.9, 1.14]; ratio 0.670 -> clipped to 0.9; with A=-2,
    # min(0.670*-2, 0.9*-2) = -1.8 (the clipped term is active).
    expected = -(r00 * 1.0 + r01 * 1.0 + 0.9 * -2.0) / 3
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-6)
    assert float(out.clip_frac) == pytest.approx(1 / 3)
    # d loss / d logp = -A * ratio / n where unclipped; 0 where clipped or padded.
    torch.testing.assert_close(grad, torch.tensor([[-r00 / 3, -r01 / 3], [0.0, 0.0]]))
    kl = ((r00 - 1 - 0.2) + (r01 - 1 + 0.1) + (r10 - 1 + 0.4)) / 3
    assert float(out.approx_kl) == pytest.approx(kl, rel=1e-5)


def test_without_staleness_decay_the_stale_sample_gets_the_plain_clip() -> None:
    out, grad = run(decay=0.0)
    r00, r01 = math.exp(0.2), math.exp(-0.1)
    # seq 1 bounds are now [0.8, 1.28]: min(0.670*-2, 0.8*-2) = -1.6.
    assert float(out.loss.detach()) == pytest.approx(-(r00 + r01 - 1.6) / 3, rel=1e-6)
    assert grad[1, 0] == 0.0


def test_on_policy_gradient_is_reinforce() -> None:
    # ratio 1 everywhere: gradient = -A / n per token (no clipping can be active).
    logp = torch.full((2, 3), -1.0, requires_grad=True)
    out = clipped_surrogate(
        logp,
        logp.detach().clone(),
        torch.tensor([0.5, -1.5]),
        torch.ones(2, 3),
        torch.zeros(2, dtype=torch.long),
    )
    out.loss.backward()
    assert float(out.loss.detach()) == pytest.approx(-(0.5 * 3 - 1.5 * 3) / 6)
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5 / 6] * 3, [1.5 / 6] * 3]))
    assert float(out.clip_frac) == 0.0


def test_positive_advantage_clipped_above() -> None:
    logp = torch.tensor([[0.0]], requires_grad=True)
    out = clipped_surrogate(
        logp,
        torch.tensor([[-1.0]]),
        torch.tensor([2.0]),
        torch.ones(1, 1),
        torch.tensor([0]),
        eps_low=0.2,
        eps_high=0.28,
    )
    out.loss.backward()
    assert float(out.loss.detach()) == pytest.approx(-1.28 * 2.0)  # ratio e^1 clipped to 1.28
    assert float(logp.grad) == 0.0


def test_surrogate_rejects_bad_shapes_and_empty_mask() -> None:
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        clipped_surrogate(z, z[:, :2], torch.zeros(2), z, torch.zeros(2))
    with pytest.raises(ValueError, match="empty mask"):
        clipped_surrogate(z, z, torch.zeros(2), z, torch.zeros(2))


def test_k3_kl_by_hand() -> None:
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -2.0]])
    expected = (math.exp(-0.5) + 0.5 - 1 + 0.0) / 2
    assert float(k3_kl(logp, ref, torch.ones(1, 2))) == pytest.approx(expected, rel=1e-6)
    assert float(k3_kl(logp, ref, torch.tensor([[0.0, 1.0]]))) == 0.0


def test_grpo_advantages_by_hand() -> None:
    np.testing.assert_allclose(
        grpo_advantages(np.array([1.0, 0.0, 0.0, 1.0])), [1, -1, -1, 1], rtol=1e-5
    )
    r = np.array([1.0, 0.0, 0.0, 0.0])  # mean 0.25, std sqrt(3)/4
    np.testing.assert_allclose(grpo_advantages(r), (r - 0.25) / (math.sqrt(3) / 4), rtol=1e-5)
    assert (grpo_advantages(np.ones(8)) == 0).all()
    with pytest.raises(ValueError):
        grpo_advantages(np.array([1.0, float("nan")]))


def test_tis_surrogate_by_hand() -> None:
    """Decoupled PPO + TIS: loss = -mean_t min(pi/mu, C) * A (u = 1 in value), and the
    gradient w.r.t. log pi is -min(pi/mu, C) * A / n on every token."""
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    mu = torch.tensor([[-1.0, -3.0], [-0.5, -2.0]])  # ratios: 1, e, 1, 1/e
    adv = torch.tensor([1.0, -2.0])
    mask = torch.ones(2, 2)
    lag = torch.zeros(2, dtype=torch.long)
    out = clipped_surrogate(logp, mu, adv, mask, lag, tis_cap=2.0)
    w = torch.tensor([[1.0, 2.0], [1.0, math.exp(-1.0)]])  # e > 2 is truncated to C = 2
    a = torch.tensor([[1.0, 1.0], [-2.0, -2.0]])
    assert out.loss.item() == pytest.approx(float(-(w * a).sum() / 4), rel=1e-6)
    out.loss.backward()
    torch.testing.assert_close(logp.grad, -(w * a) / 4)
    assert out.tis_frac.item() == pytest.approx(0.25)  # one token of four truncated
    # a cap above every ratio truncates nothing and weighs each token by its full ratio
    big = clipped_surrogate(logp.detach(), mu, adv, mask, lag, tis_cap=10.0)
    w_full = torch.exp(logp.detach() - mu)
    assert big.loss.item() == pytest.approx(float(-(w_full * a).sum() / 4), rel=1e-6)
    assert big.tis_frac.item() == 0.0
    # TIS off: the plain clipped surrogate, no truncation metric
    assert clipped_surrogate(logp.detach(), mu, adv, mask, lag).tis_frac is None


def test_logprob_mismatch_counts_only_fresh_samples() -> None:
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]])
    mu = torch.tensor([[-1.1, -1.8, 5.0], [-9.0, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])  # padding (5.0) must not count
    lag = torch.tensor([0, 3])  # the stale sample's difference is staleness, not numerics
    m = logprob_mismatch(logp, mu, mask, lag)
    assert m["learner/logprob_diff_mean"] == pytest.approx(0.15, abs=1e-6)
    assert m["learner/logprob_diff_max"] == pytest.approx(0.2, abs=1e-6)
    ratios = torch.exp(torch.tensor([0.1, -0.2]))
    assert m["learner/is_ratio_std"] == pytest.approx(float(ratios.std()), rel=1e-5)
    assert logprob_mismatch(logp, mu, mask, torch.tensor([1, 2])) == {}
