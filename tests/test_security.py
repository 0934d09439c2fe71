"""Strangers: a job bound beyond the loopback (here 127.0.0.2, traffic stays on this machine)
admits only CurveZMQ clients holding its key, on every socket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq
from pydantic import ValidationError

from dashrl.protocol import (
    Completion,
    MicroBatchReply,
    MicroBatchRequest,
    NodeHello,
    NodeWelcome,
    RolloutGroup,
    decode,
    encode,
)
from dashrl.protocol.config import Config
from dashrl.protocol.runtime import free_port
from dashrl.protocol.security import (
    KEEPALIVE_IDLE_S,
    KEEPALIVE_PROBES,
    client_setup,
    generate_keys,
    server_setup,
)

HOST = "127.0.0.2"


def _group(i: int) -> RolloutGroup:
    comps = [Completion(np.array([1, 2], np.int32), np.full(2, -0.5, np.float32), r, a, "stop", 0)
             for r, a in ((1.0, 1.0), (0.0, -1.0))]  # fmt: skip
    return RolloutGroup(f"p{i}", np.arange(4, dtype=np.int32), comps, "t")


def _stranger_keys(sock: zmq.Socket, server_public: bytes) -> None:
    pub, sec = zmq.curve_keypair()
    sock.curve_secretkey, sock.curve_publickey, sock.curve_serverkey = sec, pub, server_public


def test_binding_beyond_loopback_needs_keys(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="CurveZMQ"):
        Config.model_validate({"transport": {"host": HOST}})
    keys = generate_keys(tmp_path / "keys")
    Config.model_validate({"transport": {"host": HOST, "curve_dir": str(keys)}})
    with pytest.raises(FileExistsError):
        generate_keys(keys)  # a job's keys are never overwritten


def _ask(ctx, endpoint: str, configure, rid: int) -> MicroBatchReply | None:
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    if configure:
        configure(dealer)
    dealer.connect(endpoint)
    dealer.send(encode(MicroBatchRequest(rid, 0, 2, "sequences")), zmq.NOBLOCK)
    got = decode(dealer.recv()) if dealer.poll(3000) else None
    dealer.close(0)
    return got


def test_queue_refuses_clients_without_the_key(tmp_path: Path) -> None:
    keys = generate_keys(tmp_path / "keys")
    rollout, request = free_port(HOST), free_port(HOST)
    t = {"host": HOST, "curve_dir": str(keys), "rollout_port": rollout, "request_port": request}
    cfg = Config.model_validate({"run_dir": str(tmp_path), "transport": t})
    path = tmp_path / "config.json"
    path.write_text(cfg.model_dump_json())
    proc = subprocess.Popen([sys.executable, "-m", "dashrl.queue.server", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    ctx = zmq.Context()
    server_public = zmq.auth.load_certificate(keys / "server.key")[0]
    try:
        time.sleep(1.5)
        member = client_setup(keys)
        # strangers: no CURVE at all, and CURVE with a key the job never authorised
        for configure in (None, lambda s: _stranger_keys(s, server_public)):
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            if configure:
                configure(push)
            push.connect(f"tcp://{HOST}:{rollout}")
            for i in range(5):
                try:
                    push.send(encode(_group(i)), zmq.NOBLOCK)
                except zmq.Again:
                    pass  # never connected: the handshake was refused
            time.sleep(0.5)  # give the handshake time to be attempted (and refused)
            push.close(0)
            assert _ask(ctx, f"tcp://{HOST}:{request}", configure, 7) is None  # no reply either
        time.sleep(0.5)
        stats = _ask(ctx, f"tcp://{HOST}:{request}", member, 8).stats  # the job's own key
        assert stats["queue/received"] == 0  # nothing a stranger sent got in
        assert stats["queue/refused_clients"] >= 2  # wrong-key PUSH and DEALER, logged
        push = ctx.socket(zmq.PUSH)
        member(push)
        push.connect(f"tcp://{HOST}:{rollout}")
        push.send(encode(_group(9)))
        time.sleep(0.5)
        reply = _ask(ctx, f"tcp://{HOST}:{request}", member, 9)
        assert [s.prompt_id for s in reply.samples] == ["p9", "p9"]
        push.close(0)
    finally:
        ctx.term()
        os.kill(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=20)[0].decode()
    assert "refused a CURVE client" in out


def test_control_socket_and_weights_refuse_strangers(tmp_path: Path) -> None:
    from dashrl.learner.nodes import NodeRegistry, WeightPublisher
    from dashrl.protocol.receivers import ZmqWeightReceiver
    from dashrl.protocol.weights import layout_hash

    keys = generate_keys(tmp_path / "keys")
    control, weights = f"tcp://{HOST}:{free_port(HOST)}", f"tcp://{HOST}:{free_port(HOST)}"
    welcome = lambda node: NodeWelcome(node, 3, "{}", weights)  # noqa: E731
    registry = NodeRegistry(control, welcome, timeout_s=30, curve_dir=keys)
    params = [torch.zeros(3, 2), torch.zeros(4)]
    publisher = WeightPublisher(weights, layout_hash(params), curve_dir=keys)
    ctx = zmq.Context()
    server_public = zmq.auth.load_certificate(keys / "server.key")[0]
    receivers = []
    try:
        for name, configure in (("nokey", None),
                                ("wrongkey", lambda s: _stranger_keys(s, server_public)),
                                ("member", client_setup(keys))):  # fmt: skip
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            if configure:
                configure(dealer)
            dealer.connect(control)
            dealer.send(encode(NodeHello(name, "register", 1)), zmq.NOBLOCK)
            got = decode(dealer.recv()) if dealer.poll(3000) else None
            assert (got is not None) == (name == "member"), name
            dealer.close(0)
            receivers.append(ZmqWeightReceiver([p.clone() for p in params], weights, configure))
        assert registry.alive() == ["member"] and registry.gate.refused >= 1
        time.sleep(1.0)
        for v in (1, 2):
            publisher.publish(v, torch.arange(10, dtype=torch.float32))
            time.sleep(0.5)
        got = [r.apply() for r in receivers]
        assert got == [-1, -1, 2]  # only the key holder received weights
        assert torch.equal(receivers[2].params[1], torch.arange(6, 10, dtype=torch.float32))
    finally:
        for r in receivers:
            r.close()
        registry.close()
        publisher.close()
        ctx.term()


def test_server_sockets_use_tcp_keepalive_not_zmtp_heartbeats() -> None:
    """ZMTP heartbeats on a socket whose input is stopped by backpressure abort libzmq 4.3
    (assertion !_io_error, zeromq/libzmq#4364): the queue's intake under 16 flooding actors
    died that way (test_load). Dead peers are dropped by TCP keepalive instead."""
    ctx = zmq.Context()
    gate = server_setup(ctx, None, "queue", 32, 10.0)
    sock = ctx.socket(zmq.PULL)
    try:
        gate.bind(sock, f"tcp://127.0.0.1:{free_port()}")
        assert sock.getsockopt(zmq.HEARTBEAT_IVL) == 0
        assert sock.getsockopt(zmq.TCP_KEEPALIVE) == 1
        assert sock.getsockopt(zmq.TCP_KEEPALIVE_IDLE) == KEEPALIVE_IDLE_S
        assert sock.getsockopt(zmq.TCP_KEEPALIVE_CNT) == KEEPALIVE_PROBES
    finally:
        sock.close(linger=0)
        gate.close()
        ctx.term()
