"""Round trips of every message and every rejection path of the strict decoder."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dashrl.protocol import (
    SCHEMA_VERSION,
    ActorStats,
    Completion,
    DecodeLimits,
    MicroBatchReply,
    MicroBatchRequest,
    ProtocolError,
    QueueEvent,
    RolloutGroup,
    Sample,
    WeightsVersion,
    decode,
    encode,
    group_to_samples,
)


def make_group(g: int = 3, t: int = 5) -> RolloutGroup:
    rng = np.random.default_rng(0)
    comps = [
        Completion(
            token_ids=rng.integers(0, 49152, t + i).astype(np.int32),
            logprobs=-rng.random(t + i).astype(np.float32),
            reward=float(i % 2),
            advantage=0.5 - i,
            finish_reason="stop" if i else "length",
            policy_version=7,
        )
        for i in range(g)
    ]
    return RolloutGroup(
        "chain_sum/train/3",
        np.arange(11, dtype=np.int32),
        comps,
        "actor1",
        "chain_sum",
        1.7e9,
    )


def make_sample(adv: float = 1.0) -> Sample:
    return Sample.make(
        "p",
        np.arange(4, dtype=np.int32),
        np.arange(3, dtype=np.int32),
        np.full(3, -0.5, np.float32),
        1.0,
        adv,
        2,
    )


def raw(frame: bytes) -> dict:
    return msgpack.unpackb(frame, raw=False)


def pack(obj: dict) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# ------------------------------------------------------------------ round trips


def assert_group_equal(a: RolloutGroup, b: RolloutGroup) -> None:
    assert (a.prompt_id, a.actor_id, a.task, a.created_at) == (
        b.prompt_id,
        b.actor_id,
        b.task,
        b.created_at,
    )
    np.testing.assert_array_equal(a.prompt_ids, b.prompt_ids)
    assert len(a.completions) == len(b.completions)
    for x, y in zip(a.completions, b.completions, strict=True):
        np.testing.assert_array_equal(x.token_ids, y.token_ids)
        np.testing.assert_array_equal(x.logprobs, y.logprobs)
        assert (x.reward, x.advantage, x.finish_reason, x.policy_version) == (
            y.reward,
            y.advantage,
            y.finish_reason,
            y.policy_version,
        )


def test_rollout_group_round_trip() -> None:
    g = make_group()
    out = decode(encode(g))
    assert isinstance(out, RolloutGroup)
    assert_group_equal(g, out)
    assert out.completions[1].token_ids.dtype == np.dtype("<i4")
    assert out.completions[1].logprobs.dtype == np.dtype("<f4")


def test_arrays_travel_as_raw_little_endian_bytes() -> None:
    g = make_group(g=1, t=4)
    body = raw(encode(g))["body"]
    assert isinstance(body["prompt_ids"], bytes)
    assert body["prompt_ids"] == np.arange(11, dtype="<i4").tobytes()
    assert body["completions"][0]["logprobs"] == g.completions[0].logprobs.astype("<f4").tobytes()


def test_request_reply_weights_round_trip() -> None:
    req = MicroBatchRequest(5, 3, 4096, "tokens")
    assert decode(encode(req)) == req
    s = make_sample()
    rep = decode(encode(MicroBatchReply(5, [s, s], {"queue/size": 3.0})))
    assert (
        isinstance(rep, MicroBatchReply)
        and rep.request_id == 5
        and rep.stats == {"queue/size": 3.0}
    )
    assert len(rep.samples) == 2
    np.testing.assert_array_equal(rep.samples[1].completion_ids, s.completion_ids)
    assert rep.samples[0].policy_version == 2 and rep.samples[0].num_tokens == 7
    w = WeightsVersion(9, 1024, "float32", "abc", 1.0)
    assert decode(encode(w)) == w
    empty = decode(encode(MicroBatchReply(1, [], {})))
    assert empty.samples == []


def test_group_to_samples_shares_prompt() -> None:
    g = make_group()
    samples = group_to_samples(g)
    assert [s.advantage for s in samples] == [c.advantage for c in g.completions]
    assert all(s.prompt_ids is g.prompt_ids for s in samples)


# ------------------------------------------------------------------ rejections


def corrupt(mutate) -> bytes:
    obj = raw(encode(make_group()))
    mutate(obj)
    return pack(obj)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda o: o.update(schema=SCHEMA_VERSION + 1), "unknown schema version"),
        (lambda o: o.update(schema="1"), "expected int"),
        (lambda o: o.update(type="rollout_grop"), "unknown message type"),
        (lambda o: o.pop("body"), "missing fields"),
        (lambda o: o["body"].update(extra=1), "unknown fields"),
        (lambda o: o["body"].update(prompt_id=17), "expected str"),
        (lambda o: o["body"].update(prompt_ids=[1, 2, 3]), "expected raw bytes"),
        (lambda o: o["body"].update(prompt_ids=b"\x00" * 7), "not a whole"),
        (lambda o: o["body"].update(prompt_ids=b""), "length 0"),
        (lambda o: o["body"].update(prompt_ids=np.array([-1], "<i4").tobytes()), "negative token"),
        (lambda o: o["body"].update(completions=[]), "empty"),
        (lambda o: o["body"].update(timings={"generate_s": 1.0}), "unknown fields"),
        (lambda o: o["body"].update(created_at=float("nan")), "not finite"),
        (lambda o: o["body"]["completions"][0].update(logprobs=b"\x00" * 8), "logprobs for"),
        (lambda o: o["body"]["completions"][0].update(reward=float("inf")), "not finite"),
        (lambda o: o["body"]["completions"][0].update(advantage=True), "expected float"),
        (lambda o: o["body"]["completions"][0].update(policy_version=1.0), "expected int"),
        (lambda o: o["body"]["completions"][0].update(policy_version=True), "expected int"),
        (lambda o: o["body"]["completions"][0].update(policy_version=-2), "outside"),
        (lambda o: o["body"]["completions"][0].update(finish_reason="eos"), "not allowed"),
    ],
)
def test_rejects_malformed_group(mutate, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode(corrupt(mutate))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), 0.5])
def test_rejects_bad_logprob_values(bad: float) -> None:
    g = make_group()
    g.completions[2].logprobs = g.completions[2].logprobs.copy()
    g.completions[2].logprobs[1] = bad
    with pytest.raises(ProtocolError, match="logprob"):
        decode(encode(g))


def test_rejects_oversized_frame_and_limits() -> None:
    frame = encode(make_group(g=4, t=50))
    with pytest.raises(ProtocolError, match="limit"):
        decode(frame, DecodeLimits(max_frame_bytes=len(frame) - 1))
    with pytest.raises(ProtocolError, match="items > limit"):
        decode(frame, DecodeLimits(max_group_size=3))
    with pytest.raises(ProtocolError, match="length"):
        decode(frame, DecodeLimits(max_seq_len=20))
    assert isinstance(decode(frame, DecodeLimits(max_frame_bytes=len(frame))), RolloutGroup)


@pytest.mark.parametrize(
    "frame", [b"", b"\xc1", b"garbage", pack([1, 2, 3]), pack({1: 2}), pack("x")]
)
def test_rejects_non_messages(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(frame)


def test_rejects_truncated_frames() -> None:
    frame = encode(make_group())
    for cut in range(0, len(frame), 7):
        with pytest.raises(ProtocolError):
            decode(frame[:cut])


def test_expect_rejects_wrong_message_kind() -> None:
    with pytest.raises(ProtocolError, match="unexpected message"):
        decode(encode(MicroBatchRequest(1, 0, 4)), expect=RolloutGroup)


def test_request_fields_are_validated() -> None:
    obj = raw(encode(MicroBatchRequest(1, 0, 4)))
    obj["body"]["unit"] = "bytes"
    with pytest.raises(ProtocolError, match="not allowed"):
        decode(pack(obj))
    obj["body"].update(unit="sequences", size=0)
    with pytest.raises(ProtocolError, match="outside"):
        decode(pack(obj))


def test_encode_refuses_foreign_objects() -> None:
    with pytest.raises(TypeError):
        encode({"schema": 1})  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_only_ever_raise_protocol_error(frame: bytes) -> None:
    try:
        decode(frame)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_bit_flips_of_a_valid_frame_decode_or_raise_protocol_error(data) -> None:
    frame = bytearray(encode(make_group(g=2, t=3)))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(frame) - 1))
        frame[i] = data.draw(st.integers(0, 255))
    try:
        msg = decode(bytes(frame))
    except ProtocolError:
        return
    # Whatever still decodes satisfies every invariant the decoder promises.
    assert isinstance(msg, RolloutGroup)
    for c in msg.completions:
        assert len(c.token_ids) == len(c.logprobs) and np.isfinite(c.logprobs).all()
        assert math.isfinite(c.reward) and math.isfinite(c.advantage)


def test_queue_event_round_trip_and_validation() -> None:
    from dashrl.protocol import QueueEvent

    ev = QueueEvent("served", np.array([[0, 1], [3, 2]], np.int32), 7, 42)
    back = decode(encode(ev))
    assert isinstance(back, QueueEvent) and back.kind == "served"
    assert back.refs.tolist() == [[0, 1], [3, 2]] and (back.learner_version, back.request_id) == (
        7,
        42,
    )
    empty = decode(encode(QueueEvent("evicted_stale", np.zeros((0, 2), np.int32), 0)))
    assert empty.refs.shape == (0, 2)
    for bad in (QueueEvent("lost", ev.refs, 0), QueueEvent("served", np.array([[-1, 0]]), 0),
                QueueEvent("served", np.array([1, 2, 3]), 0)):  # fmt: skip
        with pytest.raises(ProtocolError):
            decode(encode(bad))


def test_actor_stats_round_trip_and_bounds() -> None:
    st = ActorStats("actor0", 12, 3400, 0.97, 5, 1, 2, 3.5)
    assert decode(encode(st)) == st
    obj = raw(encode(st))
    for field, bad, message in (
        ("busy_frac", 1.5, "outside"),
        ("busy_frac", float("inf"), "not finite"),
        ("groups_sent", -1, "outside"),
        ("verifier_errors", 2**62, "outside"),
        ("generate_s", 1e308, "outside"),
        ("actor_id", 7, "expected str"),
    ):
        bad_obj = {**obj, "body": {**obj["body"], field: bad}}
        with pytest.raises(ProtocolError, match=message):
            decode(pack(bad_obj))


def test_a_sample_is_its_completion_not_a_copy() -> None:
    """One rollout record: the sample the queue serves holds the group's Completion."""
    g = make_group()
    s = group_to_samples(g)[1]
    assert s.completion is g.completions[1]
    assert s.advantage == g.completions[1].advantage and s.num_tokens == 11 + 6
    back = decode(encode(MicroBatchReply(1, [s])))
    assert raw(encode(MicroBatchReply(1, [s])))["body"]["samples"][0].keys() == {
        "prompt_id",
        "prompt_ids",
        "completion",
    }
    np.testing.assert_array_equal(back.samples[0].logprobs, s.logprobs)


def test_versions_past_the_wire_bound_are_refused() -> None:
    """A policy version near 2**64 would overflow the learner's int64 tensors."""
    obj = raw(encode(make_group()))
    obj["body"]["completions"][0]["policy_version"] = 2**63
    with pytest.raises(ProtocolError, match="outside"):
        decode(pack(obj))
    req = raw(encode(MicroBatchRequest(1, 0, 4)))
    req["body"]["learner_version"] = 2**62
    with pytest.raises(ProtocolError, match="outside"):
        decode(pack(req))


def test_a_version_1_log_record_is_upgraded_only_when_asked() -> None:
    """Queue logs written by schema 1 (actor timings inside the group) still read."""
    from dashrl.protocol import decode_object

    v1 = raw(encode(make_group()))
    v1["schema"] = 1
    v1["body"]["timings"] = {"generate_s": 1.5, "busy_frac": 1.0}
    with pytest.raises(ProtocolError, match="unknown schema version 1"):
        decode_object(v1)
    assert_group_equal(decode_object(v1, upgrade=True), make_group())
    ev = raw(encode(QueueEvent("served", np.array([[0, 1]], np.int32), 3, 9)))
    ev["schema"] = 1
    assert decode_object(ev, upgrade=True).refs.tolist() == [[0, 1]]
