"""``start.py keys DIR``: write a CurveZMQ key folder for a job that binds beyond the loopback."""

from __future__ import annotations

from dashrl.launch.commands import KeysCommand
from dashrl.protocol.security import generate_keys


def keys_command(cmd: KeysCommand) -> str:
    """``start.py keys DIR``: write the keys; returns the line telling what to do next.

    Raises:
        FileExistsError: DIR already holds keys.
    """
    out = generate_keys(cmd.out)
    return (f"CurveZMQ keys written to {out}; use --transport.curve-dir {out} "
            "(and copy the folder to attaching nodes)")  # fmt: skip
