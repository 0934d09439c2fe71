"""The actors' side of the weight sync: staging buffers filled by a background thread,
loaded into the engine when the actor says so.

Two receivers share one staging design (:class:`_StagedWeights`): :class:`WeightReceiver`
sits in the launch-time process group's broadcasts (protocol/weight_group.py), and
:class:`ZmqWeightReceiver` subscribes to the learner's ZeroMQ publisher (attached nodes,
restarted actors, weight backend zmq). Each version lands in host memory, in the buffer
not being read; :meth:`_StagedWeights.apply` swaps it in under a lock that it holds until
the load is complete (device copies too), so a new version never overwrites a buffer a
load is reading and a generate call never mixes two versions.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from dashrl.protocol import ProtocolError, WeightsVersion, decode
from dashrl.protocol.security import client_setup
from dashrl.protocol.weight_group import StatelessGroup
from dashrl.protocol.weights import (
    HEADER_BYTES,
    STOP_VERSION,
    LoadFn,
    WeightSource,
    layout_hash,
    unpack_header,
    wire_dtype,
)

log = logging.getLogger("dashrl.weights")


class _StagedWeights:
    """What both receivers share: two host staging buffers filled by a background thread,
    and :meth:`apply`, which loads the newest staged weights into the engine when the actor
    says so (between generate calls for HF; paused between engine steps for vLLM).

    Args:
        params: the engine's parameters in the learner's order, or meta tensors of the
            same shapes (float32) when the weights live elsewhere (a vLLM worker's fused
            layers): they give the layout that every update is checked against.
        version: the version of the weights the engine holds now (-1: none the learner made).
        load: loads a flat host buffer into the engine; default: copy into ``params``.
    """

    def __init__(self, params: list[torch.Tensor], version: int, load: LoadFn | None = None):
        self.params = params
        self.layout = layout_hash(params)
        self.numel = sum(p.numel() for p in params)
        self.device = torch.device("cpu")  # staging lives in host memory
        self._ready = torch.empty(0)
        self._recv = torch.empty(0)
        self._ready_version: int | None = None
        self._lock = threading.Lock()
        self._load = load or self._copy_into_params
        self.version = version
        self.received = self.rejected = 0
        self.error: BaseException | None = None
        self.stopped = threading.Event()

    def _stage(self, dtype: torch.dtype) -> None:
        """(Re)allocate both staging buffers for ``dtype`` (the receiving thread, before
        its first version: nothing is staged yet)."""
        with self._lock:
            if self._recv.dtype != dtype or self._recv.numel() != self.numel:
                self._recv = torch.empty(self.numel, dtype=dtype)
                self._ready = torch.empty(self.numel, dtype=dtype)
                self._ready_version = None

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
        """Load the newest received weights into the engine, if any; returns the current
        version. The lock is held until the load is complete on the device too, so the
        receiving thread cannot swap the buffer being read."""
        with self._lock:
            if self._ready_version is None:
                return self.version
            self._load(self._ready)
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()  # copies out of the host buffer have finished
            self.version, self._ready_version = self._ready_version, None
        return self.version

    def _swap_in(self, version: int) -> None:
        """The buffer just received becomes the ready one (the old ready one is received
        into next)."""
        with self._lock:
            self._recv, self._ready = self._ready, self._recv
            self._ready_version = version
        self.received += 1


class WeightReceiver(_StagedWeights):
    """Actor side: a thread receives broadcasts into host staging; :meth:`apply` loads them.

    Args:
        params: the engine's parameters, same layout as the learner's (see _StagedWeights).
        init_method, world_size, rank, timeout_s: the torch.distributed group.
        load: see _StagedWeights.
        backend: the backend this actor's config expects ("": the learner's choice).

    Raises:
        RuntimeError: the learner's plan cannot be honoured here (the reason is in the
            message; the learner gets it too and stops at once).
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        init_method: str,
        world_size: int,
        rank: int,
        timeout_s: float,
        load: LoadFn | None = None,
        backend: str = "",
    ):
        super().__init__(params, version=0, load=load)  # all start equal
        self.group = StatelessGroup(init_method, world_size, rank, timeout_s, expected=backend,
                                    layout=self.layout, numel=self.numel)  # fmt: skip
        plan = self.group.plan
        self.dtype = wire_dtype(plan.dtype)
        self._stage(self.dtype)
        self._bucket = None
        if plan.backend == "nccl":  # one bucket on the GPU; staging stays in host memory
            n = min(plan.bucket_numel, self.numel)
            self._bucket = torch.empty(n, dtype=self.dtype, device=self.group.device)
        self._thread = threading.Thread(target=self._run, name="weight-receiver", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        group, plan = self.group, self.group.plan
        header = torch.empty(HEADER_BYTES, dtype=torch.uint8, device=group.device)
        nbytes = self.numel * self._recv.element_size()
        try:
            while True:
                group.broadcast(header)
                msg = unpack_header(header)
                if msg.version == STOP_VERSION:
                    break
                if msg.layout_hash != self.layout or msg.num_bytes != nbytes:
                    # the plan was checked at the rendezvous, so this is a corrupt header:
                    # nothing can say how much follows, and the group cannot stay in step
                    raise ProtocolError(
                        f"weights v{msg.version}: layout {msg.layout_hash}, "
                        f"{msg.num_bytes} bytes; expected {self.layout}, {nbytes}"
                    )
                for start, end in plan.buckets():
                    if self._bucket is None:
                        group.broadcast(self._recv[start:end])
                    else:
                        part = self._bucket[: end - start]
                        group.broadcast(part)  # returns once the bucket is on this GPU
                        self._recv[start:end].copy_(part)
                self._swap_in(msg.version)
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
        self._stage(torch.float32)  # the publisher sends float32
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
    source: WeightSource, params: list[torch.Tensor], load: LoadFn | None = None
) -> WeightReceiver | ZmqWeightReceiver:
    """The receiver that ``source`` names, staging into ``params``' layout (see _StagedWeights).

    Raises:
        ValueError: unknown source kind.
        RuntimeError: the group rendezvous failed, or this process cannot honour the
            learner's plan (WeightReceiver).
    """
    if source.kind == "group":
        return WeightReceiver(params, source.init_method, source.world_size, source.rank,
                              source.timeout_s, load=load, backend=source.backend)  # fmt: skip
    if source.kind == "zmq":
        keys = Path(source.curve_dir) if source.curve_dir else None
        return ZmqWeightReceiver(params, source.endpoint, client_setup(keys), load=load)
    raise ValueError(f"unknown weight source kind {source.kind!r}")
