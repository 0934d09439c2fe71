"""What every benchmark script shares: the machine header of its JSON and its one table."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name and its bf16 matrix flags (protocol/hardware.py reads them).

    Machines differ between sessions, so every result says which one made it."""
    from dashrl.protocol.hardware import BF16_CPU_FLAGS, cpu_flags

    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                  if ln.startswith("model name")), platform.processor())  # fmt: skip
    bf16 = [f for f in BF16_CPU_FLAGS if f in cpu_flags()]
    return f"{model} ({', '.join(bf16) or 'no bf16 units'})"


def header() -> dict[str, str]:
    """Date and machine, the first fields of every results JSON."""
    machine = f"{platform.machine()} {os.cpu_count()} cores"
    return {"date": time.strftime("%Y-%m-%d"), "machine": machine, "cpu": cpu_model()}


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Print ``rows`` as one right-aligned table; ``columns``: (key, title, format spec)."""
    widths = [max(len(title), 8) + 2 for _, title, _ in columns]
    print("".join(f"{title:>{w}}" for (_, title, _), w in zip(columns, widths, strict=True)))
    for r in rows:
        print(
            "".join(f"{r[k]:>{w}{spec}}" for (k, _, spec), w in zip(columns, widths, strict=True))
        )
