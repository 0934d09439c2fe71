"""Checkpoints and resuming: HF weights plus what a learner needs to continue exactly.

A checkpoint directory holds the full policy in HF format (``save_pretrained``, loadable
by transformers and vLLM), ``dashrl_state.json`` (policy version, step, backend), the
backend's optimizer state (torch ``optimizer.pt`` or DeepSpeed's sharded checkpoint),
``rng.pt`` and, for PPO, ``heads.pt`` (critic/ORM heads and their optimizer).

Resuming (``start.py --resume RUN_DIR``) loads the newest checkpoint and trains again on
the micro-batches the queue log says were served after it (:class:`ResumeQueue`): the
dead learner consumed them but its updates died with it. On CPU this redoes exactly the
lost steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dashrl.protocol import MicroBatchReply, Sample

if TYPE_CHECKING:
    from dashrl.learner.learner import Learner
    from dashrl.queue.client import QueueClient


def save_checkpoint(learner: Learner, out: Path, step: int, full: bool = True) -> Path:
    """Save an HF-format checkpoint (``save_pretrained``) of the full policy with the policy
    version next to it (``dashrl_state.json``), the critic/ORM heads (PPO) in ``heads.pt``,
    and the backend's optimizer state. Every rank must call it (ZeRO-3 gathers); rank 0
    writes the HF files.

    ``full=False`` writes the weights, tokenizer and ``dashrl_state.json`` (marked
    ``"resumable": false``) only: a checkpoint to evaluate, about a third of the bytes
    (AdamW keeps two more copies of the weights); :func:`latest_checkpoint` skips it."""
    out.mkdir(parents=True, exist_ok=True)
    state = learner.backend.full_state_dict()
    if learner.rank == 0:
        learner.model.save_pretrained(out, state_dict=state)
        learner.tokenizer.save_pretrained(out)
    if not full:
        if learner.rank == 0:
            info = {"version": learner.version, "step": step, "backend": learner.backend.name,
                    "resumable": False}  # fmt: skip
            (out / "dashrl_state.json").write_text(json.dumps(info))
        return out
    if learner.rank == 0:
        if learner.heads:
            heads = {k: h.state_dict() for k, h in learner.heads.items()}
            heads["optimizer"] = learner.head_optimizer.state_dict()
            torch.save(heads, out / "heads.pt")
        torch.save(torch.get_rng_state(), out / "rng.pt")
        info = {"version": learner.version, "step": step, "backend": learner.backend.name}
        (out / "dashrl_state.json").write_text(json.dumps(info))
    learner.backend.save_state(out)
    return out


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete, resumable checkpoint of a run (highest saved step), or None;
    weights-only checkpoints (``learner.checkpoint_optimizer=False``) are skipped."""
    best, best_step = None, -1
    for d in (run_dir / "checkpoints").glob("*/dashrl_state.json"):
        try:
            info = json.loads(d.read_text())
            step = int(info["step"])
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            continue  # a checkpoint cut short by a crash
        if info.get("resumable") is False:
            continue
        if step > best_step:
            best, best_step = d.parent, step
    return best


class ResumeQueue:
    """The queue a resumed learner talks to: first the micro-batches its dead predecessor was
    served after the checkpoint (from the queue log, in order; their updates were lost
    with it), then the live queue. So no logged sample is trained on twice or dropped."""

    def __init__(self, logged: list[list[Sample]], live: QueueClient):
        self._logged, self.live = list(logged), live

    @property
    def rejected_replies(self) -> int:
        return self.live.rejected_replies

    def request(
        self, learner_version: int, size: int, unit: str, timeout_s: float = 30.0
    ) -> MicroBatchReply:
        """The next logged micro-batch while any is left, then the live queue's answer."""
        if self._logged:
            return MicroBatchReply(0, self._logged.pop(0), {})
        return self.live.request(learner_version, size, unit, timeout_s)

    def close(self) -> None:
        self.live.close()


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the metrics rows of steps <= ``last_step`` (a resumed run redoes the rest)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]  # fmt: skip
    path.write_text("".join(line + "\n" for line in keep))
