"""A multi-rank learner's data path: rank 0 fetches, every rank trains on its shard.

Only rank 0 talks to the queue and the actors. Each micro-batch it receives is sent to
the other ranks as one protocol frame (a MicroBatchReply, msgpack; no pickle) over the
learner's default process group, and each rank backprops the samples ``rank::world``;
DeepSpeed averages the gradients across ranks at the accumulation boundary. An empty
frame is the stop signal: rank 0 decides when training ends (step budget, time limit,
SIGTERM) and the other ranks follow.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dashrl.protocol import MicroBatchReply, Sample, decode, encode


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")  # fmt: skip


def share_micro_batch(samples: list[Sample] | None, rank: int) -> list[Sample]:
    """Broadcast rank 0's micro-batch to every rank; returns it on all of them.

    Args:
        samples: rank 0's micro-batch ([] means stop); ignored on other ranks.
        rank: this process's rank in the default group.

    Raises:
        ProtocolError: the frame does not decode (it always should: same code both sides).
    """
    device = _device()
    if rank == 0:
        frame = encode(MicroBatchReply(0, samples or [])) if samples else b""
        n = torch.tensor([len(frame)], dtype=torch.int64, device=device)
    else:
        n = torch.zeros(1, dtype=torch.int64, device=device)
    dist.broadcast(n, src=0)
    if int(n) == 0:
        return []
    if rank == 0:
        buf = torch.frombuffer(bytearray(frame), dtype=torch.uint8).to(device)
    else:
        buf = torch.empty(int(n), dtype=torch.uint8, device=device)
    dist.broadcast(buf, src=0)
    if rank == 0:
        return list(samples or [])
    return decode(bytes(buf.cpu().numpy()), expect=MicroBatchReply).samples


def shard(
    samples: list[Sample], rank: int, world: int, unit: int = 1
) -> tuple[list[Sample], float]:
    """This rank's samples and a loss weight.

    The micro-batch is cut into units of ``unit`` consecutive samples (2 for DPO's
    (chosen, rejected) pairs, which must stay together) dealt round-robin: rank r gets
    units r, r + world, ... with weight 1. When that is empty (fewer units than ranks) it
    gets one unit with weight 0, because every rank must run a backward for the gradient
    all-reduce. Each rank's loss is its shard's mean, and DeepSpeed averages over ranks.
    """
    units = [samples[i : i + unit] for i in range(0, len(samples), unit)]
    mine = [s for u in units[rank::world] for s in u]
    return (mine, 1.0) if mine else (units[0] if units else [], 0.0)


def all_ranks_agree(flag: bool, world: int) -> bool:
    """True iff ``flag`` holds on every learner rank (a step is taken only if all ranks'
    losses are finite; a collective on the default group, on its device)."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())
