"""Prompt sources and their verifiers: reasoning-gym tasks here; GSM8K and any
``datasets`` source in actors/datasets_task.py.

A :class:`Problem` is one question with what its verifier needs; a task turns a
completion into a reward in [0, 1]. The answer is taken leniently as the last number in
the completion (a 135M model rarely follows strict answer formats: measured
compliance was 0-4% with a 96-128-token budget) and then judged by the task's own verifier:
reasoning-gym's ``score_answer`` for its tasks, exact numeric match with the number after
``####`` for GSM8K.

Held-out prompts come from a different seed (reasoning-gym) or the test split (GSM8K),
and any question that also occurs in training is removed from the training set.
"""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from dashrl.protocol.config import DataConfig

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass
class Problem:
    """One prompt of a dataset.

    Attributes:
        id: stable id, e.g. "chain_sum/train/17".
        question: the question text shown to the model.
        answer: the reference final answer (a string).
        entry: the raw dataset entry the verifier needs.
        solution: a reference solution to imitate (SFT); the worked solution where the
            data has one (GSM8K), else the answer as a sentence.
    """

    id: str
    question: str
    answer: str
    entry: dict[str, Any] = field(default_factory=dict)
    solution: str = ""

    def __post_init__(self) -> None:
        if not self.solution:
            self.solution = f"The answer is {self.answer}."


def last_number(text: str) -> str | None:
    """The last number in ``text`` with thousands separators removed, or None."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def gold_answer(answer: str) -> str:
    """The reference final answer: the text after ``####`` where there is one (GSM8K's
    worked solutions end with ``#### <number>``, thousands separators dropped), else
    ``answer`` stripped."""
    if "####" in answer:
        return answer.split("####")[-1].strip().replace(",", "")
    return answer.strip()


def numbers_equal(a: str | None, b: str) -> bool:
    """Exact numeric equality of two decimal strings (1,000 == 1000.0); False if unparsable."""
    if a is None:
        return False
    try:
        return Fraction(a.replace(",", "")) == Fraction(b.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return False


class Task:
    """A dataset of problems with a verifier. Subclasses fill ``train`` and ``heldout``."""

    name = "task"
    source = "task"

    def __init__(self) -> None:
        self.train: list[Problem] = []
        self.heldout: list[Problem] = []

    def score(self, problem: Problem, completion: str) -> float:
        """Reward of a completion, in [0, 1]."""
        raise NotImplementedError

    def _dedupe(self) -> None:
        held = {p.question for p in self.heldout}
        self.train = [p for p in self.train if p.question not in held]
        if not self.train:
            raise ValueError(f"{self.name}: no training prompts left after removing held-out ones")


class ReasoningGymTask(Task):
    """A reasoning-gym procedural task; its own ``score_answer`` is the verifier.

    Raises:
        ValueError: an unknown task name or keyword arguments the task refuses.
    """

    source = "reasoning_gym"

    def __init__(self, cfg: DataConfig, seed: int):
        super().__init__()
        import reasoning_gym

        self.name = cfg.task
        kw = dict(cfg.task_kwargs)
        try:
            self._train_ds = reasoning_gym.create_dataset(
                cfg.task, seed=seed, size=cfg.train_size, **kw
            )
            self._held_ds = reasoning_gym.create_dataset(
                cfg.task, seed=seed + 1_000_003, size=cfg.heldout_size, **kw
            )
        except (TypeError, AssertionError, KeyError) as e:  # what reasoning-gym raises
            raise ValueError(f"reasoning-gym task {cfg.task!r} with --data.task-kwargs "
                             f"{kw}: {e}") from None  # fmt: skip
        self.train = [self._problem(e, "train", i) for i, e in enumerate(self._train_ds)]
        self.heldout = [self._problem(e, "heldout", i) for i, e in enumerate(self._held_ds)]
        self._dedupe()

    def _problem(self, e: dict[str, Any], split: str, i: int) -> Problem:
        return Problem(f"{self.name}/{split}/{i}", e["question"], str(e["answer"]), e)

    def score(self, problem: Problem, completion: str) -> float:
        reward = self._train_ds.score_answer(answer=last_number(completion), entry=problem.entry)
        return float(reward)


class VerifierTimeout(TimeoutError):
    """A verifier call ran past its time limit."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`VerifierTimeout` in the block after ``seconds`` (SIGALRM; main thread
    only, elsewhere or with seconds <= 0 no limit). A verifier stuck in Python code (e.g. a
    pathological expression handed to a symbolic checker) is interrupted; the actor scores
    that completion 0 and goes on."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise VerifierTimeout(f"verifier exceeded {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


RCRL_GOOD, RCRL_BAD = "[GOOD]", "[BAD]"
"""Return tags of Return-Conditioned RL (Havrilla et al. 2024): a correct sample is trained
under the good tag, any other under the bad tag, and generation is conditioned on the good
tag."""


def rcrl_question(question: str, good: bool) -> str:
    """The question with its RCRL return tag in front."""
    return f"{RCRL_GOOD if good else RCRL_BAD} {question}"


def format_reward(text: str, finished: bool) -> float:
    """1.0 when the completion ended on its own (EOS, not truncated) and holds an answer the
    verifier can extract (a number), else 0.0: the format part of a dense reward."""
    return 1.0 if finished and last_number(text) is not None else 0.0


def chat_prompt_ids(
    tokenizer, question: str, suffix: str = "", system: str | None = None
) -> list[int]:
    """Token ids of the chat-formatted prompt (template applied, generation prompt added);
    ``system``: a system message before the user turn."""
    turns = [{"role": "system", "content": system}] if system else []
    text = tokenizer.apply_chat_template(
        [*turns, {"role": "user", "content": question + suffix}],
        tokenize=False,
        add_generation_prompt=True,
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def system_prompt(problem: Problem, configured: str | None) -> str | None:
    """The system message of ``problem``: its row's own (a chat "messages" prompt), else
    the configured --data.system-prompt."""
    return problem.entry.get("_system") or configured
