"""Weight broadcast from the learner (rank 0) to the actors over torch.distributed.

Each update is a fixed-size header tensor holding an encoded
:class:`~dashrl.protocol.WeightsVersion` frame, then the parameters in
``model.parameters()`` order (tied weights appear once, so SmolLM2's tied embedding/LM
head stays tied on the receiving side), flattened, cast to the wire dtype and cut into
buckets of at most ``transport.weight_bucket_mb``. The backend (gloo over host memory, or
NCCL between GPUs of their own), the dtype and the bucket size are the learner's
decision, shipped to every receiver at the rendezvous (protocol/weight_group.py).

Memory. The learner keeps one host copy of the weights in the wire dtype (gloo sends
from it; the ZeroMQ publisher reads it); with NCCL it also holds one bucket on its GPU.
A receiver stages each version in two host buffers (one being received, one ready to
load), and with NCCL one bucket on its GPU: besides its model an actor's GPU holds at
most one bucket plus, while a version loads, one parameter tensor at a time.

Receivers (protocol/receivers.py) never make the learner wait for a generation to
finish: each actor runs a thread that sits in the broadcast and stages every version; the
actor's loop applies the newest staged weights between generate calls (so one generate
call never mixes two versions, and each rollout is stamped with exactly the version that
produced it).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from dashrl.protocol import ProtocolError, WeightsVersion, decode, encode
from dashrl.protocol.weight_group import StatelessGroup, WeightPlan

log = logging.getLogger("dashrl.weights")

HEADER_BYTES = 1024
STOP_VERSION = -1


def layout_hash(params: list[torch.Tensor]) -> str:
    """Hash of the shapes and dtypes of ``params`` in order; equal layouts give equal hashes."""
    h = hashlib.sha256()
    for p in params:
        h.update(f"{tuple(p.shape)}:{p.dtype};".encode())
    return h.hexdigest()[:32]


def dtype_name(dtype: torch.dtype) -> str:
    """ "float32" for torch.float32 (the wire's spelling of a dtype)."""
    return str(dtype).removeprefix("torch.")


def wire_dtype(name: str) -> torch.dtype:
    """The torch dtype of a wire dtype name.

    Raises:
        ProtocolError: not float32, bfloat16 or float16.
    """
    if name not in ("float32", "bfloat16", "float16"):
        raise ProtocolError(f"weights in dtype {name!r}: expected float32, bfloat16 or float16")
    return getattr(torch, name)


def fill_buckets(tensors: Iterable[torch.Tensor], buf: torch.Tensor) -> Iterator[int]:
    """Copy ``tensors``, flattened and concatenated, into ``buf`` (1-D, any dtype: values
    are cast) a bucket at a time; yields the number of values in ``buf`` each time it is
    full, and once more for the last partial bucket. A tensor may straddle two buckets.
    The caller must use ``buf`` before resuming the iteration."""
    cap, fill = buf.numel(), 0
    with torch.no_grad():
        for t in tensors:
            flat, i = t.detach().reshape(-1), 0
            while i < flat.numel():
                k = min(cap - fill, flat.numel() - i)
                buf[fill : fill + k].copy_(flat[i : i + k])
                fill, i = fill + k, i + k
                if fill == cap:
                    yield fill
                    fill = 0
    if fill:
        yield fill


def _pack_header(msg: WeightsVersion) -> torch.Tensor:
    frame = encode(msg)
    if len(frame) + 4 > HEADER_BYTES:
        raise ValueError(f"weights header of {len(frame)} bytes does not fit {HEADER_BYTES}")
    buf = bytearray(HEADER_BYTES)
    buf[:4] = len(frame).to_bytes(4, "little")
    buf[4 : 4 + len(frame)] = frame
    return torch.frombuffer(buf, dtype=torch.uint8).clone()


def unpack_header(t: torch.Tensor) -> WeightsVersion:
    """The WeightsVersion frame in a header tensor.

    Raises:
        ProtocolError: a length out of range or a frame that does not decode.
    """
    raw = bytes(t.cpu().numpy().tobytes())
    n = int.from_bytes(raw[:4], "little")
    if not 0 < n <= HEADER_BYTES - 4:
        raise ProtocolError(f"weights header length {n} out of range")
    return decode(raw[4 : 4 + n], expect=WeightsVersion)


class WeightSender:
    """Rank 0: broadcasts the learner's parameters after every optimizer step.

    Args:
        params: the learner model's parameters (``list(model.parameters())``, or meta
            tensors of their shapes for a sharded backend).
        init_method: torch.distributed rendezvous, e.g. "tcp://127.0.0.1:29500".
        world_size: 1 + number of actors. Blocks until every actor has joined and
            accepted the plan.
        timeout_s: timeout of the rendezvous and of one collective, in seconds.
        backend: "gloo", "nccl" or "zmq" (no group: the publisher serves every actor).
        dtype: the wire dtype (values are cast to it).
        bucket_bytes: most bytes one broadcast carries.

    Raises:
        RuntimeError: a receiver refused the plan (its reason is in the message).
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        init_method: str,
        world_size: int,
        timeout_s: float,
        backend: str = "gloo",
        dtype: torch.dtype = torch.float32,
        bucket_bytes: int = 256 << 20,
    ):
        self.params = params
        self.layout = layout_hash(params)
        self.world_size, self.dtype = world_size, dtype
        self.numel = sum(p.numel() for p in params)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        self.plan = WeightPlan(backend, dtype_name(dtype), max(1, bucket_bytes // itemsize),
                               self.layout, self.numel)  # fmt: skip
        # the host copy in the wire dtype: gloo's send buffer, the publisher's source
        self.flat = torch.empty(self.numel, dtype=dtype)
        self.group: StatelessGroup | None = None
        self._bucket: torch.Tensor | None = None
        if backend != "zmq" and world_size > 1:
            self.group = StatelessGroup(init_method, world_size, 0, timeout_s, plan=self.plan)
            if backend == "nccl":
                n = min(self.plan.bucket_numel, self.numel)
                self._bucket = torch.empty(n, dtype=dtype, device=self.group.device)
        self.broken = False

    @property
    def publishes_only(self) -> bool:
        """True when no group carries the weights (weight backend zmq): the ZeroMQ
        publisher must send every version."""
        return self.group is None

    def send(self, version: int, tensors: Iterable[torch.Tensor] | None = None) -> float:
        """Broadcast the parameters as ``version``; returns the seconds it took.

        Args:
            version: the policy version to announce.
            tensors: the full parameters in order, possibly produced one at a time (a ZeRO-3
                backend gathers each only while it is copied); default: the ``params``
                given at construction.

        Raises:
            ValueError: ``tensors`` hold another number of values than the layout.
        """
        t0 = time.perf_counter()
        tensors = self.params if tensors is None else tensors
        group = None if self.broken else self.group
        if group is not None:
            header = WeightsVersion(version, self.numel * self.flat.element_size(),
                                    self.plan.dtype, self.layout, time.time())  # fmt: skip
        try:
            if group is not None and self._bucket is not None:  # NCCL: GPU buckets
                group.broadcast(_pack_header(header).to(group.device))
                offset = 0
                for n in fill_buckets(tensors, self._bucket):
                    group.broadcast(self._bucket[:n])
                    self.flat[offset : offset + n].copy_(self._bucket[:n])
                    offset += n
            else:
                offset = sum(n for n in fill_buckets(tensors, self.flat))
            if offset != self.numel:
                raise ValueError(f"sent {offset} parameter values, the layout has {self.numel}")
            if group is not None and self._bucket is None:  # gloo: host buckets
                group.broadcast(_pack_header(header))
                for start, end in self.plan.buckets():
                    group.broadcast(self.flat[start:end])
        except (RuntimeError, dist.DistError) as e:  # a launch-time actor died: its peers
            self.broken = True  # and restarts get weights from the publisher from now on
            log.error("weight group broken (%s): later versions go out over ZeroMQ only", e)
        return time.perf_counter() - t0

    def close(self) -> None:
        """Tell receivers to stop, then leave the process group."""
        if self.group is None:
            return
        if self.broken:
            self.group.close()
            return
        try:
            stop = _pack_header(WeightsVersion(STOP_VERSION, 0, self.plan.dtype, self.layout))
            self.group.broadcast(stop.to(self.group.device))
        finally:
            self.group.close()


LoadFn = Callable[[torch.Tensor], None]
"""Loads one flat host buffer (learner parameter order, the wire dtype) into an engine."""


@dataclass
class WeightSource:
    """Where an actor's weights come from; plain data, so it crosses into a vLLM worker.

    Attributes:
        kind: "group" (the launch-time stateless process group) or "zmq" (the learner's
            ZeroMQ weight publisher, for attached nodes, restarts and weight backend zmq).
        init_method, world_size, rank, timeout_s: the group's rendezvous ("group" only).
        backend: the group backend this actor's config expects ("" or "auto": the
            learner's choice); a different one from the learner's is refused at once.
        endpoint, curve_dir: the publisher's address and the job's CurveZMQ key folder
            ("zmq" only; curve_dir None on the loopback).
    """

    kind: Literal["group", "zmq"]
    init_method: str = ""
    world_size: int = 0
    rank: int = 0
    timeout_s: float = 120.0
    backend: str = ""
    endpoint: str = ""
    curve_dir: str | None = None
