"""``--mode dash``, DASH as published: one large batch per version, filtered on arrival,
served whole once every actor's batch is in, one optimizer step over all of it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, tiny_job_args
from dashrl.learner.learner import Learner
from dashrl.learner.sources import batch_left
from dashrl.protocol import (
    ActorStats,
    Completion,
    MicroBatchReply,
    MicroBatchRequest,
    RolloutGroup,
    Sample,
    decode,
    encode,
)
from dashrl.protocol.config import Config
from dashrl.protocol.runtime import StopFlag
from dashrl.queue.batches import BATCH_LEFT, BatchGate
from dashrl.queue.log import ROLLOUT_LOG, read_queue_log

DASH = {"mode": "dash", "queue": {"max_staleness": 0}}


def test_a_batch_is_complete_once_every_actor_has_delivered_it() -> None:
    gate = BatchGate(num_actors=2)
    gate.on_group("a0", 0)
    gate.on_group("a0", 0)
    assert not gate.complete(0)  # a0's groups are in, its batch has not ended
    gate.on_batch_end("a0", learner_version=0)
    gate.on_group("a1", 0)
    assert not gate.complete(0)
    gate.on_batch_end("a1", learner_version=0)
    assert gate.complete(0) and not gate.complete(1)
    gate.on_group("a0", 1)
    gate.on_batch_end("a0", 1)
    # a1 sent stats with no group since its last ones (all its frames were refused): its
    # batch counts as the version it waited for, so the loop goes on
    gate.on_batch_end("a1", 1)
    assert gate.complete(1)


def _group(i: int, advantages: list[float], actor: str, version: int = 0) -> bytes:
    comps = [Completion(np.array([5, 6], np.int32), np.full(2, -0.5, np.float32), 1.0, a,
                        "stop", version) for a in advantages]  # fmt: skip
    return encode(RolloutGroup(f"p{i}", np.arange(4, dtype=np.int32), comps, actor, "t"))


def _ask(server, rid: int, version: int, size: int = 3) -> MicroBatchReply:
    return decode(server.on_request_frame(encode(MicroBatchRequest(rid, version, size))))


def test_the_queue_serves_a_dash_batch_whole_then_says_it_is_done(tmp_path) -> None:
    from dashrl.queue.server import QueueServer

    cfg = Config.model_validate({**DASH, "actor": {"num_actors": 2}})
    server = QueueServer(cfg, None)
    server.on_rollout_frame(_group(0, [1.0, -1.0, 0.0, 0.0], "a0"))  # two pass the filter
    server.on_rollout_frame(_group(1, [0.0, 0.0, 0.0, 0.0], "a0"))  # none do
    server.on_rollout_frame(encode(ActorStats("a0")))
    server.on_rollout_frame(_group(2, [2.0, 0.5, -0.5, -2.0], "a1"))
    first = _ask(server, 1, 0)
    assert first.samples == [] and BATCH_LEFT not in first.stats  # a1's batch is not in
    server.on_rollout_frame(encode(ActorStats("a1")))
    served, lefts = [], []
    for rid in range(2, 5):
        reply = _ask(server, rid, 0)
        served.append(sorted(abs(s.advantage) for s in reply.samples))
        lefts.append(reply.stats[BATCH_LEFT])
    # 6 informative samples in micro-batches of 3: top |A| first, the count going down
    assert [len(s) for s in served] == [3, 3, 0] and lefts == [3.0, 0.0, 0.0]
    assert served[0] == [1.0, 2.0, 2.0]
    # the next version's requests wait for the next batch
    assert BATCH_LEFT not in _ask(server, 5, 1).stats
    # a batch the filter empties entirely: an empty reply that says so
    for a in ("a0", "a1"):
        server.on_rollout_frame(_group(3, [0.0, 0.0], a, version=1))
        server.on_rollout_frame(encode(ActorStats(a)))
    empty = _ask(server, 6, 1)
    assert empty.samples == [] and empty.stats[BATCH_LEFT] == 0.0
    # a last micro-batch smaller than the size asked for
    for a in ("a0", "a1"):
        server.on_rollout_frame(_group(4, [1.0, -1.0], a, version=2))
        server.on_rollout_frame(encode(ActorStats(a)))
    sizes = [len(_ask(server, 7 + i, 2).samples) for i in range(2)]
    assert sizes == [3, 1]


def _sample(adv: float, seed: int) -> Sample:
    rng = np.random.default_rng(seed)
    c = rng.integers(5, 90, 4).astype(np.int32)  # equal lengths: the token mean is the mean
    return Sample.make("p", np.array([1, 50, 60], np.int32), c, np.full(4, -2.0, np.float32),
                       1.0, adv, 0)  # fmt: skip


class BatchSource:
    """Serves fixed micro-batches with the dash reply stats, then empty replies."""

    def __init__(self, batches: list[list[Sample]]):
        self.batches, self.rejected_replies = list(batches), 0

    def request(self, learner_version, size, unit, timeout_s=0.0) -> MicroBatchReply:
        if not self.batches:
            return MicroBatchReply(0, [], {})
        samples = self.batches.pop(0)
        left = sum(len(b) for b in self.batches)
        return MicroBatchReply(0, samples, {BATCH_LEFT: float(left)})

    def close(self) -> None:
        pass


def _captured_step(learner: Learner, batches: list[list[Sample]]) -> tuple[dict, list]:
    grads: list[torch.Tensor] = []

    def capture() -> tuple[float, bool]:
        grads.extend(p.grad.detach().clone() for p in learner.model.parameters())
        learner.zero_grad()
        return 1.0, True

    learner.optimizer_step = capture
    out = learner.step(learner.feed(BatchSource(batches)), StopFlag())
    return out, grads


def test_a_dash_step_is_the_gradient_of_its_whole_batch(tiny_cfg) -> None:
    """Micro-batches of 3, 3 and 1 accumulate the gradient of one pass over all 7 samples
    (float32, equal lengths so the token mean is the per-sample mean)."""
    cfg = Config.model_validate({**tiny_cfg.model_dump(), **DASH})
    samples = [_sample(a, i) for i, a in enumerate([1.5, -1.0, 0.7, -0.3, 2.0, -2.0, 0.4])]
    learner = Learner(cfg, connect=False)
    out, dash = _captured_step(learner, [samples[:3], samples[3:6], samples[6:]])
    assert out["learner/micro_batches_per_step"] == 3 and learner.version == 1

    whole = Learner(cfg, connect=False)
    whole.train_micro_batch(samples, scale=1.0)
    ref = [p.grad.detach().clone() for p in whole.model.parameters()]
    diff = max(float((a - b).abs().max()) for a, b in zip(dash, ref, strict=True))
    scale = max(float(b.abs().max()) for b in ref)
    assert diff <= 1e-6 * max(scale, 1.0), (diff, scale)
    # equal shares (1/3 each, as a fixed micro_batches_per_step would give) are not it
    equal = Learner(cfg, connect=False)
    for part in (samples[:3], samples[3:6], samples[6:]):
        equal.train_micro_batch(part, scale=1 / 3)
    wrong = max(float((p.grad - b).abs().max()) for p, b in
                zip(equal.model.parameters(), ref, strict=True))  # fmt: skip
    assert wrong > 100 * max(diff, 1e-9)


def test_an_empty_dash_batch_moves_the_version_without_a_step(tiny_cfg) -> None:
    cfg = Config.model_validate({**tiny_cfg.model_dump(), **DASH})
    learner = Learner(cfg, connect=False)
    before = [p.detach().clone() for p in learner.model.parameters()]

    class Empty(BatchSource):
        def request(self, learner_version, size, unit, timeout_s=0.0) -> MicroBatchReply:
            return MicroBatchReply(0, [], {BATCH_LEFT: 0.0})

    out = learner.step(learner.feed(Empty([])), StopFlag())
    assert out["learner/step_taken"] == 0.0 and out["learner/empty_batches"] == 1.0
    assert learner.version == 1 and learner.skipped_steps == 0  # actors sample again
    assert all(torch.equal(a, b) for a, b in zip(before, learner.model.parameters(), strict=True))


def test_the_log_says_where_each_dash_batch_ends() -> None:
    # micro-batches of 3, 3, 1 at version 0, an empty batch (nothing logged), 2 at version 2
    assert batch_left([0, 0, 0, 2], [3, 3, 1, 2]) == [4.0, 1.0, 0.0, 0.0]
    assert batch_left([], []) == []


def test_dash_mode_config_is_checked() -> None:
    Config.model_validate(DASH)  # the defaults otherwise fit
    with pytest.raises(ValueError, match="max-staleness 0"):
        Config.model_validate({"mode": "dash"})
    with pytest.raises(ValueError, match="capacity"):
        Config.model_validate({**DASH, "queue": {"max_staleness": 0, "capacity": 16}})
    with pytest.raises(ValueError, match="max-uses"):
        Config.model_validate({"mode": "dash", "queue": {"max_staleness": 1, "max_uses": 2}})
    with pytest.raises(ValueError, match="one learner rank"):
        Config.model_validate({**DASH, "learner": {"micro_batch_unit": "tokens",
                                                   "micro_batch_size": 512}})  # fmt: skip


START = str(REPO / "launch" / "start.py")


def _job(run_dir: Path, **fields: object) -> list[dict]:
    args = tiny_job_args(run_dir, **{"mode": "dash", "queue.max-staleness": 0,
                                     "learner.micro-batch-size": 3, **fields})  # fmt: skip
    out = subprocess.run([sys.executable, START, *args], capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_dash_job_steps_once_per_whole_fresh_batch(tmp_path: Path) -> None:
    """1 actor x 4 prompts x G 4 = 16 samples per version, micro-batches of 3: each step
    trains on all 16 in 6 micro-batches (3+3+3+3+3+1), every sample fresh."""
    rows = _job(tmp_path / "run", **{"actor.engine": "fake", "learner.steps": 4})
    assert [r["version"] for r in rows] == [1, 2, 3, 4]
    assert all(r["learner/micro_batches_per_step"] == 6 for r in rows), rows
    assert all(r["learner/staleness_max"] == 0 and r["learner/step_taken"] == 1 for r in rows)
    qlog = read_queue_log(tmp_path / "run" / ROLLOUT_LOG)
    per_version: dict[int, int] = {}
    for g in qlog.groups:
        for c in g.completions:
            per_version[c.policy_version] = per_version.get(c.policy_version, 0) + 1
    assert all(per_version[v] == 16 for v in range(4)), per_version
    served = [e for e in qlog.events if e.kind == "served"]
    assert sum(len(e.refs) for e in served) == 4 * 16  # every sample once, none lost
    # the replay finds each step's end in the log: bit-identical
    rep = subprocess.run([sys.executable, START, "replay", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert rep.returncode == 0, rep.stdout[-2000:] + rep.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "replay" / "replay.json").read_text())
    assert result["identical"] and result["steps_compared"] == 4, result


@pytest.mark.slow
def test_a_dash_job_whose_batches_are_all_filtered_keeps_going(tmp_path: Path) -> None:
    """The fake engine's random tokens earn no reward, so the filter (threshold 0) drops
    every sample: each batch is empty, the version still moves and the actor samples the
    next batch; the job ends at its step count instead of hanging."""
    rows = _job(tmp_path / "run", **{"actor.engine": "fake", "learner.steps": 3,
                                     "queue.filter-threshold": 0.0})  # fmt: skip
    assert [r["version"] for r in rows] == [1, 2, 3]
    assert [r["learner/empty_batches"] for r in rows] == [1.0, 2.0, 3.0]
    assert all(r["learner/step_taken"] == 0 for r in rows)
