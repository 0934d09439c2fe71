"""What every benchmark script shares: the machine header of its JSON and its one table."""

from __future__ import annotations

import os
import platform
import time


def header() -> dict[str, str]:
    """Date and machine, the first fields of every results JSON."""
    from dashrl.protocol.hardware import machine_name

    machine = f"{platform.machine()} {os.cpu_count()} cores"
    return {"date": time.strftime("%Y-%m-%d"), "machine": machine, "cpu": machine_name()}


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Print ``rows`` as one right-aligned table; ``columns``: (key, title, format spec)."""
    widths = [max(len(title), 8) + 2 for _, title, _ in columns]
    print("".join(f"{title:>{w}}" for (_, title, _), w in zip(columns, widths, strict=True)))
    for r in rows:
        print(
            "".join(f"{r[k]:>{w}{spec}}" for (k, _, spec), w in zip(columns, widths, strict=True))
        )
