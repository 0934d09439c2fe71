"""``start.py attach --connect HOST:PORT``: join a running job with more generator processes.

The node registers on the learner's control socket (learner/nodes.py), receives the job's
resolved config and the weights endpoint, starts ``--actors`` actor processes that stream
rollouts to the job's queue and take weights from the learner's publisher, and sends a
heartbeat every ``transport.heartbeat_s`` until it is stopped (Ctrl-C / SIGTERM: it says
"leave" and stops its actors by pid). If the node dies without a word, the learner drops
it after ``transport.node_timeout_s``; nothing the queue already accepted is affected.
"""

from __future__ import annotations

import logging
import secrets
import tempfile
import time
from pathlib import Path

import zmq

from dashrl.launch.children import Children
from dashrl.launch.commands import AttachCommand
from dashrl.protocol import NodeHello, NodeWelcome, ProtocolError, decode, encode
from dashrl.protocol.config import Config
from dashrl.protocol.placement import cuda_available
from dashrl.protocol.runtime import StopFlag, actor_env
from dashrl.protocol.security import client_setup

log = logging.getLogger("dashrl.attach")


def register(sock: zmq.Socket, node_id: str, actors: int, timeout_s: float) -> NodeWelcome:
    """Send a register and wait for the learner's welcome.

    Raises:
        TimeoutError: no valid welcome within ``timeout_s``.
    """
    sock.send(encode(NodeHello(node_id, "register", actors)))
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if not sock.poll(int(left * 1000)):
            break
        try:
            msg = decode(sock.recv(), expect=NodeWelcome)
        except ProtocolError as e:
            log.warning("ignored a bad reply: %s", e)
            continue
        if msg.node_id == node_id:
            return msg
    raise TimeoutError(f"no welcome from the learner within {timeout_s:.0f} s")


class NodeClient:
    """A node's line to the learner's control socket: register, heartbeat, leave.

    Args:
        connect: "HOST:PORT" of the learner's control socket.
        node_id: the node's name.
        actors: how many actors it runs.
        curve_dir: CurveZMQ keys folder, for jobs bound beyond the loopback.

    Raises:
        ValueError: ``connect`` is not HOST:PORT.
    """

    def __init__(self, connect: str, node_id: str, actors: int, curve_dir: Path | None = None):
        host, _, port = connect.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--connect must be HOST:PORT, got {connect!r}")
        self.node_id, self.actors = node_id, actors
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 1000)
        secure = client_setup(curve_dir)
        if secure:  # a job bound beyond the loopback only admits holders of its client key
            secure(self._sock)
        self._sock.connect(f"tcp://{host}:{port}")
        self.heartbeats = 0

    def register(self, timeout_s: float) -> NodeWelcome:
        """Register and wait for the welcome (raises TimeoutError)."""
        return register(self._sock, self.node_id, self.actors, timeout_s)

    def heartbeat(self) -> None:
        self._sock.send(encode(NodeHello(self.node_id, "heartbeat", self.actors)))
        self.heartbeats += 1

    def leave(self) -> None:
        self._sock.send(encode(NodeHello(self.node_id, "leave", self.actors)))

    def close(self) -> None:
        self._sock.close()
        self._ctx.term()


def attach(cmd: AttachCommand, stop: StopFlag | None = None) -> dict:
    """Run a node until ``stop`` (SIGTERM/SIGINT); returns a summary.

    Raises:
        TimeoutError: the learner did not answer.
        ValueError: ``--connect`` is not HOST:PORT, or the job is not ``--mode async``.
    """
    stop = stop or StopFlag()
    node_id = cmd.node_id or f"node-{secrets.token_hex(3)}"
    client = NodeClient(cmd.connect, node_id, cmd.actors, cmd.curve_dir)
    work = Path(cmd.work_dir or tempfile.mkdtemp(prefix=f"dashrl-{node_id}-"))
    work.mkdir(parents=True, exist_ok=True)
    children = None
    try:
        welcome = client.register(cmd.timeout_s)
        cfg = Config.model_validate_json(welcome.config_json)
        if cfg.mode != "async":  # its steps are sized by its own actors' batches
            raise ValueError(f"the job runs --mode {cfg.mode}: only an async job takes "
                             "attached generator nodes")  # fmt: skip
        # this machine's copy of the keys, not the learner machine's path
        transport = cfg.transport.model_copy(update={"curve_dir": cmd.curve_dir})
        # nor the job's actor.cpus (cores of the learner's machine): this node is unpinned
        actor = cfg.actor.model_copy(update={"cpus": None})
        cfg = cfg.model_copy(update={"transport": transport, "actor": actor})
        (work / "config.json").write_text(cfg.model_dump_json())
        log.info("attached as %s at version %d; logs in %s", node_id, welcome.version, work)
        children = Children(work)
        # this machine's GPUs, not the job's actor.gpus (those name the learner's machine)
        cpu_env = {} if cuda_available() else actor_env(cfg.actor.engine)
        for i in range(cmd.actors):
            children.spawn(f"{node_id}-actor{i}", "dashrl.actors.actor", str(work / "config.json"),
                           str(i), node_id, welcome.weights_endpoint,
                           env_extra=cpu_env)  # fmt: skip
        while not stop:
            client.heartbeat()
            for role, p in children.procs.items():
                if p.poll() is not None:
                    log.error("%s exited with code %s", role, p.returncode)
                    stop.stop = True
            time.sleep(cfg.transport.heartbeat_s)
        client.leave()
        return {"node_id": node_id, "work_dir": str(work), "heartbeats": client.heartbeats}
    finally:
        if children is not None:
            children.stop_all()
        client.close()
