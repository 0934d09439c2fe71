"""Reward functions (actors/rewards.py): built-ins, a user's own by file path and by module,
weights, faults counted as zeros, and correctness kept apart from shaped reward for every
algorithm that selects by it (Reinforce-Rej, RAFT, Expert Iteration, RCRL)."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from dashrl.actors.actor import score_group
from dashrl.actors.advantages import (
    expert_iteration_advantages,
    raft_advantages,
    reinforce_rej_advantages,
)
from dashrl.actors.rewards import Rewards
from dashrl.actors.tasks import Problem, Task
from dashrl.protocol.config import RewardConfig

EXAMPLE_REWARD = REPO / "examples" / "my_reward.py"


class LastWord(Task):
    """Correct iff the completion's last word is the answer."""

    def score(self, problem: Problem, completion: str) -> float:
        return float(completion.split()[-1:] == [problem.answer])


P = Problem("p/0", "What is 3 + 4?", "7", {"difficulty": 2, "question": "What is 3 + 4?"})


def _rewards(**kw) -> Rewards:
    return Rewards(RewardConfig(**kw), LastWord())


def test_builtins_by_name() -> None:
    rw = _rewards(fns=["exact_number", "math_verify", "format", "verifier"])
    assert [f(P, "so it is 7", True) for f in rw.fns] == [1.0, 1.0, 1.0, 1.0]
    assert [f(P, "it is \\boxed{7}", False) for f in rw.fns] == [1.0, 1.0, 0.0, 0.0]
    assert [f(P, "no idea", True) for f in rw.fns] == [0.0, 0.0, 0.0, 0.0]
    gsm = Problem("g/0", "q", "#### 1,250")  # an answer with "####" is read after it
    assert rw.fns[0](gsm, "The total is 1250.", True) == 1.0
    with pytest.raises(ValueError, match="needs --data.source reasoning_gym"):
        _rewards(fns=["reasoning_gym"])


def test_user_reward_from_a_file_and_from_a_module(tmp_path: Path) -> None:
    rw = _rewards(fns=[f"{EXAMPLE_REWARD}:reward"])
    assert rw.score(P, "3 + 4 = 7. The answer is 7", True).reward == 1.0
    assert rw.score(P, "The answer is 8", True).reward == 0.0
    (tmp_path / "my_mod.py").write_text(
        "def length_bonus(prompt, completion, difficulty):\n"
        "    return difficulty * len(completion.split()) / 10\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        rw = _rewards(fns=["verifier", "my_mod:length_bonus"], weights=[1.0, 0.5])
        s = rw.score(P, "it is 7", True)  # 1 + 0.5 * (2 * 3 / 10): the row's field arrives
        assert s.reward == pytest.approx(1.3) and s.correct
    finally:
        sys.path.remove(str(tmp_path))


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("no_such_builtin", "not a built-in"),
        ("nowhere_module_xyz:fn", "cannot import nowhere_module_xyz"),
        ("/no/such/file.py:fn", "cannot import"),
        (f"{EXAMPLE_REWARD}:missing", "has no callable 'missing'"),
    ],
)
def test_bad_reward_specs_are_one_line_errors(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _rewards(fns=[spec])


def test_weights_and_correctness_are_checked() -> None:
    with pytest.raises(ValueError, match="2 values for 1 reward"):
        _rewards(fns=["verifier"], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="not among"):
        _rewards(fns=["verifier"], correctness="format")
    with pytest.raises(ValueError, match="twice"):
        _rewards(fns=["format"], format_coef=0.5)


def test_a_reward_that_raises_hangs_or_returns_nan_or_none_scores_zero_and_is_counted(
    tmp_path: Path,
) -> None:
    (tmp_path / "bad.py").write_text(
        "import math, time\n"
        "def reward(prompt, completion, **fields):\n"
        "    if completion == 'raise': raise RuntimeError('bug')\n"
        "    if completion == 'hang': time.sleep(30)\n"
        "    if completion == 'nan': return math.nan\n"
        "    if completion == 'none': return None\n"
        "    if completion == 'text': return 'high'\n"
        "    return 1.0\n"
    )
    rw = _rewards(fns=[f"{tmp_path / 'bad.py'}:reward"])
    texts = ["ok", "raise", "hang", "nan", "none", "text", "ok"]
    t0 = time.perf_counter()
    r, adv, correct = score_group(rw, P, texts, 0.0, timeout_s=0.3)
    assert time.perf_counter() - t0 < 5
    assert r.tolist() == [1, 0, 0, 0, 0, 0, 1] and np.isfinite(adv).all()
    assert correct.tolist() == [True, False, False, False, False, False, True]
    name = f"{tmp_path / 'bad.py'}:reward"
    faults = rw.fault_counts()
    assert faults["verifier_timeouts"] == 1
    assert faults[f"reward_errors/{name}"] == 3  # raised, NaN, not a number
    assert faults[f"reward_unjudged/{name}"] == 1
    assert faults["verifier_errors"] == 3


# --- correctness is not the shaped reward --------------------------------------------------


def test_raft_does_not_imitate_a_formatted_wrong_answer() -> None:
    # the case: with a format bonus and nothing correct, RAFT used to pick [1, 0, 0, 0]
    r = np.array([0.1, 0.0, 0.0, 0.0])
    assert raft_advantages(r).tolist() == [1, 0, 0, 0]  # reward-only fallback (no signal)
    assert raft_advantages(r, correct=np.zeros(4, bool)) is None
    # correct answers are ranked by their shaped reward; a wrong one never qualifies
    r, c = np.array([1.1, 1.0, 1.5, 0.0]), np.array([True, True, False, False])
    assert raft_advantages(r, correct=c).tolist() == [1, 0, 0, 0]


def test_format_bonus_of_one_does_not_make_wrong_answers_correct() -> None:
    rw = _rewards(format_coef=1.0)
    # "so 3" is wrong but well formatted: reward 1.0, the same as a correct but truncated "7"
    texts, finished = ["so 3", "so 3", "it is 7", "nothing"], [True, True, False, False]
    r, _, correct = score_group(rw, P, texts, 0.0, raft_advantages, finished)
    assert r.tolist() == [1.0, 1.0, 1.0, 0.0] and correct.tolist() == [False, False, True, False]
    for estimator, expected in [
        (raft_advantages, [0, 0, 1, 0]),
        (expert_iteration_advantages, [0, 0, 1, 0]),
        (reinforce_rej_advantages, [1, 1, 1, 0]),  # kept: 0 < #correct < G
    ]:
        _, adv, _ = score_group(rw, P, texts, 0.0, estimator, finished)
        assert adv.tolist() == expected, estimator.__name__
    # nothing correct, every sample formatted (rewards all 1): each drops the group
    wrong = ["so 3", "so 4", "so 5", "so 6"]
    for estimator in (raft_advantages, expert_iteration_advantages, reinforce_rej_advantages):
        _, adv, correct = score_group(rw, P, wrong, 0.0, estimator, [True] * 4)
        assert not correct.any() and (adv == 0).all(), estimator.__name__
    assert reinforce_rej_advantages(np.ones(4)) is None  # the reward-only reading agrees...
    assert reinforce_rej_advantages(np.ones(4), correct=np.array([1, 0, 0, 0], bool)) is not None


def test_rcrl_tags_by_correctness_not_by_reward(tiny_cfg) -> None:
    from dashrl.actors.actor import Actor
    from dashrl.actors.engine import FakeEngine
    from dashrl.protocol import Completion

    cfg = tiny_cfg.model_copy(deep=True)
    cfg.algo, cfg.reward.format_coef = "rcrl", 1.0
    actor = Actor(cfg, 0, engine=FakeEngine(cfg.model.path))
    p = actor.task.train[0]
    tok = actor.tokenizer
    texts = [f"it is {p.answer}", f"so {int(p.answer) + 1}"]  # right but cut; wrong but done
    ids = [np.asarray(tok(t, add_special_tokens=False)["input_ids"], np.int32) for t in texts]
    comps = [Completion(i, np.full(len(i), -1.0, np.float32), finish_reason=f)
             for i, f in zip(ids, ["length", "stop"], strict=True)]  # fmt: skip
    groups = {g.prompt_id: g for g in actor.build_groups([p], [comps], 0)}
    good, bad = groups[f"{p.id}#good"].completions, groups[f"{p.id}#bad"].completions
    assert [c.reward for c in good] == [1.0] and [c.reward for c in bad] == [1.0]
    assert tok.decode(good[0].token_ids) == texts[0]  # the correct one, not the formatted one
    assert not math.isnan(good[0].advantage)
