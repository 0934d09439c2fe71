"""Whole-batch serving for ``--mode dash``: DASH as its paper runs it.

DASH (Huang, Li, Anupam, Lee, Bastani 2025, "Effective Reinforcement Learning for
Reasoning in Language Models", arXiv 2505.17218, sec. 4) is a synchronous loop with two
techniques: *preemptive sampling* (the generator samples one large batch, several times
what fits in one backward pass, and the learner consumes it in small micro-batches,
accumulating gradients: one optimizer step per sampled batch) and *gradient filtering*
(samples with |A| <= threshold are dropped before they cost a forward/backward; the queue's
filter does that on arrival).

So the learner must know how many informative samples its step covers before it scales
the first micro-batch's loss. The queue holds back a version's samples until every
actor's batch of that version has arrived (each actor sends its groups, then one
``ActorStats``), then serves them in micro-batches whose reply stats carry
:data:`BATCH_LEFT`, the samples of the batch still to come after this micro-batch (0 on
the last; also on an empty reply when filtering left nothing, which tells the learner to
move on to the next batch without an optimizer step).
"""

from __future__ import annotations

BATCH_LEFT = "queue/batch_left"
"""Reply stats key (``--mode dash`` only): samples of the learner's current batch still
held after this micro-batch, in samples; present only once the whole batch has arrived."""


class BatchGate:
    """Tracks which actors have delivered their batch of which policy version.

    Args:
        num_actors: actors that each send one batch per version (``actor.num_actors``).
    """

    def __init__(self, num_actors: int):
        self.num_actors = num_actors
        self._open: dict[str, int] = {}  # actor id -> version of its groups since its stats
        self._delivered: dict[str, int] = {}  # actor id -> version of its last whole batch

    def on_group(self, actor_id: str, policy_version: int) -> None:
        """A group arrived (before filtering: a filtered group still belongs to its batch)."""
        self._open[actor_id] = policy_version

    def on_batch_end(self, actor_id: str, learner_version: int) -> None:
        """The actor's ``ActorStats`` arrived: its batch is complete. If none of its groups
        came through since its last one (every frame rejected as malformed), the batch is
        taken to be of ``learner_version``, the version the actor waited for, so one bad
        batch cannot stall the loop."""
        self._delivered[actor_id] = self._open.pop(actor_id, learner_version)

    def complete(self, version: int) -> bool:
        """Whether ``num_actors`` actors have delivered a whole batch of ``version``."""
        return sum(v == version for v in self._delivered.values()) >= self.num_actors
