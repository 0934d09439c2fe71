"""The dashrl wire format, part 2: encoding to and strict decoding from msgpack frames.

See :mod:`dashrl.protocol.messages` for the envelope and the message fields. Decoding
checks everything a frame claims before trusting it and raises :class:`ProtocolError`
(one type) for any malformed input.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

from dashrl.protocol.messages import (
    DEFAULT_LIMITS,
    FINISH_REASONS,
    LOGPROB_DTYPE,
    MICRO_BATCH_UNITS,
    NODE_HELLO_KINDS,
    QUEUE_EVENT_KINDS,
    SCHEMA_VERSION,
    TOKEN_DTYPE,
    Completion,
    DecodeLimits,
    Message,
    MicroBatchReply,
    MicroBatchRequest,
    NodeHello,
    NodeWelcome,
    ProtocolError,
    QueueEvent,
    RolloutGroup,
    Sample,
    WeightsVersion,
)

# --------------------------------------------------------------------------- encoding


def _arr(a: np.ndarray, dtype: np.dtype) -> bytes:
    return np.ascontiguousarray(a, dtype=dtype).tobytes()


def _completion_body(c: Completion) -> dict[str, Any]:
    return {
        "token_ids": _arr(c.token_ids, TOKEN_DTYPE),
        "logprobs": _arr(c.logprobs, LOGPROB_DTYPE),
        "reward": float(c.reward),
        "advantage": float(c.advantage),
        "finish_reason": c.finish_reason,
        "policy_version": int(c.policy_version),
    }


def _sample_body(s: Sample) -> dict[str, Any]:
    return {
        "prompt_id": s.prompt_id,
        "prompt_ids": _arr(s.prompt_ids, TOKEN_DTYPE),
        "completion_ids": _arr(s.completion_ids, TOKEN_DTYPE),
        "logprobs": _arr(s.logprobs, LOGPROB_DTYPE),
        "reward": float(s.reward),
        "advantage": float(s.advantage),
        "policy_version": int(s.policy_version),
    }


def _body(msg: Message) -> tuple[str, dict[str, Any]]:
    if isinstance(msg, RolloutGroup):
        return "rollout_group", {
            "prompt_id": msg.prompt_id,
            "prompt_ids": _arr(msg.prompt_ids, TOKEN_DTYPE),
            "completions": [_completion_body(c) for c in msg.completions],
            "actor_id": msg.actor_id,
            "task": msg.task,
            "timings": {str(k): float(v) for k, v in msg.timings.items()},
            "created_at": float(msg.created_at),
        }
    if isinstance(msg, MicroBatchRequest):
        return "micro_batch_request", {
            "request_id": int(msg.request_id),
            "learner_version": int(msg.learner_version),
            "size": int(msg.size),
            "unit": msg.unit,
        }
    if isinstance(msg, MicroBatchReply):
        return "micro_batch_reply", {
            "request_id": int(msg.request_id),
            "samples": [_sample_body(s) for s in msg.samples],
            "stats": {str(k): float(v) for k, v in msg.stats.items()},
        }
    if isinstance(msg, WeightsVersion):
        return "weights_version", {
            "version": int(msg.version),
            "num_bytes": int(msg.num_bytes),
            "dtype": msg.dtype,
            "layout_hash": msg.layout_hash,
            "sent_at": float(msg.sent_at),
        }
    if isinstance(msg, QueueEvent):
        return "queue_event", {
            "kind": msg.kind,
            "refs": _arr(np.asarray(msg.refs).reshape(-1), TOKEN_DTYPE),
            "learner_version": int(msg.learner_version),
            "request_id": int(msg.request_id),
        }
    if isinstance(msg, NodeHello):
        return "node_hello", {"node_id": msg.node_id, "kind": msg.kind, "actors": int(msg.actors)}
    if isinstance(msg, NodeWelcome):
        return "node_welcome", {
            "node_id": msg.node_id,
            "version": int(msg.version),
            "config_json": msg.config_json,
            "weights_endpoint": msg.weights_endpoint,
        }
    raise TypeError(f"not a dashrl message: {type(msg).__name__}")


def encode(msg: Message) -> bytes:
    """Serialise a message to one msgpack frame.

    Raises:
        TypeError: ``msg`` is not one of the protocol's message classes.
    """
    kind, body = _body(msg)
    return msgpack.packb({"schema": SCHEMA_VERSION, "type": kind, "body": body}, use_bin_type=True)


# --------------------------------------------------------------------------- decoding


class _Fields:
    """Strict accessor over one decoded map: exact key set, typed getters."""

    def __init__(self, obj: Any, where: str, keys: tuple[str, ...]):
        if not isinstance(obj, dict):
            raise ProtocolError(f"{where}: expected a map, got {type(obj).__name__}")
        missing = [k for k in keys if k not in obj]
        extra = [k for k in obj if k not in keys]
        if missing or extra:
            raise ProtocolError(f"{where}: missing fields {missing}, unknown fields {extra}")
        self.obj, self.where = obj, where

    def int(self, key: str, lo: int | None = None, hi: int | None = None) -> int:
        v = self.obj[key]
        if isinstance(v, bool) or not isinstance(v, int):
            raise ProtocolError(f"{self.where}.{key}: expected int, got {type(v).__name__}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ProtocolError(f"{self.where}.{key}={v} outside [{lo}, {hi}]")
        return v

    def float(self, key: str) -> float:
        v = self.obj[key]
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ProtocolError(f"{self.where}.{key}: expected float, got {type(v).__name__}")
        if not math.isfinite(v):
            raise ProtocolError(f"{self.where}.{key}: not finite ({v})")
        return float(v)

    def str(self, key: str, choices: tuple[str, ...] | None = None, max_len: int = 4096) -> str:
        v = self.obj[key]
        if not isinstance(v, str):
            raise ProtocolError(f"{self.where}.{key}: expected str, got {type(v).__name__}")
        if len(v) > max_len or (choices is not None and v not in choices):
            raise ProtocolError(f"{self.where}.{key}={v[:64]!r} not allowed")
        return v

    def list(self, key: str, max_len: int) -> list[Any]:
        v = self.obj[key]
        if not isinstance(v, list):
            raise ProtocolError(f"{self.where}.{key}: expected list, got {type(v).__name__}")
        if len(v) > max_len:
            raise ProtocolError(f"{self.where}.{key}: {len(v)} items > limit {max_len}")
        return v

    def floats(self, key: str) -> dict[str, float]:
        v = self.obj[key]
        if not isinstance(v, dict):
            raise ProtocolError(f"{self.where}.{key}: expected map, got {type(v).__name__}")
        out: dict[str, float] = {}
        for k, x in v.items():
            if not isinstance(k, str) or isinstance(x, bool) or not isinstance(x, int | float):
                raise ProtocolError(f"{self.where}.{key}: entries must be str -> float")
            if not math.isfinite(x):
                raise ProtocolError(f"{self.where}.{key}[{k!r}]: not finite")
            out[k] = float(x)
        return out

    def array(self, key: str, dtype: np.dtype, max_len: int, min_len: int = 1) -> np.ndarray:
        v = self.obj[key]
        if not isinstance(v, bytes):
            raise ProtocolError(f"{self.where}.{key}: expected raw bytes, got {type(v).__name__}")
        if len(v) % dtype.itemsize:
            raise ProtocolError(f"{self.where}.{key}: {len(v)} bytes is not a whole {dtype}")
        a = np.frombuffer(v, dtype=dtype)
        if not min_len <= a.shape[0] <= max_len:
            raise ProtocolError(
                f"{self.where}.{key}: length {a.shape[0]} not in [{min_len}, {max_len}]"
            )
        return a


def _token_ids(f: _Fields, key: str, lim: DecodeLimits) -> np.ndarray:
    a = f.array(key, TOKEN_DTYPE, lim.max_seq_len)
    if a.min() < 0:
        raise ProtocolError(f"{f.where}.{key}: negative token id {int(a.min())}")
    return a


def _logprobs(f: _Fields, key: str, n: int, lim: DecodeLimits) -> np.ndarray:
    a = f.array(key, LOGPROB_DTYPE, lim.max_seq_len)
    if a.shape[0] != n:
        raise ProtocolError(f"{f.where}.{key}: {a.shape[0]} logprobs for {n} tokens")
    if not np.isfinite(a).all():
        raise ProtocolError(f"{f.where}.{key}: NaN or inf logprob")
    if a.max() > 1e-3:  # log-probabilities are <= 0; allow float rounding only
        raise ProtocolError(f"{f.where}.{key}: positive logprob {float(a.max()):.4g}")
    return a


def _completion(obj: Any, where: str, lim: DecodeLimits) -> Completion:
    f = _Fields(
        obj,
        where,
        ("token_ids", "logprobs", "reward", "advantage", "finish_reason", "policy_version"),
    )
    ids = _token_ids(f, "token_ids", lim)
    return Completion(
        token_ids=ids,
        logprobs=_logprobs(f, "logprobs", ids.shape[0], lim),
        reward=f.float("reward"),
        advantage=f.float("advantage"),
        finish_reason=f.str("finish_reason", FINISH_REASONS),
        policy_version=f.int("policy_version", lo=0),
    )


def _sample(obj: Any, where: str, lim: DecodeLimits) -> Sample:
    keys = ("prompt_id", "prompt_ids", "completion_ids", "logprobs", "reward", "advantage")
    f = _Fields(obj, where, (*keys, "policy_version"))
    ids = _token_ids(f, "completion_ids", lim)
    return Sample(
        prompt_id=f.str("prompt_id"),
        prompt_ids=_token_ids(f, "prompt_ids", lim),
        completion_ids=ids,
        logprobs=_logprobs(f, "logprobs", ids.shape[0], lim),
        reward=f.float("reward"),
        advantage=f.float("advantage"),
        policy_version=f.int("policy_version", lo=0),
    )


def _decode_body(kind: str, body: Any, lim: DecodeLimits) -> Message:
    if kind == "rollout_group":
        keys = ("prompt_id", "prompt_ids", "completions", "actor_id", "task", "timings")
        f = _Fields(body, kind, (*keys, "created_at"))
        comps = f.list("completions", lim.max_group_size)
        if not comps:
            raise ProtocolError("rollout_group.completions: empty group")
        return RolloutGroup(
            prompt_id=f.str("prompt_id"),
            prompt_ids=_token_ids(f, "prompt_ids", lim),
            completions=[
                _completion(c, f"{kind}.completions[{i}]", lim) for i, c in enumerate(comps)
            ],
            actor_id=f.str("actor_id"),
            task=f.str("task"),
            timings=f.floats("timings"),
            created_at=f.float("created_at"),
        )
    if kind == "micro_batch_request":
        f = _Fields(body, kind, ("request_id", "learner_version", "size", "unit"))
        return MicroBatchRequest(
            request_id=f.int("request_id", lo=0),
            learner_version=f.int("learner_version", lo=0),
            size=f.int("size", lo=1, hi=lim.max_samples * lim.max_seq_len),
            unit=f.str("unit", MICRO_BATCH_UNITS),
        )
    if kind == "micro_batch_reply":
        f = _Fields(body, kind, ("request_id", "samples", "stats"))
        samples = f.list("samples", lim.max_samples)
        return MicroBatchReply(
            request_id=f.int("request_id", lo=0),
            samples=[_sample(s, f"{kind}.samples[{i}]", lim) for i, s in enumerate(samples)],
            stats=f.floats("stats"),
        )
    if kind == "weights_version":
        f = _Fields(body, kind, ("version", "num_bytes", "dtype", "layout_hash", "sent_at"))
        return WeightsVersion(
            version=f.int("version", lo=-1),
            num_bytes=f.int("num_bytes", lo=0),
            dtype=f.str("dtype", max_len=32),
            layout_hash=f.str("layout_hash", max_len=128),
            sent_at=f.float("sent_at"),
        )
    if kind == "queue_event":
        f = _Fields(body, kind, ("kind", "refs", "learner_version", "request_id"))
        refs = f.array("refs", TOKEN_DTYPE, 2 * lim.max_samples, min_len=0)
        if refs.size % 2 or (refs.size and refs.min() < 0):
            raise ProtocolError("queue_event.refs: need non-negative (log index, completion) pairs")
        return QueueEvent(
            kind=f.str("kind", QUEUE_EVENT_KINDS),
            refs=refs.reshape(-1, 2),
            learner_version=f.int("learner_version", lo=0),
            request_id=f.int("request_id", lo=0),
        )
    if kind == "node_hello":
        f = _Fields(body, kind, ("node_id", "kind", "actors"))
        return NodeHello(
            node_id=f.str("node_id", max_len=128),
            kind=f.str("kind", NODE_HELLO_KINDS),
            actors=f.int("actors", lo=0, hi=4096),
        )
    if kind == "node_welcome":
        f = _Fields(body, kind, ("node_id", "version", "config_json", "weights_endpoint"))
        return NodeWelcome(
            node_id=f.str("node_id", max_len=128),
            version=f.int("version", lo=0),
            config_json=f.str("config_json", max_len=1 << 20),
            weights_endpoint=f.str("weights_endpoint", max_len=256),
        )
    raise ProtocolError(f"unknown message type {kind!r}")


def decode(
    frame: bytes,
    limits: DecodeLimits = DEFAULT_LIMITS,
    expect: type[Message] | tuple[type, ...] | None = None,
) -> Message:
    """Parse and validate one frame.

    Args:
        frame: the raw bytes received from a socket.
        limits: size bounds checked before and while decoding.
        expect: if given, the message class(es) this socket may carry.

    Returns:
        The decoded message; its arrays are read-only views on ``frame``.

    Raises:
        ProtocolError: for anything but a well-formed message of the current schema
            (oversized frame, invalid msgpack, unknown schema version or type, missing,
            extra or mistyped fields, mismatched lengths, NaN/inf values, or a message
            of a class not in ``expect``).
    """
    if not isinstance(frame, bytes | bytearray | memoryview):
        raise ProtocolError(f"frame must be bytes, got {type(frame).__name__}")
    if len(frame) > limits.max_frame_bytes:
        raise ProtocolError(f"frame of {len(frame)} bytes > limit {limits.max_frame_bytes}")
    try:
        obj = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"not a msgpack frame: {type(e).__name__}: {e}") from None
    return decode_object(obj, limits, expect)


def decode_object(
    obj: Any,
    limits: DecodeLimits = DEFAULT_LIMITS,
    expect: type[Message] | tuple[type, ...] | None = None,
) -> Message:
    """Validate an already unpacked envelope (e.g. from a ``msgpack.Unpacker`` stream).

    Raises:
        ProtocolError: as :func:`decode`, except for the frame-level checks.
    """
    env = _Fields(obj, "envelope", ("schema", "type", "body"))
    schema = env.int("schema")
    if schema != SCHEMA_VERSION:
        raise ProtocolError(f"unknown schema version {schema} (this build speaks {SCHEMA_VERSION})")
    msg = _decode_body(env.str("type", max_len=64), obj["body"], limits)
    if expect is not None and not isinstance(msg, expect):
        raise ProtocolError(f"unexpected message {type(msg).__name__} on this socket")
    return msg
