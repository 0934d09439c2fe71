"""The replay queue: reuse up to K serves, the learner's priority updates, proportional
sampling with importance weights, the rate limiter, and the log that records and restores
all of it. Hand-computed expectations throughout; one real job at the end."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, tiny_job_args
from dashrl.protocol import (
    Completion,
    MicroBatchReply,
    MicroBatchRequest,
    PriorityUpdate,
    ProtocolError,
    RolloutGroup,
    Sample,
    decode,
    encode,
)
from dashrl.protocol.config import Config
from dashrl.queue.buffer import ReplayBuffer, dpo_pair_units
from dashrl.queue.log import ROLLOUT_LOG, read_queue_log
from dashrl.queue.policies import (
    RateLimit,
    expiring_first_pick,
    importance_weights,
    proportional_pick,
    replay_priority,
    sampling_probabilities,
)

START = str(REPO / "launch" / "start.py")


def sample(adv: float, version: int = 0, name: str = "p", n_tokens: int = 2) -> Sample:
    return Sample.make(name, np.arange(3, dtype=np.int32), np.arange(n_tokens, dtype=np.int32),
                       np.full(n_tokens, -0.5, np.float32), 1.0, adv, version)  # fmt: skip


# ------------------------------------------------------------------ reuse


def test_a_unit_is_served_k_times_never_twice_in_one_step() -> None:
    buf = ReplayBuffer(capacity=10, max_uses=2, max_staleness=4)
    a, b, c = sample(3.0, name="a"), sample(2.0, name="b"), sample(1.0, name="c")
    for s in (a, b, c):
        buf.add([s])
    assert buf.pop_micro_batch(2) == [a, b]
    # lent until the version advances: the same step gets the next best, then nothing
    assert buf.pop_micro_batch(1) == [c] and buf.pop_micro_batch(1) == []
    assert len(buf) == 3 and buf.uses_of(a) == 1
    assert buf.set_learner_version(1) == []
    assert buf.pop_micro_batch(3) == [a, b, c]  # second serves, at version 1
    assert buf.set_learner_version(2) == [] and len(buf) == 0  # used up: gone
    assert buf.counters.served == 6 and buf.counters.reused == 3


def test_reused_samples_still_age_out() -> None:
    buf = ReplayBuffer(capacity=10, max_uses=4, max_staleness=1)
    s = sample(1.0, version=0)
    buf.add([s])
    assert buf.pop_micro_batch(1) == [s]
    assert buf.set_learner_version(1) == []
    assert buf.pop_micro_batch(1) == [s]  # lag 1 <= max_staleness: reused
    assert buf.set_learner_version(2) == [s]  # lag 2: evicted although 2 uses remain
    assert buf.counters.evicted_stale == 1 and len(buf) == 0


def test_a_dpo_pair_is_reused_and_updated_whole() -> None:
    buf = ReplayBuffer(capacity=10, max_uses=2)
    chosen, rejected = sample(1.0, name="c"), sample(-1.0, name="r")
    buf.add([chosen, rejected], dpo_pair_units([1.0, -1.0]))
    assert buf.pop_micro_batch(2) == [chosen, rejected]
    buf.update_priorities([chosen, rejected], [0.0, 0.3])  # the pair's priority: its max
    buf.set_learner_version(1)
    assert buf.peek_priorities() == [0.3, 0.3] and buf.pop_micro_batch(1) == [chosen, rejected]


# ------------------------------------------------------------------ priority updates


def test_priority_updates_reorder_and_remove_at_the_filter() -> None:
    buf = ReplayBuffer(capacity=10, max_uses=3, filter_threshold=0.05)
    a, b, c = sample(3.0, name="a"), sample(2.0, name="b"), sample(1.0, name="c")
    for s in (a, b, c):
        buf.add([s])
    served = buf.pop_micro_batch(3)
    # a fully clipped -> 0 (leaves), b barely moved, c's tokens all still active
    removed = buf.update_priorities(served, [0.0, 0.5, 1.0])
    assert removed == [a] and buf.counters.evicted_low_priority == 1
    buf.set_learner_version(1)
    assert buf.peek_priorities() == [1.0, 0.5]  # c now before b
    assert buf.pop_micro_batch(1) == [c]
    # an update for samples the buffer no longer lends is ignored
    assert buf.update_priorities([a], [9.0]) == [] and len(buf) == 2


def test_replay_priority_and_active_token_share_by_hand() -> None:
    from dashrl.learner.loss import active_token_frac

    # ratios exp(d): sample 0 (A > 0) has tokens at 1.0, 1.5 (> hi 1.28: dead), 0.5 (alive);
    # sample 1 (A < 0) has 0.5 (< lo 0.8: dead), 1.5 (alive), padding.
    d = torch.log(torch.tensor([[1.0, 1.5, 0.5], [0.5, 1.5, 1.0]]))
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    frac = active_token_frac(d, torch.zeros(2, 3), torch.tensor([2.0, -1.0]), mask,
                             torch.zeros(2, dtype=torch.long), 0.2, 0.28)  # fmt: skip
    assert frac.tolist() == pytest.approx([2 / 3, 1 / 2])
    assert replay_priority(2.0, 2 / 3) == pytest.approx(4 / 3)
    assert replay_priority(-1.0, 0.5) == 0.5 and replay_priority(1.0, float("nan")) == 0.0


# ------------------------------------------------------------------ proportional sampling


def test_proportional_draws_follow_p_to_the_alpha() -> None:
    rng = np.random.default_rng(0)
    prios, alpha, n = [1.0, 2.0, 3.0, 4.0], 1.0, 20_000
    counts = Counter(proportional_pick(prios, [1] * 4, 1, alpha, rng)[0] for _ in range(n))
    expected = sampling_probabilities(prios, alpha) * n  # [0.1, 0.2, 0.3, 0.4] * n
    chi2 = sum((counts[i] - expected[i]) ** 2 / expected[i] for i in range(4))
    assert chi2 < 16.27, (counts, chi2)  # chi-square, 3 degrees of freedom, p = 0.001
    # alpha = 0 is uniform; a draw of 3 sequences from units of sizes [2, 1, 1] stops when full
    assert sampling_probabilities(prios, 0.0).tolist() == [0.25] * 4
    picked = proportional_pick([1.0, 1.0, 1.0], [2, 1, 1], 3, 1.0, rng)
    assert sum([2, 1, 1][i] for i in picked) >= 3 and len(set(picked)) == len(picked)
    assert proportional_pick([1.0], [1], 2, 1.0, rng) == []


def test_importance_weights_by_hand() -> None:
    probs = sampling_probabilities([1.0, 3.0], 1.0)  # [0.25, 0.75]
    # w = (N P)^-beta / max w: beta 1 -> (0.5^-1, 1.5^-1) / 2 = (1, 1/3)
    assert importance_weights(probs, [0, 1], 1.0) == pytest.approx([1.0, 1 / 3])
    assert importance_weights(probs, [1], 0.5) == pytest.approx([(1.5 / 0.5) ** -0.5])
    assert importance_weights(probs, [0, 1], 0.0) == [1.0, 1.0]


def test_proportional_serves_carry_their_weights_into_the_loss() -> None:
    from dashrl.learner.loss import clipped_surrogate

    buf = ReplayBuffer(capacity=10, sampling="proportional", beta=1.0, seed=3)
    buf.add([sample(1.0, name="low"), sample(3.0, name="high")])
    got = {s.prompt_id: s.is_weight for s in buf.pop_micro_batch(2)}
    assert got == pytest.approx({"low": 1.0, "high": 1 / 3})
    # the surrogate multiplies each sample's tokens by its weight: at ratio 1 the loss is
    # -mean_t(w_b A_b) = -(1 * 1 * 2 + (1/3) * 3 * 2) / 4 tokens
    zeros = torch.zeros(2, 2)
    out = clipped_surrogate(zeros, zeros, torch.tensor([1.0, 3.0]), torch.ones(2, 2),
                            torch.zeros(2, dtype=torch.long),
                            sample_weights=torch.tensor([1.0, 1 / 3]))  # fmt: skip
    assert float(out.loss) == pytest.approx(-(2 + 2) / 4)


# ------------------------------------------------------------------ rate limiter


def test_the_rate_limiter_blocks_and_releases_inserts() -> None:
    buf = ReplayBuffer(capacity=100, rate_limit=RateLimit(1.0, error_buffer=3.0))
    assert buf.accepting()
    buf.add([sample(1.0), sample(1.0)])  # budget 2
    assert buf.accepting()
    buf.add([sample(1.0), sample(1.0)])  # budget 4 > 3: generation is ahead
    assert not buf.accepting()
    assert len(buf.pop_micro_batch(2)) == 2  # budget 2: the learner caught up
    assert buf.accepting()


def test_the_rate_limiters_default_slack_is_one_optimizer_step() -> None:
    from dashrl.queue.handlers import rate_limit

    assert rate_limit(Config()) is None  # off unless samples_per_insert is set
    step = {"micro_batch_size": 4, "micro_batches_per_step": 3}
    cfg = Config.model_validate({"queue": {"samples_per_insert": 1.0}, "learner": step})
    assert rate_limit(cfg) == RateLimit(1.0, error_buffer=12.0, min_size=0)
    cfg = Config.model_validate({"queue": {"samples_per_insert": 2.0, "rate_error_buffer": 5.0,
                                           "min_size": 7}})  # fmt: skip
    assert rate_limit(cfg) == RateLimit(2.0, error_buffer=5.0, min_size=7)


def test_the_rate_limiter_blocks_and_releases_sampling() -> None:
    # each sample may be served 4 times, but the limiter aims at 1 serve per insert with a
    # slack of 2 serves: sampling runs ahead of inserts at most that far
    buf = ReplayBuffer(capacity=100, max_uses=4, rate_limit=RateLimit(1.0, error_buffer=2.0))
    buf.add([sample(2.0, name="a"), sample(1.0, name="b")])  # budget 2
    assert len(buf.pop_micro_batch(2)) == 2  # budget 0
    buf.set_learner_version(1)
    assert len(buf.pop_micro_batch(2)) == 2  # budget -2 = the floor
    buf.set_learner_version(2)
    assert buf.pop_micro_batch(1) == []  # -3 would pass the floor: wait for inserts
    buf.add([sample(0.5, name="c")])  # budget -1
    assert [s.prompt_id for s in buf.pop_micro_batch(1)] == ["a"]


def test_evictions_write_off_their_budget_so_intake_never_stalls() -> None:
    buf = ReplayBuffer(capacity=100, max_staleness=0, rate_limit=RateLimit(1.0, 3.0))
    buf.add([sample(1.0, version=0) for _ in range(4)])
    assert not buf.accepting()
    assert len(buf.set_learner_version(1)) == 4  # all stale, never served
    assert buf.budget == 0 and buf.accepting()


def test_expiring_first_pick_by_hand() -> None:
    # no unit expiring: exactly the length-aware pick (top unit, then the closest lengths)
    assert expiring_first_pick([False] * 4, [10, 30, 11, 12], [1, 1, 1, 1], 3) == [0, 2, 3]
    # units 1 and 3 expire: both first, then the length-aware pick among the rest
    assert expiring_first_pick([False, True, False, True], [10, 30, 11, 50],
                               [1, 1, 1, 1], 3) == [0, 1, 3]  # fmt: skip
    # more expiring than fit: the highest-priority expiring ones only
    assert expiring_first_pick([True, True, True], [5, 5, 5], [1, 1, 1], 2) == [0, 1]
    assert expiring_first_pick([True], [5], [1], 2) == []  # too few held


def test_greedy_serves_the_expiring_bottom_before_fresher_higher_priority() -> None:
    def run(expiring_first: bool) -> tuple[list[Sample], list[Sample]]:
        buf = ReplayBuffer(capacity=10, max_staleness=1, expiring_first=expiring_first)
        low = sample(0.1, version=0, name="low")
        buf.add([low])
        buf.set_learner_version(1)  # low is now at lag 1 = max_staleness: its last version
        high = [sample(2.0, version=1, name=f"h{i}") for i in range(2)]
        for s in high:
            buf.add([s])
        served = buf.pop_micro_batch(2)
        return served, buf.set_learner_version(2)

    served, evicted = run(expiring_first=True)
    assert {s.prompt_id for s in served} == {"low", "h1"} and evicted == []  # h1: the newer
    served, evicted = run(expiring_first=False)  # plain greedy: low starves and goes stale
    assert {s.prompt_id for s in served} == {"h0", "h1"}
    assert [s.prompt_id for s in evicted] == ["low"]


def test_generation_permits_wait_for_the_limiter_and_for_batches_on_their_way(tmp_path) -> None:
    from dashrl.protocol import ActorStats, GenerationPermit
    from dashrl.queue.server import QueueServer

    cfg = Config.model_validate({"run_dir": str(tmp_path), "queue": {
        "samples_per_insert": 1.0, "rate_error_buffer": 4.0, "log_rollouts": False,
        "serve_groups": False}})  # fmt: skip
    server = QueueServer(cfg, None)
    ask = [encode(GenerationPermit("a0", i)) for i in range(4)]
    assert server.on_request_frame(ask[0], b"loop0") == ask[0]  # granted at once
    server.on_rollout_frame(encode(_group(0, [1.0, -1.0, 0.5])))  # the batch: 3 accepted
    server.on_rollout_frame(encode(ActorStats("a0")))  # ...and its end
    assert server.on_request_frame(ask[1], b"loop0") == ask[1]  # budget 3 <= 4: granted
    # one batch (3 samples expected) on its way: 3 + 3 > 4, the next loop waits
    assert server.on_request_frame(ask[2], b"loop1") is None and server.grant_permits() == []
    assert len(_ask(server, 1, 0).samples) == 2  # the learner takes 2: 1 + 3 <= 4
    assert server.grant_permits() == [(b"loop1", ask[2])]
    assert server.on_request_frame(ask[3], b"loop0") is None  # 1 + 2 batches x 3 > 4
    server.on_rollout_frame(encode(ActorStats("a0")))  # a batch arrived with nothing new
    assert server.grant_permits() == [(b"loop0", ask[3])]  # 1 + 1 batch x 1.5 <= 4
    # an actor loop that asks again (it heard nothing for a while) waits once, not twice
    server.on_rollout_frame(encode(_group(1, [1.0, 1.0, 1.0, 1.0])))  # budget 5: closed
    for rid in (10, 11):
        assert server.on_request_frame(encode(GenerationPermit("a0", rid)), b"loop2") is None
    assert server.stats()["queue/permits_waiting"] == 1


# ------------------------------------------------------------------ protocol and log


def test_priority_updates_and_weights_are_validated_on_the_wire() -> None:
    upd = decode(encode(PriorityUpdate(7, np.array([0.5, 0.0], np.float32))))
    assert upd.request_id == 7 and upd.priorities.tolist() == [0.5, 0.0]
    for bad in ([float("nan")], [-1.0]):
        with pytest.raises(ProtocolError, match="priorities"):
            decode(encode(PriorityUpdate(1, np.array(bad, np.float32))))
    s = sample(1.0)
    with pytest.raises(ProtocolError, match="is_weights"):
        MicroBatchReply(1, [s], {}, np.array([1.0, 0.5], np.float32))
    with pytest.raises(ProtocolError, match="is_weights"):
        decode(encode(MicroBatchReply(1, [s], {}, np.array([2.0], np.float32))))


def _group(i: int, advantages: list[float], version: int = 0) -> RolloutGroup:
    comps = [Completion(np.array([5, 6], np.int32), np.full(2, -0.5, np.float32), 1.0, a,
                        "stop", version) for a in advantages]  # fmt: skip
    return RolloutGroup(f"p{i}", np.arange(4, dtype=np.int32), comps, "t")


def _ask(server, rid: int, version: int, size: int = 2) -> MicroBatchReply:
    return decode(server.on_request_frame(encode(MicroBatchRequest(rid, version, size))))


def test_uses_and_priorities_are_logged_and_restored_by_a_restarted_queue(tmp_path) -> None:
    from dashrl.queue.server import QueueServer

    cfg = Config.model_validate(
        {
            "run_dir": str(tmp_path),
            "queue": {"max_uses": 3, "samples_per_insert": 3.0, "serve_groups": False},
        }
    )
    server = QueueServer(cfg, tmp_path)
    server.on_rollout_frame(encode(_group(0, [3.0, -2.0, 1.0])))
    first = _ask(server, 1, 0)
    assert [s.advantage for s in first.samples] == [3.0, -2.0]
    update = PriorityUpdate(1, np.array([0.0, 0.7], np.float32))  # 3.0's tokens all clipped
    assert server.on_request_frame(encode(update)) is None
    assert server.on_request_frame(encode(PriorityUpdate(99, np.zeros(1, np.float32)))) is None
    assert server.rejected_updates == 1  # no such micro-batch
    # filter 0: priority 0 leaves the queue
    assert server.buffer.counters.evicted_low_priority == 1
    second = _ask(server, 2, 1)
    assert [s.advantage for s in second.samples] == [1.0, -2.0]  # 1.0 (fresh) above 0.7
    server.close()

    qlog = read_queue_log(tmp_path / ROLLOUT_LOG)
    assert [e.kind for e in qlog.events] == ["served", "priority", "evicted_low_priority",
                                             "served"]  # fmt: skip
    assert qlog.pending(3) == {(0, 1): (2, pytest.approx(0.7)), (0, 2): (1, None)}
    restarted = QueueServer(cfg, tmp_path, reload=True)
    # the rate limiter's budget comes back too: (3 - 2 uses) + (3 - 1 use)
    assert restarted.reloaded == 2 and restarted.buffer.budget == pytest.approx(1 + 2)
    restarted.buffer.set_learner_version(2)
    assert restarted.buffer.peek_priorities() == pytest.approx([1.0, 0.7])
    third = _ask(restarted, 3, 2)
    assert [s.advantage for s in third.samples] == [1.0, -2.0]  # -2.0's third and last use
    assert restarted.buffer.uses_of(third.samples[1]) == 0  # used up: not lent any more
    restarted.close()


def test_a_schema_2_log_still_reads(tmp_path) -> None:
    import msgpack

    from dashrl.queue.log import RolloutLog

    body = {"kind": "served", "refs": np.array([0, 0], "<i4").tobytes(),
            "learner_version": 0, "request_id": 1}  # fmt: skip
    log = RolloutLog(tmp_path / "q.msgpack")
    log.write_frame(encode(_group(0, [1.0])))
    log.write_frame(msgpack.packb({"schema": 2, "type": "queue_event", "body": body}))
    log.close()
    qlog = read_queue_log(tmp_path / "q.msgpack")
    assert [e.kind for e in qlog.events] == ["served"] and qlog.events[0].values.size == 0


# ------------------------------------------------------------------ a real job


@pytest.mark.slow
def test_a_job_with_reuse_and_pacing_serves_twice_and_loses_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # the fake engine generates far faster than the learner trains: the limiter must pace it
    args = tiny_job_args(run_dir, **{
        "actor.engine": "fake", "learner.steps": 8, "learner.micro-batches-per-step": 2,
        "learner.lr": 1e-3,
        "queue.max-uses": 2, "queue.max-staleness": 3, "queue.sampling": "proportional",
        "queue.is-beta": 1.0, "queue.samples-per-insert": 2.0, "queue.capacity": 64})  # fmt: skip
    out = subprocess.run([sys.executable, START, *args], capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    last = rows[-1]
    print(f"reused_frac {last['queue/reused_frac']:.2f}, actor/paced_frac "
          f"{last['actor/paced_frac']:.2f}, accepted {last['queue/accepted']:.0f}, "
          f"stale {last['queue/evicted_stale']:.0f}")  # fmt: skip
    assert rows[-1]["queue/reused_frac"] > 0 and rows[-1]["actor/paced_frac"] > 0
    assert all(0 < r["learner/is_weight_mean"] <= 1 for r in rows)

    qlog = read_queue_log(run_dir / ROLLOUT_LOG)
    serves: dict[tuple[int, int], list[int]] = {}
    for e in qlog.events:
        if e.kind == "served":
            for r in e.refs.tolist():
                serves.setdefault(tuple(r), []).append(e.learner_version)
    twice = {r: v for r, v in serves.items() if len(v) == 2}
    updates = [e for e in qlog.events if e.kind == "priority"]  # the learner re-ranked them
    assert updates and all(len(e.values) == len(e.refs) for e in updates)
    assert twice and all(len(v) <= 2 for v in serves.values())
    for (g, c), versions in twice.items():  # a reuse comes at a later version, lag >= 1
        lag = versions[1] - qlog.groups[g].completions[c].policy_version
        assert versions[1] > versions[0] and lag >= 1
    # every accepted sample: used up (served twice), evicted by a named policy, or held
    evicted = {tuple(r) for e in qlog.events if e.kind.startswith("evicted")
               for r in e.refs.tolist()}  # fmt: skip
    everything = {(g, c) for g, grp in enumerate(qlog.groups) for c in range(len(grp.completions))}
    assert set(twice) | evicted | set(qlog.pending_refs(2)) == everything  # 0 lost
    assert not set(twice) & set(qlog.pending_refs(2))

    rep = subprocess.run([sys.executable, START, "replay", str(run_dir)], capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert rep.returncode == 0, rep.stdout[-2000:] + rep.stderr[-3000:]
    result = json.loads((run_dir / "replay" / "replay.json").read_text())
    assert result["identical"] and result["steps_compared"] == 8, result
