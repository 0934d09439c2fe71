"""What the machine's matrix units can do, read at run time: the learner's and the actors'
compute dtype under ``dtype = "auto"``.

Machines differ between sessions and users (one CPU here had AMX-BF16, the next only
AVX512-BF16, an older one neither), so the dtype is chosen from what the device reports,
never written into a default, and the choice is logged with its reason. Measured on an
AMD EPYC with AVX512-BF16 (one thread, torch 2.13.0+cpu, bench/learner_tokens.py): a
1024^2 bf16 matmul ran 2.4x fp32, SmolLM2-135M forward+backward under bf16 autocast 1.6-2.1x;
on a Xeon with AMX-BF16 the matmul was 7.8x (issue 17). Without either unit, bf16 is
emulated and slower than fp32.
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path
from typing import Any

log = logging.getLogger("dashrl.hardware")

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
"""CPU flags (/proc/cpuinfo) of native bf16 matrix instructions, best first."""


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The flags of the first CPU in ``cpuinfo`` (empty where the file is missing: not Linux)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: str, flags: set[str] | None = None) -> str | None:
    """Why ``device`` has native bf16 matrix math ("amx_bf16", "avx512_bf16", "cuda sm_80"),
    or None when it has none.

    Args:
        device: "cpu" or a CUDA device ("cuda", "cuda:1").
        flags: CPU flags (default: this machine's, from :func:`cpu_flags`).
    """
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
            major, minor = torch.cuda.get_device_capability(device)
            return f"cuda sm_{major}{minor}"
        return None
    flags = cpu_flags() if flags is None else flags
    return next((f for f in BF16_CPU_FLAGS if f in flags), None)


def machine_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name, its core count and its bf16 matrix flags, e.g. ``AMD EPYC,
    2 cores (no bf16 units)``: machines differ between sessions, so every timed result
    says which one made it."""
    try:
        info = cpuinfo.read_text()
    except OSError:
        info = ""
    names = [ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")]
    model = names[0] if names else platform.processor() or "unknown CPU"
    bf16 = [f for f in BF16_CPU_FLAGS if f in cpu_flags(cpuinfo)]
    return f"{model}, {os.cpu_count()} cores ({', '.join(bf16) or 'no bf16 units'})"


def local_device() -> str:
    """ "cuda" when torch sees a GPU, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(setting: str, device: str, role: str, flags: set[str] | None = None) -> Any:
    """The torch dtype a ``dtype`` setting means on ``device``, logged with its reason.

    Args:
        setting: "auto" (bfloat16 where :func:`native_bf16` finds units, else float32),
            or a dtype: "float32", "bfloat16", "float16".
        device: "cpu" or "cuda[:i]".
        role: who asks ("learner", "actor"), for the log line.
        flags: CPU flags (tests pass their own).

    Returns:
        The torch dtype (auto: ``torch.float32`` or ``torch.bfloat16``).

    Raises:
        ValueError: an unknown setting.
    """
    import torch

    if setting not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype {setting!r}: expected auto, float32, bfloat16 or float16")
    if setting != "auto":
        log.info("%s compute dtype %s (set)", role, setting)
        return getattr(torch, setting)
    why = native_bf16(device, flags)
    dtype = torch.bfloat16 if why else torch.float32
    reason = f"native bf16 on {device}: {why}" if why else f"no bf16 matrix units on {device}"
    log.info("%s compute dtype %s (auto: %s)", role, str(dtype).removeprefix("torch."), reason)
    return dtype
