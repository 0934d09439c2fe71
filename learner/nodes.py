"""Generator nodes that join a running job: the learner's control socket and weight publisher.

Actors started with the job receive weights over the torch.distributed group built at
launch (protocol/weights.py); that group's size is fixed when it is created. Nodes that
attach later (``start.py attach``) instead:

1. register on the learner's control socket (ZeroMQ ROUTER, a thread of the learner) and
   get a NodeWelcome: the job's resolved config, the current version and the weights
   endpoint;
2. subscribe to the learner's weight publisher (ZeroMQ PUB): after every optimizer step
   that at least one node is attached, the learner publishes [WeightsVersion frame, flat
   float32 weights]. PUB never blocks on a slow or dead subscriber (a high-water mark of
   one message: a node that falls behind simply gets the newest version), so attaching
   or losing a node never pauses the learner or the other actors;
3. send a heartbeat every ``transport.heartbeat_s``. A node silent for
   ``transport.node_timeout_s`` (Ctrl-C without "leave", kill -9, a lost machine) is
   dropped, and once no node is left the learner stops publishing.

Frames on the control socket are decoded strictly; a bad one is counted and logged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import zmq

from dashrl.protocol import NodeHello, NodeWelcome, ProtocolError, WeightsVersion, decode, encode
from dashrl.protocol.security import server_setup

log = logging.getLogger("dashrl.learner")


class NodeRegistry:
    """The learner's control socket, served by a background thread.

    Args:
        bind: ZeroMQ address to bind, e.g. "tcp://127.0.0.1:5560".
        welcome: returns the NodeWelcome for a registering node id.
        timeout_s: drop a node after this many seconds without a heartbeat.
        curve_dir: CurveZMQ keys folder (protocol/security.py), None on the loopback.
        max_nodes: most nodes attached at once; registers beyond it are refused (counted).

    A node id belongs to the socket identity that registered it: a "heartbeat" or "leave"
    for it from any other peer is refused and counted, so a stranger on the control
    socket can neither detach a node nor keep a dead one alive.
    """

    def __init__(self, bind: str, welcome: Callable[[str], NodeWelcome], timeout_s: float,
                 curve_dir: Path | None = None, max_nodes: int = 64):  # fmt: skip
        self.welcome, self.timeout_s, self.max_nodes = welcome, timeout_s, max_nodes
        self.nodes: dict[str, float] = {}  # node id -> last time heard (monotonic)
        self.owners: dict[str, bytes] = {}  # node id -> the socket identity that registered it
        self.rejected_frames = 0
        self.refused = 0  # hellos refused: another peer's node id, or the registry is full
        self.joined = self.left = self.timed_out = 0
        self._lock = threading.Lock()
        self._ctx = zmq.Context()
        # one control connection per node, plus room for nodes reconnecting
        self.gate = server_setup(self._ctx, curve_dir, "learner control", max_nodes + 16)
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self.gate.bind(self._sock, bind)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="node-registry", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._sock.poll(200):
                parts = self._sock.recv_multipart()
                try:
                    self._handle(parts)
                except Exception as e:  # one bad frame or bug must not stop the registry
                    self.rejected_frames += 1
                    log.warning("control socket: rejected frame #%d: %s", self.rejected_frames, e)
            self.expire()

    def _handle(self, parts: list[bytes]) -> None:
        if len(parts) != 2:
            raise ProtocolError(f"expected [identity, frame], got {len(parts)} parts")
        ident, frame = parts
        msg = decode(frame, expect=NodeHello)
        now = time.monotonic()
        with self._lock:
            known = msg.node_id in self.nodes
            if known and self.owners.get(msg.node_id) != ident:
                # only the peer that registered a node may heartbeat it or detach it
                self._refuse(f"node {msg.node_id!r} belongs to another peer ({msg.kind})")
                return
            if msg.kind == "leave":
                if self.nodes.pop(msg.node_id, None) is not None:
                    self.owners.pop(msg.node_id, None)
                    self.left += 1
                    log.info("node %s left (%d attached)", msg.node_id, len(self.nodes))
                return
            if msg.kind == "heartbeat" and not known:
                return  # a node dropped for silence must register again
            if not known and len(self.nodes) >= self.max_nodes:
                self._refuse(f"registry full ({self.max_nodes} nodes): {msg.node_id!r} refused")
                return
            self.nodes[msg.node_id] = now
            self.owners[msg.node_id] = ident
        if msg.kind == "register":
            if not known:
                self.joined += 1
                log.info("node %s attached with %d actor(s)", msg.node_id, msg.actors)
            self._sock.send_multipart([ident, encode(self.welcome(msg.node_id))])

    def _refuse(self, why: str) -> None:
        self.refused += 1
        if self.refused <= 100 or self.refused % 1000 == 0:
            log.warning("control socket: %s (%d refused so far)", why, self.refused)

    def expire(self) -> list[str]:
        """Drop nodes silent for longer than the timeout; returns their ids."""
        now = time.monotonic()
        with self._lock:
            gone = [n for n, t in self.nodes.items() if now - t > self.timeout_s]
            for n in gone:
                del self.nodes[n]
                self.owners.pop(n, None)
        for n in gone:
            self.timed_out += 1
            log.warning("node %s dropped: no heartbeat for %.0f s", n, self.timeout_s)
        return gone

    def alive(self) -> list[str]:
        """Ids of the attached nodes (after dropping silent ones)."""
        self.expire()
        with self._lock:
            return sorted(self.nodes)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close(0)
        self.gate.close()
        self._ctx.term()


class WeightPublisher:
    """ZeroMQ PUB of [WeightsVersion frame, raw float32 weights] to attached nodes.

    Args:
        bind: address to bind.
        layout_hash: the weights' layout hash (protocol/weights.py ``layout_hash``).
        curve_dir: CurveZMQ keys folder (protocol/security.py), None on the loopback.
        max_nodes: most nodes subscribed at once (connections beyond it plus 16 are refused).
    """

    def __init__(self, bind: str, layout_hash: str, curve_dir: Path | None = None,
                 max_nodes: int = 64):  # fmt: skip
        self.layout = layout_hash
        self._ctx = zmq.Context()
        self.gate = server_setup(self._ctx, curve_dir, "weight publisher", max_nodes + 16)
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, 1)  # a slow node gets the newest version, not a backlog
        self._sock.setsockopt(zmq.LINGER, 0)
        self.gate.bind(self._sock, bind)
        self.published = 0

    def publish(self, version: int, flat: torch.Tensor) -> float:
        """Publish ``flat`` (float32 [N], CPU or GPU) as ``version``; returns seconds taken."""
        t0 = time.perf_counter()
        # a copy: ZeroMQ sends zero-copy in the background, and ``flat`` is reused next step
        data = flat.detach().to("cpu", torch.float32).clone()
        header = WeightsVersion(version, data.numel() * 4, "float32", self.layout, time.time())
        self._sock.send_multipart([encode(header), memoryview(data.numpy())], copy=False)
        self.published += 1
        return time.perf_counter() - t0

    def close(self) -> None:
        self._sock.close(0)
        self.gate.close()
        self._ctx.term()
