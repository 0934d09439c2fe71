"""CurveZMQ for jobs that bind beyond the loopback: keys, server and client socket setup.

By default every socket binds to 127.0.0.1 and nothing here is used. A job whose
``transport.host`` is any other address must have ``transport.curve_dir``: a folder made by
``start.py keys DIR`` holding a server keypair and a client keypair (copy the folder to the
machines that attach). Then every server socket (the queue's PULL and ROUTER, the learner's
control ROUTER and weight PUB) is a CURVE server, and a ZAP authenticator admits only
clients whose public key is in ``DIR/authorized_clients``; each refusal is logged and
counted. With or without keys, every server socket is bound through a :class:`Gate`,
which also refuses connections beyond a per-socket limit at the handshake. A peer
without CURVE at all fails the ZeroMQ handshake and never gets a frame through. The
torch.distributed group of launch-time actors always binds to 127.0.0.1.
Frames that do get through are still decoded strictly (msgpack, no pickle, no eval).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from dashrl.protocol.config import LOOPBACK

log = logging.getLogger("dashrl.security")
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES = 10, 5, 3
"""TCP keepalive of every server socket: first probe after 10 s of silence, then every 5 s;
3 unanswered probes drop the connection (a dead peer is gone after about 25 s)."""

__all__ = [
    "LOOPBACK",
    "CurveKeys",
    "Gate",
    "client_setup",
    "generate_keys",
    "load_keys",
    "server_setup",
]


@dataclass(frozen=True)
class CurveKeys:
    """The key material in a keys folder (Z85-encoded bytes)."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes
    authorized: Path


def generate_keys(out: Path) -> Path:
    """Create a server and a client keypair in ``out`` and authorise the client. The folder
    is mode 0700 and the secret keys 0600 (they are the job's only credential).

    Raises:
        FileExistsError: ``out`` already holds keys (never overwrite a job's keys).
    """
    out = Path(out)
    if (out / "server.key_secret").exists():
        raise FileExistsError(f"{out} already holds keys")
    old = os.umask(0o077)  # nothing readable by others, even for a moment
    try:
        out.mkdir(parents=True, exist_ok=True)
        os.chmod(out, 0o700)
        zmq.auth.create_certificates(out, "server")
        zmq.auth.create_certificates(out, "client")
        (out / "authorized_clients").mkdir(exist_ok=True)
        shutil.copy(out / "client.key", out / "authorized_clients" / "client.key")
    finally:
        os.umask(old)
    for secret in out.glob("*.key_secret"):
        os.chmod(secret, 0o600)
    return out


def load_keys(folder: Path) -> CurveKeys:
    """Read a keys folder made by :func:`generate_keys`.

    Raises:
        FileNotFoundError: a key file is missing.
        PermissionError: a secret key is readable by group or others.
    """
    folder = Path(folder).expanduser()
    for name in ("server.key_secret", "client.key_secret"):
        path = folder / name
        if not path.exists():
            raise FileNotFoundError(f"{path}: run `start.py keys {folder}` first")
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise PermissionError(
                f"{path}: secret key readable by others (mode {mode:o}); chmod 600 it "
                "(and 700 its folder), or make new keys"
            )
    s_pub, s_sec = zmq.auth.load_certificate(folder / "server.key_secret")
    c_pub, c_sec = zmq.auth.load_certificate(folder / "client.key_secret")
    return CurveKeys(s_pub, s_sec, c_pub, c_sec, folder / "authorized_clients")


class Gate:
    """Admission control for a role's server sockets, at the ZeroMQ handshake (ZAP).

    Two rules, each refusal logged and counted:
    - at most ``max_connections`` open TCP connections per bound socket (idle ones
      included): a flood of idle connections cannot use up the process's file descriptors
      and lock new actors out. Counted by a socket monitor per bound socket (ZeroMQ's
      accepted/disconnected events, one thread each); a connection that never starts the
      handshake is closed after ``handshake_s`` seconds (ZMQ_HANDSHAKE_IVL) and so cannot
      hold a slot for long.
    - with a keys folder, only clients whose CURVE public key is authorised.

    Use :meth:`bind` instead of ``sock.bind``; call :meth:`close` before ``ctx.term()``.
    """

    def __init__(self, ctx: zmq.Context, role: str, keys: CurveKeys | None,
                 max_connections: int, handshake_s: float):  # fmt: skip
        self.role, self.keys = role, keys
        self.max_connections, self.handshake_s = max_connections, handshake_s
        self.authorized = (
            {zmq.auth.load_certificate(p)[0] for p in Path(keys.authorized).glob("*.key")}
            if keys
            else set()
        )
        self.refused = 0  # clients with an unknown CURVE key
        self.refused_full = 0  # connections beyond max_connections
        self._open: dict[str, set[int]] = {}  # ZAP domain -> fds of its open connections
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._monitors: list[threading.Thread] = []
        self.auth = _Authenticator(ctx, self)
        self.auth.start()

    def bind(self, sock: zmq.Socket, endpoint: str) -> None:
        """Configure ``sock`` as a server under this gate and bind it to ``endpoint``."""
        domain = f"{self.role}/{len(self._open)}"
        sock.zap_domain = domain.encode()  # makes libzmq ask the gate even without CURVE
        sock.setsockopt(zmq.HANDSHAKE_IVL, int(self.handshake_s * 1000))
        # TCP keepalive: a peer that vanished without closing (its host died) is dropped
        # after about 25 s and frees its slot. Not ZMTP heartbeats: with them libzmq 4.3
        # aborts the whole process (assertion !_io_error, zeromq/libzmq#4364) when a
        # heartbeat timer fires on a connection whose input is stopped by backpressure,
        # which is exactly the queue's intake under a flood of actors.
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, KEEPALIVE_PROBES)
        if self.keys:  # pyzmq looks the key checker up by the socket's ZAP domain
            self.auth.configure_curve_callback(domain=domain, credentials_provider=self)
            sock.curve_secretkey = self.keys.server_secret
            sock.curve_publickey = self.keys.server_public
            sock.curve_server = True
        # the monitor's PAIR socket is made here and used only by its thread from now on
        monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._open[domain] = set()
        thread = threading.Thread(target=self._watch, args=(domain, monitor), daemon=True,
                                  name=f"gate-{domain}")  # fmt: skip
        thread.start()
        self._monitors.append(thread)
        sock.bind(endpoint)

    def _watch(self, domain: str, monitor: zmq.Socket) -> None:
        """Keep ``domain``'s set of open connections (by file descriptor) up to date."""
        try:
            while not self._stop.is_set():
                if not monitor.poll(100):
                    continue
                event = recv_monitor_message(monitor)
                with self._lock:
                    if event["event"] == zmq.EVENT_ACCEPTED:
                        self._open[domain].add(event["value"])
                    else:
                        self._open[domain].discard(event["value"])
        finally:
            monitor.close(0)

    def open_connections(self, domain: str) -> int:
        """Open TCP connections of the socket of ``domain`` (0 if unknown)."""
        with self._lock:
            return len(self._open.get(domain, ()))

    def admit(self, domain: str) -> bool:
        """False (and counted) when the socket of ``domain`` already holds more than
        ``max_connections`` connections, the one being admitted included."""
        n = self.open_connections(domain)
        if n <= self.max_connections:
            return True
        self.refused_full += 1
        if self.refused_full <= 10 or self.refused_full % 1000 == 0:
            log.warning("%s: refused a connection: %d open, limit %d (%d refused so far)",
                        self.role, n, self.max_connections, self.refused_full)  # fmt: skip
        return False

    def callback(self, domain: str, key: bytes) -> bool:
        """CURVE credentials check (pyzmq's credentials-provider interface)."""
        if key in self.authorized:
            return True
        self.refused += 1
        log.warning("%s: refused a CURVE client with an unknown key (%d refused so far)",
                    self.role, self.refused)  # fmt: skip
        return False

    def close(self) -> None:
        """Stop the authenticator and the monitors (call it after closing the sockets bound
        through the gate and before the context is terminated, or term() hangs)."""
        self._stop.set()
        for thread in self._monitors:
            thread.join(timeout=2)
        self.auth.stop()


class _Authenticator(ThreadAuthenticator):
    """pyzmq's ZAP thread, with the gate's connection limit checked first."""

    def __init__(self, ctx: zmq.Context, gate: Gate):
        super().__init__(ctx, log=logging.getLogger("dashrl.security.zap"))
        self.gate = gate

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        if len(msg) >= 6 and not self.gate.admit(msg[2].decode("utf-8", "replace")):
            self._send_zap_reply(msg[1], b"400", b"too many connections")
            return
        await super().handle_zap_message(msg)


def server_setup(ctx: zmq.Context, curve_dir: Path | None, role: str,
                 max_connections: int = 256, handshake_s: float = 10.0) -> Gate:  # fmt: skip
    """The :class:`Gate` for ``role``'s server sockets in ``ctx`` (starts its ZAP thread).

    Args:
        curve_dir: a keys folder (CURVE on every socket bound through the gate), or None.
        max_connections: most open connections per bound socket.
        handshake_s: seconds a new connection has to complete the ZeroMQ handshake.

    Raises:
        FileNotFoundError, PermissionError: see :func:`load_keys`.
    """
    keys = load_keys(curve_dir) if curve_dir is not None else None
    return Gate(ctx, role, keys, max_connections, handshake_s)


def client_setup(curve_dir: Path | None) -> Callable[[zmq.Socket], None] | None:
    """``configure(socket)`` making a socket a CURVE client of the job's server key (call it
    before ``connect``), or None without a keys folder."""
    if curve_dir is None:
        return None
    keys = load_keys(curve_dir)

    def configure(sock: zmq.Socket) -> None:
        sock.curve_secretkey = keys.client_secret
        sock.curve_publickey = keys.client_public
        sock.curve_serverkey = keys.server_public

    return configure
