"""Advantage estimators, loss aggregations and the per-algorithm loss, against hand values."""

from __future__ import annotations

import math

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
from dashrl.learner.objectives import OBJECTIVES
from dashrl.protocol.algorithms import (
    ALGORITHM_NAMES,
    ALGORITHMS,
    Algorithm,
    algorithm_table,
    get_algorithm,
)
from dashrl.protocol.config import Config
from dashrl.queue.buffer import UNITS


def test_every_registered_algorithm_resolves_in_every_role() -> None:
    """Each spec names an estimator the actor has, an objective the learner has and a unit
    the queue has; the config's --algo choices are exactly the registry's names."""
    for algo in ALGORITHMS.values():
        assert algo.estimator in ESTIMATORS, algo.name
        assert algo.objective in OBJECTIVES, algo.name
        assert algo.unit in UNITS, algo.name
    choices = Config.model_json_schema()["properties"]["algo"]["enum"]
    assert tuple(choices) == ALGORITHM_NAMES
    assert "rcrl (Havrilla" in Config.model_json_schema()["properties"]["algo"]["description"]
    with pytest.raises(ValueError, match="unknown algorithm 'nope'; known: grpo"):
        get_algorithm("nope")


def test_the_queue_unit_and_the_learner_shard_unit_are_one_field() -> None:
    """A DPO pair is stored and served whole by the queue and never split across ranks."""
    from dashrl.learner.ranks import shard

    dpo = get_algorithm("iterative_dpo")
    assert dpo.unit == "pair" and dpo.unit_size == 2
    assert UNITS[dpo.unit]([1.0, -1.0, 0.0]) == [(0, 1)]
    samples = list("abcd")  # two pairs
    assert shard(samples, 1, 2, dpo.unit_size) == (["c", "d"], 1.0)
    assert {a.unit_size for a in ALGORITHMS.values() if a.unit == "sample"} == {1}


def test_the_readme_algorithm_table_is_the_registry() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert algorithm_table() in readme


def test_a_new_algorithm_is_one_registry_entry(tiny_cfg, monkeypatch) -> None:
    """An algorithm that reuses an estimator and the surrogate objective needs nothing but
    its spec: with it in the registry, the learner builds and trains with it (the config's
    --algo choices are built from the same registry at import)."""
    from dashrl.learner.learner import Learner
    from dashrl.protocol import algorithms

    new = Algorithm("grpo_seq_mean", "grpo", "surrogate", "GRPO with a sequence mean", "test",
                    loss_agg="seq_mean_token_mean")  # fmt: skip
    monkeypatch.setitem(algorithms.ALGORITHMS, new.name, new)
    learner = Learner(tiny_cfg.model_copy(update={"algo": new.name}), connect=False)
    assert learner.context.loss_agg == "seq_mean_token_mean"
    m = learner.train_micro_batch(_samples([([5, 6, 7], 1.0, 1.0), ([8, 9], 0.0, -1.0)]), 1.0)
    assert np.isfinite(m["learner/loss"]) and "learner/clip_frac" in m


def test_estimators_by_hand() -> None:
    r = np.array([1.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(dr_grpo_advantages(r), [0.5, -0.5, -0.5, 0.5])
    np.testing.assert_allclose(reinforce_advantages(r), r)
    np.testing.assert_allclose(reinforce_rej_advantages(r), r)
    np.testing.assert_allclose(reinforce_advantages(r, baseline="group_mean"), r - 0.5)
    np.testing.assert_allclose(  # RLOO: b_i = mean of the other three
        reinforce_advantages(r, baseline="leave_one_out"), [1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3]
    )
    np.testing.assert_allclose(
        reinforce_rej_advantages(r, baseline="leave_one_out"), [2 / 3, -2 / 3, -2 / 3, 2 / 3]
    )
    with pytest.raises(ValueError, match="baseline"):
        reinforce_advantages(r, baseline="median")
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
    from dashrl.actors.rewards import Rewards
    from dashrl.actors.tasks import Problem, Task
    from dashrl.protocol.config import RewardConfig

    class Exact(Task):
        def score(self, problem: Problem, completion: str) -> float:
            return float(completion == problem.answer)

    p, rw = Problem("x", "q", "7"), Rewards(RewardConfig(), Exact())
    rewards, adv, correct = score_group(rw, p, ["7", "7"], 0.0, reinforce_rej_advantages)
    assert rewards.tolist() == [1.0, 1.0] and adv.tolist() == [0.0, 0.0]
    rewards, adv, correct = score_group(rw, p, ["7", "3"], 0.0, reinforce_rej_advantages)
    assert adv.tolist() == [1.0, 0.0] and correct.tolist() == [True, False]


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


@pytest.mark.parametrize("algo", ALGORITHM_NAMES)
def test_every_algorithm_takes_a_learner_step(tiny_cfg, algo: str) -> None:
    from dashrl.learner.learner import Learner
    from dashrl.protocol import Sample

    cfg = tiny_cfg.model_copy(update={"algo": algo})
    learner = Learner(cfg, connect=False)
    samples = [Sample.make("p", np.array([1, 50], np.int32), np.array(c, np.int32),
                      np.full(len(c), -3.0, np.float32), r, a, 0)
               for c, r, a in (([5, 6, 7], 1.0, 1.0), ([8, 9], 0.0, -1.0))]  # fmt: skip
    before = [p.detach().clone() for p in learner.model.parameters()]
    m = learner.train_micro_batch(samples, scale=1.0)
    assert np.isfinite(m["learner/loss"])
    _, took = learner.optimizer_step()
    assert took
    assert any(
        not torch.equal(a, b) for a, b in zip(before, learner.model.parameters(), strict=True)
    )


def _samples(rewards_advs, prompt="p"):
    from dashrl.protocol import Sample

    return [Sample.make(prompt, np.array([1, 50, 60], np.int32), np.array(c, np.int32),
                   np.full(len(c), -3.0, np.float32), r, a, 0)
            for c, r, a in rewards_advs]  # fmt: skip


def _policy_grads(learner) -> list[torch.Tensor]:
    return [p.grad.clone() for p in learner.model.parameters() if p.grad is not None]


def test_ppo_critic_learns_and_a_detached_critic_leaves_the_policy_gradient_alone(tiny_cfg) -> None:
    from dashrl.learner.learner import Learner

    batch = _samples([([5, 6, 7], 1.0, 0.5), ([8, 9], 0.0, -0.5)])
    grads = []
    for vf in (0.0, 5.0):
        cfg = tiny_cfg.model_copy(update={"algo": "ppo"}, deep=True)
        cfg.ppo.vf_coef = vf
        learner = Learner(cfg, connect=False)
        m = learner.train_micro_batch(batch, 1.0)
        assert m["learner/value_mean"] == 0.0 and m["learner/value_loss"] > 0  # zero-init critic
        grads.append(_policy_grads(learner))
        if vf:
            assert any(p.grad is not None and p.grad.abs().sum() > 0
                       for p in learner.heads["critic"].parameters())  # fmt: skip
            losses = [m["learner/value_loss"]]
            for _ in range(15):
                learner.optimizer_step()
                losses.append(learner.train_micro_batch(batch, 1.0)["learner/value_loss"])
            assert losses[-1] < 0.5 * losses[0], losses  # the critic fits the returns
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)  # value loss does not reach the policy's weights


def test_ppo_dense_orm_learns_the_labels(tiny_cfg) -> None:
    from dashrl.learner.learner import Learner

    cfg = tiny_cfg.model_copy(update={"algo": "ppo"}, deep=True)
    cfg.reward.dense = "orm"
    learner = Learner(cfg, connect=False)
    batch = _samples([([5, 6, 7], 1.0, 0.5), ([8, 9], 0.0, -0.5)])
    first = learner.train_micro_batch(batch, 1.0)
    assert first["learner/orm_loss"] == pytest.approx(math.log(2), rel=1e-5)  # p = 0.5 at init
    for _ in range(15):
        learner.optimizer_step()
        last = learner.train_micro_batch(batch, 1.0)
    # Both completions share the prompt, so at t = 0 the labels conflict: the floor is
    # 2/5 * log 2 = 0.28 (2 of the 5 tokens); from 0.69 the fit must get most of the way.
    assert last["learner/orm_loss"] < 0.6 * first["learner/orm_loss"]
    assert last["learner/orm_acc"] == 1.0


def test_dense_reward_needs_ppo() -> None:
    from pydantic import ValidationError

    from dashrl.protocol.config import Config

    with pytest.raises(ValidationError, match="ppo"):
        Config.model_validate({"algo": "grpo", "reward": {"dense": "orm"}})
    with pytest.raises(ValidationError, match="multiple of 2"):
        Config.model_validate({"algo": "iterative_dpo", "learner": {"micro_batch_size": 3}})


def test_iterative_dpo_starts_at_log2_and_raises_the_margin(tiny_cfg) -> None:
    from dashrl.learner.learner import Learner

    cfg = tiny_cfg.model_copy(update={"algo": "iterative_dpo"}, deep=True)
    cfg.learner.lr, cfg.learner.ref_update_every = 1e-3, 0
    learner = Learner(cfg, connect=False)
    batch = _samples([([5, 6, 7], 1.0, 1.0), ([8, 9], 0.0, -1.0)])
    m = learner.train_micro_batch(batch, 1.0)
    assert m["learner/loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference
    assert m["learner/dpo_pairs"] == 1
    learner.optimizer_step()
    m = learner.train_micro_batch(batch, 1.0)
    assert m["learner/dpo_margin"] > 0 and m["learner/loss"] < math.log(2)
    learner.zero_grad()
    cfg.learner.ref_update_every = 1
    learner.step_count = 1
    assert learner.update_reference()  # the reference becomes the current policy
    assert learner.train_micro_batch(batch, 1.0)["learner/loss"] == pytest.approx(math.log(2))
    unpaired = learner.train_micro_batch(batch[:1], 1.0)  # half a pair: no loss, no crash
    assert unpaired["learner/dpo_pairs"] == 0 and unpaired["learner/loss"] == 0.0


def test_a_hung_verifier_times_out_scores_zero_and_is_counted() -> None:
    import time

    from dashrl.actors.actor import score_group
    from dashrl.actors.rewards import Rewards
    from dashrl.actors.tasks import Problem, Task
    from dashrl.protocol.config import RewardConfig

    class Hangs(Task):
        def score(self, problem: Problem, completion: str) -> float:
            if completion == "hang":
                time.sleep(30)  # a verifier stuck on one input
            if completion == "boom":
                raise RuntimeError("verifier bug")
            return 1.0

    rw = Rewards(RewardConfig(), Hangs())
    t0 = time.perf_counter()
    rewards, _, _ = score_group(rw, Problem("x", "q", "7"), ["ok", "hang", "boom", "ok"], 0.0,
                                reinforce_advantages, timeout_s=0.3)  # fmt: skip
    assert time.perf_counter() - t0 < 5
    assert rewards.tolist() == [1.0, 0.0, 0.0, 1.0]
    faults = rw.fault_counts()
    assert faults["verifier_timeouts"] == 1.0 and faults["verifier_errors"] == 1.0
    assert faults["reward_errors/verifier"] == 1.0
