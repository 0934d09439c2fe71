"""CurveZMQ for jobs that bind beyond the loopback: keys, server and client socket setup.

By default every socket binds to 127.0.0.1 and nothing here is used. A job whose
``transport.host`` is any other address must have ``transport.curve_dir``: a folder made by
``start.py keys DIR`` holding a server keypair and a client keypair (copy the folder to the
machines that attach). Then every server socket (the queue's PULL and ROUTER, the learner's
control ROUTER and weight PUB) is a CURVE server, and a ZAP authenticator admits only
clients whose public key is in ``DIR/authorized_clients``; each refusal is logged and
counted. A peer without CURVE at all fails the ZeroMQ handshake and never gets a frame
through. The torch.distributed group of launch-time actors always binds to 127.0.0.1.
Frames that do get through are still decoded strictly (msgpack, no pickle, no eval).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from dashrl.protocol.config import LOOPBACK

log = logging.getLogger("dashrl.security")

__all__ = ["LOOPBACK", "CurveKeys", "client_setup", "generate_keys", "load_keys", "server_setup"]


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


class _Gate:
    """ZAP credentials provider: admits the authorised client keys, logs and counts the rest."""

    def __init__(self, authorized: Path, role: str, auth: ThreadAuthenticator):
        self.keys = {zmq.auth.load_certificate(p)[0] for p in Path(authorized).glob("*.key")}
        self.role, self.refused, self.auth = role, 0, auth

    def close(self) -> None:
        """Stop the authenticator (before the context is terminated, or term() hangs)."""
        self.auth.stop()

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        self.refused += 1
        log.warning("%s: refused a CURVE client with an unknown key (%d refused so far)",
                    self.role, self.refused)  # fmt: skip
        return False


def server_setup(
    ctx: zmq.Context, curve_dir: Path | None, role: str
) -> tuple[Callable[[zmq.Socket], None] | None, _Gate | None]:
    """Prepare ``ctx`` for CURVE server sockets (starts its ZAP authenticator).

    Returns:
        (configure(socket) to call before ``bind``, the gate counting refusals; call its
        ``close()`` before ``ctx.term()``), or (None, None) without a keys folder.
    """
    if curve_dir is None:
        return None, None
    keys = load_keys(curve_dir)
    auth = ThreadAuthenticator(ctx)
    auth.start()
    gate = _Gate(keys.authorized, role, auth)
    auth.configure_curve_callback(domain="*", credentials_provider=gate)

    def configure(sock: zmq.Socket) -> None:
        sock.curve_secretkey = keys.server_secret
        sock.curve_publickey = keys.server_public
        sock.curve_server = True

    return configure, gate


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
