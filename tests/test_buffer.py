"""The priority replay buffer: ordering by |A|, gradient filtering, staleness and capacity."""

from __future__ import annotations

import numpy as np
import pytest

from dashrl.protocol import Sample
from dashrl.queue.buffer import (
    ReplayBuffer,
    is_stale,
    micro_batch_count,
    passes_gradient_filter,
    version_lag,
)


def sample(adv: float, version: int = 0, completion_len: int = 2, tag: str = "") -> Sample:
    return Sample.make(
        tag or f"a={adv}",
        np.arange(3, dtype=np.int32),
        np.arange(completion_len, dtype=np.int32),
        np.zeros(completion_len, np.float32),
        0.0,
        adv,
        version,
    )


def test_policies() -> None:
    assert not passes_gradient_filter(0.0, 0.0)
    assert passes_gradient_filter(-1e-3, 0.0)
    assert not passes_gradient_filter(0.3, 0.3) and passes_gradient_filter(-0.31, 0.3)
    assert passes_gradient_filter(0.0, None)
    assert version_lag(3, 7) == 4
    assert not is_stale(3, 7, 4) and is_stale(2, 7, 4)


def test_serves_highest_abs_advantage_first() -> None:
    buf = ReplayBuffer(capacity=10)
    buf.add([sample(a) for a in (0.5, -2.0, 1.0, -0.1, 3.0)])
    assert buf.peek_priorities() == [3.0, 2.0, 1.0, 0.5, 0.1]
    assert [s.advantage for s in buf.pop_micro_batch(2)] == [3.0, -2.0]
    assert [s.advantage for s in buf.pop_micro_batch(3)] == [1.0, 0.5, -0.1]
    assert len(buf) == 0 and buf.counters.served == 5


def test_ties_go_to_the_newest_sample() -> None:
    buf = ReplayBuffer(capacity=10)
    buf.add([sample(1.0, tag="old")])
    buf.add([sample(-1.0, tag="new")])
    assert [s.prompt_id for s in buf.pop_micro_batch(2)] == ["new", "old"]


def test_gradient_filter_drops_zero_advantage_by_default() -> None:
    buf = ReplayBuffer(capacity=10, filter_threshold=0.0)
    res = buf.add([sample(0.0), sample(0.0), sample(0.7), sample(-0.7)])
    assert res.accepted == [2, 3] and res.filtered == 2
    assert buf.counters.filtered == 2 and buf.counters.accepted == 2 and len(buf) == 2


def test_filter_threshold_and_off() -> None:
    buf = ReplayBuffer(capacity=10, filter_threshold=0.5)
    assert buf.add([sample(0.5), sample(0.51), sample(-0.2)]).accepted == [1]
    off = ReplayBuffer(capacity=10, filter_threshold=None)
    assert off.add([sample(0.0), sample(0.0)]).accepted == [0, 1]


def test_stale_samples_refused_on_arrival_and_evicted_when_version_moves() -> None:
    buf = ReplayBuffer(capacity=10, max_staleness=2)
    buf.set_learner_version(5)
    res = buf.add([sample(1.0, version=2), sample(1.0, version=3), sample(2.0, version=5)])
    assert res.accepted == [1, 2] and res.stale == 1
    assert len(buf.set_learner_version(6)) == 1  # version 3 now lags 3 > 2
    assert [s.policy_version for s in buf.pop_micro_batch(1)] == [5]
    assert buf.counters.evicted_stale == 2 and len(buf) == 0
    assert buf.counters.stale_on_arrival == 1  # the other one aged in the buffer
    assert buf.set_learner_version(4) == [] and buf.learner_version == 6  # never goes back


def test_capacity_evicts_lowest_priority_first() -> None:
    buf = ReplayBuffer(capacity=3)
    buf.add([sample(a) for a in (1.0, 2.0, 3.0)])
    res = buf.add([sample(0.5), sample(5.0)])
    assert res.evicted == 2 and res.accepted == [0, 1]  # 0.5 accepted, then evicted
    assert buf.peek_priorities() == [5.0, 3.0, 2.0]
    assert buf.counters.evicted_capacity == 2 and buf.counters.accepted == 5


def test_micro_batch_by_sequences_waits_for_a_full_batch() -> None:
    buf = ReplayBuffer(capacity=10)
    buf.add([sample(1.0), sample(2.0)])
    assert buf.pop_micro_batch(3) == [] and len(buf) == 2
    buf.add([sample(0.5)])
    assert len(buf.pop_micro_batch(3)) == 3


def test_micro_batch_count_by_tokens() -> None:
    assert micro_batch_count([4, 4, 4], 8, "tokens") == 2
    assert micro_batch_count([4, 3], 8, "tokens") == 0  # 7 tokens held, 1 more could fit
    assert micro_batch_count([10, 1], 8, "tokens") == 1  # an oversize sample goes alone
    assert micro_batch_count([1, 1], 3, "sequences") == 0
    with pytest.raises(ValueError):
        micro_batch_count([1], 1, "bytes")


def test_micro_batch_by_tokens_and_token_accounting() -> None:
    buf = ReplayBuffer(capacity=10)
    buf.add(
        [
            sample(3.0, completion_len=5),
            sample(2.0, completion_len=5),
            sample(1.0, completion_len=1),
        ]
    )  # 8 + 8 + 4 tokens
    assert buf.num_tokens == 20
    got = buf.pop_micro_batch(17, unit="tokens")
    assert [s.advantage for s in got] == [3.0, 2.0]
    assert buf.num_tokens == 4
    assert buf.pop_micro_batch(17, unit="tokens") == []


def test_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        ReplayBuffer(capacity=0)
    with pytest.raises(ValueError):
        ReplayBuffer(capacity=1, max_staleness=-1)


def test_length_aware_pick_keeps_the_top_unit_and_its_closest_lengths() -> None:
    from dashrl.queue.buffer import length_aware_pick

    # priority order; lengths of the window's units
    assert length_aware_pick([50, 90, 52, 10, 49], [1] * 5, 3) == [0, 2, 4]
    assert length_aware_pick([50, 90, 52], [1] * 3, 3) == [0, 1, 2]  # window = size: strict
    assert length_aware_pick([50, 60, 40], [1] * 3, 2) == [0, 1]  # a tie goes to priority
    assert length_aware_pick([50, 51, 90], [2, 1, 1], 2) == [0]  # a pair fills it alone
    assert length_aware_pick([50, 51], [1, 1], 3) == []  # too few: wait


def test_length_window_serves_similar_lengths_and_loses_nothing() -> None:
    import numpy as np

    from dashrl.protocol import Sample

    def sample(i: int, n: int, adv: float) -> Sample:
        return Sample.make(f"p{i}", np.ones(4, np.int32), np.ones(n, np.int32),
                      np.zeros(n, np.float32), 1.0, adv, 0)  # fmt: skip

    lengths = [30, 5, 29, 6, 28, 7, 27, 8]
    for window, first in ((1, [30, 5]), (4, [30, 29])):
        buf = ReplayBuffer(capacity=100, length_window=window)
        samples = [sample(i, n, 1.0 - i / 100) for i, n in enumerate(lengths)]
        buf.add(samples)
        got = buf.pop_micro_batch(2)
        assert [len(s.completion_ids) for s in got] == first  # top |A| always served first
        rest = []
        while batch := buf.pop_micro_batch(2):
            rest += batch
        assert len(got) + len(rest) == len(lengths) and len(buf) == 0
