"""Config files: ``start.py --config FILE.toml [--field value ...]``.

A file holds any subset of the config tree (TOML tables for the sections, or a run's own
config.json, so ``--config runs/X/config.json`` repeats a run); command-line flags then
override it. Keys may be written with ``_`` or ``-``; an unknown key is an error naming
the key and the file. Presets ship under ``configs/``. Also here: how tyro reads the
JSON-valued fields (``--data.task-kwargs '{"allow_negation": true}'``).

Only the standard library, pydantic and tyro are imported, so ``--help`` stays fast.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from dashrl.protocol.config import PORT_FIELDS, Config

__all__ = [
    "json_field_rules",
    "load_config_file",
    "normalise_keys",
    "one_line",
    "split_config_flag",
]


def _flag_prefixes(model: type = Config, prefix: str = "") -> dict[str, str]:
    """Config section model name -> its flag prefix, e.g. {"LearnerConfig": "--learner."}."""
    out = {model.__name__: prefix or "--"}
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and hasattr(sub, "model_fields"):
            out |= _flag_prefixes(sub, f"{prefix or '--'}{name.replace('_', '-')}.")
    return out


_ERROR_HEAD = re.compile(r"\d+ validation errors? for (\w+)")
_ERROR_DETAIL = re.compile(r"\s+(.*?) \[type=[^,\]]*(?:, input_value=(.*?), input_type=\w+)?\]")


def one_line(message: str) -> str:
    """A pydantic validation message as one line naming the flag, e.g.
    ``--learner.lr: Input should be a finite number (got nan)``; other text is joined."""
    lines = [ln for ln in message.splitlines() if ln.strip() and "errors.pydantic" not in ln]
    head = _ERROR_HEAD.match(lines[0]) if lines else None
    if head is None:
        return " ".join(ln.strip() for ln in lines)
    prefix = _flag_prefixes().get(head.group(1), "--")
    parts, field = [], None
    for ln in lines[1:]:
        if not ln.startswith(" "):
            field = ln.strip().replace("_", "-")
        elif (m := _ERROR_DETAIL.match(ln)) and field is not None:
            got = f" (got {m.group(2)})" if m.group(2) is not None else ""
            parts.append(f"{prefix}{field}: {m.group(1)}{got}")
    return "; ".join(parts) or " ".join(ln.strip() for ln in lines)


def normalise_keys(model: type[BaseModel], data: Any) -> Any:
    """``data`` with its keys spelled as ``model``'s field names (``-`` -> ``_``), at every
    level that is a config model (not inside free-form dict fields such as task_kwargs)."""
    if not isinstance(data, dict):
        return data
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        field = model.model_fields.get(name)
        sub = field.annotation if field is not None else None
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            value = normalise_keys(sub, value)
        out[name] = value
    return out


def load_config_file(path: Path) -> Config:
    """The config in ``path`` (.toml, or .json such as a run's config.json), every field it
    leaves out at its default. A run's own config.json comes back as a new run: not
    resuming, ports picked afresh.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unknown suffix, a file that does not parse, or keys or values the
            config refuses (one line naming the file and the key).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(path.read_text())
        elif path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            raise ValueError(f"{path}: a config file is .toml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: does not parse: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a table of config sections")
    data = normalise_keys(Config, data)
    data["resume"] = False
    if isinstance(data.get("transport"), dict):  # a saved run's ports may be taken now
        data["transport"] |= dict.fromkeys(PORT_FIELDS, 0)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ValueError(f"{path}: {one_line(str(e))}") from None


def split_config_flag(argv: list[str]) -> tuple[Path | None, list[str]]:
    """(the ``--config`` file, the other arguments) of a train command line.

    Raises:
        ValueError: ``--config`` without a file, or given twice.
    """
    found: list[Path] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ValueError("--config needs a file: --config FILE.toml")
            found.append(Path(argv[i + 1]))
            i += 1
        elif arg.startswith("--config="):
            found.append(Path(arg.split("=", 1)[1]))
        else:
            rest.append(arg)
        i += 1
    if len(found) > 1:
        raise ValueError("--config given more than once")
    return (found[0] if found else None), rest


def json_field_rules():
    """A tyro constructor registry under which ``dict[str, Any]`` fields (free-form
    keyword arguments such as data.task_kwargs) are one JSON argument, not one flag per key
    of their default."""
    from tyro.constructors import ConstructorRegistry, PrimitiveConstructorSpec

    registry = ConstructorRegistry()

    def from_json(args: list[str]) -> dict[str, Any]:
        try:
            value = json.loads(args[0])
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON ({e}): {args[0]!r}") from None
        if not isinstance(value, dict):
            raise ValueError(f"expected a JSON object, got {args[0]!r}")
        return value

    @registry.primitive_rule
    def _json_dict(info) -> PrimitiveConstructorSpec | None:
        if info.type != dict[str, Any]:
            return None
        return PrimitiveConstructorSpec(
            nargs=1,
            metavar="JSON",
            instance_from_str=from_json,
            is_instance=lambda x: isinstance(x, dict),
            str_from_instance=lambda x: [json.dumps(x)],
        )

    return registry
