"""PPO's critic (GAE, shaping, value/ORM losses), DPO, RCRL and the format reward, against
independent straightforward implementations and hand values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dashrl.actors.advantages import dpo_pair, ones, ppo_priority
from dashrl.learner import critic as C
from dashrl.learner.loss import clipped_surrogate, dpo_loss, sequence_logprobs
from dashrl.learner.objectives import dpo_pairs
from dashrl.protocol import Sample
from dashrl.queue.buffer import ReplayBuffer, dpo_pair_units

LENGTHS = [5, 3, 1, 4]


def _mask(lengths: list[int], T: int) -> torch.Tensor:
    return torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])


def test_gae_matches_a_hand_unrolled_recursion() -> None:
    g = torch.Generator().manual_seed(0)
    T, gamma, lam = 6, 0.9, 0.8
    mask = _mask(LENGTHS, T)
    rewards = torch.randn(4, T, generator=g) * mask
    values = torch.randn(4, T, generator=g)
    values_padded = values.clone()
    values_padded[mask == 0] = 123.0  # garbage on padding must not leak in
    adv, ret = C.gae(rewards, values_padded, mask, gamma, lam)
    for b, n in enumerate(LENGTHS):  # textbook recursion on the unpadded sequence only
        a_next = 0.0
        for t in reversed(range(n)):
            v_next = float(values[b, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[b, t]) + gamma * v_next - float(values[b, t])
            a_next = delta + gamma * lam * a_next
            assert float(adv[b, t]) == pytest.approx(a_next, abs=1e-5)
            assert float(ret[b, t]) == pytest.approx(a_next + float(values[b, t]), abs=1e-5)
        assert torch.all(adv[b, n:] == 0) and torch.all(ret[b, n:] == 0)


def test_gae_with_lambda_one_and_no_discount_is_return_minus_value() -> None:
    mask = _mask([3], 3)
    adv, _ = C.gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.2, 0.5, 0.7]]), mask, 1.0, 1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.8, 0.5, 0.3]]))


def test_sparse_rewards_sit_on_the_last_token() -> None:
    out = C.sparse_token_rewards(torch.tensor([1.0, 0.5, 2.0]), _mask([3, 1, 2], 3))
    torch.testing.assert_close(out, torch.tensor([[0, 0, 1.0], [0.5, 0, 0], [0, 2.0, 0]]))


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_potential_shaping_telescopes_to_minus_phi0(gamma: float) -> None:
    g = torch.Generator().manual_seed(1)
    mask = _mask(LENGTHS, 6)
    phi = torch.rand(4, 6, generator=g)
    f = C.potential_shaping(phi, mask, gamma)
    disc = gamma ** torch.arange(6.0)
    torch.testing.assert_close((f * disc).sum(1), -phi[:, 0])  # policy-invariant (Ng et al.)
    assert torch.all(f[mask == 0] == 0)
    assert float(f[2, 0]) == pytest.approx(-float(phi[2, 0]))  # one token: phi(terminal) = 0


def test_whiten_value_and_orm_losses_by_hand() -> None:
    mask = _mask([2, 1], 2)
    x = torch.tensor([[1.0, 3.0], [5.0, 99.0]])
    w = C.whiten(x, mask)
    torch.testing.assert_close(w, torch.tensor([[-2.0, 0.0], [2.0, 0.0]]) / math.sqrt(8 / 3),
                               atol=1e-6, rtol=0)  # fmt: skip
    v, r = torch.tensor([[1.0, 2.0], [0.0, 9.0]]), torch.tensor([[0.0, 0.0], [3.0, 0.0]])
    assert float(C.value_loss(v, r, mask)) == pytest.approx(0.5 * (1 + 4 + 9) / 3)
    logits = torch.tensor([[0.0, 2.0], [-1.0, 7.0]])
    bce = -(math.log(0.5) + math.log(1 / (1 + math.exp(-2))) + math.log(1 / (1 + math.exp(-1))))
    assert float(C.orm_loss(logits, torch.tensor([1.0, 0.0]), mask)) == pytest.approx(bce / 3)


def test_scalar_head_starts_at_zero() -> None:
    h = C.ScalarHead(8, 4)
    assert torch.all(h(torch.randn(2, 3, 8)) == 0)
    assert C.ScalarHead(8, 0)(torch.randn(1, 2, 8)).shape == (1, 2)


def test_clipped_surrogate_with_token_advantages_matches_loops() -> None:
    g = torch.Generator().manual_seed(2)
    mask = _mask([3, 2], 3)
    logp = (torch.randn(2, 3, generator=g) * 0.3 - 1).requires_grad_()
    beh = torch.randn(2, 3, generator=g) * 0.3 - 1
    adv = torch.randn(2, 3, generator=g)
    lag = torch.tensor([0, 2])
    out = clipped_surrogate(logp, beh, adv, mask, lag, 0.2, 0.28, decay=0.5)
    total, n = 0.0, 0
    for b, length in enumerate([3, 2]):
        s = 1 / (1 + 0.5 * int(lag[b]))
        for t in range(length):
            rho = math.exp(float(logp[b, t].detach()) - float(beh[b, t]))
            a = float(adv[b, t])
            total += -min(rho * a, min(max(rho, 1 - 0.2 * s), 1 + 0.28 * s) * a)
            n += 1
    assert float(out.loss.detach()) == pytest.approx(total / n, rel=1e-5)
    with pytest.raises(ValueError):
        clipped_surrogate(logp, beh, adv[:, :2], mask, lag)


def test_dpo_loss_by_hand() -> None:
    pol_w, pol_l = torch.tensor([-3.0, -1.0]), torch.tensor([-4.0, -1.0])
    ref_w, ref_l = torch.tensor([-3.5, -2.0]), torch.tensor([-3.0, -1.5])
    out = dpo_loss(pol_w, pol_l, ref_w, ref_l, beta=0.5)
    z = [0.5 * ((-3 + 3.5) - (-4 + 3)), 0.5 * ((-1 + 2) - (-1 + 1.5))]  # 0.75, 0.25
    expect = sum(math.log1p(math.exp(-v)) for v in z) / 2
    assert float(out.loss) == pytest.approx(expect)
    assert float(out.accuracy) == 1.0 and float(out.margin) == pytest.approx(0.5)
    same = torch.tensor([-2.0])
    assert float(dpo_loss(same, same, same, same).loss) == pytest.approx(math.log(2))
    with pytest.raises(ValueError):
        dpo_loss(pol_w, pol_l[:1], ref_w, ref_l)
    mask = _mask([2, 1], 2)
    torch.testing.assert_close(
        sequence_logprobs(torch.tensor([[-1.0, -2.0], [-3.0, -9.0]]), mask),
        torch.tensor([-3.0, -3.0]),
    )


def test_pair_selection_on_actor_queue_and_learner() -> None:
    np.testing.assert_array_equal(dpo_pair(np.array([0.0, 1.0, 0.0, 1.0])), [-1, 1, 0, 0])
    assert dpo_pair(np.ones(4)) is None
    np.testing.assert_array_equal(ones(np.array([0.0, 1.0])), [1, 1])
    np.testing.assert_allclose(ppo_priority(np.array([1.0, 0.0])), [0.5, -0.5])
    assert dpo_pair_units([-1.0, 1.0, 0.0, 0.0]) == [(1, 0)]
    assert dpo_pairs(["a", "a", "b", "c", "c"], [1.0, -1.0, 1.0, -1.0, 1.0]) == [(0, 1), (4, 3)]


def _s(pid: str, adv: float, version: int = 0, n: int = 3) -> Sample:
    return Sample.make(pid, np.array([1, 2], np.int32), np.arange(n, dtype=np.int32),
                  np.full(n, -1.0, np.float32), float(adv > 0), adv, version)  # fmt: skip


def test_buffer_keeps_dpo_pairs_together() -> None:
    buf = ReplayBuffer(capacity=5, filter_threshold=0.0, max_staleness=1)
    for i in range(3):
        group = [_s(f"p{i}", 0.0), _s(f"p{i}", -1.0, version=i), _s(f"p{i}", 1.0, version=i)]
        res = buf.add(group, dpo_pair_units([s.advantage for s in group]))
        assert res.accepted == [1, 2] and res.filtered == 1
    # capacity 5 samples: the oldest pair (tie on |A|, the oldest goes first) was evicted whole
    assert len(buf) == 4 and buf.counters.evicted_capacity == 2
    batch = buf.pop_micro_batch(3)  # whole units until >= 3 sequences: 2 pairs
    assert [s.prompt_id for s in batch] == ["p2", "p2", "p1", "p1"]
    assert dpo_pairs([s.prompt_id for s in batch], [s.advantage for s in batch]) == [(0, 1), (2, 3)]
    assert buf.pop_micro_batch(2) == []
    g = [_s("q", 1.0, version=0), _s("q", -1.0, version=3)]
    buf.add(g, [(0, 1)])
    assert len(buf.set_learner_version(2)) == 2  # one stale half evicts the whole pair
    assert len(buf) == 0


def test_format_reward_is_added_to_the_verifier() -> None:
    from dashrl.actors.actor import score_group
    from dashrl.actors.rewards import Rewards
    from dashrl.actors.tasks import Problem, Task
    from dashrl.protocol.config import RewardConfig

    class Exact(Task):
        def score(self, problem: Problem, completion: str) -> float:
            return float(completion.strip().endswith(problem.answer))

    p = Problem("x", "q", "7")
    texts = ["so 7", "so 3", "no number", "so 7"]
    rw = Rewards(RewardConfig(format_coef=0.1), Exact())
    rewards, _, correct = score_group(rw, p, texts, 0.0, ones, [True, True, True, False])
    np.testing.assert_allclose(rewards, [1.1, 0.1, 0.0, 1.0], rtol=1e-6)
    assert correct.tolist() == [True, False, False, True]  # the format bonus is not correctness


def test_rcrl_heldout_prompts_carry_the_good_tag(tiny_cfg) -> None:
    from dashrl.launch.evaluate import heldout_spec

    cfg = tiny_cfg.model_copy(update={"algo": "rcrl"})
    assert heldout_spec(cfg, 1).render("What?") == "[GOOD] What?"
    assert heldout_spec(tiny_cfg, 1).render("What?") == "What?"
