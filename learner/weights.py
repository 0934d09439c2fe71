"""Weight broadcast from the learner (rank 0) to the actors over torch.distributed.

Each update is two broadcasts: a fixed-size header tensor holding an encoded
:class:`~dashrl.protocol.WeightsVersion` frame, then one flat buffer with every
parameter in ``model.parameters()`` order (tied weights appear once, so SmolLM2's tied
embedding/LM head stays tied on the receiving side). gloo on CPU; the same calls run on
NCCL when the tensors live on a GPU.

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
from datetime import timedelta

import torch
import torch.distributed as dist

from dashrl.protocol import ProtocolError, WeightsVersion, decode, encode

log = logging.getLogger("dashrl.weights")

HEADER_BYTES = 1024
STOP_VERSION = -1


def layout_hash(params: list[torch.Tensor]) -> str:
    """Hash of the shapes and dtypes of ``params`` in order; equal layouts give equal hashes."""
    h = hashlib.sha256()
    for p in params:
        h.update(f"{tuple(p.shape)}:{p.dtype};".encode())
    return h.hexdigest()[:32]


def _init_group(
    init_method: str, world_size: int, rank: int, timeout_s: float, device: torch.device
) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"  # NCCL moves CUDA tensors only
    dist.init_process_group(
        backend,
        init_method=init_method,
        world_size=world_size,
        rank=rank,
        timeout=timedelta(seconds=timeout_s),
    )


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
        _init_group(init_method, world_size, 0, timeout_s, device)
        self.flat = torch.empty(sum(p.numel() for p in params), dtype=torch.float32, device=device)
        self._header_device = device

    def send(self, version: int) -> float:
        """Broadcast the current parameters as ``version``; returns the seconds it took."""
        t0 = time.perf_counter()
        offset = 0
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                self.flat[offset : offset + n].copy_(p.detach().reshape(-1))
                offset += n
        header = WeightsVersion(version, self.flat.numel() * 4, "float32", self.layout, time.time())
        dist.broadcast(_pack_header(header).to(self._header_device), src=0)
        dist.broadcast(self.flat, src=0)
        return time.perf_counter() - t0

    def close(self) -> None:
        """Tell receivers to stop, then leave the process group."""
        try:
            stop = _pack_header(WeightsVersion(STOP_VERSION, 0, "float32", self.layout))
            dist.broadcast(stop.to(self._header_device), 0)
        finally:
            dist.destroy_process_group()


class WeightReceiver:
    """Actor side: a thread receives broadcasts into a staging buffer; :meth:`apply` swaps them in.

    Args:
        params: the engine's parameters, same layout as the learner's.
        init_method, world_size, rank, timeout_s: the torch.distributed group.
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        init_method: str,
        world_size: int,
        rank: int,
        timeout_s: float,
    ):
        self.params = params
        self.layout = layout_hash(params)
        self.numel = sum(p.numel() for p in params)
        self.device = params[0].device
        self._recv = torch.empty(self.numel, dtype=torch.float32, device=self.device)
        self._ready = torch.empty(self.numel, dtype=torch.float32, device=self.device)
        self._ready_version: int | None = None
        self._lock = threading.Lock()
        self.version = 0
        self.received = 0
        self.rejected = 0
        self.error: BaseException | None = None
        self.stopped = threading.Event()
        _init_group(init_method, world_size, rank, timeout_s, self.device)
        self._thread = threading.Thread(target=self._run, name="weight-receiver", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        header = torch.empty(HEADER_BYTES, dtype=torch.uint8, device=self.device)
        try:
            while True:
                dist.broadcast(header, src=0)
                msg = _unpack_header(header)
                if msg.version == STOP_VERSION:
                    break
                ok = msg.layout_hash == self.layout and msg.num_bytes == self.numel * 4
                target = (
                    self._recv
                    if ok
                    else torch.empty(msg.num_bytes // 4, dtype=torch.float32, device=self.device)
                )
                dist.broadcast(target, src=0)  # always receive, to stay in step with rank 0
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

    def apply(self) -> int:
        """Copy the newest received weights into the engine, if any; returns the current version."""
        with self._lock:
            if self._ready_version is None:
                return self.version
            offset = 0
            with torch.no_grad():
                for p in self.params:
                    n = p.numel()
                    p.copy_(self._ready[offset : offset + n].view_as(p))
                    offset += n
            self.version, self._ready_version = self._ready_version, None
        return self.version
