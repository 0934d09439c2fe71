"""The dashrl wire format: msgpack messages with an explicit schema version.

Every frame is one msgpack map ``{"schema": SCHEMA_VERSION, "type": <name>, "body": {...}}``.
Token ids travel as raw little-endian int32 bytes and logprobs as raw little-endian float32
bytes (numpy buffers), never as lists of Python ints: a 1k-token completion costs 8 KB on
the wire and decodes with one ``np.frombuffer``.

Decoding is strict because every long-running process (queue, learner, actors) reads
frames from a socket that anything on the host could write to: an unknown schema
version, an unknown message type, a missing or extra field, a wrong type, mismatched
array lengths, a NaN/inf logprob or reward, or an oversized frame all raise
:class:`ProtocolError`, which the receiver counts, logs in one line and survives.
Nothing here uses pickle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack
import numpy as np

SCHEMA_VERSION = 1
"""Bump on any incompatible change of a message body; decoders reject other versions."""

TOKEN_DTYPE = np.dtype("<i4")
LOGPROB_DTYPE = np.dtype("<f4")
FINISH_REASONS = ("stop", "length")
MICRO_BATCH_UNITS = ("sequences", "tokens")


class ProtocolError(ValueError):
    """A frame that does not decode to a valid message. The message says what and where."""


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds that a decoder enforces before trusting a frame.

    Attributes:
        max_frame_bytes: largest accepted frame, in bytes.
        max_seq_len: largest prompt or completion, in tokens.
        max_group_size: most completions in one group.
        max_samples: most samples in one micro-batch reply.
    """

    max_frame_bytes: int = 64 * 1024 * 1024
    max_seq_len: int = 32768
    max_group_size: int = 1024
    max_samples: int = 65536


DEFAULT_LIMITS = DecodeLimits()


# --------------------------------------------------------------------------- messages


@dataclass
class Completion:
    """One sampled completion of a prompt, scored.

    Attributes:
        token_ids: int32 array [T], the sampled tokens (EOS included when it was sampled).
        logprobs: float32 array [T], behaviour logprobs log mu(token | prefix) of the
            sampled tokens under the sampling distribution (temperature applied).
        reward: verifier reward (finite float).
        advantage: advantage of the whole completion (finite float).
        finish_reason: "stop" (EOS sampled) or "length" (hit max_new_tokens).
        policy_version: learner version of the weights that generated it.
    """

    token_ids: np.ndarray
    logprobs: np.ndarray
    reward: float
    advantage: float
    finish_reason: str
    policy_version: int


@dataclass
class RolloutGroup:
    """G scored completions of one prompt, as an actor streams them to the queue.

    Attributes:
        prompt_id: stable id of the prompt in its dataset (e.g. "chain_sum/train/17").
        prompt_ids: int32 array [P], the prompt's token ids (chat template applied).
        completions: the G completions.
        actor_id: which actor produced the group.
        task: the task/dataset name.
        timings: seconds spent per phase, e.g. {"generate_s": 3.1, "score_s": 0.01}.
        created_at: unix time (seconds) when the group was sent.
    """

    prompt_id: str
    prompt_ids: np.ndarray
    completions: list[Completion]
    actor_id: str
    task: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    created_at: float = 0.0


@dataclass
class Sample:
    """One completion with its prompt: the unit the queue ranks and the learner trains on.

    Attributes:
        prompt_id: id of the prompt.
        prompt_ids: int32 array [P].
        completion_ids: int32 array [T].
        logprobs: float32 array [T], behaviour logprobs.
        reward: verifier reward.
        advantage: advantage of the completion.
        policy_version: version of the weights that generated it.
    """

    prompt_id: str
    prompt_ids: np.ndarray
    completion_ids: np.ndarray
    logprobs: np.ndarray
    reward: float
    advantage: float
    policy_version: int

    @property
    def num_tokens(self) -> int:
        """Prompt plus completion length, in tokens."""
        return int(self.prompt_ids.shape[0] + self.completion_ids.shape[0])


@dataclass
class MicroBatchRequest:
    """The learner asks the queue for one micro-batch.

    Attributes:
        request_id: echoed in the reply so a late reply is never mistaken for a new one.
        learner_version: the learner's current policy version (drives staleness eviction).
        size: micro-batch size, counted in ``unit``.
        unit: "sequences" (number of samples) or "tokens" (prompt + completion tokens).
    """

    request_id: int
    learner_version: int
    size: int
    unit: str = "sequences"


@dataclass
class MicroBatchReply:
    """The queue's answer: the highest-|A| samples, or none when it holds too few.

    Attributes:
        request_id: the id of the request being answered.
        samples: the micro-batch (empty means "not enough yet, ask again").
        stats: queue and actor metrics, e.g. {"queue/size": 40.0}.
    """

    request_id: int
    samples: list[Sample]
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class WeightsVersion:
    """Announces the weights that follow on the weight-sync channel.

    Attributes:
        version: the policy version of the weights; -1 tells receivers to stop.
        num_bytes: size of the flat weight buffer that follows, in bytes.
        dtype: torch dtype name of the flat buffer, e.g. "float32".
        layout_hash: hash of the parameter names and shapes; a receiver whose model
            has another layout refuses the update.
        sent_at: unix time (seconds) when the learner started sending.
    """

    version: int
    num_bytes: int
    dtype: str
    layout_hash: str
    sent_at: float = 0.0


Message = RolloutGroup | MicroBatchRequest | MicroBatchReply | WeightsVersion


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
    raise ProtocolError(f"unknown message type {kind!r}")


MessageKind = Literal[
    "rollout_group", "micro_batch_request", "micro_batch_reply", "weights_version"
]


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
    env = _Fields(obj, "envelope", ("schema", "type", "body"))
    schema = env.int("schema")
    if schema != SCHEMA_VERSION:
        raise ProtocolError(f"unknown schema version {schema} (this build speaks {SCHEMA_VERSION})")
    msg = _decode_body(env.str("type", max_len=64), obj["body"], limits)
    if expect is not None and not isinstance(msg, expect):
        raise ProtocolError(f"unexpected message {type(msg).__name__} on this socket")
    return msg


def group_to_samples(group: RolloutGroup) -> list[Sample]:
    """Split a group into per-completion samples that share the prompt's token array."""
    return [
        Sample(
            prompt_id=group.prompt_id,
            prompt_ids=group.prompt_ids,
            completion_ids=c.token_ids,
            logprobs=c.logprobs,
            reward=c.reward,
            advantage=c.advantage,
            policy_version=c.policy_version,
        )
        for c in group.completions
    ]
