"""The learner's weight channel: how each new policy version reaches the actors.

:func:`open_weight_channel` is the one place that decides. A run's channel is the
launch-time group (a stateless torch.distributed group of the learner and the actors
started with the job: one broadcast per version) plus a ZeroMQ publisher with its
control socket (learner/nodes.py) for generator nodes that attach later and for actors
restarted by the launcher. The publisher sends a version only when somebody needs it:
an attached node is alive, or the launch-time group broke (an actor died), after which
every actor subscribes to it. While the learner waits for data, :meth:`idle`
re-publishes the current version every few seconds, so a node that joined after the
last step never waits for a step that needs its own rollouts.

A learner without actors (unit tests, ``start.py replay``) gets :class:`NoChannel`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import torch

from dashrl.learner.nodes import NodeRegistry, WeightPublisher
from dashrl.protocol import NodeWelcome
from dashrl.protocol.config import Config
from dashrl.protocol.placement import resolve_weight_backend
from dashrl.protocol.weights import WeightSender

log = logging.getLogger("dashrl.learner")


def wire_dtype_for(setting: str, learner: torch.dtype, actor: torch.dtype) -> torch.dtype:
    """The dtype the weights travel in (``transport.weight_dtype``): auto is bfloat16 when
    the learner computes in bf16 and the actors' engine holds bf16 weights (it would round
    float32 weights to bf16 on load, so it gets the same weights from half the bytes),
    else float32."""
    if setting != "auto":
        return getattr(torch, setting)
    both_bf16 = learner == torch.bfloat16 and actor == torch.bfloat16
    return torch.bfloat16 if both_bf16 else torch.float32


class NoChannel:
    """No actors to send to: sending only drains the parameter iterator (the ZeRO-3
    gathers it drives must still run on every rank)."""

    def send(self, version: int, params: Iterable[torch.Tensor]) -> float:
        """Consume ``params``; returns 0 seconds."""
        for _ in params:
            pass
        return 0.0

    def idle(self) -> None:
        """Nothing to re-publish."""

    def attached_nodes(self) -> int:
        return 0

    def close(self) -> None:
        """Nothing to release."""


class WeightChannel(NoChannel):
    """Launch-time group plus ZeroMQ publisher (see the module docstring).

    Args:
        sender: the launch-time group's sender (blocks until every local actor joined).
        publisher: the ZeroMQ publisher for attached nodes and restarted actors.
        nodes: the control socket's registry of attached nodes.
        republish_s: how often :meth:`idle` re-sends the current version, in seconds.
    """

    def __init__(
        self,
        sender: WeightSender,
        publisher: WeightPublisher,
        nodes: NodeRegistry,
        republish_s: float = 3.0,
    ):
        self.sender, self.publisher, self.nodes = sender, publisher, nodes
        self.republish_s = republish_s
        self._version = 0
        self._published_at = 0.0

    def send(self, version: int, params: Iterable[torch.Tensor]) -> float:
        """Broadcast ``params`` as ``version`` to the group, then publish them if anyone
        subscribes; returns the seconds both took."""
        self._version = version
        return self.sender.send(version, params) + self._publish()

    def _publish(self) -> float:
        if not (self.nodes.alive() or self.sender.broken or self.sender.publishes_only):
            return 0.0
        self._published_at = time.monotonic()
        return self.publisher.publish(self._version, self.sender.flat)

    def idle(self) -> None:
        """While waiting for data, re-publish the current version every ``republish_s``."""
        if time.monotonic() - self._published_at >= self.republish_s:
            self._publish()

    def attached_nodes(self) -> int:
        return len(self.nodes.alive())

    def close(self) -> None:
        """Tell the group's receivers to stop; close the publisher and the control socket."""
        self.sender.close()
        self.nodes.close()
        self.publisher.close()


def open_weight_channel(
    cfg: Config,
    shapes: list[torch.Tensor],
    version: Callable[[], int],
    dtype: torch.dtype = torch.float32,
) -> WeightChannel:
    """Build rank 0's channel for ``cfg``: join the launch-time group (blocks until all
    ``actor.num_actors`` local actors joined and accepted the plan), bind the publisher
    and the control socket.

    Args:
        cfg: the resolved run config (transport section, actor count, timeouts).
        shapes: the parameters (or meta tensors of their shapes) in broadcast order.
        version: returns the learner's current policy version (for a node's welcome).
        dtype: the wire dtype (:func:`wire_dtype_for`).

    Raises:
        RuntimeError: an actor refused the learner's plan (the reason is in the message).
    """
    t = cfg.transport
    backend = t.weight_backend
    if backend == "auto":  # not resolved by the launcher (a test, a hand-written config)
        a = cfg.actor
        backend = resolve_weight_backend(backend, cfg.learner.gpus, a.gpus, a.num_actors,
                                         a.engine, torch.cuda.is_available(),
                                         cfg.learner.num_ranks)  # fmt: skip
    log.info("weights go to %d actor(s) over %s in %s, buckets of %d MiB", cfg.actor.num_actors,
             backend, str(dtype).removeprefix("torch."), t.weight_bucket_mb)  # fmt: skip
    sender = WeightSender(
        shapes,
        init_method=f"tcp://127.0.0.1:{t.dist_port}",  # launch-time actors are local
        world_size=1 + cfg.actor.num_actors,
        timeout_s=cfg.learner.weight_sync_timeout_s,
        backend=backend,
        dtype=dtype,
        bucket_bytes=t.weight_bucket_mb << 20,
    )
    weights_at = f"tcp://{t.host}:{t.weights_port}"
    publisher = WeightPublisher(weights_at, sender.layout, t.curve_dir, t.max_nodes)
    nodes = NodeRegistry(
        f"tcp://{t.host}:{t.control_port}",
        lambda node: NodeWelcome(node, version(), cfg.model_dump_json(), weights_at),
        t.node_timeout_s,
        t.curve_dir,
        t.max_nodes,
    )
    return WeightChannel(sender, publisher, nodes)
