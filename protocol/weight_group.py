"""The weight group's rendezvous: the learner's transport plan, each receiver's answer, and
a broadcast that blocks until the data is really there.

The group is *stateless*: a process group built directly on its own TCPStore, not
torch.distributed's default group, which belongs to the learner's own ranks (DeepSpeed
data parallelism); the learner-to-actors group is a second, separate world, as TRL,
OpenRLHF and prime-rl build theirs for their vLLM weight sync.

Before any process group exists, rank 0 (the learner) writes its :class:`WeightPlan` (the
backend, the wire dtype, the bucket size and the parameter layout) into the store, and
every receiver reads it, checks that it can honour it and writes back "ok" or the reason
it cannot. A receiver that cannot (told gloo by its config while the learner sends NCCL,
NCCL without a GPU, another model) raises at once, and so does the learner on reading
the refusal: a clear error in seconds instead of two processes waiting in two different
backends' rendezvous until the weight-sync timeout.

Receives block the receiving thread until the data is in place: gloo's wait already
does; for NCCL, whose wait only orders the current CUDA stream, the collective runs on a
dedicated stream that is then synchronized (and TORCH_NCCL_BLOCKING_WAIT makes a hung
collective raise at the group's timeout rather than NCCL's 10-minute default).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

PLAN_KEY = "dashrl/weight_plan"
ACK_KEY = "dashrl/weight_ack/{rank}"
OK = "ok"


@dataclass(frozen=True)
class WeightPlan:
    """What the learner sends and how, decided by the learner alone.

    Attributes:
        backend: "gloo" (host tensors) or "nccl" (CUDA tensors).
        dtype: the wire dtype's torch name ("float32", "bfloat16").
        bucket_numel: elements per broadcast (the last bucket may be shorter).
        layout_hash: hash of the parameters' shapes and dtypes (protocol/weights.py).
        numel: parameter values in one version.
    """

    backend: str
    dtype: str
    bucket_numel: int
    layout_hash: str
    numel: int

    def buckets(self) -> list[tuple[int, int]]:
        """[(start, end)] element ranges of the buckets, in order."""
        step = max(1, self.bucket_numel)
        return [(s, min(s + step, self.numel)) for s in range(0, self.numel, step)]


def refusal(plan: WeightPlan, expected_backend: str, layout: str, numel: int) -> str | None:
    """Why a receiver cannot take ``plan`` (one sentence), or None when it can.

    Args:
        expected_backend: what this receiver's config says ("" or "auto": whatever the
            learner chose).
        layout, numel: the receiver's own parameter layout hash and size.
    """
    if expected_backend not in ("", "auto") and expected_backend != plan.backend:
        return (f"the learner sends weights over {plan.backend} but this receiver was started "
                f"for {expected_backend} (transport.weight_backend differs between the two "
                "configs: start both from the same config.json)")  # fmt: skip
    if plan.backend == "nccl" and not torch.cuda.is_available():
        return ("the learner sends weights over nccl, which needs a GPU in every receiver, and "
                "this process sees none: use --transport.weight-backend gloo")  # fmt: skip
    if plan.backend not in ("gloo", "nccl"):
        return f"unknown weight backend {plan.backend!r} in the learner's plan"
    if plan.layout_hash != layout or plan.numel != numel:
        return (
            f"the learner's model has another parameter layout ({plan.numel} values, "
            f"{plan.layout_hash}) than this receiver's ({numel}, {layout}): same model?"
        )
    return None


class StatelessGroup:
    """A broadcast-only process group on its own TCPStore, set up by the plan handshake.

    Rank 0 passes ``plan``; every other rank passes ``expected`` (its config's backend)
    and its own ``layout`` / ``numel`` and gets the learner's plan as ``self.plan``.

    Args:
        init_method: "tcp://HOST:PORT"; rank 0 hosts the store there.
        world_size, rank: this group's size and this process's rank in it.
        timeout_s: rendezvous and collective timeout, in seconds.

    Raises:
        ValueError: init_method is not tcp://HOST:PORT.
        RuntimeError: a receiver refused the plan (on the receiver and on rank 0, with the
            reason), or the handshake timed out.
        DistNetworkError: the store's rendezvous failed.
    """

    def __init__(
        self,
        init_method: str,
        world_size: int,
        rank: int,
        timeout_s: float,
        plan: WeightPlan | None = None,
        expected: str = "",
        layout: str = "",
        numel: int = 0,
    ):
        if not init_method.startswith("tcp://") or ":" not in init_method[6:]:
            raise ValueError(f"init_method must be tcp://HOST:PORT, got {init_method!r}")
        host, port = init_method[6:].rsplit(":", 1)
        timeout = timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(host, int(port), world_size, is_master=rank == 0,
                                   timeout=timeout)  # fmt: skip
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        if rank == 0:
            if plan is None:
                raise ValueError("rank 0 of the weight group must pass its plan")
            self.store.set(PLAN_KEY, json.dumps(asdict(plan)))
            self._wait_for_answers()
        else:
            plan = WeightPlan(**json.loads(self.store.get(PLAN_KEY)))
            why = refusal(plan, expected, layout, numel)
            self.store.set(ACK_KEY.format(rank=rank), OK if why is None else f"refused: {why}")
            if why is not None:
                raise RuntimeError(f"weight group: {why}")
        self.plan = plan
        self.backend = plan.backend
        self.device = torch.device("cpu")
        prefixed = dist.PrefixStore("pg", self.store)  # apart from the handshake's keys
        if plan.backend == "nccl":
            # wait() then blocks the CPU and raises at the group's own timeout
            os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.device = torch.device("cuda", torch.cuda.current_device())
            self.pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, opts)
            self._stream = torch.cuda.Stream(self.device)
        else:
            self.pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)

    def _wait_for_answers(self) -> None:
        """Rank 0: every receiver's answer, raising at the first refusal (in seconds)."""
        pending = {r: ACK_KEY.format(rank=r) for r in range(1, self.world_size)}
        deadline = time.monotonic() + self.timeout_s
        while pending:
            for r, key in list(pending.items()):
                if self.store.check([key]):
                    answer = self.store.get(key).decode()
                    if answer != OK:
                        raise RuntimeError(f"weight group: receiver rank {r} {answer}")
                    del pending[r]
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"weight group: no answer from ranks {sorted(pending)} in "
                                   f"{self.timeout_s:.0f} s")  # fmt: skip
            if pending:
                time.sleep(0.05)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """In-place broadcast of ``tensor`` from rank ``src``; returns once it is complete
        on this rank (the data is in ``tensor``, not merely enqueued)."""
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        if self.backend != "nccl":
            self.pg.broadcast([tensor], opts).wait()
            return
        # the tensor was written on the current stream: the collective's stream waits for
        # it; then the CPU waits for the collective
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            self.pg.broadcast([tensor], opts).wait()
        self._stream.synchronize()

    def close(self) -> None:
        """Release the group (NCCL communicators are aborted; gloo needs nothing)."""
        shutdown = getattr(self.pg, "shutdown", None)
        if shutdown is not None:
            try:
                shutdown()
            except RuntimeError:
                pass
