"""Checkpoints and resuming: HF weights plus what a learner needs to continue exactly.

A checkpoint directory holds the full policy in HF format (``save_pretrained``, loadable
by transformers and vLLM), ``dashrl_state.json`` (policy version, step, backend), the
backend's optimizer state (torch ``optimizer.pt`` or DeepSpeed's sharded checkpoint),
``rng.pt`` and, for PPO, ``heads.pt`` (critic/ORM heads and their optimizer).

A checkpoint is written into ``<name>.partial`` and renamed into place only when complete,
with ``manifest.json`` listing every file's size and SHA-256; :func:`verify_checkpoint`
checks them before anything is loaded, so a damaged or half-written checkpoint is one
error line naming the file, never a traceback deep in a loader. Nothing is unpickled
beyond tensors (``weights_only=True`` everywhere, DeepSpeed's states included).

Resuming (``start.py --resume RUN_DIR``) loads the newest checkpoint and trains again on
the micro-batches the queue log says were served after it (learner/sources.py
``ResumeSource``): the dead learner consumed them but its updates died with it. On CPU
this redoes exactly the lost steps.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

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
    final, out = out, out.with_name(out.name + PARTIAL)
    if rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
    _barrier()
    state = backend.full_state_dict()
    if rank == 0:
        backend.module.model.save_pretrained(out, state_dict=state)
        tokenizer.save_pretrained(out)
    if not full:
        if rank == 0:
            info = {"version": version, "step": step, "backend": backend.name,
                    "resumable": False}  # fmt: skip
            (out / "dashrl_state.json").write_text(json.dumps(info))
        return _commit(out, final, rank)
    if rank == 0:
        if heads:
            saved = {k: h.state_dict() for k, h in heads.items()}
            saved["optimizer"] = head_optimizer.state_dict()
            torch.save(saved, out / "heads.pt")
        torch.save(torch.get_rng_state(), out / "rng.pt")
        info = {"version": version, "step": step, "backend": backend.name}
        (out / "dashrl_state.json").write_text(json.dumps(info))
    backend.save_state(out)
    return _commit(out, final, rank)


PARTIAL = ".partial"
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or damaged; the message names the file."""


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _commit(tmp: Path, final: Path, rank: int) -> Path:
    """Every rank has written into ``tmp``: rank 0 writes the manifest, fsyncs, and renames
    ``tmp`` to ``final`` (an older ``final`` is replaced only once the new one is whole)."""
    _barrier()
    if rank == 0:
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                    for p in files}  # fmt: skip
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for p in [*files, tmp / MANIFEST]:
            with p.open("rb") as f:
                os.fsync(f.fileno())
        old = final.with_name(final.name + ".old")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself survives a power cut
        finally:
            os.close(fd)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def verify_checkpoint(ckpt: Path) -> None:
    """Check every file of ``ckpt`` against its manifest (size, then SHA-256).

    Raises:
        CheckpointError: no manifest, or a file missing, truncated or altered (named).
    """
    manifest_path = ckpt / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable or missing ({e})") from None
    for name, want in manifest.items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the manifest lists it)")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, the manifest says {want['bytes']}")
        if _sha256(path) != want["sha256"]:
            raise CheckpointError(f"{path}: contents differ from the manifest (SHA-256)")


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
        if d.parent.name.endswith((PARTIAL, ".old")):
            continue  # not (or no longer) a whole checkpoint
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


def resumable_checkpoint(run_dir: Path) -> Path:
    """The checkpoint ``--resume`` continues from: the newest resumable one, verified.

    Raises:
        CheckpointError: the run has none (a resume never silently starts from the base
            model), or it is damaged (the message names the file).
    """
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(
            f"{run_dir / 'checkpoints'}: no resumable checkpoint, nothing to resume "
            "(start a new run, or save with learner.checkpoint_optimizer True)"
        )
    verify_checkpoint(ckpt)
    return ckpt


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the metrics rows of steps <= ``last_step`` (a resumed run redoes the rest)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]  # fmt: skip
    path.write_text("".join(line + "\n" for line in keep))
