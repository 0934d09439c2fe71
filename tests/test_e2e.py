"""End to end: the real launcher, processes, sockets and weight broadcast on a tiny model."""

from __future__ import annotations

import json
import os

import pytest

from conftest import REPO
from dashrl.launch.train import run
from dashrl.protocol.config import Config
from dashrl.protocol.runtime import read_jsonl
from dashrl.queue.log import ROLLOUT_LOG, read_rollout_log

GSM8K = REPO / "tests" / "fixtures" / "data" / "gsm8k"


@pytest.mark.slow
def test_tiny_run_versions_advance_rollouts_flow_weights_reach_actor(tiny_cfg) -> None:
    tiny_cfg.eval.every_steps = 2  # the weights of step 2 are evaluated in the background
    summary = run(tiny_cfg)
    run_dir = tiny_cfg.run_dir
    assert summary["learner_steps"] == 3 and summary["final_version"] == 3
    assert all(code in (0, -15) for code in summary["exit_codes"].values()), summary["exit_codes"]

    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["version"] for r in rows] == [1, 2, 3]
    assert all(r["learner/micro_batches_per_step"] == 2 for r in rows)
    assert all(r["learner/completion_tokens"] > 0 for r in rows)
    # started after step 2; after the last step the learner waits for it: row 3 has it
    assert [("eval/heldout_reward" in r) for r in rows] == [False, False, True]
    assert 0.0 <= rows[2]["eval/heldout_reward"] <= 1.0
    assert rows[2]["eval/version"] == 2 and rows[2]["eval/step"] == 2
    assert rows[2]["eval/wall_s"] == rows[1]["wall_s"]  # the time of the weights evaluated
    assert not list((run_dir / "eval").iterdir())  # the snapshot was removed

    # Rollouts flowed through the queue and were logged; rollouts generated after the
    # first broadcasts carry newer versions, so the actor received and applied weights.
    groups = read_rollout_log(run_dir / ROLLOUT_LOG)
    assert len(groups) > 0 and summary["rollouts_accepted"] > 0
    versions = [c.policy_version for g in groups for c in g.completions]
    assert max(versions) >= 1
    assert versions == sorted(versions)  # one actor: versions never go back

    for name in ("config.json", "summary.json", "plot.png", "logs/learner.log"):
        assert (run_dir / name).exists(), name
    state = json.loads((run_dir / "checkpoints" / "final" / "dashrl_state.json").read_text())
    assert state == {"version": 3, "step": 3, "backend": "deepspeed"}
    assert (run_dir / "checkpoints" / "final" / "model.safetensors").exists()
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["transport"]["rollout_port"] > 0 and saved["model"]["path"]
    # the learner on a core of its own, every other role on the rest
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) > 1:
        learner, others = saved["learner"]["cpus"], saved["actor"]["cpus"]
        assert learner == cores[:1] and others == cores[1:]
        logs = {role: (run_dir / "logs" / f"{role}.log").read_text()
                for role in ("learner", "actor0", "queue")}  # fmt: skip
        assert f"learner runs on cores {learner}" in logs["learner"]
        assert f"actor0 runs on cores {others}" in logs["actor0"]
        assert f"queue runs on cores {others}" in logs["queue"]


@pytest.mark.slow
def test_tiny_run_on_gsm8k(tiny_cfg) -> None:
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.data.source, cfg.data.gsm8k_dir = "gsm8k", GSM8K
    cfg.learner.steps = 1
    summary = run(cfg)
    assert summary["learner_steps"] == 1
    groups = read_rollout_log(cfg.run_dir / ROLLOUT_LOG)
    assert groups and all(
        g.task == "gsm8k" and g.prompt_id.startswith("gsm8k/train/") for g in groups
    )


@pytest.mark.slow
def test_sft_baseline_streams_reference_solutions(tiny_cfg) -> None:
    from dashrl.actors.data import load_task
    from dashrl.protocol.model import load_tokenizer

    cfg = tiny_cfg.model_copy(deep=True)
    cfg.algo, cfg.data.source, cfg.data.gsm8k_dir = "sft", "gsm8k", GSM8K
    cfg.actor.max_new_tokens, cfg.learner.steps = 256, 1
    summary = run(cfg)
    assert summary["learner_steps"] == 1
    tok = load_tokenizer(cfg.model.path)
    solutions = {p.id: p.solution for p in load_task(cfg.data, cfg.seed).train}
    groups = read_rollout_log(cfg.run_dir / ROLLOUT_LOG)
    assert groups
    whole = 0
    for g in groups:
        (c,) = g.completions  # one reference per prompt, cut at max_new_tokens
        text = tok.decode(c.token_ids, skip_special_tokens=True)
        assert solutions[g.prompt_id].startswith(text) and c.advantage == 1.0
        if text == solutions[g.prompt_id]:
            whole += 1
            assert c.reward == 1.0  # a whole solution ends with its answer
    assert whole > 0


@pytest.mark.slow
def test_two_rank_deepspeed_learner(tiny_cfg) -> None:
    """torchrun starts 2 learner ranks (ZeRO-2 over gloo): rank 0 serves the queue and the
    actors, rank 1 trains on its share of every micro-batch, both stop together."""
    pytest.importorskip("deepspeed")
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.learner.num_ranks, cfg.learner.backend, cfg.learner.zero_stage = 2, "deepspeed", 2
    summary = run(cfg)
    assert summary["learner_steps"] == 3 and summary["final_version"] == 3, summary
    assert summary["exit_codes"]["learner"] == 0
    rows = read_jsonl(cfg.run_dir / "metrics.jsonl")
    assert [r["learner/ranks"] for r in rows] == [2.0, 2.0, 2.0]
    log_text = (cfg.run_dir / "logs" / "learner.log").read_text()
    assert "[learner1]" in log_text and "saved final checkpoint" in log_text
    groups = read_rollout_log(cfg.run_dir / ROLLOUT_LOG)
    assert max(c.policy_version for g in groups for c in g.completions) >= 1
    state = json.loads((cfg.run_dir / "checkpoints" / "final" / "dashrl_state.json").read_text())
    assert state["version"] == 3 and state["backend"] == "deepspeed"
    assert (cfg.run_dir / "checkpoints" / "final" / "deepspeed").is_dir()


@pytest.mark.slow
def test_sync_mode_trains_each_step_on_exactly_one_fresh_batch(tiny_cfg) -> None:
    """mode sync (the standard GRPO loop, a rung of experiments/ladder.toml): the actor
    waits for every step, so each step trains on one whole batch of the current version."""
    tiny_cfg.mode = "sync"
    tiny_cfg.queue.max_staleness = 0  # tiny_cfg has no gradient filter already
    tiny_cfg.learner.steps = 4
    # 1 actor x 4 prompts x G 4 = 16 sequences = micro-batch 4 x 4
    tiny_cfg.learner.micro_batches_per_step = 4
    tiny_cfg = type(tiny_cfg).model_validate(tiny_cfg.model_dump())  # re-run the checks
    summary = run(tiny_cfg)
    assert summary["learner_steps"] == 4
    rows = read_jsonl(tiny_cfg.run_dir / "metrics.jsonl")
    assert [r["version"] for r in rows] == [1, 2, 3, 4]
    assert all(r["learner/staleness_max"] == 0 for r in rows)  # every sample fresh
    groups = read_rollout_log(tiny_cfg.run_dir / ROLLOUT_LOG)
    per_version = {}
    for g in groups:
        for c in g.completions:
            per_version[c.policy_version] = per_version.get(c.policy_version, 0) + 1
    # one batch per version: 16 samples for each of versions 0..3 (4 may have started)
    assert all(per_version[v] == 16 for v in range(4)), per_version
    assert 0.0 < rows[-1]["actor/busy_frac"] < 1.0  # it waited for the learner


def test_sync_mode_config_is_checked() -> None:
    with pytest.raises(ValueError, match="must equal"):
        Config.model_validate({"mode": "sync", "queue": {"filter_threshold": None,
                                                         "max_staleness": 0}})  # fmt: skip
    with pytest.raises(ValueError, match="filter-threshold None"):
        Config.model_validate({"mode": "sync", "actor": {"prompts_per_batch": 2},
                               "learner": {"micro_batches_per_step": 2}})  # fmt: skip
