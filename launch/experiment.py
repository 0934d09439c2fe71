"""What an experiment is: the TOML file of named configurations x seeds x a wall-clock
budget, checked against the config tree, and the resolved config of each of its runs.

An experiment is a TOML file (``experiments/NAME.toml``; see experiments/README.md)::

    description = "grpo with and without a KL penalty"
    budget_s = 600            # training seconds per run (the learner's clock)
    seeds = [0, 1]
    [base]                    # config fields every run shares (the config tree's sections)
    data.task = "chain_sum"
    [eval]                    # held-out evaluation of every run's checkpoints
    prompts = 256
    k = 4
    final_k = 32
    [configs.kl_0]            # one table per configuration: fields over base
    learner.kl_coef = 0.0

A configuration may name its ``runner`` (``RUNNERS``): dashrl itself, or TRL's GRPOTrainer
on the same resolved config. A run's fingerprint (its resolved config, the evaluation plan
and the runner) decides whether a recorded run is still valid (launch/sweep.py).
Only pydantic and the standard library are imported (``--help`` stays fast).
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from dashrl.launch.config_file import normalise_keys, one_line
from dashrl.protocol.algorithms import get_algorithm
from dashrl.protocol.config import Config, Strict


class EvalPlan(Strict):
    """How every run of an experiment is evaluated (launch/sweep_eval.py)."""

    prompts: int = Field(256, ge=1)
    """Held-out prompts of the training task (the first N of the run's held-out split;
    data.heldout_size is raised to at least this)."""
    k: int = Field(4, ge=1)
    """Samples per prompt at each evaluated checkpoint but the last (avg@k, maj@k, pass@j)."""
    final_k: int = Field(32, ge=1)
    """Samples per prompt at the last checkpoint (pass@j for j up to it)."""
    at: tuple[float, ...] = (0.25, 1.0)
    """Fractions of the budget at which the latest checkpoint is evaluated (1.0: the final
    weights)."""
    engine: str = Field("vllm", pattern="^(vllm|hf)$")
    """vllm (one engine, checkpoints loaded in place) or hf (tiny test models)."""

    @field_validator("at")
    @classmethod
    def _fractions(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not 0 < f <= 1 for f in v) or list(v) != sorted(set(v)):
            raise ValueError(f"eval.at must be increasing fractions in (0, 1], got {v}")
        return v


class Experiment(Strict):
    """An experiment file: configurations x seeds x a budget, evaluated by one plan."""

    description: str
    """What the experiment asks (printed at the top of its results)."""
    budget_s: float = Field(gt=0)
    """Training seconds per run (the learner's clock, start-up not counted)."""
    seeds: list[int] = Field(min_length=1)
    """Seeds; every configuration runs once per seed."""
    checkpoint_every_s: float | None = Field(None, gt=0)
    """Seconds of training between checkpoints (default: budget_s / 8)."""
    base: dict[str, Any] = {}
    """Config fields shared by every run (sections of the config tree, as in configs/)."""
    configs: dict[str, dict[str, Any]] = Field(min_length=1)
    """Configuration name -> its fields over base."""
    eval: EvalPlan = EvalPlan()
    """The evaluation of every run."""
    clock: Literal["train", "launch"] = "train"
    """The report's time axis: training seconds, or seconds since launch (start-up
    counted: the clock of a time-to-reward comparison between systems)."""
    targets: list[float] = []
    """Held-out reward levels: the report gives the seconds to reach each (interpolated
    between evaluated checkpoints, the base model at 0 s)."""
    baselines: list[str] = []
    """Configurations every other one's time to each target is compared with (speed-up,
    paired by seed)."""
    comparisons: list[tuple[str, str]] = []
    """Pairs [a, b] of configurations: the report gives a - b paired by seed (final avg@k,
    maj@k, pass@k, early reward, entropy, steps) with its interval, the form in which a
    claim such as "a beats b" is tested (launch/sweep_pairs.py)."""

    @model_validator(mode="after")
    def _known_baselines(self) -> Experiment:
        unknown = [b for b in self.baselines if b not in self.configs]
        if unknown:
            raise ValueError(f"baselines {unknown} are not configurations "
                             f"({sorted(self.configs)})")  # fmt: skip
        unknown = [c for pair in self.comparisons for c in pair if c not in self.configs]
        if unknown:
            raise ValueError(f"comparisons name {unknown}, which are not configurations "
                             f"({sorted(self.configs)})")  # fmt: skip
        for name, fields in self.configs.items():
            if fields.get("runner", "dashrl") not in RUNNERS:
                raise ValueError(f"configs.{name}.runner must be one of {sorted(RUNNERS)}, "
                                 f"got {fields['runner']!r}")  # fmt: skip
        return self


RUNNERS = {"dashrl": ["launch", "start.py"], "trl": ["bench", "trl_grpo.py"]}
"""A configuration's ``runner`` key -> the script (under the repo) that trains it from the
resolved config (``SCRIPT --config FILE``): dashrl itself, or TRL's GRPOTrainer with the
same model, data, sampler and hyper-parameters (bench/trl_grpo.py), writing the same
metrics.jsonl and checkpoints so that both are evaluated and timed alike."""


def runner_of(exp: Experiment, name: str) -> str:
    """The runner of configuration ``name`` (default "dashrl")."""
    return exp.configs[name].get("runner", "dashrl")


def _nulls(d: Any) -> Any:
    """TOML has no null: the string "None" in an experiment file means None (e.g.
    ``queue.filter_threshold = "None"``, no gradient filter)."""
    if isinstance(d, dict):
        return {k: _nulls(v) for k, v in d.items()}
    return None if d == "None" else d


def _merge(a: dict, b: dict) -> dict:
    """``b`` over ``a``, section by section."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_experiment(path: Path) -> Experiment:
    """The experiment in ``path``, every configuration checked against the config tree.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a file that does not parse, an unknown key, or a configuration the
            config refuses (one line naming the file, the configuration and the field).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"experiment file not found: {path}")
    try:
        exp = Experiment.model_validate(tomllib.loads(path.read_text()))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: does not parse: {e}") from None
    except ValidationError as e:
        raise ValueError(f"{path}: {one_line(str(e))}") from None
    for name in exp.configs:
        run_config(exp, name, 0, Path("/nonexistent"), source=path)  # raises on a bad field
    return exp


def run_config(exp: Experiment, name: str, seed: int, run_dir: Path,
               source: Path | None = None) -> Config:  # fmt: skip
    """The resolved config of one run: base, the configuration, then what the runner fixes
    (seed, run directory, time limit, checkpoints, no in-run evaluation).

    Raises:
        ValueError: a field the config refuses (naming ``source`` and the configuration).
    """
    data = _merge(normalise_keys(Config, _nulls(exp.base)),
                  normalise_keys(Config, _nulls({k: v for k, v in exp.configs[name].items()
                                                 if k != "runner"})))  # fmt: skip
    every = exp.checkpoint_every_s or exp.budget_s / 8
    fixed = {"seed": seed, "run_dir": str(run_dir), "time_limit_s": exp.budget_s,
             "learner": {"checkpoint_every_s": every, "checkpoint_optimizer": False},
             "eval": {"heldout": False, "every_steps": 0}}  # fmt: skip
    data = _merge(data, fixed)
    data.setdefault("learner", {}).setdefault("steps", 1_000_000)  # the budget ends a run
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ValueError(f"{source or 'experiment'}: configs.{name}: {one_line(str(e))}") from None
    if cfg.data.heldout_size < exp.eval.prompts:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(
            update={"heldout_size": exp.eval.prompts})})  # fmt: skip
    return cfg


def fingerprint(exp: Experiment, cfg: Config, runner: str = "dashrl", legacy: bool = False) -> str:
    """What makes a recorded run still valid: the values of its resolved config (paths and
    ports aside) and of the evaluation plan that differ from their defaults, and the
    runner. A changed value re-runs it; a config field added later, with a default that
    keeps the old behaviour, does not (each run records the commit its code was at).
    ``legacy``: the fingerprint of runs recorded before 2026-12-05, over every field, so
    that any field added to the config since invalidated them."""
    kw: dict[str, Any] = {"mode": "json"} if legacy else {"mode": "json", "exclude_defaults": True}
    d = cfg.model_dump(exclude={"run_dir", "transport"}, **kw)
    parts = [d, exp.eval.model_dump(**kw)] + ([runner] if runner != "dashrl" else [])
    blob = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def base_fingerprint(exp: Experiment, cfg: Config) -> str:
    """What the base model's held-out metrics depend on, and nothing else: the model, the
    task (data), the evaluation seed, the sampler and grader settings, the prompt tag an
    algorithm adds (RCRL), and the plan's prompts, final k and engine. Two experiments whose
    base fingerprints agree share one base evaluation (256 x 32 samples take about ten
    minutes on 2 cores)."""
    a = cfg.actor
    parts = {"model": cfg.model.model_dump(mode="json"),
             "data": cfg.data.model_dump(mode="json"), "seed": cfg.seed,
             "reward": cfg.reward.model_dump(mode="json"),
             "rcrl_tag": get_algorithm(cfg.algo).prompt_tags,
             "sampler": [a.max_new_tokens, a.temperature, a.verifier_timeout_s,
                         a.vllm.dtype, a.vllm.max_model_len],
             "eval": [exp.eval.prompts, exp.eval.final_k, exp.eval.engine]}  # fmt: skip
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
