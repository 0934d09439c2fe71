"""Benchmark loading and grading on real rows of every benchmark file (right and wrong)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from dashrl.actors.grading import gsm8k_answer, last_boxed
from dashrl.launch.benchmarks import BENCHMARKS, grade, load_benchmark

DATA = REPO / "tests" / "fixtures" / "data"  # the first rows of each benchmark


def test_last_boxed_and_gsm8k_answer() -> None:
    assert last_boxed(r"a \boxed{1} then \boxed{\frac{1}{2}} end") == r"\frac{1}{2}"
    assert (
        last_boxed(r"\boxed{\left( 3, \frac{\pi}{2} \right)}") == r"\left( 3, \frac{\pi}{2} \right)"
    )
    assert last_boxed("no box") is None and last_boxed(r"\boxed{unclosed") is None
    assert gsm8k_answer("so 3 + 4 = 7\n#### 7") == "7"
    assert gsm8k_answer("#### 1,200 dollars, not 5") == "1200"
    assert gsm8k_answer("the answer is 12.") == "12"


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_reference_answers_are_right_and_perturbed_ones_wrong(name: str) -> None:
    problems = load_benchmark(name, DATA, limit=15)
    assert len(problems) == 15 and len({p.id for p in problems}) == 15
    for p in problems:
        if name == "gsm8k":
            right, wrong = p.entry["answer"], f"#### {float(p.gold) + 1}"
        else:
            answer = p.gold.strip().strip("$")
            right, wrong = f"So the answer is $\\boxed{{{answer}}}$.", f"$\\boxed{{{answer}+7}}$"
        assert grade(name, right, p.gold)[1], (p.id, right)
        assert not grade(name, wrong, p.gold)[1], (p.id, wrong)
        assert not grade(name, "I cannot solve this.", p.gold)[1]


def test_math500_worked_solutions_grade_right() -> None:
    for p in load_benchmark("math500", DATA, limit=20):
        assert grade("math500", p.entry["solution"], p.gold)[1], p.id


def test_groups_are_read() -> None:
    p = load_benchmark("math500", DATA, limit=1)[0]
    assert set(p.groups) == {"subject", "level"}
    assert "type" in load_benchmark("minerva_math", DATA, limit=1)[0].groups


def test_bad_benchmark_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("mmlu", tmp_path)
    with pytest.raises(FileNotFoundError, match="math500.jsonl"):
        load_benchmark("math500", tmp_path)
    (tmp_path / "eval").mkdir()
    good = '{"problem": "1+1?", "answer": "2", "subject": "A", "level": 1}\n'
    (tmp_path / "eval" / "math500.jsonl").write_text(good + '{"problem": "x"}\n')
    with pytest.raises(ValueError, match=r"math500.jsonl:2: malformed"):
        load_benchmark("math500", tmp_path)
    (tmp_path / "eval" / "math500.jsonl").write_text(good + "{not json\n")
    with pytest.raises(ValueError, match=r"math500.jsonl:2"):
        load_benchmark("math500", tmp_path)
    assert len(load_benchmark("math500", tmp_path, limit=1)) == 1


@pytest.mark.slow
def test_eval_command_writes_samples_and_table(tiny_model_path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    start = str(REPO / "launch" / "start.py")
    cmd = [sys.executable, start, "eval", "--model", str(tiny_model_path),
           "--benchmark", "gsm8k", "math500", "--limit", "3", "--k", "2", "--max-new-tokens", "8",
           "--data-dir", str(DATA), "--out-dir", str(out)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "### gsm8k" in res.stdout and "pass@2" in res.stdout and "maj@2" in res.stdout
    import json

    samples = json.loads((out / "math500_samples.json").read_text())
    assert len(samples["problems"]) == 3 and len(samples["problems"][0]["samples"]) == 2
    assert samples["meta"]["template"].startswith("{question}")
    assert "subject=" in (out / "math500_summary.md").read_text()
    bad = subprocess.run([*cmd[:5], "--benchmark", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown benchmark 'nope'" in bad.stderr
    assert "Traceback" not in bad.stderr
