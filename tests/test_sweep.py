"""The experiment runner (launch/sweep.py): experiment files checked against the config
tree, the training clock and checkpoint choice, intervals over seeds by hand, and a real
tiny-model sweep of 2 configurations x 2 seeds that writes its table and skips its
finished runs when restarted."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from dashrl.launch import sweep as sweep_mod
from dashrl.launch.experiment import Experiment, fingerprint, load_experiment, run_config
from dashrl.launch.sweep import pick_checkpoints, source_commit, training_clock
from dashrl.launch.sweep_pairs import comparison_lines
from dashrl.launch.sweep_report import (
    markdown,
    ratio_interval,
    t_interval,
    target_lines,
    time_lines,
    time_to_target,
)

TINY = REPO / "tests" / "fixtures" / "tiny_sweep.toml"
EXPERIMENTS = sorted((REPO / "experiments").glob("*.toml"))


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "exp.toml"
    p.write_text(text)
    return p


MINIMAL = 'description = "x"\nbudget_s = 60\nseeds = [0]\n'


def test_every_shipped_experiment_file_loads() -> None:
    assert EXPERIMENTS, "experiments/*.toml missing"
    for path in [*EXPERIMENTS, TINY]:
        exp = load_experiment(path)
        assert exp.configs and exp.seeds


def test_a_bad_experiment_file_names_the_file_the_configuration_and_the_field(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"configs\.bad: --learner\.lr: "):
        load_experiment(write(tmp_path, MINIMAL + '[configs.bad]\nlearner.lr = "fast"\n'))
    with pytest.raises(ValueError, match="exp.toml.*learner.*lrr"):
        load_experiment(write(tmp_path, MINIMAL + "[configs.bad]\nlearner.lrr = 1.0\n"))
    with pytest.raises(ValueError, match="exp.toml.*budjet"):
        load_experiment(write(tmp_path, MINIMAL + "budjet_s = 3\n[configs.a]\nalgo = 'grpo'\n"))
    with pytest.raises(ValueError, match="increasing fractions"):
        load_experiment(write(tmp_path, MINIMAL + "[eval]\nat = [1.0, 0.5]\n[configs.a]\n"
                              "algo = 'grpo'\n"))  # fmt: skip
    with pytest.raises(ValueError, match=r"comparisons name \['c'\]"):
        load_experiment(write(tmp_path, MINIMAL + "comparisons = [['a', 'c']]\n[configs.a]\n"
                              "algo = 'grpo'\n"))  # fmt: skip
    with pytest.raises(ValueError, match="does not parse"):
        load_experiment(write(tmp_path, "description = \n"))
    with pytest.raises(FileNotFoundError):
        load_experiment(tmp_path / "none.toml")


def test_run_config_layers_base_configuration_and_the_runners_fields(tmp_path) -> None:
    exp = load_experiment(TINY)
    cfg = run_config(exp, "lr_high", 3, tmp_path / "r")
    assert cfg.learner.lr == 1e-4 and cfg.model.name == "tiny-random" and cfg.seed == 3
    assert cfg.queue.filter_threshold is None  # "None" in TOML
    assert cfg.time_limit_s == exp.budget_s and cfg.learner.checkpoint_every_s == 2
    assert not cfg.eval.heldout and cfg.eval.every_steps == 0
    assert cfg.data.heldout_size >= exp.eval.prompts
    # the fingerprint ignores where a run lives, not what it is
    same = run_config(exp, "lr_high", 3, tmp_path / "elsewhere")
    assert fingerprint(exp, cfg) == fingerprint(exp, same)
    assert fingerprint(exp, cfg) != fingerprint(exp, run_config(exp, "lr_low", 3, tmp_path))


def test_the_base_evaluation_is_shared_by_experiments_with_the_same_base_fingerprint(
    tmp_path,
) -> None:
    """The base model is evaluated once per base fingerprint: a second experiment on the
    same model, task, sampler and plan takes the first one's numbers (saying from where);
    a training-only difference (learning rate) does not matter, an evaluation one does."""
    results = tmp_path / "results"
    results.mkdir()
    first = load_experiment(TINY)
    base = {"reward_mean": 0.25, "k": 4.0, "fingerprint": sweep_mod.base_fp(first)}
    (results / "first.json").write_text(json.dumps({"base": base, "runs": {}}))
    (results / "notes.json").write_text("[1, 2]")  # not a results file: skipped
    lr = tmp_path / "lr.toml"
    lr.write_text(TINY.read_text().replace("learner.lr = 1e-6", "learner.lr = 3e-6"))
    shared = sweep_mod.known_base(load_experiment(lr), {}, 0, results)
    assert shared is not None and shared["reward_mean"] == 0.25 and shared["from"] == "first"
    k8 = tmp_path / "k8.toml"
    k8.write_text(TINY.read_text().replace("final_k = 4", "final_k = 8"))
    assert sweep_mod.known_base(load_experiment(k8), {}, 0, results) is None
    hot = tmp_path / "hot.toml"
    hot.write_text(TINY.read_text().replace("actor.max_new_tokens = 8",
                                            "actor.max_new_tokens = 9"))  # fmt: skip
    assert sweep_mod.known_base(load_experiment(hot), {}, 0, results) is None
    # a record from before fingerprints is this experiment's own only while a recorded run
    # of it is still valid
    legacy = {"base": {"reward_mean": 0.5}}
    assert sweep_mod.known_base(load_experiment(k8), legacy, 0, results) is None
    own = sweep_mod.known_base(load_experiment(k8), legacy, 1, results)
    assert own == {"reward_mean": 0.5, "fingerprint": sweep_mod.base_fp(load_experiment(k8))}


def test_a_config_field_added_later_with_its_default_keeps_recorded_runs_valid(tmp_path) -> None:
    """An experiment takes several sittings, and the config tree grows between them: a new
    field whose default keeps the old behaviour must not re-run what is recorded, a changed
    value must, and a run recorded under the legacy (every-field) fingerprint still counts."""
    from dashrl.protocol.config import Config

    class Later(Config):
        new_knob: int = 3

    exp = load_experiment(TINY)
    cfg = run_config(exp, "lr_high", 0, tmp_path / "lr_high_s0")
    grown = Later(**cfg.model_dump())
    assert fingerprint(exp, grown) == fingerprint(exp, cfg)
    assert fingerprint(exp, grown, legacy=True) != fingerprint(exp, cfg, legacy=True)
    assert fingerprint(exp, Later(**cfg.model_dump(), new_knob=4)) != fingerprint(exp, cfg)
    legacy = {"fingerprint": fingerprint(exp, cfg, legacy=True)}
    assert sweep_mod.still_valid(exp, "lr_high/0", legacy, tmp_path)
    assert not sweep_mod.still_valid(exp, "lr_high/0", {"fingerprint": "0123"}, tmp_path)
    assert not sweep_mod.still_valid(exp, "lr_low/0", legacy, tmp_path)  # lr differs


def test_a_changed_experiment_keeps_its_outdated_runs_as_superseded(tmp_path) -> None:
    """A recorded run whose config changed since, or whose configuration or seed the file
    no longer lists, leaves the tables but stays in the JSON; a valid one stays a run."""
    exp, runs = load_experiment(TINY), tmp_path / "runs"
    valid = {"seed": 0, "fingerprint": sweep_mod.run_fingerprint(exp, "lr_low", 0, runs)}
    recorded = {
        "runs": {"lr_low/0": valid, "lr_high/0": {"seed": 0, "fingerprint": "0123"},
                 "gone/1": {"seed": 1, "fingerprint": "x"},
                 "lr_low/9": {**valid, "seed": 9}},
        "superseded": {"lr_high/0": [{"seed": 0, "fingerprint": "older"}]},
    }  # fmt: skip
    old = sweep_mod.supersede(exp, recorded, runs)
    assert sorted(old) == ["gone/1", "lr_high/0", "lr_low/9"]
    assert [r["fingerprint"] for r in old["lr_high/0"]] == ["older", "0123"]
    state = {"runs": {}, "superseded": old, "base": None,
             "eval": {"at": [1.0], "prompts": 4, "k": 2, "final_k": 4},
             "budget_s": 8, "description": "x", "experiment": "t"}  # fmt: skip
    assert "4 earlier run(s)" in markdown(state)


def test_training_clock_leaves_checkpoint_writing_out_and_picks_the_latest_by_each_time(
    tmp_path,
) -> None:
    run = tmp_path / "run"
    rows = [{"step": 1, "wall_s": 10.0, "learner/checkpoint_s": 0.0},
            {"step": 2, "wall_s": 25.0, "learner/checkpoint_s": 5.0},  # a save of 5 s
            {"step": 3, "wall_s": 35.0, "learner/checkpoint_s": 0.0},
            {"step": 4, "wall_s": 52.0, "learner/checkpoint_s": 2.0}]  # fmt: skip
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, clock = training_clock(run)
    assert clock == {1: 10.0, 2: 20.0, 3: 30.0, 4: 45.0}
    for name in ("step_2", "step_4", "final"):
        (run / "checkpoints" / name).mkdir(parents=True)
        (run / "checkpoints" / name / "config.json").write_text("{}")
    exp = Experiment.model_validate({"description": "x", "budget_s": 80, "seeds": [0],
                                     "configs": {"a": {}},
                                     "eval": {"at": [0.1, 0.25, 0.5, 1.0], "k": 2,
                                              "final_k": 8}})  # fmt: skip
    picks = pick_checkpoints(run, exp, clock)
    # 0.1 x 80 = 8 s: nothing written yet; 20 s: step_2; 40 s: step_2 (step_4 at 45 s); final
    assert [(p["label"], Path(p["path"]).name, p["k"]) for p in picks] == [
        ("0.25", "step_2", 2), ("0.5", "step_2", 2), ("1", "final", 8)]  # fmt: skip
    assert picks[-1]["train_s"] == 45.0


def test_t_interval_by_hand() -> None:
    m, h = t_interval([0.5, 0.7])  # sd 0.1414, n 2: 12.706 * 0.1414 / 1.4142
    assert m == pytest.approx(0.6) and h == pytest.approx(1.2706, abs=1e-4)
    m, h = t_interval([1.0, 2.0, 3.0])  # sd 1, n 3: 4.303 / sqrt(3)
    assert m == 2.0 and h == pytest.approx(4.303 / math.sqrt(3))
    assert math.isnan(t_interval([0.3])[1])
    with pytest.raises(ValueError):
        t_interval([])


def test_time_to_target_interpolates_between_evaluations() -> None:
    pts = [(0.0, 0.3), (30.0, 0.5), (60.0, 0.7)]
    assert time_to_target(pts, 0.6) == pytest.approx(45.0)
    assert time_to_target(pts, 0.5) == 30.0 and time_to_target(pts, 0.2) == 0.0
    assert time_to_target(pts, 0.8) is None
    assert time_to_target([(0.0, 0.3), (10.0, 0.7), (20.0, 0.5)], 0.6) == pytest.approx(7.5)


def test_speedup_is_a_geometric_mean_with_an_interval_on_log_ratios() -> None:
    g, lo, hi = ratio_interval([(90.0, 45.0), (60.0, 30.0)])
    assert (g, lo, hi) == pytest.approx((2.0, 2.0, 2.0))  # no spread: no width
    g, lo, hi = ratio_interval([(100.0, 50.0), (80.0, 20.0)])  # ratios 2 and 4
    half = 12.706 * (math.log(2) / math.sqrt(2)) / math.sqrt(2)
    assert g == pytest.approx(math.sqrt(8))
    assert lo == pytest.approx(math.exp(math.log(math.sqrt(8)) - half))
    assert hi == pytest.approx(math.exp(math.log(math.sqrt(8)) + half))
    with pytest.raises(ValueError):
        ratio_interval([(10.0, 0.0)])


def test_the_target_table_pairs_seeds_and_says_what_was_not_reached() -> None:
    def run(config: str, seed: int, curve: list[tuple[float, float]]) -> dict:
        evals = [{"label": str(i), "launch_s": t, "train_s": t - 50, "reward_mean": r}
                 for i, (t, r) in enumerate(curve)]  # fmt: skip
        return {"config": config, "seed": seed, "evals": evals, "curve": []}

    state = {
        "clock": "launch",
        "targets": [0.6, 0.8],
        "baselines": ["slow"],
        "base": {"reward_mean": 0.4},
        "runs": {
            "slow/0": run("slow", 0, [(100, 0.5), (200, 0.7)]),  # 0.6 at 150 s
            "slow/1": run("slow", 1, [(100, 0.6), (200, 0.7)]),  # 0.6 at 100 s
            "fast/0": run("fast", 0, [(50, 0.6), (100, 0.9)]),  # 50 s; 0.8 at 83.3
            "fast/1": run("fast", 1, [(50, 0.6), (100, 0.7)]),
        },
    }  # 50 s; 0.8 never
    text = "\n".join(target_lines(state))
    # 150 and 100 s: sd 35.36, 12.706 x 35.36 / sqrt(2) = 317.6
    assert "| slow | 2 | 125.0 ± 317.6 | 0/2 seeds reached it |" in text
    assert "| fast | 2 | 50.0 ± 0.0 | 1/2 seeds reached it |" in text
    # speed-up at 0.6: 150/50 = 3 and 100/50 = 2 -> geometric mean sqrt(6) = 2.45
    assert "| fast | 2.45x [" in text and "(2 seeds) | - |" in text


def test_source_commit_names_head_and_says_when_tracked_files_differ(tmp_path) -> None:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip

    assert source_commit(tmp_path) == "unknown"  # not a checkout
    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = git("rev-parse", "--short", "HEAD")
    assert source_commit(tmp_path) == head
    (tmp_path / "untracked.txt").write_text("ignored\n")  # results written beside the code
    assert source_commit(tmp_path) == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert source_commit(tmp_path) == head + "+dirty"


def test_a_speedup_pairs_two_runs_of_a_seed_only_on_the_same_machine() -> None:
    def run(config: str, seed: int, t: float, machine: str) -> dict:
        return {"config": config, "seed": seed, "machine": machine, "curve": [],
                "evals": [{"label": "1", "launch_s": t, "reward_mean": 0.9}]}  # fmt: skip

    runs = [run("slow", 0, 100, "xeon"), run("fast", 0, 50, "xeon"),
            run("slow", 1, 300, "epyc"), run("fast", 1, 25, "xeon")]  # fmt: skip
    state = {"clock": "launch", "targets": [0.6], "baselines": ["slow"],
             "base": {"reward_mean": 0.0},
             "runs": {f"{r['config']}/{r['seed']}": r for r in runs}}  # fmt: skip
    text = "\n".join(target_lines(state))
    # seed 1 ran its two rungs on two CPUs: only seed 0's ratio (2x) is counted
    assert "| fast | 2.00x (1 seeds) |" in text
    assert "made on 2 machines" in text
    # the seconds table pools one machine per row: 0.6 of the way to 0.9 from 0 at 0 s
    assert "| slow | epyc | 1 | 200.0 |" in text and "| slow | xeon | 1 | 66.7 |" in text
    assert "| fast | xeon | 2 | 25.0 ± 105.9 |" in text  # 33.3 and 16.7 s
    assert "| config | machine | start-up |" in "\n".join(time_lines(state))


def test_the_results_table_keeps_each_machines_runs_in_a_row_of_its_own() -> None:
    def run(config: str, seed: int, reward: float, machine: str) -> dict:
        return {"config": config, "seed": seed, "machine": machine, "curve": [], "steps": 10,
                "evals": [{"label": "1", "launch_s": 60.0, "reward_mean": reward}]}  # fmt: skip

    runs = [run("a", 0, 0.5, "xeon"), run("a", 1, 0.7, "xeon"), run("a", 2, 0.1, "epyc")]
    state = {"experiment": "x", "description": "d", "budget_s": 60.0,
             "eval": {"prompts": 4, "k": 1, "final_k": 1, "at": [1.0]},
             "runs": {f"{r['config']}/{r['seed']}": r for r in runs}}  # fmt: skip
    text = markdown(state)
    assert "| config | machine | seeds | reward_mean | steps |" in text
    # xeon: mean 0.6 of two seeds; epyc's lone 0.1 is not pooled into it
    assert "| a | xeon | 2 | 60.0 ± 127.1 | 10.0 ± 0.0 |" in text
    assert "| a | epyc | 1 | 10.0 | 10.0 |" in text
    one = {**state, "runs": {k: v for k, v in state["runs"].items() if v["machine"] == "xeon"}}
    assert "| config | seeds | reward_mean | steps |" in markdown(one)


def test_a_metric_only_some_seeds_recorded_is_shown_with_how_many_had_it() -> None:
    # seed 0 was recorded before the evaluator had maj@8: its row must still show maj@8,
    # from seed 1 alone and saying so, not as if both seeds had been averaged
    def run(seed: int, reward: float, maj8: float | None) -> dict:
        final = {"label": "1", "launch_s": 60.0, "reward_mean": reward}
        if maj8 is not None:
            final["maj@8"] = maj8
        return {"config": "a", "seed": seed, "machine": "xeon", "curve": [], "steps": 10,
                "evals": [final]}  # fmt: skip

    state = {"experiment": "x", "description": "d", "budget_s": 60.0,
             "eval": {"prompts": 4, "k": 1, "final_k": 1, "at": [1.0]},
             "runs": {"a/0": run(0, 0.5, None), "a/1": run(1, 0.7, 0.75)}}  # fmt: skip
    text = markdown(state)
    assert "| config | seeds | reward_mean | maj@8 | steps |" in text
    assert "| a | 2 | 60.0 ± 127.1 | 75.0 (1 of 2 seeds) | 10.0 ± 0.0 |" in text


def test_paired_differences_by_hand_and_only_on_one_machine() -> None:
    def run(config: str, seed: int, final: float, early: float, entropy: float,
            machine: str = "xeon") -> dict:  # fmt: skip
        evals = [
            {"label": "0.25", "reward_mean": early},
            {"label": "1", "avg@4": final, "maj@4": final, "pass@4": final + 0.1},
        ]
        return {"config": config, "seed": seed, "machine": machine, "steps": 10 + seed,
                "curve": [{"learner/entropy": 9.0}, {"learner/entropy": entropy}],
                "evals": evals}  # fmt: skip

    runs = [run("a", 0, 0.60, 0.40, 0.01), run("b", 0, 0.50, 0.30, 0.11),
            run("a", 1, 0.70, 0.45, 0.02), run("b", 1, 0.50, 0.40, 0.10),
            run("a", 2, 0.90, 0.90, 0.00, "epyc"), run("b", 2, 0.10, 0.10, 0.50)]  # fmt: skip
    state = {"eval": {"at": [0.25, 1.0], "final_k": 4}, "comparisons": [["a", "b"], ["b", "c"]],
             "runs": {f"{r['config']}/{r['seed']}": r for r in runs}}  # fmt: skip
    text = "\n".join(comparison_lines(state))
    assert "| a - b | seeds | avg@4 per seed | avg@4 | maj@4 | pass@4 | reward at 0.25 |" in text
    # seed 2's runs ran on two machines: left out. avg@4 a - b = +10 and +20 points: mean 15,
    # half-width 12.706 * 7.071 / sqrt(2) = 63.5; early +10 and +5: 7.5 ± 31.8; entropy
    # -0.10 and -0.08: -0.090 ± 0.127; steps 0 and 0
    assert ("| a - b | 2 | +10.0 / +20.0 | +15.0 ± 63.5 | +15.0 ± 63.5 | +15.0 ± 63.5 | "
            "+7.5 ± 31.8 | -0.090 ± 0.127 | +0 ± 0 |") in text  # fmt: skip
    assert "| b - c | 0 | - | - |" in text  # c never ran
    assert comparison_lines({**state, "comparisons": []}) == []


def test_a_sweep_stopped_by_its_pid_stops_the_run_it_waits_on(tmp_path) -> None:
    # the run sits in a session of its own (so that a timeout can kill its process group):
    # a SIGTERM to the sweep must still reach it, not leave it training
    log, child, harness = tmp_path / "run.log", tmp_path / "child.pid", tmp_path / "sweep.py"
    run = f"import os, time; open({str(child)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    harness.write_text(
        "import sys\nfrom pathlib import Path\n"
        "from dashrl.launch.sweep import _launch, exit_on_sigterm\n"
        f"exit_on_sigterm()\n_launch([sys.executable, '-c', {run!r}], Path({str(log)!r}), 900)\n"
    )
    sweep = subprocess.Popen([sys.executable, str(harness)])
    try:
        deadline = time.monotonic() + 60
        while not (child.exists() and child.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        pid = int(child.read_text())
        os.kill(sweep.pid, signal.SIGTERM)
        assert sweep.wait(30) == 143
        with pytest.raises(ProcessLookupError):  # stopped and reaped by the sweep
            os.kill(pid, 0)
    finally:  # a failed run of this test must not leave either process sleeping
        if sweep.poll() is None:
            sweep.kill()
        if child.exists() and child.read_text():
            try:
                os.kill(int(child.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_machine_name_says_cpu_cores_and_bf16_units(tmp_path) -> None:
    from dashrl.protocol.hardware import machine_name

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx512_bf16 sse\n")
    assert machine_name(info) == f"Some CPU, {os.cpu_count()} cores (avx512_bf16)"
    info.write_text("processor\t: 0\nmodel name\t: Old CPU\nflags\t\t: fpu avx2\n")
    assert machine_name(info).endswith("(no bf16 units)")


@pytest.mark.slow
def test_a_tiny_sweep_runs_writes_its_table_and_skips_finished_runs(tmp_path, monkeypatch) -> None:
    runs, results = tmp_path / "runs", tmp_path / "results"
    cmd = [sys.executable, str(REPO / "launch" / "start.py"), "sweep", str(TINY),
           "--runs", str(runs), "--results", str(results)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    state = json.loads((results / "tiny_sweep.json").read_text())
    assert sorted(state["runs"]) == ["lr_high/0", "lr_high/1", "lr_low/0", "lr_low/1"]
    for run in state["runs"].values():
        assert run["steps"] >= 1 and run["curve"]
        final = run["evals"][-1]
        assert final["label"] == "1" and final["k"] == 4 and final["prompts"] == 8
        assert 0.0 <= final["reward_mean"] <= 1.0 and "pass@4" in final and "maj@4" in final
        assert not (runs / f"{run['config']}_s{run['seed']}" / "checkpoints").exists()
        # seconds since launch: start-up counted, so every point comes later than on the
        # training clock
        assert run["startup_s"] > 0
        assert all(e["launch_s"] > e["train_s"] for e in run["evals"])
        assert run["commit"] == source_commit() and run["commit"] != "unknown"
    assert state["base"]["k"] == 4
    assert state["base"]["fingerprint"] == sweep_mod.base_fp(load_experiment(TINY))
    md = (results / "tiny_sweep.md").read_text()
    assert "| lr_low | 2 |" in md and "| lr_high | 2 |" in md and " ± " in md
    assert "0/2 seeds reached it" in md and "## Where the time went" in md
    assert f"| lr_low | 1 | {state['runs']['lr_low/1']['steps']} | {source_commit()} |" in md
    assert (results / "tiny_sweep.png").stat().st_size > 10_000
    assert md == markdown(state)

    # a restart runs nothing that is recorded; a changed configuration runs again
    launched: list[tuple[str, int]] = []

    def fake_run_one(exp, name, seed, runs_dir):
        launched.append((name, seed))
        return {
            **state["runs"][f"{name}/{seed}"],
            "fingerprint": fingerprint(exp, run_config(exp, name, seed, runs_dir)),
        }

    monkeypatch.setattr(sweep_mod, "run_one", fake_run_one)
    sweep_mod.sweep(TINY, runs, results)
    assert launched == []
    changed = tmp_path / "tiny_sweep.toml"
    changed.write_text(TINY.read_text().replace("learner.lr = 1e-4", "learner.lr = 2e-4"))
    sweep_mod.sweep(changed, runs, results, seeds=(1,))  # one seed of every configuration
    assert launched == [("lr_high", 1)]
    sweep_mod.sweep(changed, runs, results)
    assert sorted(launched) == [("lr_high", 0), ("lr_high", 1)]
    with pytest.raises(ValueError, match=r"unknown seed\(s\) \[7\]"):
        sweep_mod.sweep(changed, runs, results, seeds=(7,))


@pytest.mark.slow
def test_the_trl_runner_writes_what_the_sweep_reads(tmp_path) -> None:
    """bench/trl_grpo.py on a resolved tiny config: metrics rows on the training clock,
    checkpoints the runner can pick, the final weights and a summary, within its budget."""
    pytest.importorskip("trl")
    exp = load_experiment(TINY)
    cfg = run_config(exp, "lr_high", 0, tmp_path / "run")
    cfg_file = tmp_path / "run.json"
    cfg_file.write_text(cfg.model_dump_json())
    # LOCAL_RANK without WORLD_SIZE is what an in-process DeepSpeed rank leaves behind in a
    # parent (CI ran this after the DeepSpeed tests): the runner must stay one process
    env = {**os.environ, "LOCAL_RANK": "0"}
    env.pop("WORLD_SIZE", None)
    p = subprocess.run([sys.executable, str(REPO / "bench" / "trl_grpo.py"), "--config",
                        str(cfg_file)], capture_output=True, text=True, timeout=600,
                       env=env)  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text())["failed_role"] is None
    rows, clock = training_clock(run, launched_at=0.0)
    assert rows and [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert all(0 <= r["actor/reward_mean"] <= 1 and r["launch_s"] > r["train_s"] for r in rows)
    # it stops once its training clock passes the budget, not long after
    assert rows[-1]["train_s"] >= exp.budget_s - rows[-1]["learner/step_s"] - 1e-6
    picks = pick_checkpoints(run, exp, clock)
    assert picks[-1]["label"] == "1" and Path(picks[-1]["path"]).name == "final"
    assert (Path(picks[-1]["path"]) / "model.safetensors").exists()
