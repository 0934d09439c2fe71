"""The dashrl wire format, part 2: encoding and strict decoding, derived from the declarations.

:mod:`dashrl.protocol.messages` declares each field once with its :class:`Wire` rule; this
module walks those rules. Decoding checks everything a frame claims before trusting it
(exact key set, types, ranges, lengths, finiteness) and raises :class:`ProtocolError`
(one type) for any malformed input, naming the field, e.g.
``rollout_group.completions[2].logprobs: NaN or inf logprob``.

Queue logs written by an earlier schema stay readable: :data:`LOG_UPGRADES` rewrites an
old envelope into the current one before it is validated, and only the log reader asks
for it (``decode_object(..., upgrade=True)``); sockets accept the current schema only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np

from dashrl.protocol.messages import MESSAGES, SCHEMA_VERSION, Message
from dashrl.protocol.rules import (
    DEFAULT_LIMITS,
    LOGPROB_DTYPE,
    TOKEN_DTYPE,
    DecodeLimits,
    ProtocolError,
    Wire,
)

_BY_NAME: dict[str, type] = {m.WIRE_NAME: m for m in MESSAGES}


def _fields(cls: type) -> list[tuple[str, Wire]]:
    """The wire fields (a field without a Wire rule, e.g. Sample.is_weight, is local)."""
    return [(f.name, f.metadata["wire"]) for f in dataclasses.fields(cls) if "wire" in f.metadata]


_FIELDS: dict[type, list[tuple[str, Wire]]] = {}


def fields_of(cls: type) -> list[tuple[str, Wire]]:
    """(name, rule) of every wire field of a message class, in declaration order."""
    if cls not in _FIELDS:
        _FIELDS[cls] = _fields(cls)
    return _FIELDS[cls]


# --------------------------------------------------------------------------- encoding


def _encode_value(rule: Wire, v: Any) -> Any:
    k = rule.kind
    if k == "int":
        return int(v)
    if k == "float":
        return float(v)
    if k == "str":
        return v
    if k == "tokens":
        return np.ascontiguousarray(v, dtype=TOKEN_DTYPE).tobytes()
    if k == "logprobs":
        return np.ascontiguousarray(v, dtype=LOGPROB_DTYPE).tobytes()
    if k == "refs":
        return np.ascontiguousarray(np.asarray(v).reshape(-1), dtype=TOKEN_DTYPE).tobytes()
    if k == "weights":
        return np.ascontiguousarray(v, dtype=LOGPROB_DTYPE).tobytes()
    if k == "floats":
        return {str(key): float(x) for key, x in v.items()}
    if k == "list":
        return [_encode_body(x) for x in v]
    if k == "message":
        return _encode_body(v)
    raise TypeError(f"unknown wire kind {k!r}")


def _encode_body(msg: Any) -> dict[str, Any]:
    return {name: _encode_value(rule, getattr(msg, name)) for name, rule in fields_of(type(msg))}


def encode(msg: Message) -> bytes:
    """Serialise a message to one msgpack frame.

    Raises:
        TypeError: ``msg`` is not one of the protocol's message classes.
    """
    if type(msg) not in MESSAGES:
        raise TypeError(f"not a dashrl message: {type(msg).__name__}")
    frame = {"schema": SCHEMA_VERSION, "type": msg.WIRE_NAME, "body": _encode_body(msg)}
    return msgpack.packb(frame, use_bin_type=True)


# --------------------------------------------------------------------------- decoding


def _limit(rule: Wire, lim: DecodeLimits) -> int:
    return getattr(lim, rule.max_len) if isinstance(rule.max_len, str) else rule.max_len


def _int(v: Any, rule: Wire, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ProtocolError(f"{where}: expected int, got {type(v).__name__}")
    if (rule.lo is not None and v < rule.lo) or (rule.hi is not None and v > rule.hi):
        raise ProtocolError(f"{where}={v} outside [{rule.lo}, {rule.hi}]")
    return v


def _float(v: Any, rule: Wire, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ProtocolError(f"{where}: expected float, got {type(v).__name__}")
    if not math.isfinite(v):
        raise ProtocolError(f"{where}: not finite ({v})")
    if (rule.lo is not None and v < rule.lo) or (rule.hi is not None and v > rule.hi):
        raise ProtocolError(f"{where}={v} outside [{rule.lo}, {rule.hi}]")
    return float(v)


def _str(v: Any, rule: Wire, where: str, lim: DecodeLimits) -> str:
    if not isinstance(v, str):
        raise ProtocolError(f"{where}: expected str, got {type(v).__name__}")
    if len(v) > _limit(rule, lim) or (rule.choices is not None and v not in rule.choices):
        raise ProtocolError(f"{where}={v[:64]!r} not allowed")
    return v


def _array(v: Any, dtype: np.dtype, lo: int, hi: int, where: str) -> np.ndarray:
    if not isinstance(v, bytes):
        raise ProtocolError(f"{where}: expected raw bytes, got {type(v).__name__}")
    if len(v) % dtype.itemsize:
        raise ProtocolError(f"{where}: {len(v)} bytes is not a whole {dtype}")
    a = np.frombuffer(v, dtype=dtype)
    if not lo <= a.shape[0] <= hi:
        raise ProtocolError(f"{where}: length {a.shape[0]} not in [{lo}, {hi}]")
    return a


def _tokens(v: Any, rule: Wire, where: str, lim: DecodeLimits) -> np.ndarray:
    a = _array(v, TOKEN_DTYPE, rule.min_len, _limit(rule, lim), where)
    if a.size and a.min() < 0:
        raise ProtocolError(f"{where}: negative token id {int(a.min())}")
    return a


def _logprobs(v: Any, rule: Wire, where: str, lim: DecodeLimits, n: int) -> np.ndarray:
    a = _array(v, LOGPROB_DTYPE, rule.min_len, _limit(rule, lim), where)
    if a.shape[0] != n:
        raise ProtocolError(f"{where}: {a.shape[0]} logprobs for {n} tokens")
    if not np.isfinite(a).all():
        raise ProtocolError(f"{where}: NaN or inf logprob")
    if a.max() > 1e-3:  # log-probabilities are <= 0; allow float rounding only
        raise ProtocolError(f"{where}: positive logprob {float(a.max()):.4g}")
    return a


def _weights(v: Any, rule: Wire, where: str, lim: DecodeLimits) -> np.ndarray:
    a = _array(v, LOGPROB_DTYPE, rule.min_len, _limit(rule, lim), where)
    if not np.isfinite(a).all():
        raise ProtocolError(f"{where}: NaN or inf value")
    if a.size and (a.min() < rule.lo or a.max() > rule.hi):
        raise ProtocolError(f"{where}: values outside [{rule.lo}, {rule.hi}]")
    return a


def _refs(v: Any, rule: Wire, where: str, lim: DecodeLimits) -> np.ndarray:
    a = _array(v, TOKEN_DTYPE, 2 * rule.min_len, 2 * _limit(rule, lim), where)
    if a.size % 2 or (a.size and a.min() < 0):
        raise ProtocolError(f"{where}: need non-negative (log index, completion) pairs")
    return a.reshape(-1, 2)


def _floats(v: Any, where: str) -> dict[str, float]:
    if not isinstance(v, dict):
        raise ProtocolError(f"{where}: expected map, got {type(v).__name__}")
    out: dict[str, float] = {}
    for k, x in v.items():
        if not isinstance(k, str) or isinstance(x, bool) or not isinstance(x, int | float):
            raise ProtocolError(f"{where}: entries must be str -> float")
        if not math.isfinite(x):
            raise ProtocolError(f"{where}[{k!r}]: not finite")
        out[k] = float(x)
    return out


def _list(v: Any, rule: Wire, where: str, lim: DecodeLimits) -> list[Any]:
    if not isinstance(v, list):
        raise ProtocolError(f"{where}: expected list, got {type(v).__name__}")
    if len(v) > _limit(rule, lim):
        raise ProtocolError(f"{where}: {len(v)} items > limit {_limit(rule, lim)}")
    if len(v) < rule.min_len:
        raise ProtocolError(f"{where}: empty ({len(v)} items < {rule.min_len})")
    return [_decode_body(rule.of, x, f"{where}[{i}]", lim) for i, x in enumerate(v)]


def _decode_body(cls: type, obj: Any, where: str, lim: DecodeLimits) -> Any:
    """One message of class ``cls`` from its decoded map, every field checked by its rule."""
    rules = fields_of(cls)
    if not isinstance(obj, dict):
        raise ProtocolError(f"{where}: expected a map, got {type(obj).__name__}")
    missing = [k for k, _ in rules if k not in obj]
    extra = [k for k in obj if k not in dict(rules)]
    if missing or extra:
        raise ProtocolError(f"{where}: missing fields {missing}, unknown fields {extra}")
    out: dict[str, Any] = {}
    for name, rule in rules:
        v, at, k = obj[name], f"{where}.{name}", rule.kind
        if k == "int":
            out[name] = _int(v, rule, at)
        elif k == "float":
            out[name] = _float(v, rule, at)
        elif k == "str":
            out[name] = _str(v, rule, at, lim)
        elif k == "tokens":
            out[name] = _tokens(v, rule, at, lim)
        elif k == "logprobs":  # declared after the tokens field it matches
            out[name] = _logprobs(v, rule, at, lim, out[rule.of].shape[0])
        elif k == "refs":
            out[name] = _refs(v, rule, at, lim)
        elif k == "weights":
            out[name] = _weights(v, rule, at, lim)
        elif k == "floats":
            out[name] = _floats(v, at)
        elif k == "list":
            out[name] = _list(v, rule, at, lim)
        else:  # "message"
            out[name] = _decode_body(rule.of, v, at, lim)
    return cls(**out)


def _upgrade_v1(obj: dict) -> dict:
    """Schema 1 -> 2 for log records: a RolloutGroup carried actor statistics in
    ``timings`` (now the ActorStats message; a replay does not need them); a QueueEvent
    is unchanged."""
    body = obj.get("body")
    if obj.get("type") == "rollout_group" and isinstance(body, dict):
        body = {k: v for k, v in body.items() if k != "timings"}
    return {"schema": 2, "type": obj.get("type"), "body": body}


def _upgrade_v2(obj: dict) -> dict:
    """Schema 2 -> 3 for log records: a QueueEvent gains ``values`` (empty: no weights)."""
    body = obj.get("body")
    if obj.get("type") == "queue_event" and isinstance(body, dict):
        body = {**body, "values": b""}
    return {"schema": 3, "type": obj.get("type"), "body": body}


LOG_UPGRADES: dict[int, Callable[[dict], dict]] = {1: _upgrade_v1, 2: _upgrade_v2}
"""Old schema -> the function that rewrites its envelope to the next schema (logs only)."""


MAX_ITEMS_BASE = 256
BYTES_PER_ITEM = 12
"""A frame may hold at most MAX_ITEMS_BASE + len(frame) / BYTES_PER_ITEM msgpack items (list
elements and map entries, counted as each container finishes). Real frames hold a few per
kilobyte (token ids travel as one bytes item); a frame of tiny items would otherwise cost
about 72 bytes of Python objects per wire byte. With the budget, and each item at least one
wire byte, the decoded objects of a frame stay within about 5 times its size plus one
MAX_ARRAY_LEN list (about 4 MiB): measured in tests/test_protocol.py."""
MAX_ARRAY_LEN = 65536
MAX_MAP_LEN = 1024
"""Longest msgpack array and map any message needs (a micro-batch of 65536 samples; the
stats map)."""


class _TooManyItems(Exception):
    pass


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
            (oversized frame, invalid msgpack, more items than the frame's size allows,
            unknown schema version or type, missing, extra or mistyped fields,
            out-of-range numbers, mismatched lengths, NaN/inf values, or a message of a
            class not in ``expect``).
    """
    if not isinstance(frame, bytes | bytearray | memoryview):
        raise ProtocolError(f"frame must be bytes, got {type(frame).__name__}")
    if len(frame) > limits.max_frame_bytes:
        raise ProtocolError(f"frame of {len(frame)} bytes > limit {limits.max_frame_bytes}")
    budget = [MAX_ITEMS_BASE + len(frame) // BYTES_PER_ITEM]

    def spend(container):  # msgpack calls it for each finished list and map
        budget[0] -= len(container) + 1
        if budget[0] < 0:
            raise _TooManyItems
        return container

    try:
        obj = msgpack.unpackb(
            frame, raw=False, strict_map_key=True, list_hook=spend, object_hook=spend,
            max_str_len=1 << 20, max_bin_len=limits.max_frame_bytes, max_ext_len=0,
            max_array_len=MAX_ARRAY_LEN, max_map_len=MAX_MAP_LEN,
        )  # fmt: skip
    except _TooManyItems:
        raise ProtocolError(
            f"frame of {len(frame)} bytes holds more than {MAX_ITEMS_BASE} + 1 per "
            f"{BYTES_PER_ITEM} bytes of msgpack items"
        ) from None
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"not a msgpack frame: {type(e).__name__}: {e}") from None
    return decode_object(obj, limits, expect)


def decode_object(
    obj: Any,
    limits: DecodeLimits = DEFAULT_LIMITS,
    expect: type[Message] | tuple[type, ...] | None = None,
    upgrade: bool = False,
) -> Message:
    """Validate an already unpacked envelope (e.g. from a ``msgpack.Unpacker`` stream).

    Args:
        upgrade: accept older schemas that :data:`LOG_UPGRADES` can rewrite (queue logs).

    Raises:
        ProtocolError: as :func:`decode`, except for the frame-level checks.
    """
    if not isinstance(obj, dict):
        raise ProtocolError(f"envelope: expected a map, got {type(obj).__name__}")
    keys = ("schema", "type", "body")
    missing, extra = [k for k in keys if k not in obj], [k for k in obj if k not in keys]
    if missing or extra:
        raise ProtocolError(f"envelope: missing fields {missing}, unknown fields {extra}")
    schema = _int(obj["schema"], Wire("int"), "envelope.schema")
    while upgrade and schema in LOG_UPGRADES:
        obj = LOG_UPGRADES[schema](obj)
        schema = obj["schema"]
    if schema != SCHEMA_VERSION:
        raise ProtocolError(f"unknown schema version {schema} (this build speaks {SCHEMA_VERSION})")
    kind = _str(obj["type"], Wire("str", max_len=64), "envelope.type", limits)
    if kind not in _BY_NAME:
        raise ProtocolError(f"unknown message type {kind!r}")
    cls = _BY_NAME[kind]
    if expect is not None and not issubclass(cls, expect):
        raise ProtocolError(f"unexpected message {cls.__name__} on this socket")
    return _decode_body(cls, obj["body"], kind, limits)
