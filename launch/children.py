"""The run's child processes: started in sessions of their own, logged, stopped by pid.

Used by the launcher (queue, learner, actors) and by ``start.py attach`` (a node's actors).
Every child is stopped by its pid, never by name; what a dead child leaves behind in its
process group (a vLLM engine core) is reaped through that pid too.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("dashrl.launch")


DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")  # fmt: skip
"""torch.distributed variables a child must not inherit from whoever started the launcher."""


class Children:
    """The run's child processes, started with their own sessions and stopped by pid."""

    def __init__(self, run_dir: Path):
        self.logs = run_dir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def spawn(
        self,
        role: str,
        module: str,
        *args: str,
        launcher: list[str] | None = None,
        env_extra: dict[str, str] | None = None,
    ) -> subprocess.Popen:
        """Start ``python -m module args`` (or ``python -m <launcher...> module args``, e.g.
        torchrun) in its own session, logging to logs/<role>.log; ``env_extra`` is added to
        its environment."""
        out = (self.logs / f"{role}.log").open("ab")
        env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}  # torchrun sets its own
        env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", **(env_extra or {}))
        # A session of its own: a terminal Ctrl-C reaches only the launcher, which then
        # stops the learner first (so it checkpoints) and the others after.
        p = subprocess.Popen(
            [sys.executable, "-m", *(launcher or []), module, *args],
            stdout=out,
            stderr=out,
            env=env,
            start_new_session=True,
        )
        self.procs[role] = p
        log.info("started %s (pid %d), log: %s", role, p.pid, out.name)
        return p

    def stop(self, role: str, timeout_s: float = 60.0) -> int | None:
        """SIGTERM the child by pid, wait up to ``timeout_s``, then SIGKILL it."""
        p = self.procs.get(role)
        if p is None:
            return None
        if p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM; killing it", role, p.pid)
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
        reap_group(p.pid)
        return p.returncode

    def stop_all(self) -> None:
        """Stop the learner first (it checkpoints), then the actors, the queue last (so
        actors blocked on a full socket can still hand over their last groups)."""
        order = {"learner": 0, "queue": 2}
        for role in sorted(self.procs, key=lambda r: order.get(r, 1)):
            self.stop(role)

    def failure(self, role: str) -> dict:
        """What a dead child left: {"role", "exit_code", "error" (its log's last error
        line), "log"} (for the launcher's summary and its exit status)."""
        p, path = self.procs.get(role), self.logs / f"{role}.log"
        return {"role": role, "exit_code": None if p is None else p.returncode,
                "error": last_error_line(path), "log": str(path)}  # fmt: skip


def reap_group(pid: int) -> None:
    """SIGKILL what is left of the process group that child ``pid`` led (it was started in
    a session of its own). A vLLM actor's engine-core process outlives an actor that died
    without shutting it down (SIGKILL, a crash) and would hold gigabytes forever."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


_ERROR_LINE = re.compile(r"^(\[rank\d+\]: )?[\w.]*(Error|Exception|Exit|Interrupt)\b.*")


def last_error_line(path: Path, tail_bytes: int = 65536) -> str:
    """The last line of a log that names an exception (``ValueError: ...``), else its last
    non-empty line ("" for a missing or empty log)."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail_bytes))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    lines = [line.strip() for line in lines if line.strip()]
    errors = [line for line in lines if _ERROR_LINE.match(line)]
    return (errors or lines or [""])[-1][:500]
