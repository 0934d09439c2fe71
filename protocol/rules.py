"""The wire format's vocabulary: how a field is encoded and what a decoder accepts.

:mod:`dashrl.protocol.messages` declares each message field with one of these rules
(:func:`wire`, :func:`weights_field`, :func:`tokens_field`) and :mod:`dashrl.protocol.codec`
derives the encoding and the strict validation from them; :class:`ProtocolError` is what
every receiver counts and survives, and :class:`DecodeLimits` bounds a frame before it is
trusted. Token ids and logprobs travel as raw little-endian int32 / float32 bytes.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field
from typing import Any

import numpy as np

TOKEN_DTYPE = np.dtype("<i4")
LOGPROB_DTYPE = np.dtype("<f4")
MAX_COUNT = 2**53
"""Largest count or version accepted on the wire (exact in a float64, fits an int64)."""


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


@dataclass(frozen=True)
class Wire:
    """How one field is encoded and what a decoder accepts for it.

    Attributes:
        kind: "int", "float" (finite), "str", "tokens" (int32 bytes, ids >= 0), "logprobs"
            (float32 bytes, finite, <= 0 up to rounding, as many as the ``of`` field),
            "refs" (int32 bytes of non-negative (log index, completion) pairs), "weights"
            (float32 bytes, finite, within lo/hi), "floats" (a map str -> finite float),
            "list" (of ``of`` messages) or "message" (one ``of`` message).
        lo, hi: inclusive bounds of an int or float.
        choices: the allowed values of a str.
        max_len: longest str / array / list; an int, or the name of a DecodeLimits field.
        min_len: shortest array or list.
        of: the tokens field a "logprobs" field matches, or the message class of a "list"
            or "message" field.
    """

    kind: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] | None = None
    max_len: int | str = 4096
    min_len: int = 1
    of: Any = None


def wire(kind: str, default: Any = MISSING, **rule: Any) -> Any:
    """A dataclass field with its :class:`Wire` rule (and an optional default)."""
    return field(default=default, metadata={"wire": Wire(kind, **rule)})


def _no_weights() -> np.ndarray:
    return np.zeros(0, dtype=LOGPROB_DTYPE)


def weights_field(lo: float, hi: float) -> Any:
    """A float32 array field ("weights" rule), empty by default, up to max_samples long."""
    rule = Wire("weights", lo=lo, hi=hi, max_len="max_samples", min_len=0)
    return field(default_factory=_no_weights, metadata={"wire": rule})


def tokens_field() -> Any:
    """A token-id field ("tokens" rule), up to max_seq_len long."""
    return wire("tokens", max_len="max_seq_len")
