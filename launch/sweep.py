"""``start.py sweep EXPERIMENT``: run an experiment (launch/experiment.py: named
configurations x seeds x a wall-clock budget), each run evaluated the same way, resumable,
written up as a table with intervals over seeds.

The runner takes one (config, seed) at a time: it writes the run's resolved config, runs
``start.py --config`` on it with the time limit (in-run evaluation off, a weights-only
checkpoint every ``checkpoint_every_s`` of training), then evaluates, in a separate
process (launch/sweep_eval.py) after the run, the latest checkpoint written by each
fraction ``eval.at`` of the budget, with k samples per prompt (``final_k`` for the last),
deletes the checkpoints and records the run (with the commit and the machine it ran on)
in ``experiments/results/NAME.json``. A restart skips every recorded run whose resolved
config and evaluation plan are unchanged, so a long experiment completes over several
sittings. Times are training seconds: the learner's clock (``wall_s`` in metrics.jsonl)
less the seconds spent writing checkpoints; start-up (model load, engine compile) is not
counted. Every point also carries its ``launch_s``, seconds since the run was launched
(start-up counted, checkpoint writing not): an experiment with ``clock = "launch"`` is
reported on that clock, and with ``targets`` the report gives each configuration's seconds
to each held-out reward level and its speed-up over each of ``baselines``
(launch/sweep_report.py).

Only pydantic and the standard library are imported at module level (``--help`` stays
fast); the report (launch/sweep_report.py) imports matplotlib when it draws.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from dashrl.launch.commands import SweepCommand
from dashrl.launch.experiment import (
    RUNNERS,
    Experiment,
    base_fingerprint,
    fingerprint,
    load_experiment,
    run_config,
    runner_of,
)
from dashrl.launch.sweep_report import write_report
from dashrl.protocol.hardware import machine_name
from dashrl.protocol.model import resolve_model

REPO = Path(__file__).resolve().parents[1]
SETUP_GRACE_S = 900.0
"""Seconds a run may take beyond its budget (start-up, the final checkpoint) before the
runner stops it by its pid."""


def training_clock(
    run_dir: Path, launched_at: float | None = None
) -> tuple[list[dict], dict[int, float]]:
    """(metrics rows, step -> training seconds at its end): the learner's ``wall_s`` less
    the seconds spent writing checkpoints up to and including that step. With the unix
    time ``launched_at`` each row also gets ``launch_s``: seconds from then to the step's
    end (its ``unix_s``), checkpoint writing left out."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]  # fmt: skip
    clock, saved = {}, 0.0
    for r in rows:
        saved += r.get("learner/checkpoint_s", 0.0)
        r["train_s"] = r["wall_s"] - saved
        if launched_at is not None and "unix_s" in r:
            r["launch_s"] = r["unix_s"] - launched_at - saved
        clock[int(r["step"])] = r["train_s"]
    return rows, clock


def startup_s(rows: list[dict], launched_at: float) -> float | None:
    """Seconds from launch to the learner's first step starting (model loading, engine
    start, weights to the actors), from the first row's ``unix_s`` and ``wall_s``; None
    for rows without ``unix_s``."""
    if not rows or "unix_s" not in rows[0]:
        return None
    first = rows[0]
    return first["unix_s"] - first["wall_s"] - launched_at


def pick_checkpoints(run_dir: Path, exp: Experiment, clock: dict[int, float]) -> list[dict]:
    """Per fraction of ``eval.at``: the latest checkpoint written by then (the final weights
    for 1.0), as {"label", "path", "k", "step", "train_s"}; fractions before the first
    checkpoint are left out."""
    ckpts = sorted((int(d.name.split("_")[1]), d) for d in (run_dir / "checkpoints").glob("step_*")
                   if (d / "config.json").exists())  # fmt: skip
    last_step = max(clock) if clock else 0
    final = run_dir / "checkpoints" / "final"
    if (final / "config.json").exists():
        ckpts.append((last_step, final))
    out = []
    for f in exp.eval.at:
        t = f * exp.budget_s
        found = [(s, d) for s, d in ckpts if clock.get(s, float("inf")) <= t + 1e-6]
        if f == 1.0 and ckpts:
            found = [ckpts[-1]]  # the final weights, whenever the run stopped
        if found:
            s, d = found[-1]
            last = f == exp.eval.at[-1]
            out.append({"label": f"{f:g}", "path": str(d), "step": s,
                        "train_s": clock.get(s, 0.0),
                        "k": exp.eval.final_k if last else exp.eval.k})  # fmt: skip
    return out


KEPT = ("actor/reward_mean", "learner/entropy", "actor/completion_len", "learner/kl",
        "learner/step_s", "learner/queue_wait_s", "learner/broadcast_s", "actor/busy_frac",
        "learner/empty_batches")  # fmt: skip
"""Metrics kept in a run's record, per step (the curves and where the time went)."""


def _launch(cmd: list[str], log: Path, timeout_s: float) -> int:
    """Run ``cmd`` (its output to ``log``) in a session of its own; past ``timeout_s``, or
    when the sweep itself is stopped (Ctrl-C, or SIGTERM once :func:`exit_on_sigterm` is
    set), it is stopped by its pid: SIGTERM, then SIGKILL to its process group 120 s later.
    Returns its exit status.

    Raises:
        KeyboardInterrupt, SystemExit: the sweep was stopped (after the child is).
    """
    with log.open("w") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                             start_new_session=True)  # fmt: skip
        try:
            return p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return _stop(p)
        except BaseException:
            # its own session keeps it out of a signal sent to the sweep's process group:
            # without this a stopped sweep leaves its run training on the cores
            _stop(p)
            raise


def _stop(p: subprocess.Popen) -> int:
    """Stop a run by its pid: SIGTERM, then SIGKILL to its process group after 120 s;
    returns its exit status."""
    os.kill(p.pid, signal.SIGTERM)
    try:
        return p.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        return p.wait()


def exit_on_sigterm() -> None:
    """Make SIGTERM raise SystemExit(143) in this (main) thread, so that a sweep stopped by
    its pid stops the run it is waiting on (:func:`_launch`) instead of orphaning it."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def evaluate_checkpoints(job: dict, work: Path) -> dict[str, dict[str, float]]:
    """Run launch/sweep_eval.py on ``job`` in its own process; label -> metrics.

    Raises:
        RuntimeError: the evaluator failed (its log is named).
    """
    work.mkdir(parents=True, exist_ok=True)
    (work / "eval_job.json").write_text(json.dumps(job, indent=1))
    out, log = work / "eval.json", work / "eval.log"
    rc = _launch([sys.executable, "-m", "dashrl.launch.sweep_eval", str(work / "eval_job.json"),
                  str(out)], log, 3 * 3600)  # fmt: skip
    if rc != 0 or not out.exists():
        raise RuntimeError(f"evaluation failed (exit {rc}); see {log}")
    return json.loads(out.read_text())


def run_one(exp: Experiment, name: str, seed: int, runs: Path) -> dict:
    """Train and evaluate one (configuration, seed); its record.

    Raises:
        RuntimeError: the run left no metrics or failed, or its evaluation failed.
    """
    run_dir = runs / f"{name}_s{seed}"
    cfg = run_config(exp, name, seed, run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)  # a run that did not finish starts over
    cfg_file = runs / f"{name}_s{seed}.json"
    cfg_file.write_text(cfg.model_dump_json(indent=1))
    t0 = time.time()
    script = REPO.joinpath(*RUNNERS[runner_of(exp, name)])
    rc = _launch([sys.executable, str(script), "--config", str(cfg_file)],
                 runs / f"{name}_s{seed}.log", exp.budget_s + SETUP_GRACE_S)  # fmt: skip
    summary = run_dir / "summary.json"
    if not (run_dir / "metrics.jsonl").exists() or not summary.exists():
        raise RuntimeError(f"{name} seed {seed}: the run left no metrics (exit {rc}); see "
                           f"{runs / f'{name}_s{seed}.log'}")  # fmt: skip
    failed = json.loads(summary.read_text()).get("failed_role")
    if failed:
        raise RuntimeError(f"{name} seed {seed}: role {failed} failed; see {run_dir / 'logs'}")
    rows, clock = training_clock(run_dir, launched_at=t0)
    launch = {int(r["step"]): r["launch_s"] for r in rows if "launch_s" in r}
    picks = pick_checkpoints(run_dir, exp, clock)
    for p in picks:
        if p["step"] in launch:
            p["launch_s"] = round(launch[p["step"]], 2)
    job = {"config": str(run_dir / "config.json"), "prompts": exp.eval.prompts,
           "engine": exp.eval.engine, "checkpoints": picks}  # fmt: skip
    evals = evaluate_checkpoints(job, run_dir / "sweep_eval") if picks else {}
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # 0.5-2 GB each; numbers kept
    curve = [{"step": r["step"], "train_s": round(r["train_s"], 2),
              **({"launch_s": round(r["launch_s"], 2)} if "launch_s" in r else {}),
              **{k: r[k] for k in KEPT if k in r}} for r in rows]  # fmt: skip
    return {"config": name, "seed": seed,
            "fingerprint": fingerprint(exp, cfg, runner_of(exp, name)),
            "steps": len(rows), "run_s": round(time.time() - t0, 1),
            "startup_s": startup_s(rows, t0), "commit": source_commit(),
            "machine": machine_name(),
            "finished": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "evals": [{**p, **evals.get(p["label"], {})} for p in picks],
            "curve": curve}  # fmt: skip


def source_commit(repo: Path = REPO) -> str:
    """The commit the runner's code is at (short hash, ``+dirty`` when tracked files differ
    from it), so a results table can say which code each row ran on; ``unknown`` outside a
    git checkout. The sweep's own outputs under ``experiments/results`` do not count: a
    sweep rewrites them after each run, which would mark every later run dirty."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10)  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain",
                                "--untracked-files=no", "--", ".",
                                ":(exclude)experiments/results"],
                               capture_output=True, text=True,
                               timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def base_record(exp: Experiment, runs: Path) -> dict[str, float]:
    """The base model's held-out metrics (k = final_k) under the first configuration's
    data and sampler settings, stamped with their :func:`base_fingerprint`."""
    cfg = run_config(exp, next(iter(exp.configs)), exp.seeds[0], runs / "base")
    (runs / "base").mkdir(parents=True, exist_ok=True)
    cfg_file = runs / "base" / "config.json"
    cfg_file.write_text(cfg.model_dump_json(indent=1))
    model = resolve_model(cfg.model.name, cfg.model.cache_dir)
    ck = {"label": "base", "path": str(model), "k": exp.eval.final_k}
    job = {"config": str(cfg_file), "prompts": exp.eval.prompts, "engine": exp.eval.engine,
           "checkpoints": [ck]}  # fmt: skip
    return {**evaluate_checkpoints(job, runs / "base")["base"], "fingerprint": base_fp(exp)}


def base_fp(exp: Experiment) -> str:
    """:func:`base_fingerprint` of the configuration the base model is evaluated under."""
    name = next(iter(exp.configs))
    return base_fingerprint(exp, run_config(exp, name, exp.seeds[0], Path("base")))


def known_base(exp: Experiment, recorded: dict, kept_runs: int, results: Path) -> dict | None:
    """The base model's metrics if they are already measured under this experiment's
    :func:`base_fingerprint`: its own record, or another experiment's in ``results`` (the
    copy names it in ``from``). A record from before fingerprints is taken as this
    experiment's own only while ``kept_runs`` > 0, i.e. some recorded run's config and
    evaluation plan are unchanged since it was made; None when it must be evaluated."""
    fp, own = base_fp(exp), recorded.get("base")
    if own and (own.get("fingerprint") == fp or ("fingerprint" not in own and kept_runs)):
        return {**own, "fingerprint": fp}
    for other in sorted(results.glob("*.json")):
        try:
            theirs = json.loads(other.read_text()).get("base") or {}
        except (OSError, json.JSONDecodeError, AttributeError):
            continue  # not a results file: nothing to share
        if theirs.get("fingerprint") == fp:
            return {**theirs, "from": theirs.get("from", other.stem)}
    return None


def run_fingerprint(exp: Experiment, cname: str, seed: int, runs: Path) -> str:
    """:func:`fingerprint` of configuration ``cname`` at ``seed`` as it would run now."""
    cfg = run_config(exp, cname, seed, runs / f"{cname}_s{seed}")
    return fingerprint(exp, cfg, runner_of(exp, cname))


def still_valid(exp: Experiment, key: str, old: dict, runs: Path) -> bool:
    """Whether the recorded run ``old`` (under ``key`` = "config/seed") counts as it is:
    its configuration and seed are still listed and it was made under the config and
    evaluation plan it would run under now (:func:`fingerprint`, or for a run recorded
    before 2026-12-05 its legacy form)."""
    cname, seed = key.rsplit("/", 1)
    if cname not in exp.configs or int(seed) not in exp.seeds:
        return False
    cfg = run_config(exp, cname, int(seed), runs / f"{cname}_s{seed}")
    fps = {fingerprint(exp, cfg, runner_of(exp, cname), legacy=v) for v in (False, True)}
    return old.get("fingerprint") in fps


def supersede(exp: Experiment, recorded: dict, runs: Path) -> dict[str, list[dict]]:
    """``recorded["superseded"]`` plus every recorded run that no longer counts: made under a
    config or evaluation plan that has changed since (its fingerprint differs), or of a
    configuration or seed the experiment no longer lists. They are kept (key -> records,
    oldest first), so a changed experiment file never deletes a measurement, and reported
    only as a count; the run itself is re-run when its (config, seed) is asked for."""
    out = {k: list(v) for k, v in (recorded.get("superseded") or {}).items()}
    for key, old in (recorded.get("runs") or {}).items():
        if not still_valid(exp, key, old, runs):
            out.setdefault(key, []).append(old)
    return out


def sweep(path: Path, runs: Path | None = None, results: Path | None = None,
          only: tuple[str, ...] = (), report_only: bool = False,
          seeds: tuple[int, ...] = ()) -> dict:  # fmt: skip
    """Run every (configuration, seed) of the experiment in ``path`` not yet recorded, then
    write the report. Returns the results (as written to JSON).

    Args:
        path: the experiment file.
        runs: where run directories go (default runs/sweep/NAME).
        results: where NAME.json/.md/.png go (default experiments/results).
        only: run just these configurations (the report still covers every recorded run).
        seeds: run just these seeds (likewise).
        report_only: start nothing; rewrite the report from what is recorded.

    Raises:
        ValueError: a bad experiment file, an unknown name in ``only`` or seed in ``seeds``.
    """
    exp, name = load_experiment(path), Path(path).stem
    unknown = set(only) - set(exp.configs)
    if unknown:
        raise ValueError(f"unknown configuration(s) {sorted(unknown)}; the experiment has "
                         f"{sorted(exp.configs)}")  # fmt: skip
    if set(seeds) - set(exp.seeds):
        raise ValueError(f"unknown seed(s) {sorted(set(seeds) - set(exp.seeds))}; the "
                         f"experiment has {exp.seeds}")  # fmt: skip
    runs = Path(runs or REPO / "runs" / "sweep" / name)
    results = Path(results or REPO / "experiments" / "results")
    out = results / f"{name}.json"
    recorded = json.loads(out.read_text()) if out.exists() else {}
    state = {"experiment": name, "description": exp.description, "budget_s": exp.budget_s,
             "eval": exp.eval.model_dump(mode="json"), "base": recorded.get("base"),
             "clock": exp.clock, "targets": exp.targets, "baselines": exp.baselines,
             "comparisons": [list(p) for p in exp.comparisons],
             "runs": {}, "superseded": supersede(exp, recorded, runs)}  # fmt: skip
    kept = 0  # recorded runs that still count
    for seed in exp.seeds:
        for cname in exp.configs:
            key, old = f"{cname}/{seed}", recorded.get("runs", {}).get(f"{cname}/{seed}")
            if old is not None and still_valid(exp, key, old, runs):
                # recorded with this config and plan: skip (stamped with today's fingerprint)
                state["runs"][key] = {**old, "fingerprint": run_fingerprint(exp, cname, seed, runs)}
                kept += 1
                continue
            if report_only or (only and cname not in only) or (seeds and seed not in seeds):
                continue
            runs.mkdir(parents=True, exist_ok=True)
            print(f"sweep {name}: {key} ({exp.budget_s:.0f} s)", flush=True)
            state["runs"][key] = run_one(exp, cname, seed, runs)
            write_report(state, out)  # after every run: a stopped sweep keeps what it has
    # the base model is evaluated once per base fingerprint, shared between experiments
    state["base"] = known_base(exp, recorded, kept, results) or (
        state["base"] if report_only else None
    )
    if state["base"] is None and not report_only and state["runs"]:
        state["base"] = base_record(exp, runs)
    write_report(state, out)
    return state


def sweep_command(cmd: SweepCommand) -> dict:
    """``start.py sweep``: :func:`sweep` on the named or given experiment file.

    Raises:
        FileNotFoundError: neither a file nor a name under experiments/.
    """
    exit_on_sigterm()
    path = Path(cmd.experiment)
    if not path.suffix and not path.exists():
        path = REPO / "experiments" / f"{cmd.experiment}.toml"
    state = sweep(path, cmd.runs, cmd.results, cmd.only, cmd.report_only, cmd.seeds)
    print((Path(cmd.results or REPO / "experiments" / "results") / f"{path.stem}.md").read_text())
    return state
