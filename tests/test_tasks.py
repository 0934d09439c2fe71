"""Answer extraction and the verifiers of reasoning-gym and GSM8K on real rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO
from dashrl.actors.data import load_task
from dashrl.actors.tasks import last_number, numbers_equal
from dashrl.protocol.config import DataConfig

GSM8K = REPO / "tests" / "fixtures" / "data" / "gsm8k"


def test_last_number() -> None:
    assert last_number("3 + 4 = 7.") == "7"
    assert last_number("The total is -1,250 dollars") == "-1250"
    assert last_number("x = 2.50") == "2.50"
    assert last_number("no digits") is None
    assert numbers_equal("2.50", "2.5") and numbers_equal("1,000", "1000")
    assert not numbers_equal(None, "1") and not numbers_equal("abc", "1")


def test_reasoning_gym_verifier_and_disjoint_heldout() -> None:
    task = load_task(DataConfig(train_size=300, heldout_size=30), seed=0)
    p = task.heldout[0]
    assert task.score(p, f"Let me add. The answer is {p.answer}.") == 1.0
    assert task.score(p, f"The answer is {int(p.answer) + 1}.") == 0.0
    assert task.score(p, "I do not know.") == 0.0
    assert not {q.question for q in task.heldout} & {q.question for q in task.train}
    again = load_task(DataConfig(train_size=300, heldout_size=30), seed=0)
    assert [q.question for q in again.heldout] == [q.question for q in task.heldout]


def test_gsm8k_verifier_on_real_rows() -> None:
    task = load_task(
        DataConfig(source="gsm8k", gsm8k_dir=GSM8K, train_size=50, heldout_size=20), seed=0
    )
    rows = {
        r["question"]: r for r in map(json.loads, (GSM8K / "test.jsonl").read_text().splitlines())
    }
    assert len(task.heldout) == 20 and len(task.train) == 50
    for p in task.heldout:
        row = rows[p.question]  # held-out prompts are the test split's, shuffled by the seed
        final = row["answer"].split("####")[-1].strip()
        assert p.answer == final.replace(",", "") and p.solution == row["answer"]
        assert task.score(p, row["answer"]) == 1.0  # the worked solution ends with its answer
        assert task.score(p, f"So the answer is {final}") == 1.0
        assert task.score(p, f"So the answer is {float(final.replace(',', '')) + 1}") == 0.0
    again = load_task(DataConfig(source="gsm8k", gsm8k_dir=GSM8K, train_size=50), seed=0)
    other = load_task(DataConfig(source="gsm8k", gsm8k_dir=GSM8K, train_size=50), seed=1)
    assert [p.question for p in again.train] == [p.question for p in task.train]
    assert [p.question for p in other.train] != [p.question for p in task.train]


def test_gsm8k_malformed_row_names_its_row(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text(
        '{"question": "q", "answer": "#### 1"}\n{"question": 1}\n'
    )
    (tmp_path / "test.jsonl").write_text('{"question": "t", "answer": "#### 2"}\n')
    with pytest.raises(ValueError, match=r"train split, row 1 of the source: empty or non-text"):
        load_task(DataConfig(source="gsm8k", gsm8k_dir=tmp_path), seed=0)
    with pytest.raises(FileNotFoundError):
        load_task(DataConfig(source="gsm8k", gsm8k_dir=tmp_path / "nope"), seed=0)
