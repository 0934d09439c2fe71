"""The learner on a tiny model: real updates, bad samples dropped, non-finite steps skipped."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dashrl.learner.learner import Learner
from dashrl.learner.sources import valid_samples
from dashrl.protocol import MicroBatchReply, Sample
from dashrl.protocol.runtime import StopFlag


def sample(adv: float, completion: list[int], version: int = 0) -> Sample:
    c = np.array(completion, np.int32)
    return Sample.make("p", np.array([1, 50, 60], np.int32), c, np.full(len(c), -2.0, np.float32),
                  1.0, adv, version)  # fmt: skip


def test_micro_batches_accumulate_into_one_update(tiny_cfg) -> None:
    learner = Learner(tiny_cfg, connect=False)
    before = [p.detach().clone() for p in learner.model.parameters()]
    m1 = learner.train_micro_batch([sample(1.0, [5, 6, 7]), sample(-1.0, [8, 9])], scale=0.5)
    m2 = learner.train_micro_batch([sample(0.5, [10, 11])], scale=0.5)
    assert all(np.isfinite(v) for v in [*m1.values(), *m2.values()])
    assert m1["learner/completion_tokens"] == 5 and m1["learner/staleness_max"] == 0
    norm, took = learner.optimizer_step()
    assert took and norm > 0
    after = list(learner.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(p.grad is None for p in after)  # zeroed for the next step


class ListSource:
    """A MicroBatchSource serving fixed micro-batches, then empty replies."""

    def __init__(self, batches: list[list[Sample]]):
        self.batches, self.rejected_replies, self.asked = list(batches), 0, 0

    def request(self, learner_version, size, unit, timeout_s=0.0) -> MicroBatchReply:
        self.asked += 1
        return MicroBatchReply(0, self.batches.pop(0) if self.batches else [], {})

    def close(self) -> None:
        pass


def test_samples_outside_the_vocabulary_are_dropped(tiny_cfg) -> None:
    learner = Learner(tiny_cfg, connect=False)
    vocab = learner.model.get_input_embeddings().num_embeddings
    good, bad = sample(1.0, [5, 6]), sample(1.0, [5, vocab])
    assert valid_samples([good, bad, good], vocab) == [good, good]
    feed = learner.feed(ListSource([[good, bad, good]]))
    samples, _, _ = feed.next(0, StopFlag())
    assert samples == [good, good] and feed.rejected_samples == 1


def test_non_finite_gradient_skips_the_step_and_keeps_weights(tiny_cfg) -> None:
    learner = Learner(tiny_cfg, connect=False)
    learner.train_micro_batch([sample(1.0, [5, 6, 7])], scale=1.0)
    next(learner.model.parameters()).grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in learner.model.parameters()]
    norm, took = learner.optimizer_step()
    assert not took and not np.isfinite(norm)
    for a, b in zip(before, learner.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_step_with_a_non_finite_loss_is_skipped_and_counted_once(tiny_cfg) -> None:
    """Learner.step owns the NaN-skip: no optimizer step, no version bump, one count; the
    next good step goes through and bumps the version."""
    learner = Learner(tiny_cfg, connect=False)
    nan = sample(1.0, [5, 6, 7])
    nan.completion.logprobs = np.full(3, np.nan, np.float32)  # what the wire would have refused
    n = tiny_cfg.learner.micro_batches_per_step
    good = [[sample(1.0, [5, 6]), sample(-1.0, [7, 8])] for _ in range(n)]
    feed = learner.feed(ListSource([[nan]] * n + good))
    before = [p.detach().clone() for p in learner.model.parameters()]
    out = learner.step(feed, StopFlag())
    assert out["learner/step_taken"] == 0.0 and learner.skipped_steps == 1
    assert learner.version == 0 and learner.step_count == 1
    assert all(torch.equal(a, b) for a, b in zip(before, learner.model.parameters(), strict=True))
    out = learner.step(feed, StopFlag())
    assert out["learner/step_taken"] == 1.0 and learner.version == 1
    assert learner.skipped_steps == 1 and out["learner/micro_batches_per_step"] == n


def test_a_step_is_dropped_when_the_feed_runs_dry(tiny_cfg) -> None:
    """Stopped while waiting for data: the partial step is dropped, nothing is counted."""
    learner = Learner(tiny_cfg, connect=False)
    stop = StopFlag()
    stop.stop = True
    assert learner.step(learner.feed(ListSource([])), stop) is None
    assert learner.step_count == 0 and learner.version == 0


def test_kl_penalty_to_the_reference_model(tiny_cfg) -> None:
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.learner.kl_coef = 0.5
    learner = Learner(cfg, connect=False)
    assert learner.ref_model is not None
    batch = [sample(1.0, [5, 6, 7])]
    m0 = learner.train_micro_batch(batch, scale=1.0)
    assert m0["learner/kl_ref"] == pytest.approx(0.0, abs=1e-6)  # identical weights: KL 0
    learner.optimizer_step()
    learner.zero_grad()
    m1 = learner.train_micro_batch(batch, scale=1.0)
    assert m1["learner/kl_ref"] > 0  # the policy moved away from the reference
    no_kl = Learner(tiny_cfg, connect=False)
    assert no_kl.ref_model is None  # off by default (DASH): no reference model is even loaded
