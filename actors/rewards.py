"""Reward functions: built-in verifiers and a user's own, by name or import path.

A run's reward is a weighted sum of reward functions (``--reward.fns``, ``--reward.weights``)
and its *correctness* is one of them alone (``--reward.correctness``, default the first):
the algorithms that select by "correct" (Reinforce-Rej, RAFT, Expert Iteration, RCRL's
return tag) read that signal, never the sum, so a format bonus cannot turn a wrong answer
into an imitated one.

A user's function has the signature::

    def my_reward(prompt: str, completion: str, **fields) -> float | None

``prompt`` is the question text (before the chat template), ``completion`` the decoded
completion; ``fields`` are the dataset row's other columns plus ``answer`` (the reference
answer) and ``finished`` (the completion ended with EOS, not truncated). ``None`` means
"cannot judge": it scores 0 and is counted. A function that raises, runs past the verifier
time limit or returns a non-finite number scores 0 for that completion and is counted; the
actor goes on. It is named as ``module:function`` (importable) or ``path/to/file.py:function``.

Built-in names:
    ``math_verify``: the last ``\\boxed{}`` (else the last number) equals the answer under
    math-verify; ``exact_number``: the last number equals the answer exactly (GSM8K's
    rule; an answer holding ``####`` is read after it); ``reasoning_gym``: the task's own
    ``score_answer`` on the last number; ``format``: 1 when the completion finished and
    holds a number; ``verifier``: the data source's own verifier (``reasoning_gym`` for a
    reasoning-gym task, ``exact_number`` for GSM8K, ``math_verify`` for a ``datasets`` file).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dashrl.actors.grading import grade_math
from dashrl.actors.tasks import (
    Problem,
    VerifierTimeout,
    format_reward,
    gold_answer,
    last_number,
    numbers_equal,
    time_limit,
)

if TYPE_CHECKING:
    from dashrl.actors.tasks import Task
    from dashrl.protocol.config import RewardConfig

log = logging.getLogger("dashrl.rewards")

ScoreFn = Callable[[Problem, str, bool], "float | None"]
"""(problem, completion text, finished) -> reward, or None (cannot judge)."""


def exact_number(problem: Problem, text: str, finished: bool = True) -> float:
    """1.0 when the last number of ``text`` equals the reference answer exactly, else 0.0."""
    return 1.0 if numbers_equal(last_number(text), gold_answer(problem.answer)) else 0.0


def math_verify(problem: Problem, text: str, finished: bool = True) -> float:
    """1.0 when math-verify finds ``text``'s answer equivalent to the reference, else 0.0."""
    return 1.0 if grade_math(text, gold_answer(problem.answer))[1] else 0.0


def _format(problem: Problem, text: str, finished: bool) -> float:
    return format_reward(text, finished)


BUILTINS = ("verifier", "math_verify", "exact_number", "reasoning_gym", "format")
"""Names of the built-in reward functions (module docstring)."""


def _load_user_fn(spec: str) -> Callable[..., Any]:
    """The function named by ``module:function`` or ``path/file.py:function``.

    Raises:
        ValueError: no ``:``, a module or file that cannot be imported, or a name that is
            missing or not callable (the message names the spec).
    """
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        known = ", ".join(BUILTINS)
        raise ValueError(
            f"reward function {spec!r}: not a built-in ({known}) nor module:function "
            "or path/to/file.py:function"
        )
    try:
        if where.endswith(".py"):
            path = Path(where).expanduser().resolve()
            if not path.is_file():
                raise FileNotFoundError(f"no such file {path}")
            mod_name = f"dashrl_user_reward_{abs(hash(str(path)))}"
            module_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[mod_name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except Exception as e:  # any import-time failure of user code is a config error
        raise ValueError(f"reward function {spec!r}: cannot import {where}: {e!r}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {where} has no callable {name!r}")
    return fn


def _wrap_user_fn(fn: Callable[..., Any]) -> ScoreFn:
    """A user function in the (problem, text, finished) form: it gets the prompt, the
    completion, and the row's fields as keywords (only those it names, unless it takes
    ``**fields``)."""
    params = inspect.signature(fn).parameters.values()
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    named = {p.name for p in params}

    def score(problem: Problem, text: str, finished: bool) -> float | None:
        fields = {k: v for k, v in problem.entry.items() if k not in ("prompt", "completion")}
        fields |= {"answer": problem.answer, "finished": finished}
        if not takes_all:
            fields = {k: v for k, v in fields.items() if k in named}
        return fn(problem.question, text, **fields)

    return score


def resolve_fn(spec: str, task: Task) -> ScoreFn:
    """The score function of a built-in name or a user import path (module docstring).

    Raises:
        ValueError: an unknown name, a bad import path, or ``reasoning_gym`` on a data
            source that is not a reasoning-gym task.
    """
    if spec == "reasoning_gym" and task.source != "reasoning_gym":
        raise ValueError("reward function 'reasoning_gym' needs --data.source reasoning_gym")
    if spec in ("verifier", "reasoning_gym"):
        return lambda p, text, finished: task.score(p, text)
    named = {"math_verify": math_verify, "exact_number": exact_number, "format": _format}
    return named[spec] if spec in named else _wrap_user_fn(_load_user_fn(spec))


@dataclass
class Scored:
    """One completion's score: ``reward`` (the weighted sum, finite float) and ``correct``
    (the correctness function's value >= 1)."""

    reward: float
    correct: bool


class Rewards:
    """The run's reward functions, weights and correctness signal (``cfg.reward``).

    Args:
        cfg: the reward config (fns, weights, correctness, format_coef).
        task: the data source (its verifier backs the ``verifier`` and ``reasoning_gym``
            names).

    Raises:
        ValueError: weights that do not match the functions, a correctness name that is not
            among the functions, or a function that cannot be resolved (:func:`resolve_fn`).
    """

    def __init__(self, cfg: RewardConfig, task: Task):
        names = list(cfg.fns) or ["verifier"]
        weights = list(cfg.weights) or [1.0] * len(names)
        if len(weights) != len(names):
            raise ValueError(
                f"--reward.weights has {len(weights)} values for {len(names)} reward "
                f"functions ({', '.join(names)})"
            )
        if cfg.format_coef:  # the older shorthand for a weighted "format" function
            names, weights = [*names, "format"], [*weights, cfg.format_coef]
        if len(set(names)) != len(names):
            raise ValueError(f"--reward.fns names a function twice: {names}")
        self.correctness = cfg.correctness or names[0]
        if self.correctness not in names:
            raise ValueError(
                f"--reward.correctness {self.correctness!r} is not among --reward.fns {names}"
            )
        self.names, self.weights = names, weights
        self._correct_i = names.index(self.correctness)
        self.fns = [resolve_fn(n, task) for n in names]
        self.errors = dict.fromkeys(names, 0)  # raised or non-finite, per function
        self.unjudged = dict.fromkeys(names, 0)  # returned None, per function
        self.timeouts = 0

    def _call(self, i: int, problem: Problem, text: str, finished: bool, timeout_s: float):
        name = self.names[i]
        try:
            with time_limit(timeout_s):
                value = self.fns[i](problem, text, finished)
        except VerifierTimeout as e:
            log.warning("reward %s timed out on %s: %s", name, problem.id, e)
            self.timeouts += 1
            return 0.0
        except Exception as e:  # a reward bug must not kill a long-running actor
            self.errors[name] += 1
            if self.errors[name] <= 10 or self.errors[name] % 1000 == 0:
                log.warning("reward %s failed on %s (%d so far): %r", name, problem.id,
                            self.errors[name], e)  # fmt: skip
            return 0.0
        if value is None:
            self.unjudged[name] += 1
            return 0.0
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            self.errors[name] += 1
            if self.errors[name] <= 10:
                log.warning("reward %s returned a non-finite or non-number on %s", name,
                            problem.id)  # fmt: skip
            return 0.0
        return value

    def score(self, problem: Problem, text: str, finished: bool, timeout_s: float = 0.0) -> Scored:
        """Weighted reward and correctness of one completion (each function under the
        verifier time limit ``timeout_s`` seconds; failures score 0 and are counted)."""
        total, correct = 0.0, False
        for i, w in enumerate(self.weights):
            value = self._call(i, problem, text, finished, timeout_s)
            total += w * value
            if i == self._correct_i:
                correct = value >= 1.0
        return Scored(total, correct)

    def correctness_value(
        self, problem: Problem, text: str, finished: bool = True, timeout_s: float = 0.0
    ) -> float:
        """The correctness function's value alone (held-out evaluation scores this, never
        the shaped sum); failures score 0 and are counted."""
        return self._call(self._correct_i, problem, text, finished, timeout_s)

    def fault_counts(self) -> dict[str, float]:
        """{"verifier_timeouts", "verifier_errors" (all functions), "reward_errors/<fn>",
        "reward_unjudged/<fn>"}: counts so far."""
        out = {"verifier_timeouts": float(self.timeouts),
               "verifier_errors": float(sum(self.errors.values()))}  # fmt: skip
        out |= {f"reward_errors/{k}": float(v) for k, v in self.errors.items()}
        out |= {f"reward_unjudged/{k}": float(v) for k, v in self.unjudged.items()}
        return out
