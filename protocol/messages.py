"""The dashrl wire format, part 1: the messages, each field declared once with its wire rule.

Every frame is one msgpack map ``{"schema": SCHEMA_VERSION, "type": <name>, "body": {...}}``.
Each message is a dataclass whose fields carry a :class:`~dashrl.protocol.rules.Wire` rule
(protocol/rules.py) in their metadata; the codec (:mod:`dashrl.protocol.codec`) derives
both the encoding and the strict validation from those rules, so a field is written down
exactly once. Token ids travel as raw
little-endian int32 bytes and logprobs as raw little-endian float32 bytes (numpy
buffers), never as lists of Python ints: a 1k-token completion costs 8 KB on the wire and
decodes with one ``np.frombuffer``.

One rollout is one record from the engine to the learner: the engine returns a
:class:`Completion` (tokens, behaviour logprobs, finish reason), the actor fills in its
reward, advantage and policy version and sends the group's completions in a
:class:`RolloutGroup`, and the queue serves each as a :class:`Sample`, which is the
prompt plus that same Completion object (never a copy). Actor statistics travel as
their own :class:`ActorStats` message.

Decoding is strict because every long-running process (queue, learner, actors) reads
frames from a socket that anything on the host could write to: an unknown schema
version, an unknown message type, a missing or extra field, a wrong type, a number out
of its declared range, mismatched array lengths, a NaN/inf logprob or reward, or an
oversized frame all raise :class:`ProtocolError`, which the receiver counts, logs in one
line and survives. Nothing here uses pickle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from dashrl.protocol.rules import (
    DEFAULT_LIMITS,
    MAX_COUNT,
    ProtocolError,
    Wire,
    tokens_field,
    weights_field,
    wire,
)

SCHEMA_VERSION = 3
"""Bump on any incompatible change of a message body; decoders reject other versions. 2:
a Sample nests its Completion, and actor statistics left RolloutGroup for ActorStats. 3:
the replay queue: PriorityUpdate, GenerationPermit, importance weights on replies and
serve records, use counts and priorities in the log, ActorStats.paced_frac (version-1 and
-2 queue logs are still read: codec.LOG_UPGRADES)."""

FINISH_REASONS = ("stop", "length")
MICRO_BATCH_UNITS = ("sequences", "tokens")
NODE_HELLO_KINDS = ("register", "heartbeat", "leave")
QUEUE_EVENT_KINDS = (
    "served",
    "evicted_stale",
    "evicted_capacity",
    "priority",
    "evicted_low_priority",
    "evicted_used",
)


# --------------------------------------------------------------------------- messages


@dataclass
class Completion:
    """One sampled completion of a prompt: the rollout record, from engine to learner.

    Attributes:
        token_ids: int32 array [T], the sampled tokens (EOS included when it was sampled).
        logprobs: float32 array [T], behaviour logprobs log mu(token | prefix) of the
            sampled tokens under the sampling distribution (temperature applied).
        reward: verifier reward (finite float; 0 until the actor scores it).
        advantage: advantage of the whole completion (finite float; set by the actor).
        finish_reason: "stop" (EOS sampled) or "length" (hit max_new_tokens).
        policy_version: learner version of the weights that generated it (the version it
            started on, for a rollout that straddled an in-flight update).
    """

    WIRE_NAME: ClassVar[str] = "completion"
    token_ids: np.ndarray = tokens_field()
    logprobs: np.ndarray = wire("logprobs", max_len="max_seq_len", of="token_ids")
    reward: float = wire("float", 0.0)
    advantage: float = wire("float", 0.0)
    finish_reason: str = wire("str", "stop", choices=FINISH_REASONS)
    policy_version: int = wire("int", 0, lo=0, hi=MAX_COUNT)


@dataclass
class RolloutGroup:
    """G scored completions of one prompt, as an actor streams them to the queue.

    Attributes:
        prompt_id: stable id of the prompt in its dataset (e.g. "chain_sum/train/17").
        prompt_ids: int32 array [P], the prompt's token ids (chat template applied).
        completions: the G completions.
        actor_id: which actor produced the group.
        task: the task/dataset name.
        created_at: unix time (seconds) when the group was sent.
    """

    WIRE_NAME: ClassVar[str] = "rollout_group"
    prompt_id: str = wire("str")
    prompt_ids: np.ndarray = tokens_field()
    completions: list[Completion] = wire("list", of=Completion, max_len="max_group_size")
    actor_id: str = wire("str")
    task: str = wire("str", "")
    created_at: float = wire("float", 0.0)


@dataclass
class ActorStats:
    """One actor's running statistics, sent on the rollout socket after each batch; the
    queue keeps each actor's latest and reports them in its micro-batch stats.

    Attributes:
        actor_id: the actor (as in its RolloutGroups).
        groups_sent: groups sent so far.
        tokens_generated: completion tokens generated so far.
        busy_frac: share of wall time since the first batch that the engine held at least
            one of this actor's requests, in [0, 1].
        updated_in_flight: rollouts so far that straddled an in-flight weight update.
        verifier_timeouts: completions so far whose verifier ran past its time limit.
        verifier_errors: completions so far whose verifier raised.
        generate_s: seconds the last batch took to generate.
        paced_frac: see the field.
    """

    WIRE_NAME: ClassVar[str] = "actor_stats"
    actor_id: str = wire("str")
    groups_sent: int = wire("int", 0, lo=0, hi=MAX_COUNT)
    tokens_generated: int = wire("int", 0, lo=0, hi=MAX_COUNT)
    busy_frac: float = wire("float", 0.0, lo=0.0, hi=1.0)
    updated_in_flight: int = wire("int", 0, lo=0, hi=MAX_COUNT)
    verifier_timeouts: int = wire("int", 0, lo=0, hi=MAX_COUNT)
    verifier_errors: int = wire("int", 0, lo=0, hi=MAX_COUNT)
    generate_s: float = wire("float", 0.0, lo=0.0, hi=1e9)
    paced_frac: float = wire("float", 0.0, lo=0.0, hi=1.0)
    """Share of wall time since the first batch that the actor's sends were blocked by
    the queue (its rate limiter or a full log), in [0, 1]."""


@dataclass
class Sample:
    """One completion with its prompt: the unit the queue ranks and the learner trains on.

    Attributes:
        prompt_id: id of the prompt.
        prompt_ids: int32 array [P] (shared by every sample of the group).
        completion: the group's Completion itself (tokens, behaviour logprobs, reward,
            advantage, policy version).
        is_weight: the importance weight of its latest serve, in (0, 1] (1 unless the
            queue samples proportionally). Not a wire field of Sample: it travels in
            MicroBatchReply.is_weights and the serve record's values.
    """

    WIRE_NAME: ClassVar[str] = "sample"
    prompt_id: str = wire("str")
    prompt_ids: np.ndarray = tokens_field()
    completion: Completion = wire("message", of=Completion)
    is_weight: float = field(default=1.0, compare=False)

    @classmethod
    def make(
        cls,
        prompt_id: str,
        prompt_ids: np.ndarray,
        completion_ids: np.ndarray,
        logprobs: np.ndarray,
        reward: float,
        advantage: float,
        policy_version: int,
    ) -> Sample:
        """A sample built from its parts (tests, benchmarks)."""
        c = Completion(completion_ids, logprobs, reward, advantage, "stop", policy_version)
        return cls(prompt_id, prompt_ids, c)

    @property
    def completion_ids(self) -> np.ndarray:
        """int32 [T], the completion's tokens."""
        return self.completion.token_ids

    @property
    def logprobs(self) -> np.ndarray:
        """float32 [T], the behaviour logprobs."""
        return self.completion.logprobs

    @property
    def reward(self) -> float:
        return self.completion.reward

    @property
    def advantage(self) -> float:
        return self.completion.advantage

    @property
    def policy_version(self) -> int:
        return self.completion.policy_version

    @property
    def num_tokens(self) -> int:
        """Prompt plus completion length, in tokens."""
        return int(self.prompt_ids.shape[0] + self.completion.token_ids.shape[0])


@dataclass
class MicroBatchRequest:
    """The learner asks the queue for one micro-batch.

    Attributes:
        request_id: echoed in the reply so a late reply is never mistaken for a new one.
        learner_version: the learner's current policy version (drives staleness eviction).
        size: micro-batch size, counted in ``unit``.
        unit: "sequences" (number of samples) or "tokens" (prompt + completion tokens).
    """

    WIRE_NAME: ClassVar[str] = "micro_batch_request"
    request_id: int = wire("int", lo=0, hi=MAX_COUNT)
    learner_version: int = wire("int", lo=0, hi=MAX_COUNT)
    size: int = wire("int", lo=1, hi=DEFAULT_LIMITS.max_samples * DEFAULT_LIMITS.max_seq_len)
    unit: str = wire("str", "sequences", choices=MICRO_BATCH_UNITS)


@dataclass
class MicroBatchReply:
    """The queue's answer: the highest-|A| samples, or none when it holds too few.

    Attributes:
        request_id: the id of the request being answered.
        samples: the micro-batch (empty means "not enough yet, ask again").
        stats: queue and actor metrics, e.g. {"queue/size": 40.0}.
        is_weights: float32 [N] importance weights in (0, 1], one per sample, correcting
            proportional sampling's bias (Schaul et al. 2016); empty means all 1.
    """

    WIRE_NAME: ClassVar[str] = "micro_batch_reply"
    request_id: int = wire("int", lo=0, hi=MAX_COUNT)
    samples: list[Sample] = wire("list", of=Sample, max_len="max_samples", min_len=0)
    stats: dict[str, float] = field(default_factory=dict, metadata={"wire": Wire("floats")})
    is_weights: np.ndarray = weights_field(0.0, 1.0)

    def __post_init__(self) -> None:
        """Check the weights' length and hand each sample its weight (``is_weight``)."""
        if len(self.is_weights) not in (0, len(self.samples)):
            raise ProtocolError(f"micro_batch_reply: {len(self.is_weights)} is_weights for "
                                f"{len(self.samples)} samples")  # fmt: skip
        for s, w in zip(self.samples, self.is_weights, strict=False):
            s.is_weight = float(w)


@dataclass
class GenerationPermit:
    """Rate limiting: an actor asks the queue before it generates a batch, and the queue
    echoes the message back once its rate limiter lets inserts in (queue.samples_per_insert).
    Waiting before generating, rather than blocking the finished batch's send, keeps
    generation from running ahead and ageing in socket buffers.

    Attributes:
        actor_id: the asking actor.
        request_id: echoed in the grant.
    """

    WIRE_NAME: ClassVar[str] = "generation_permit"
    actor_id: str = wire("str")
    request_id: int = wire("int", lo=0, hi=MAX_COUNT)


@dataclass
class PriorityUpdate:
    """The learner's new priority for each sample of a micro-batch it trained on (sent on
    the request socket after the micro-batch's forward/backward; no reply).

    Attributes:
        request_id: the request whose reply held the samples.
        priorities: float32 [N] >= 0, aligned with that reply's samples (the rule:
            learner/loss.py ``replay_priority``).
    """

    WIRE_NAME: ClassVar[str] = "priority_update"
    request_id: int = wire("int", lo=0, hi=MAX_COUNT)
    priorities: np.ndarray = weights_field(0.0, 1e9)


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

    WIRE_NAME: ClassVar[str] = "weights_version"
    version: int = wire("int", lo=-1, hi=MAX_COUNT)
    num_bytes: int = wire("int", lo=0, hi=MAX_COUNT)
    dtype: str = wire("str", max_len=32)
    layout_hash: str = wire("str", max_len=128)
    sent_at: float = wire("float", 0.0)


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

    WIRE_NAME: ClassVar[str] = "node_hello"
    node_id: str = wire("str", max_len=128)
    kind: str = wire("str", choices=NODE_HELLO_KINDS)
    actors: int = wire("int", 1, lo=0, hi=4096)


@dataclass
class NodeWelcome:
    """The learner's answer to a register: everything a node needs to join the job.

    Attributes:
        node_id: the node it answers.
        version: the learner's current policy version.
        config_json: the job's resolved config (the node's actors run with it).
        weights_endpoint: ZeroMQ address where the learner publishes every new version.
    """

    WIRE_NAME: ClassVar[str] = "node_welcome"
    node_id: str = wire("str", max_len=128)
    version: int = wire("int", lo=0, hi=MAX_COUNT)
    config_json: str = wire("str", max_len=1 << 20)
    weights_endpoint: str = wire("str", max_len=256)


@dataclass
class QueueEvent:
    """A record of the queue's log (never sent on a socket): what happened to logged samples.

    The log holds every accepted group as a RolloutGroup frame; the k-th group frame in the
    file has *log index* k, and a sample is referred to by (log index, completion index).
    With these records the log says, in order, which samples each micro-batch held and
    which were evicted, so a run can be replayed exactly and a restarted queue can reload
    what was never consumed.

    Attributes:
        kind: "served" (one micro-batch, in the order it was sent; a sample may be served
            up to ``queue.max_uses`` times), "priority" (the learner's priority update of
            a served micro-batch), or why samples left: "evicted_stale",
            "evicted_capacity", "evicted_low_priority" (a priority update put them at or
            below the gradient filter), "evicted_used" (served ``max_uses`` times).
        refs: int32 array [N, 2] of (log index, completion index).
        learner_version: the learner version the queue knew when it happened.
        request_id: the request a "served" micro-batch answered, or whose samples a
            "priority" update is about (0 for evictions).
        values: float32 [N], per ref: a serve's importance weights (empty: all 1), an
            update's new priorities; empty for evictions.
    """

    WIRE_NAME: ClassVar[str] = "queue_event"
    kind: str = wire("str", choices=QUEUE_EVENT_KINDS)
    refs: np.ndarray = wire("refs", max_len="max_samples", min_len=0)
    learner_version: int = wire("int", lo=0, hi=MAX_COUNT)
    request_id: int = wire("int", 0, lo=0, hi=MAX_COUNT)
    values: np.ndarray = weights_field(0.0, 1e9)

    def __post_init__(self) -> None:
        """Check that ``values`` is empty or has one value per ref."""
        n = np.asarray(self.refs).size // 2
        if len(self.values) not in (0, n):
            raise ProtocolError(f"queue_event: {len(self.values)} values for {n} refs")


MESSAGES: tuple[type, ...] = (
    RolloutGroup,
    ActorStats,
    MicroBatchRequest,
    MicroBatchReply,
    GenerationPermit,
    PriorityUpdate,
    WeightsVersion,
    QueueEvent,
    NodeHello,
    NodeWelcome,
)
"""The top-level messages a frame can hold (Completion and Sample are only nested)."""

Message = (
    RolloutGroup
    | ActorStats
    | MicroBatchRequest
    | MicroBatchReply
    | WeightsVersion
    | QueueEvent
    | NodeHello
    | NodeWelcome
)


def group_to_samples(group: RolloutGroup) -> list[Sample]:
    """The group's completions as samples: each shares the prompt's token array and *is*
    the group's Completion object (nothing is copied)."""
    return [Sample(group.prompt_id, group.prompt_ids, c) for c in group.completions]
