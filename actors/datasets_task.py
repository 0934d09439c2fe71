"""Prompts from any Hugging Face ``datasets`` source: a user's file or folder, a saved
dataset, or a name in the local cache (``--data.source datasets``).

Rows are read with ``datasets`` (memory-mapped Arrow, so a large file is not held in
Python objects), shuffled with the run seed, and mapped to :class:`Problem` by the
configured columns: the prompt (a string, or a chat "messages" list), the reference
answer, an optional worked solution; every other column travels in ``Problem.entry`` to
the reward functions. Held-out prompts come from their own split or are cut from the
shuffled training split, and any question that also occurs in training is removed from
the training set. GSM8K (``--data.source gsm8k``) is a preset of this loader.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dashrl.actors.rewards import exact_number, math_verify
from dashrl.actors.tasks import Problem, Task, gold_answer
from dashrl.protocol.config import DataConfig

log = logging.getLogger("dashrl.data")

ROW = "__dashrl_row__"
"""Column added before shuffling: a row's index in its source split (error messages)."""
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
"""File suffix -> the ``datasets`` builder that reads it."""


def _files_builder(folder: Path) -> str | None:
    """The one builder of the data files in ``folder`` (None: no data files)."""
    builders = {FORMATS[p.suffix] for p in folder.iterdir() if p.suffix in FORMATS}
    if len(builders) > 1:
        raise ValueError(f"{folder}: data files of several formats ({sorted(builders)})")
    return builders.pop() if builders else None


def load_splits(path: str) -> dict[str, Any]:
    """{split name: datasets.Dataset} of a file, a folder, a saved dataset or a cached name.

    Raises:
        FileNotFoundError: a path-like ``path`` that does not exist.
        ValueError: a file of an unknown format, a folder without data files, or a name
            ``datasets`` cannot resolve (offline: not in the local cache).
    """
    try:
        return _load_splits(path)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as e:  # datasets' own errors (a malformed line, a cast failure)
        cause = e.__cause__ or e
        raise ValueError(f"{path}: could not be read: {type(cause).__name__}: {cause}") from None


def _load_splits(path: str) -> dict[str, Any]:
    import datasets

    datasets.disable_progress_bars()  # one bar per split and process floods the role logs
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix not in FORMATS:
            raise ValueError(f"{p}: unknown data file format (known: {', '.join(FORMATS)})")
        d = datasets.load_dataset(FORMATS[p.suffix], data_files=str(p), split=None)
        return dict(d)
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists():
            d = datasets.load_from_disk(str(p))
            return dict(d) if isinstance(d, datasets.DatasetDict) else {"train": d}
        builder = _files_builder(p)
        if builder is None:
            raise ValueError(f"{p}: no .jsonl, .json, .csv or .parquet files in this folder")
        return dict(datasets.load_dataset(builder, data_dir=str(p)))
    if p.suffix in FORMATS or path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"data file not found: {p}")
    try:  # a dataset name: datasets resolves it (its cache when there is no network)
        return dict(datasets.load_dataset(path))
    except Exception as e:
        raise ValueError(f"dataset {path!r} could not be loaded: {e}") from None


def _question(cfg: DataConfig, row: dict[str, Any], where: str) -> tuple[str, str | None]:
    """(user message, system message or None) of a row, template applied."""
    value, system = row.get(cfg.prompt_field), None
    if isinstance(value, list):  # chat format: an optional system turn, then one user turn
        turns = [t for t in value if isinstance(t, dict)]
        roles = [t.get("role") for t in turns]
        if len(turns) != len(value) or roles not in (["user"], ["system", "user"]):
            raise ValueError(f"{where}: {cfg.prompt_field!r} must be a system turn and one user "
                             f"turn, or one user turn (got roles {roles})")  # fmt: skip
        system = turns[0]["content"] if roles[0] == "system" else None
        value = turns[-1].get("content")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: empty or non-text prompt in column {cfg.prompt_field!r}")
    if cfg.prompt_template is not None:
        try:
            value = cfg.prompt_template.format(**{**row, "prompt": value})
        except (KeyError, IndexError, ValueError) as e:
            cols = ", ".join(row)
            raise ValueError(f"{where}: --data.prompt-template: {e!r} (columns: {cols}; "
                             "literal braces are doubled)") from None  # fmt: skip
    return value, system


class DatasetTask(Task):
    """Problems from a ``datasets`` source, mapped by the configured columns.

    Args:
        cfg: the data config (path, split, held-out split or fraction, columns, template).
        seed: the run seed (shuffles the rows).
        path: overrides ``cfg.path`` (the GSM8K preset passes its folder).
        name: the task's name in ids and metrics (default: the file or folder name).

    Raises:
        ValueError: no path, a missing split or column, a malformed row (names its index),
            an empty split, or nothing left to train on.
        FileNotFoundError: the path does not exist.
    """

    source = "datasets"

    def __init__(self, cfg: DataConfig, seed: int, path: str | None = None, name: str = ""):
        super().__init__()
        path = path or cfg.path
        if not path:
            raise ValueError("--data.source datasets needs --data.path (a file, folder or name)")
        self.name = name or Path(path).stem or str(path)
        self.cfg, self.seed = cfg, seed
        splits = load_splits(str(path))
        train = self._split(splits, cfg.split, path)
        if cfg.heldout_split is not None:
            held = self._split(splits, cfg.heldout_split, path)
            n_held = min(cfg.heldout_size, len(held))
        else:  # cut from the shuffled training split: the first rows are held out
            n_held = round(cfg.heldout_fraction * len(train)) or cfg.heldout_size
            n_held = min(n_held, cfg.heldout_size, len(train) - 1)
            held, train = train.select(range(n_held)), train.select(range(n_held, len(train)))
        self.heldout = self._problems(held.select(range(n_held)), "heldout")
        self.train = self._problems(train.select(range(min(cfg.train_size, len(train)))), "train")
        self._dedupe()
        log.info("%s: %d training and %d held-out prompts from %s", self.name, len(self.train),
                 len(self.heldout), path)  # fmt: skip

    def _split(self, splits: dict[str, Any], split: str, path: str):
        if split not in splits:
            raise ValueError(f"{path}: no split {split!r} (it has: {', '.join(splits)})")
        d = splits[split]
        if len(d) == 0:
            raise ValueError(f"{path}: split {split!r} is empty")
        for col in (self.cfg.prompt_field, self.cfg.answer_field, self.cfg.solution_field):
            if col is not None and col not in d.column_names:
                raise ValueError(f"{path}: split {split!r} has no column {col!r} (columns: "
                                 f"{', '.join(d.column_names)})")  # fmt: skip
        return d.add_column(ROW, list(range(len(d)))).shuffle(seed=self.seed)

    def _problems(self, rows, split: str) -> list[Problem]:
        cfg, out = self.cfg, []
        for i, row in enumerate(rows):
            row = dict(row)
            where = f"{self.name}: {split} split, row {row.pop(ROW)} of the source"
            question, system = _question(cfg, row, where)
            answer = "" if cfg.answer_field is None else row[cfg.answer_field]
            if answer is None or isinstance(answer, (dict, list)):
                raise ValueError(f"{where}: answer column {cfg.answer_field!r} is {answer!r}")
            answer = gold_answer(str(answer))
            solution = "" if cfg.solution_field is None else str(row[cfg.solution_field] or "")
            entry = row
            if system is not None:
                entry["_system"] = system
            out.append(Problem(f"{self.name}/{split}/{i}", question, answer, entry, solution))
        return out

    def score(self, problem: Problem, completion: str) -> float:
        """The default verifier of a dataset: math-verify equivalence of the last
        ``\\boxed{}`` (else the last number) with the answer (1.0 or 0.0)."""
        return math_verify(problem, completion)


class GSM8KTask(DatasetTask):
    """GSM8K word problems (the openai/gsm8k layout: train.jsonl / test.jsonl with
    "question" and "answer" = worked solution ending "#### N"); reward 1 iff the last
    number equals N. A preset of :class:`DatasetTask`."""

    source = "gsm8k"

    def __init__(self, cfg: DataConfig, seed: int):
        folder = Path(cfg.gsm8k_dir)
        for f in ("train.jsonl", "test.jsonl"):
            if not (folder / f).exists():
                raise FileNotFoundError(f"GSM8K file not found: {folder / f} (set data.gsm8k_dir)")
        preset = cfg.model_copy(update={
            "split": "train", "heldout_split": "test", "prompt_field": "question",
            "answer_field": "answer", "solution_field": "answer", "prompt_template": None,
        })  # fmt: skip
        super().__init__(preset, seed, path=str(folder), name="gsm8k")

    def score(self, problem: Problem, completion: str) -> float:
        return exact_number(problem, completion)
