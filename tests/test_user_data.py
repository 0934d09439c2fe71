"""Bring your own data and reward: ``--data.source datasets`` (JSONL, Parquet, CSV, a
save_to_disk folder), column mapping, prompt templates and system prompts, held-out splits,
one-line errors for bad data, config files with overrides, any reasoning-gym task's
keyword arguments, and a user's dataset plus reward file trained end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from dashrl.actors.data import load_task
from dashrl.actors.tasks import chat_prompt_ids, system_prompt
from dashrl.launch.cli import parse
from dashrl.protocol.config import DataConfig

EXAMPLES = REPO / "examples"
PROBLEMS = EXAMPLES / "my_problems.jsonl"
START = str(REPO / "launch" / "start.py")


def _user_data(**kw) -> DataConfig:
    base = {"source": "datasets", "path": str(PROBLEMS), "prompt_field": "problem",
            "answer_field": "final", "solution_field": "solution", "heldout_size": 10}  # fmt: skip
    return DataConfig(**(base | kw))


def test_a_jsonl_file_maps_its_columns_and_holds_out_disjoint_prompts() -> None:
    task = load_task(_user_data(), seed=0)
    rows = {r["problem"]: r for r in map(json.loads, PROBLEMS.read_text().splitlines())}
    assert len(task.heldout) == 10 and len(task.train) == 40
    assert not {p.question for p in task.heldout} & {p.question for p in task.train}
    p = task.train[0]
    assert p.answer == rows[p.question]["final"] and p.solution == rows[p.question]["solution"]
    assert p.entry["op"] == rows[p.question]["op"]  # other columns travel to the reward
    assert task.score(p, f"so the answer is {p.answer}") == 1.0  # default: math-verify
    again, other = load_task(_user_data(), seed=0), load_task(_user_data(), seed=1)
    assert [q.question for q in again.train] == [q.question for q in task.train]
    assert [q.question for q in other.train] != [q.question for q in task.train]
    assert len(load_task(_user_data(heldout_fraction=0.2, heldout_size=1000), 0).heldout) == 10


def test_parquet_csv_and_save_to_disk_folders_load(tmp_path: Path) -> None:
    import datasets

    rows = [json.loads(x) for x in PROBLEMS.read_text().splitlines()]
    d = datasets.Dataset.from_list(rows)
    d.to_parquet(str(tmp_path / "p.parquet"))
    d.to_csv(str(tmp_path / "p.csv"))
    datasets.DatasetDict({"train": d.select(range(40)), "test": d.select(range(40, 50))}
                         ).save_to_disk(str(tmp_path / "saved"))  # fmt: skip
    for path in ("p.parquet", "p.csv"):
        task = load_task(_user_data(path=str(tmp_path / path)), seed=0)
        assert len(task.train) == 40 and task.train[0].answer.lstrip("-").isdigit()
    task = load_task(_user_data(path=str(tmp_path / "saved"), heldout_split="test"), seed=0)
    held = {r["problem"] for r in rows[40:]}
    assert {p.question for p in task.heldout} == held and len(task.train) == 40


def test_template_system_prompt_and_chat_messages(tiny_model_path, tmp_path: Path) -> None:
    from dashrl.protocol.model import load_tokenizer

    task = load_task(_user_data(prompt_template="Q: {prompt} ({op})"), seed=0)
    p = task.train[0]
    assert p.question.startswith("Q: What is") and p.question.endswith(f"({p.entry['op']})")
    msgs = tmp_path / "chat.jsonl"
    msgs.write_text("".join(json.dumps({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{i} + 1?"}],
        "answer": str(i + 1)}) + "\n" for i in range(12)))  # fmt: skip
    chat = load_task(DataConfig(source="datasets", path=str(msgs), prompt_field="messages",
                                heldout_size=2), seed=0)  # fmt: skip
    q = chat.train[0]
    assert q.question.endswith(" + 1?") and system_prompt(q, "ignored") == "Be brief."
    assert system_prompt(p, "Be careful.") == "Be careful."
    tok = load_tokenizer(tiny_model_path)
    text = tok.decode(chat_prompt_ids(tok, q.question, system="Be brief."))
    assert "Be brief." in text and text.index("Be brief.") < text.index(q.question)


@pytest.mark.parametrize(
    ("content", "kw", "match"),
    [
        ("", {}, "could not be read|is empty"),
        ('{"problem": "q", "final": "1"}\n', {"answer_field": "answer"}, "no column 'answer'"),
        ('{"problem": "q", "final": "1"}\n{"problem": "", "final": "2"}\n', {},
         "row 1 of the source: empty or non-text prompt"),
        ('{"problem": "q", "final": "1"}\n{not json\n', {}, "could not be read"),
        ('{"problem": "q", "final": "1"}\n', {"prompt_template": "{nope}"}, "prompt-template"),
        ('{"problem": "q", "final": "1"}\n', {"split": "dev"}, "no split 'dev'"),
    ],
)  # fmt: skip
def test_bad_data_is_a_one_line_error(tmp_path: Path, content: str, kw: dict, match: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        load_task(_user_data(path=str(f), **({"solution_field": None} | kw)), seed=0)
    assert "\n" not in str(e.value)


def test_a_missing_path_and_no_path() -> None:
    with pytest.raises(FileNotFoundError):
        load_task(_user_data(path="no/such/file.jsonl"), seed=0)
    with pytest.raises(ValueError, match="needs --data.path"):
        load_task(DataConfig(source="datasets"), seed=0)


def test_any_reasoning_gym_task_takes_its_own_keyword_arguments() -> None:
    cfg = parse(["--data.task-kwargs", '{"allow_negation": true, "min_terms": 3, "max_terms": 3}'])
    assert cfg.data.task_kwargs == {"allow_negation": True, "min_terms": 3, "max_terms": 3}
    task = load_task(cfg.data.model_copy(update={"train_size": 50, "heldout_size": 5}), seed=0)
    assert any("-" in p.question.split(":")[-1] for p in task.train)  # negative terms appear
    with pytest.raises(ValueError, match="bogus"):
        load_task(DataConfig(task_kwargs={"bogus": 1}, train_size=5, heldout_size=2), seed=0)


def test_config_file_with_overrides(tmp_path: Path) -> None:
    cfg = parse(["--config", str(REPO / "configs" / "user_dataset.toml"), "--learner.steps", "7",
                 "--reward.weights", "1.0", "0.5"])  # fmt: skip
    assert cfg.data.source == "datasets" and cfg.data.answer_field == "final"
    assert cfg.learner.steps == 7 and cfg.reward.weights == [1.0, 0.5]  # flags win
    assert cfg.reward.fns[0] == "examples/my_reward.py:reward" and cfg.time_limit_s == 600
    assert cfg.queue.capacity == type(cfg.queue)().capacity  # left out: the default
    bad = tmp_path / "bad.toml"
    bad.write_text("[learner]\nmicro-batch-size = 8\nnot_a_field = 1\n")
    with pytest.raises(ValueError, match=r"bad.toml: --learner.not-a-field: Extra inputs"):
        parse(["--config", str(bad)])
    bad.write_text("[learner\n")
    with pytest.raises(ValueError, match="does not parse"):
        parse(["--config", str(bad)])
    # a run's own config.json repeats the run: same fields, a new run with fresh ports
    saved = cfg.model_copy(update={"resume": True}).model_dump_json()
    (tmp_path / "config.json").write_text(saved)
    again = parse(["--config", str(tmp_path / "config.json")])
    assert again.learner.steps == 7 and not again.resume and again.transport.rollout_port == 0
    out = subprocess.run([sys.executable, START, "--config", str(bad)], capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr


@pytest.mark.slow
def test_user_dataset_and_reward_file_train_end_to_end(tiny_cfg, tmp_path: Path) -> None:
    from dashrl.launch.train import run
    from dashrl.protocol.model import load_tokenizer
    from dashrl.queue.log import ROLLOUT_LOG, read_rollout_log

    # a reward the tiny random model earns: its value is checked against the logged groups
    (tmp_path / "len_reward.py").write_text(
        "def reward(prompt, completion, answer, op, **fields):\n"
        "    assert op in ('plus', 'minus', 'times') and answer\n"
        "    return (len(completion) % 3) / 2\n"
    )
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.data = _user_data(heldout_size=10)
    cfg.reward.fns = [f"{tmp_path / 'len_reward.py'}:reward", "format"]
    cfg.reward.weights = [1.0, 0.25]
    cfg.learner.steps = 2
    summary = run(cfg)
    assert summary["learner_steps"] == 2
    split = json.loads((cfg.run_dir / "data_split.json").read_text())
    task = load_task(cfg.data, cfg.seed)
    assert {h["question"] for h in split["heldout"]} == {p.question for p in task.heldout}
    assert split["train_prompts"] == 40
    train_ids = {p.id for p in task.train}
    tok = load_tokenizer(cfg.model.path)
    groups = read_rollout_log(cfg.run_dir / ROLLOUT_LOG)
    assert groups and all(g.prompt_id in train_ids for g in groups)
    rewards = [c.reward for g in groups for c in g.completions]
    for g in groups:
        for c in g.completions:
            text = tok.decode(c.token_ids, skip_special_tokens=True)
            fmt = 0.25 * (c.finish_reason == "stop" and any(ch.isdigit() for ch in text))
            assert c.reward == pytest.approx((len(text) % 3) / 2 + fmt, abs=1e-6)
    assert len(set(rewards)) > 1  # the user's function, not a constant, reached the queue


def test_a_prompt_longer_than_the_model_allows_is_named(tiny_cfg, tmp_path: Path) -> None:
    from dashrl.launch.train import check_prompt_lengths

    f = tmp_path / "long.jsonl"
    rows = [{"problem": f"What is {i} + 1?", "final": str(i + 1)} for i in range(20)]
    rows[7]["problem"] = "Add these: " + " + ".join(["1"] * 400)
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.data = _user_data(path=str(f), solution_field=None, heldout_size=2)
    cfg.actor.engine, cfg.actor.vllm.max_model_len, cfg.actor.max_new_tokens = "vllm", 512, 64
    with pytest.raises(ValueError, match=r"prompt long/(train|heldout)/\d+ \('Add these.*448"):
        check_prompt_lengths(cfg, load_task(cfg.data, cfg.seed))
    cfg.actor.vllm.max_model_len = 4096
    assert 400 < check_prompt_lengths(cfg, load_task(cfg.data, cfg.seed)) < 4096 - 64
