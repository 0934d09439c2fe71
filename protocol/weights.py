"""Weight broadcast from the learner (rank 0) to the actors over torch.distributed.

Each update is two broadcasts: a fixed-size header tensor holding an encoded
:class:`~dashrl.protocol.WeightsVersion` frame, then one flat buffer with every
parameter in ``model.parameters()`` order (tied weights appear once, so SmolLM2's tied
embedding/LM head stays tied on the receiving side). gloo on CPU; NCCL when the tensors
live on a GPU.

The group is *stateless*: a process group built directly on its own TCPStore, not
torch.distributed's default group. The default group belongs to the learner's own ranks
(DeepSpeed ZeRO data parallelism), and the learner-to-actors group is a second, separate
world (as TRL, OpenRLHF and prime-rl do for their vLLM weight sync).

Receivers never make the learner wait for a generation to finish: each actor runs a
thread that sits in the broadcast, lands the weights in a staging buffer and swaps it
in under a lock; the actor's loop applies the newest staged weights between generate
calls (so one generate call never mixes two versions, and each rollout is stamped with
exactly the version that produced it).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from dashrl.protocol import ProtocolError, WeightsVersion, decode, encode
from dashrl.protocol.security import client_setup

log = logging.getLogger("dashrl.weights")

HEADER_BYTES = 1024
STOP_VERSION = -1


def layout_hash(params: list[torch.Tensor]) -> str:
    """Hash of the shapes and dtypes of ``params`` in order; equal layouts give equal hashes."""
    h = hashlib.sha256()
    for p in params:
        h.update(f"{tuple(p.shape)}:{p.dtype};".encode())
    return h.hexdigest()[:32]


class StatelessGroup:
    """A broadcast-only process group on its own TCPStore, independent of the default group.

    Args:
        init_method: "tcp://HOST:PORT"; rank 0 hosts the store there.
        world_size, rank: this group's size and this process's rank in it.
        timeout_s: rendezvous and collective timeout, in seconds.
        device: where the broadcast tensors live (cuda: NCCL, else gloo).

    Raises:
        ValueError: init_method is not tcp://HOST:PORT.
        RuntimeError / DistNetworkError: the rendezvous failed or timed out.
    """

    def __init__(
        self, init_method: str, world_size: int, rank: int, timeout_s: float, device: torch.device
    ):
        if not init_method.startswith("tcp://") or ":" not in init_method[6:]:
            raise ValueError(f"init_method must be tcp://HOST:PORT, got {init_method!r}")
        host, port = init_method[6:].rsplit(":", 1)
        timeout = timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(host, int(port), world_size, is_master=rank == 0,
                                   timeout=timeout)  # fmt: skip
        if device.type == "cuda":  # NCCL moves CUDA tensors only
            self.pg = dist.ProcessGroupNCCL(self.store, rank, world_size)
        else:
            self.pg = dist.ProcessGroupGloo(self.store, rank, world_size, timeout)
        self.rank, self.world_size = rank, world_size

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """In-place broadcast of ``tensor`` from rank ``src`` (blocking)."""
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self.pg.broadcast([tensor], opts).wait()

    def close(self) -> None:
        """Release the group (NCCL communicators are aborted; gloo needs nothing)."""
        shutdown = getattr(self.pg, "shutdown", None)
        if shutdown is not None:
            try:
                shutdown()
            except RuntimeError:
                pass


def _pack_header(msg: WeightsVersion) -> torch.Tensor:
    frame = encode(msg)
    if len(frame) + 4 > HEADER_BYTES:
        raise ValueError(f"weights header of {len(frame)} bytes does not fit {HEADER_BYTES}")
    buf = bytearray(HEADER_BYTES)
    buf[:4] = len(frame).to_bytes(4, "little")
    buf[4 : 4 + len(frame)] = frame
    return torch.frombuffer(buf, dtype=torch.uint8).clone()


def _unpack_header(t: torch.Tensor) -> WeightsVersion:
    raw = bytes(t.cpu().numpy().tobytes())
    n = int.from_bytes(raw[:4], "little")
    if not 0 < n <= HEADER_BYTES - 4:
        raise ProtocolError(f"weights header length {n} out of range")
    return decode(raw[4 : 4 + n], expect=WeightsVersion)


class WeightSender:
    """Rank 0: broadcasts the learner's parameters after every optimizer step.

    Args:
        params: the learner model's parameters (``list(model.parameters())``).
        init_method: torch.distributed rendezvous, e.g. "tcp://127.0.0.1:29500".
        world_size: 1 + number of actors. Blocks until every actor has joined.
        timeout_s: timeout of one collective, in seconds.
    """

    def __init__(
        self, params: list[torch.Tensor], init_method: str, world_size: int, timeout_s: float
    ):
        self.params = params
        self.layout = layout_hash(params)
        self.world_size = world_size
        device = params[0].device
        if device.type == "meta":  # shapes only (a sharded backend): send from the compute device
            cuda = torch.cuda.is_available()
            device = (
                torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
            )
        self.group = StatelessGroup(init_method, world_size, 0, timeout_s, device)
        self.flat = torch.empty(sum(p.numel() for p in params), dtype=torch.float32, device=device)
        self._header_device = device
        self.broken = False

    def send(self, version: int, tensors: Iterable[torch.Tensor] | None = None) -> float:
        """Broadcast the parameters as ``version``; returns the seconds it took.

        Args:
            version: the policy version to announce.
            tensors: the full parameters in order, possibly produced one at a time (a ZeRO-3
                backend gathers each only while it is copied); default: the ``params``
                given at construction.
        """
        t0 = time.perf_counter()
        offset = 0
        with torch.no_grad():
            for p in self.params if tensors is None else tensors:
                n = p.numel()
                self.flat[offset : offset + n].copy_(p.detach().reshape(-1))
                offset += n
        if offset != self.flat.numel():
            raise ValueError(f"sent {offset} parameter values, the layout has {self.flat.numel()}")
        if self.broken:
            return time.perf_counter() - t0
        header = WeightsVersion(version, self.flat.numel() * 4, "float32", self.layout, time.time())
        try:
            self.group.broadcast(_pack_header(header).to(self._header_device))
            self.group.broadcast(self.flat)
        except (RuntimeError, dist.DistError) as e:  # a launch-time actor died: its peers
            self.broken = True  # and restarts get weights from the publisher from now on
            log.error("weight group broken (%s): later versions go out over ZeroMQ only", e)
        return time.perf_counter() - t0

    def close(self) -> None:
        """Tell receivers to stop, then leave the process group."""
        if self.broken:
            self.group.close()
            return
        try:
            stop = _pack_header(WeightsVersion(STOP_VERSION, 0, "float32", self.layout))
            self.group.broadcast(stop.to(self._header_device))
        finally:
            self.group.close()


LoadFn = Callable[[torch.Tensor], None]
"""Loads one flat float32 buffer (learner parameter order) into an engine's weights."""


@dataclass
class WeightSource:
    """Where an actor's weights come from; plain data, so it crosses into a vLLM worker.

    Attributes:
        kind: "group" (the launch-time stateless process group: gloo, NCCL on GPU) or
            "zmq" (the learner's ZeroMQ weight publisher, for attached nodes and restarts).
        init_method, world_size, rank, timeout_s: the group's rendezvous ("group" only).
        endpoint, curve_dir: the publisher's address and the job's CurveZMQ key folder
            ("zmq" only; curve_dir None on the loopback).
    """

    kind: Literal["group", "zmq"]
    init_method: str = ""
    world_size: int = 0
    rank: int = 0
    timeout_s: float = 120.0
    endpoint: str = ""
    curve_dir: str | None = None


class _StagedWeights:
    """What both receivers share: a staging buffer filled by a background thread, and
    :meth:`apply`, which swaps the newest staged weights into the engine when the actor
    says so (between generate calls for HF; paused between engine steps for vLLM).

    Args:
        params: the engine's parameters in the learner's order, or meta tensors of the
            same shapes (float32) when the weights live elsewhere (a vLLM worker's fused
            layers): they give the layout that every update is checked against.
        version: the version of the weights the engine holds now (-1: none the learner made).
        load: loads the flat buffer into the engine; default: copy into ``params``.
        device: where the staging buffers live (default: the params' device, CPU for meta);
            CUDA makes the group an NCCL group.
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        version: int,
        load: LoadFn | None = None,
        device: torch.device | None = None,
    ):
        self.params = params
        self.layout = layout_hash(params)
        self.numel = sum(p.numel() for p in params)
        meta = params[0].device.type == "meta"
        self.device = device or (torch.device("cpu") if meta else params[0].device)
        self._ready = torch.empty(self.numel, dtype=torch.float32, device=self.device)
        self._ready_version: int | None = None
        self._lock = threading.Lock()
        self._load = load or self._copy_into_params
        self.version = version
        self.received = self.rejected = 0
        self.error: BaseException | None = None
        self.stopped = threading.Event()

    def _copy_into_params(self, flat: torch.Tensor) -> None:
        offset = 0
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                p.copy_(flat[offset : offset + n].view_as(p))
                offset += n

    def status(self) -> dict:
        """version, received, rejected, error (repr or None) and whether the thread stopped:
        plain data, so it crosses vLLM's RPC as well."""
        return {"version": self.version, "received": self.received, "rejected": self.rejected,
                "error": None if self.error is None else repr(self.error),
                "stopped": self.stopped.is_set()}  # fmt: skip

    @property
    def staged_version(self) -> int | None:
        """The version waiting in the staging buffer (None: nothing newer than ``version``)."""
        return self._ready_version

    def apply(self) -> int:
        """Load the newest received weights into the engine, if any; returns the current version."""
        with self._lock:
            if self._ready_version is None:
                return self.version
            self._load(self._ready)
            self.version, self._ready_version = self._ready_version, None
        return self.version


class WeightReceiver(_StagedWeights):
    """Actor side: a thread receives broadcasts into a staging buffer; :meth:`apply` swaps them in.

    Args:
        params: the engine's parameters, same layout as the learner's (see _StagedWeights).
        init_method, world_size, rank, timeout_s: the torch.distributed group.
        load: see _StagedWeights.
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        init_method: str,
        world_size: int,
        rank: int,
        timeout_s: float,
        load: LoadFn | None = None,
        device: torch.device | None = None,
    ):
        super().__init__(params, version=0, load=load, device=device)  # all start equal
        self._recv = torch.empty(self.numel, dtype=torch.float32, device=self.device)
        self.group = StatelessGroup(init_method, world_size, rank, timeout_s, self.device)
        self._thread = threading.Thread(target=self._run, name="weight-receiver", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        header = torch.empty(HEADER_BYTES, dtype=torch.uint8, device=self.device)
        try:
            while True:
                self.group.broadcast(header)
                msg = _unpack_header(header)
                if msg.version == STOP_VERSION:
                    break
                ok = msg.layout_hash == self.layout and msg.num_bytes == self.numel * 4
                target = (
                    self._recv
                    if ok
                    else torch.empty(msg.num_bytes // 4, dtype=torch.float32, device=self.device)
                )
                self.group.broadcast(target)  # always receive, to stay in step with rank 0
                if not ok:
                    self.rejected += 1
                    log.error(
                        "refused weights v%d: layout %s != %s",
                        msg.version,
                        msg.layout_hash,
                        self.layout,
                    )
                    continue
                with self._lock:
                    self._recv, self._ready = self._ready, self._recv
                    self._ready_version = msg.version
                self.received += 1
        except BaseException as e:  # learner gone or group torn down: keep generating
            self.error = e
            log.warning("weight receiver stopped: %s", e)
        finally:
            self.stopped.set()


class ZmqWeightReceiver(_StagedWeights):
    """Attached node side: the same staging/apply as :class:`WeightReceiver`, fed by
    the learner's ZeroMQ weight publisher (learner/nodes.py) instead of a process group.

    Args:
        params: the engine's parameters, same layout as the learner's.
        endpoint: the learner's weights endpoint (NodeWelcome.weights_endpoint).
        configure: applied to the SUB socket before connecting (CurveZMQ client keys).
        load: see _StagedWeights.

    ``version`` stays -1 until the first weights arrive; an attached actor waits for them
    rather than generate with weights the learner never had.
    """

    def __init__(
        self, params: list[torch.Tensor], endpoint: str, configure=None, load: LoadFn | None = None
    ):
        import zmq

        super().__init__(params, version=-1, load=load)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.RCVHWM, 2)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        if configure:
            configure(self._sock)
        self._sock.connect(endpoint)
        self._thread = threading.Thread(target=self._run, name="weight-sub", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self.stopped.is_set():
                if not self._sock.poll(500):
                    continue
                parts = self._sock.recv_multipart(copy=False)
                try:
                    if len(parts) != 2:
                        raise ProtocolError(f"weights message of {len(parts)} parts")
                    msg = decode(parts[0].bytes, expect=WeightsVersion)
                    if msg.layout_hash != self.layout or msg.num_bytes != self.numel * 4:
                        raise ProtocolError(f"layout {msg.layout_hash} != {self.layout}")
                    data = torch.frombuffer(parts[1].buffer, dtype=torch.float32)
                    if data.numel() != self.numel:
                        raise ProtocolError(f"{data.numel()} weights, expected {self.numel}")
                except ProtocolError as e:
                    self.rejected += 1
                    log.error("refused published weights: %s", e)
                    continue
                with self._lock:
                    self._ready.copy_(data)
                    self._ready_version = msg.version
                self.received += 1
        except BaseException as e:
            self.error = e
            log.warning("weight subscriber stopped: %s", e)

    def close(self) -> None:
        self.stopped.set()
        self._thread.join(timeout=2)
        self._sock.close(0)
        self._ctx.term()


def open_receiver(
    source: WeightSource,
    params: list[torch.Tensor],
    load: LoadFn | None = None,
    device: torch.device | None = None,
) -> WeightReceiver | ZmqWeightReceiver:
    """The receiver that ``source`` names, staging into ``params``' layout (see _StagedWeights;
    ``device`` matters for a group: CUDA staging buffers make it an NCCL group).

    Raises:
        ValueError: unknown source kind; RuntimeError: the group rendezvous failed.
    """
    if source.kind == "group":
        return WeightReceiver(params, source.init_method, source.world_size, source.rank,
                              source.timeout_s, load=load, device=device)  # fmt: skip
    if source.kind == "zmq":
        keys = Path(source.curve_dir) if source.curve_dir else None
        return ZmqWeightReceiver(params, source.endpoint, client_setup(keys), load=load)
    raise ValueError(f"unknown weight source kind {source.kind!r}")
