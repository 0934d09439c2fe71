"""Wire format shared by actors, queue and learner: ``messages`` (types) and ``codec``."""

from dashrl.protocol.codec import decode, decode_object, encode
from dashrl.protocol.messages import (
    DEFAULT_LIMITS,
    SCHEMA_VERSION,
    Completion,
    DecodeLimits,
    MicroBatchReply,
    MicroBatchRequest,
    NodeHello,
    NodeWelcome,
    ProtocolError,
    QueueEvent,
    RolloutGroup,
    Sample,
    WeightsVersion,
    group_to_samples,
)

__all__ = [
    "DEFAULT_LIMITS",
    "SCHEMA_VERSION",
    "Completion",
    "DecodeLimits",
    "MicroBatchReply",
    "MicroBatchRequest",
    "NodeHello",
    "NodeWelcome",
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
