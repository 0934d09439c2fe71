"""dashrl's command line: one tyro parser with a subcommand per entry point.

    start.py [train] [--field value ...]     a training run (the default subcommand)
    start.py --resume RUN_DIR [--field ...]  continue a run from its newest checkpoint
    start.py --config FILE.toml [--field ...] a run from a config file (configs/), flags over it
    start.py eval | replay | attach | keys | sweep   see each one's --help

Each subcommand's arguments are a typed model (``Config`` for train, launch/commands.py
for the others), so ``--help`` shows every field with its docstring. Parsing imports
nothing heavy; a subcommand's module (which imports torch) is imported only once its
arguments have parsed, so ``--help`` stays fast. An expected error (a bad name, file,
address or value) is printed as one ``error: ...`` line with exit status 2.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Union

import tyro

from dashrl.launch.commands import (
    AttachCommand,
    EvalCommand,
    KeysCommand,
    ReplayCommand,
    SweepCommand,
)
from dashrl.launch.config_file import (
    json_field_rules,
    load_config_file,
    one_line,
    split_config_flag,
)
from dashrl.protocol.config import PORT_FIELDS, Config, load_config
from dashrl.protocol.runtime import setup_logging

TRAIN = "train"
SUBCOMMANDS: dict[str, tuple[type, str, str]] = {
    TRAIN: (Config, "dashrl.launch.train", "run"),
    "eval": (EvalCommand, "dashrl.launch.eval_command", "run_eval"),
    "replay": (ReplayCommand, "dashrl.launch.replay", "run_replay_command"),
    "attach": (AttachCommand, "dashrl.launch.attach", "attach"),
    "keys": (KeysCommand, "dashrl.launch.keys", "keys_command"),
    "sweep": (SweepCommand, "dashrl.launch.sweep", "sweep_command"),
}
"""Subcommand -> (argument model, module, function called with the parsed arguments)."""

EXPECTED_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, TimeoutError)
"""Errors a user can cause with a wrong argument: printed in one line, no traceback."""

_TYRO = (tyro.conf.FlagConversionOff,)  # train's booleans as --flag True|False (config.json)


def _command_type() -> Any:
    """The union of every subcommand's model (built at run time from SUBCOMMANDS). Train
    and eval take booleans as ``--flag True|False`` (as written in config.json); replay,
    attach and keys as plain ``--flag`` switches."""
    options = []
    for name, (model, _, _) in SUBCOMMANDS.items():
        default = Config() if name == TRAIN else None
        marks = [tyro.conf.FlagConversionOff] if name in (TRAIN, "eval") else []
        options.append(Annotated[model, tyro.conf.subcommand(name, default=default), *marks])
    return Union[tuple(options)]  # noqa: UP007  (a union built at run time)


def resume_config(run_dir: Path) -> Config:
    """The saved config of ``run_dir`` marked for resuming, with fresh ports.

    Raises:
        FileNotFoundError: no config.json there.
    """
    path = run_dir / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: nothing to resume")
    cfg = load_config(path)
    ports = dict.fromkeys(PORT_FIELDS, 0)
    return cfg.model_copy(update={"resume": True, "run_dir": run_dir.resolve(),
                                  "transport": cfg.transport.model_copy(update=ports)})  # fmt: skip


@contextlib.contextmanager
def _one_line_value_errors():
    """Turn tyro's multi-line box for a value a model refuses into a ValueError of one line
    (main prints it as ``error: ...``). Uses tyro's parse-error hook where this tyro has
    it; without it, tyro's own box is printed."""
    try:
        from tyro._errors import InstantiationFailure, on_parse_error
    except ImportError:  # a tyro without the hook
        yield
        return

    def hook(event: object) -> None:
        if isinstance(event, InstantiationFailure):
            raise ValueError(one_line(event.message))

    with on_parse_error(hook):
        yield


def parse(argv: list[str]) -> Any:
    """The parsed subcommand model for ``argv`` (without the program name).

    A first argument that is no subcommand means train, so ``start.py --learner.steps 4``
    works as it always has; ``--resume RUN_DIR`` parses the overrides on top of the run's
    saved config, ``--config FILE`` on top of a config file (launch/config_file.py).

    Raises:
        SystemExit: ``--help``, or arguments tyro rejects (it prints why).
        ValueError: a value a config model refuses (its message is one line).
        FileNotFoundError: ``--resume`` of a directory without config.json, or a missing
            ``--config`` file.
    """
    if argv[:1] == ["--resume"]:
        if len(argv) < 2:
            raise ValueError("usage: start.py --resume RUN_DIR [--field value ...]")
        default = resume_config(Path(argv[1]))
        with _one_line_value_errors(), json_field_rules():
            return tyro.cli(Config, default=default, args=argv[2:], config=_TYRO,
                            prog="start.py --resume RUN_DIR")  # fmt: skip
    if not argv or argv[0] not in SUBCOMMANDS:  # start.py --help: train's fields
        argv = [TRAIN, *argv]
    if argv[0] == TRAIN:  # --config FILE: the file's values, then the flags over them
        path, rest = split_config_flag(argv[1:])
        if path is not None:
            default = load_config_file(path)
            with _one_line_value_errors(), json_field_rules():
                return tyro.cli(Config, default=default, args=rest, config=_TYRO,
                                prog=f"start.py --config {path}")  # fmt: skip
    with _one_line_value_errors(), json_field_rules():
        return tyro.cli(_command_type(), args=argv, prog="start.py")


def handler(cmd: Any) -> tuple[str, Callable[[Any], Any]]:
    """(subcommand name, its function) for a parsed model."""
    for name, (model, module, fn) in SUBCOMMANDS.items():
        if type(cmd) is model:
            return name, getattr(importlib.import_module(module), fn)
    raise TypeError(f"not a subcommand model: {type(cmd).__name__}")


def main(argv: list[str] | None = None) -> None:
    """Parse, run the subcommand, and turn its result into the exit status: a replay whose
    metrics differ from the original exits 1."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        cmd = parse(argv)
        name, fn = handler(cmd)
        setup_logging(name if name != TRAIN else "launch")
        result = fn(cmd)
    except EXPECTED_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if name == "replay" and result is not None and not result["identical"]:
        sys.exit(1)
    if name == TRAIN and result.get("failure"):  # a role died: say which and why
        f = result["failure"]
        print(f"error: {f['role']} failed (exit code {f['exit_code']}): {f['error']} "
              f"(log: {f['log']})", file=sys.stderr)  # fmt: skip
        sys.exit(1)
    if name in ("attach", "keys"):
        print(result)
    logging.shutdown()
