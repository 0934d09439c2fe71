"""Advantage estimators, loss aggregations and the per-algorithm loss, against hand values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dashrl.actors.advantages import (
    ESTIMATORS,
    dedupe_advantages,
    dr_grpo_advantages,
    expert_iteration_advantages,
    raft_advantages,
    reinforce_advantages,
    reinforce_rej_advantages,
)
from dashrl.learner.loss import aggregate, weighted_nll


def test_estimators_by_hand() -> None:
    r = np.array([1.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(dr_grpo_advantages(r), [0.5, -0.5, -0.5, 0.5])
    np.testing.assert_allclose(reinforce_advantages(r), r)
    np.testing.assert_allclose(reinforce_rej_advantages(r), r)
    assert reinforce_rej_advantages(np.ones(4)) is None  # all correct: dropped
    assert reinforce_rej_advantages(np.array([0.0, 0.5])) is None  # none fully correct
    np.testing.assert_allclose(raft_advantages(np.array([0.0, 1.0, 0.5, 1.0])), [0, 1, 0, 1])
    np.testing.assert_allclose(raft_advantages(np.array([0.0, 0.5, 0.25])), [0, 1, 0])
    assert raft_advantages(np.zeros(3)) is None
    np.testing.assert_allclose(expert_iteration_advantages(np.array([1.0, 0.5, 1.0])), [1, 0, 1])
    assert expert_iteration_advantages(np.array([0.0, 0.5])) is None
    kept = dedupe_advantages(np.array([1.0, 1.0, 0.0, 1.0]), [(1, 2), (1, 2), (3,), (4,)])
    np.testing.assert_allclose(kept, [1, 0, 0, 1])


def test_score_group_sends_discarded_groups_with_zero_advantage() -> None:
    from dashrl.actors.actor import score_group
    from dashrl.actors.tasks import Problem, Task

    class Exact(Task):
        def score(self, problem: Problem, completion: str) -> float:
            return float(completion == problem.answer)

    p = Problem("x", "q", "7")
    rewards, adv = score_group(Exact(), p, ["7", "7"], 0.0, reinforce_rej_advantages)
    assert rewards.tolist() == [1.0, 1.0] and adv.tolist() == [0.0, 0.0]
    rewards, adv = score_group(Exact(), p, ["7", "3"], 0.0, reinforce_rej_advantages)
    assert adv.tolist() == [1.0, 0.0]


PER_TOKEN = torch.tensor([[1.0, 2.0], [3.0, 99.0]])
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]])


def test_aggregations_by_hand() -> None:
    assert float(aggregate(PER_TOKEN, MASK, "token_mean")) == pytest.approx(6 / 3)
    assert float(aggregate(PER_TOKEN, MASK, "seq_mean_token_mean")) == pytest.approx((1.5 + 3) / 2)
    assert float(aggregate(PER_TOKEN, MASK, "seq_sum_const", 4.0)) == pytest.approx(
        (3 / 4 + 3 / 4) / 2
    )
    with pytest.raises(ValueError):
        aggregate(PER_TOKEN, MASK, "sum")


def test_weighted_nll_by_hand() -> None:
    logp = torch.tensor([[-1.0, -2.0], [-3.0, 0.0]], requires_grad=True)
    loss = weighted_nll(logp, torch.tensor([1.0, 0.0]), MASK)
    assert float(loss.detach()) == pytest.approx((1 + 2 + 0) / 3)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1 / 3, -1 / 3], [0.0, 0.0]]))


@pytest.mark.parametrize("algo", sorted(ESTIMATORS))
def test_every_algorithm_takes_a_learner_step(tiny_cfg, algo: str) -> None:
    from dashrl.learner.learner import Learner
    from dashrl.protocol import Sample

    cfg = tiny_cfg.model_copy(update={"algo": algo})
    learner = Learner(cfg, connect=False)
    samples = [Sample("p", np.array([1, 50], np.int32), np.array(c, np.int32),
                      np.full(len(c), -3.0, np.float32), 1.0, a, 0)
               for c, a in (([5, 6, 7], 1.0), ([8, 9], 0.5))]  # fmt: skip
    before = [p.detach().clone() for p in learner.model.parameters()]
    m = learner.train_micro_batch(samples, scale=1.0)
    assert np.isfinite(m["learner/loss"])
    _, took = learner.optimizer_step()
    assert took
    assert any(
        not torch.equal(a, b) for a, b in zip(before, learner.model.parameters(), strict=True)
    )
