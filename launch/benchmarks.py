"""Evaluation benchmarks: where each one's rows live, how to read them, how to prompt and grade.

Every benchmark has an explicit prompt template (recorded with its results) and a
grader: math-verify equivalence for MATH-style answers, exact numeric match for GSM8K,
the task's own verifier for a reasoning-gym held-out split. A missing file, an unknown
name or a malformed row raises an error naming the file and line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dashrl.actors.grading import grade_math, grade_numeric, last_boxed
from dashrl.actors.tasks import gold_answer

MATH_TEMPLATE = (
    "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
)
GSM8K_TEMPLATE = (
    "{question}\nSolve the problem step by step, then write the final answer as a number "
    "after '####'."
)


@dataclass
class EvalProblem:
    """One benchmark problem.

    Attributes:
        id: "<benchmark>/<row index>".
        question: the problem text (before the template).
        gold: the reference final answer.
        groups: per-problem breakdown keys, e.g. {"subject": "Algebra", "level": "3"}.
    """

    id: str
    question: str
    gold: str
    groups: dict[str, str] = field(default_factory=dict)
    entry: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Benchmark:
    """A benchmark file and how to read, prompt and grade it."""

    name: str
    relpath: str
    grader: str  # "math" | "numeric"
    template: str
    row: Callable[[dict[str, Any]], tuple[str, str, dict[str, str]]]


def _math500(r):
    return r["problem"], r["answer"], {"subject": r["subject"], "level": str(r["level"])}


def _minerva(r):
    gold = last_boxed(r["solution"])
    if gold is None:
        raise KeyError("no \\boxed{} answer in solution")
    return r["problem"], gold, {"type": r["type"]}


def _olympiad(r):
    answers = r["final_answer"]
    if not isinstance(answers, list) or not answers:
        raise KeyError("final_answer must be a non-empty list")
    return r["question"], ", ".join(answers), {"subfield": r.get("subfield") or "?"}


def _aime(r):
    return r["problem"], str(r["answer"]), {}


def _amc(r):
    a = r["answer"]
    return r["question"], str(int(a) if isinstance(a, float) and a.is_integer() else a), {}


def _gsm8k(r):
    return r["question"], gold_answer(r["answer"]), {}


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("math500", "eval/math500.jsonl", "math", MATH_TEMPLATE, _math500),
        Benchmark("minerva_math", "eval/minerva_math.jsonl", "math", MATH_TEMPLATE, _minerva),
        Benchmark("olympiadbench", "eval/olympiadbench.jsonl", "math", MATH_TEMPLATE, _olympiad),
        Benchmark("aime24", "eval/aime24.jsonl", "math", MATH_TEMPLATE, _aime),
        Benchmark("amc23", "eval/amc23.jsonl", "math", MATH_TEMPLATE, _amc),
        Benchmark("gsm8k", "gsm8k/test.jsonl", "numeric", GSM8K_TEMPLATE, _gsm8k),
    )
}
HELDOUT = "heldout"
"""The configured training task's held-out prompts, graded by the task's own verifier."""


def load_benchmark(name: str, data_dir: Path, limit: int | None = None) -> list[EvalProblem]:
    """Read the first ``limit`` problems of benchmark ``name`` from ``data_dir``.

    Raises:
        ValueError: unknown benchmark name, or a malformed row (message names file:line).
        FileNotFoundError: the benchmark file is missing.
    """
    if name not in BENCHMARKS:
        known = ", ".join([*BENCHMARKS, HELDOUT])
        raise ValueError(f"unknown benchmark {name!r}; known: {known}")
    bench = BENCHMARKS[name]
    path = Path(data_dir) / bench.relpath
    if not path.exists():
        raise FileNotFoundError(f"benchmark file not found: {path} (set --data-dir)")
    problems = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(problems) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                question, gold, groups = bench.row(row)
                if not isinstance(question, str) or not question.strip():
                    raise KeyError("empty question")
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{path}:{n}: malformed {name} row ({e!r})") from None
            problems.append(EvalProblem(f"{name}/{n - 1}", question, gold, groups, row))
    return problems


def grade(bench_name: str, completion: str, gold: str) -> tuple[str, bool]:
    """Extracted answer and correctness of ``completion`` under the benchmark's grader."""
    grader = BENCHMARKS[bench_name].grader
    return grade_math(completion, gold) if grader == "math" else grade_numeric(completion, gold)
