"""Checkpoints and resuming: HF weights plus what a learner needs to continue exactly.

A checkpoint directory holds the full policy in HF format (``save_pretrained``, loadable
by transformers and vLLM), ``dashrl_state.json`` (policy version, step, backend), the
backend's optimizer state (torch ``optimizer.pt`` or DeepSpeed's sharded checkpoint),
``rng.pt`` and, for PPO, ``heads.pt`` (critic/ORM heads and their optimizer).

Resuming (``start.py --resume RUN_DIR``) loads the newest checkpoint and trains again on
the micro-batches the queue log says were served after it (learner/sources.py
``ResumeSource``): the dead learner consumed them but its updates died with it. On CPU
this redoes exactly the lost steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dashrl.learner.backend import TorchBackend


def save_checkpoint(
    out: Path,
    step: int,
    version: int,
    backend: TorchBackend,
    tokenizer,
    heads: dict[str, torch.nn.Module],
    head_optimizer: torch.optim.Optimizer | None,
    rank: int = 0,
    full: bool = True,
) -> Path:
    """Save an HF-format checkpoint (``save_pretrained``) of the full policy with the policy
    version next to it (``dashrl_state.json``), the critic/ORM heads (PPO) in ``heads.pt``,
    and the backend's optimizer state. Every rank must call it (ZeRO-3 gathers); rank 0
    writes the HF files.

    ``full=False`` writes the weights, tokenizer and ``dashrl_state.json`` (marked
    ``"resumable": false``) only: a checkpoint to evaluate, about a third of the bytes
    (AdamW keeps two more copies of the weights); :func:`latest_checkpoint` skips it."""
    out.mkdir(parents=True, exist_ok=True)
    state = backend.full_state_dict()
    if rank == 0:
        backend.module.model.save_pretrained(out, state_dict=state)
        tokenizer.save_pretrained(out)
    if not full:
        if rank == 0:
            info = {"version": version, "step": step, "backend": backend.name,
                    "resumable": False}  # fmt: skip
            (out / "dashrl_state.json").write_text(json.dumps(info))
        return out
    if rank == 0:
        if heads:
            saved = {k: h.state_dict() for k, h in heads.items()}
            saved["optimizer"] = head_optimizer.state_dict()
            torch.save(saved, out / "heads.pt")
        torch.save(torch.get_rng_state(), out / "rng.pt")
        info = {"version": version, "step": step, "backend": backend.name}
        (out / "dashrl_state.json").write_text(json.dumps(info))
    backend.save_state(out)
    return out


def load_checkpoint_state(
    ckpt: Path,
    backend: TorchBackend,
    heads: dict[str, torch.nn.Module],
    head_optimizer: torch.optim.Optimizer | None,
) -> tuple[int, int]:
    """Continue from a checkpoint written by :func:`save_checkpoint` (the policy weights
    were loaded from it when the model was built): optimizer state, heads and RNG.

    Returns:
        (policy version, step) it was saved at.

    Raises:
        FileNotFoundError: a part of the checkpoint is missing.
    """
    backend.load_state(ckpt)
    if heads:
        saved = torch.load(ckpt / "heads.pt", weights_only=True)
        for k, h in heads.items():
            h.load_state_dict(saved[k])
        head_optimizer.load_state_dict(saved["optimizer"])
    if (ckpt / "rng.pt").exists():
        torch.set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True))
    info = json.loads((ckpt / "dashrl_state.json").read_text())
    return int(info["version"]), int(info["step"])


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


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the metrics rows of steps <= ``last_step`` (a resumed run redoes the rest)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]  # fmt: skip
    path.write_text("".join(line + "\n" for line in keep))
