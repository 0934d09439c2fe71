"""The dashrl wire format, part 1: the messages, their limits and the error type.

Every frame is one msgpack map ``{"schema": SCHEMA_VERSION, "type": <name>, "body": {...}}``.
Token ids travel as raw little-endian int32 bytes and logprobs as raw little-endian float32
bytes (numpy buffers), never as lists of Python ints: a 1k-token completion costs 8 KB on
the wire and decodes with one ``np.frombuffer``.

Decoding is strict because every long-running process (queue, learner, actors) reads
frames from a socket that anything on the host could write to: an unknown schema
version, an unknown message type, a missing or extra field, a wrong type, mismatched
array lengths, a NaN/inf logprob or reward, or an oversized frame all raise
:class:`ProtocolError`, which the receiver counts, logs in one line and survives.
Nothing here uses pickle. Encoding and strict decoding live in :mod:`dashrl.protocol.codec`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


NODE_HELLO_KINDS = ("register", "heartbeat", "leave")


@dataclass
class NodeHello:
    """A generator node talking to the learner's control socket (``start.py attach``).

    Attributes:
        node_id: the node's name, unique in the job (e.g. "node-3f2a").
        kind: "register" (first contact; answered with a NodeWelcome), "heartbeat" (every
            ``transport.heartbeat_s``; a node silent for ``transport.node_timeout_s`` is
            dropped) or "leave" (clean detach).
        actors: how many actor processes the node runs.
    """

    node_id: str
    kind: str
    actors: int = 1


@dataclass
class NodeWelcome:
    """The learner's answer to a register: everything a node needs to join the job.

    Attributes:
        node_id: the node it answers.
        version: the learner's current policy version.
        config_json: the job's resolved config (the node's actors run with it).
        weights_endpoint: ZeroMQ address where the learner publishes every new version.
    """

    node_id: str
    version: int
    config_json: str
    weights_endpoint: str


QUEUE_EVENT_KINDS = ("served", "evicted_stale", "evicted_capacity")


@dataclass
class QueueEvent:
    """A record of the queue's log (never sent on a socket): what happened to logged samples.

    The log holds every accepted group as a RolloutGroup frame; the k-th group frame in the
    file has *log index* k, and a sample is referred to by (log index, completion index).
    With these records the log says, in order, which samples each micro-batch held and
    which were evicted, so a run can be replayed exactly and a restarted queue can reload
    what was never consumed.

    Attributes:
        kind: "served" (one micro-batch, in the order it was sent), "evicted_stale" or
            "evicted_capacity".
        refs: int32 array [N, 2] of (log index, completion index).
        learner_version: the learner version the queue knew when it happened.
        request_id: the request a "served" micro-batch answered (0 for evictions).
    """

    kind: str
    refs: np.ndarray
    learner_version: int
    request_id: int = 0


Message = (
    RolloutGroup
    | MicroBatchRequest
    | MicroBatchReply
    | WeightsVersion
    | QueueEvent
    | NodeHello
    | NodeWelcome
)


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
