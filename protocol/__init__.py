"""The base layer every dashrl process agrees on, and nothing above it is imported here.

- the wire format: :mod:`~dashrl.protocol.messages` (each message and field declared once,
  with a rule of :mod:`~dashrl.protocol.rules`) and :mod:`~dashrl.protocol.codec`
  (encoding and strict decoding derived from them);
- :mod:`~dashrl.protocol.config`: the config schema (``config.json`` is the contract the
  launcher hands every child process) and :mod:`~dashrl.protocol.algorithms`, the
  registry of what each ``--algo`` changes in each role;
- :mod:`~dashrl.protocol.weights`: the weight-transfer format and its senders/receivers;
- what every role uses to run: :mod:`~dashrl.protocol.runtime` (role-tagged logging, stop
  flag, thread budget, metrics), :mod:`~dashrl.protocol.security` (CurveZMQ) and
  :mod:`~dashrl.protocol.model` (model loading without a hub).

Importing ``dashrl.protocol`` loads only the wire format (numpy and msgpack).
"""

from dashrl.protocol.codec import decode, decode_object, encode
from dashrl.protocol.messages import (
    SCHEMA_VERSION,
    ActorStats,
    Completion,
    GenerationPermit,
    MicroBatchReply,
    MicroBatchRequest,
    NodeHello,
    NodeWelcome,
    PriorityUpdate,
    QueueEvent,
    RolloutGroup,
    Sample,
    WeightsVersion,
    group_to_samples,
)
from dashrl.protocol.rules import DEFAULT_LIMITS, DecodeLimits, ProtocolError

__all__ = [
    "DEFAULT_LIMITS",
    "SCHEMA_VERSION",
    "ActorStats",
    "Completion",
    "DecodeLimits",
    "GenerationPermit",
    "MicroBatchReply",
    "MicroBatchRequest",
    "NodeHello",
    "NodeWelcome",
    "PriorityUpdate",
    "ProtocolError",
    "QueueEvent",
    "RolloutGroup",
    "Sample",
    "WeightsVersion",
    "decode",
    "decode_object",
    "encode",
    "group_to_samples",
]
