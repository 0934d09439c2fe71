"""``start.py replay RUN_DIR``: re-run a run's learner on its logged micro-batches; inspect logs.

The queue's log (queue/log.py) names every micro-batch the learner received, in order. A
replay builds a fresh learner from the run's own config.json (same model, seed, algorithm,
backend and thread count), answers each of its requests with the next logged micro-batch
instead of asking a queue, and runs no actor and no weight broadcast. The learner's
computation is then the original one, so on CPU its metrics must match the original
metrics.jsonl bit for bit; the replay reports the first step and metric that differ.
That turns "the loss spiked at step 41" into something one can step through in a debugger.

``--inspect`` summarises the log (counts, versions, staleness and |advantage| histograms,
reward per task) and ``--show N`` prints N logged rollouts as text.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from dashrl.launch.commands import ReplayCommand
from dashrl.learner.learner import Learner, train
from dashrl.learner.sources import LogSource
from dashrl.protocol import Sample, group_to_samples
from dashrl.protocol.config import load_config
from dashrl.protocol.model import load_tokenizer
from dashrl.protocol.runtime import StopFlag, read_jsonl, set_thread_budget
from dashrl.queue.log import ROLLOUT_LOG, DamagedLogError, QueueLog, read_queue_log

log = logging.getLogger("dashrl.replay")

COMPARED = (
    "version",
    "learner/loss",
    "learner/clip_frac",
    "learner/grad_norm",
    "learner/entropy",
    "learner/approx_kl_behaviour",
    "learner/ratio_mean",
    "learner/logprob_abs_diff",
    "learner/step_taken",
    "learner/completion_tokens",
)
"""Metrics that depend only on the learner's computation (not on timing), compared exactly."""


def compare(original: list[dict], replayed: list[dict]) -> dict:
    """Exact comparison of :data:`COMPARED` metrics, step by step.

    Returns:
        {"steps_compared", "identical", "first_difference": None or {step, metric, original,
        replayed}, "max_abs_diff": {metric: float}}.
    """
    first, max_diff = None, {}
    n = min(len(original), len(replayed))
    for a, b in zip(original[:n], replayed[:n], strict=True):
        for k in COMPARED:
            if k not in a:
                continue
            x, y = a[k], b.get(k)
            same = x == y or (isinstance(x, float) and isinstance(y, float)
                              and math.isnan(x) and math.isnan(y))  # fmt: skip
            if not same:
                if first is None:
                    first = {"step": a["step"], "metric": k, "original": x, "replayed": y}
                if y is not None:
                    max_diff[k] = max(max_diff.get(k, 0.0), abs(float(x) - float(y)))
    return {
        "steps_compared": n,
        "steps_original": len(original),
        "steps_replayed": len(replayed),
        "identical": first is None and len(original) == len(replayed),
        "first_difference": first,
        "max_abs_diff": max_diff,
    }


def replay(cmd: ReplayCommand) -> dict:
    """Replay the run in ``cmd.run_dir`` (see module docstring); writes replay.json.

    Raises:
        FileNotFoundError: the run has no config.json, metrics.jsonl or queue log.
    """
    run_dir = Path(cmd.run_dir)
    for need in ("config.json", "metrics.jsonl", ROLLOUT_LOG):
        if not (run_dir / need).exists():
            raise FileNotFoundError(f"{run_dir / need}: not a dashrl run directory with a log")
    original = read_jsonl(run_dir / "metrics.jsonl")
    cfg = load_config(run_dir / "config.json")
    out = Path(cmd.out or run_dir / "replay")
    out.mkdir(parents=True, exist_ok=cmd.overwrite)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    steps = cmd.steps or len(original)
    cfg = cfg.model_copy(deep=True, update={"run_dir": out, "time_limit_s": 1e9})
    cfg.learner.steps, cfg.learner.checkpoint_every, cfg.eval.every_steps = steps, 0, 0
    cfg.learner.num_ranks = 1
    set_thread_budget(cfg.learner.torch_threads)  # same threads, same float reductions
    served = read_queue_log(run_dir / ROLLOUT_LOG, strict=True).served()
    stop = StopFlag()
    source = LogSource(served, stop)
    train(cfg, stop, learner=Learner(cfg, connect=False), source=source)
    result = compare(original[:steps], read_jsonl(out / "metrics.jsonl"))
    result["micro_batches_logged"] = len(served)
    result["version_mismatches"] = source.version_mismatches
    (out / "replay.json").write_text(json.dumps(result, indent=1))
    return result


def _hist(values: list[float], bins: int = 8) -> list[str]:
    if not values:
        return ["  (none)"]
    counts, edges = np.histogram(np.asarray(values, dtype=float), bins=bins)
    top = max(counts.max(), 1)
    return [f"  [{lo:8.3f}, {hi:8.3f})  {c:7d}  {'#' * int(40 * c / top)}"
            for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True)]  # fmt: skip


def inspect(qlog: QueueLog, max_uses: int = 1) -> dict:
    """Counts and histograms of a queue log (printed by ``--inspect``); ``max_uses``: the
    run's ``queue.max_uses`` (a sample served fewer times is still pending)."""
    samples = [s for g in qlog.groups for s in _samples(g)]
    kinds = Counter()
    for e in qlog.events:
        kinds[e.kind] += len(e.refs)
    lags = [e.learner_version - s.policy_version for e, mb in qlog.served() for s in mb]
    per_task: dict[str, list[float]] = defaultdict(list)
    for g in qlog.groups:
        per_task[g.task or "?"] += [c.reward for c in g.completions]
    return {
        "groups": len(qlog.groups),
        "samples_accepted": len(samples),
        "samples_served": kinds["served"],
        "samples_evicted_stale": kinds["evicted_stale"],
        "samples_evicted_capacity": kinds["evicted_capacity"],
        "samples_evicted_low_priority": kinds["evicted_low_priority"],
        "priority_updates": kinds["priority"],
        "samples_pending": len(qlog.pending_refs(max_uses)),
        "micro_batches": sum(e.kind == "served" for e in qlog.events),
        "policy_versions": dict(sorted(Counter(s.policy_version for s in samples).items())),
        "served_staleness": dict(sorted(Counter(lags).items())),
        "reward_mean_per_task": {t: float(np.mean(r)) for t, r in per_task.items()},
        "abs_advantage": [abs(s.advantage) for s in samples],
    }


def _samples(group) -> list[Sample]:
    return group_to_samples(group)


def print_inspect(summary: dict) -> None:
    """Print :func:`inspect`'s summary as text."""
    adv = summary.pop("abs_advantage")
    for k, v in summary.items():
        print(f"{k}: {v}")
    print("|advantage| of accepted samples:")
    print("\n".join(_hist(adv)))


def show(qlog: QueueLog, model_path: Path, n: int) -> None:
    """Print the first ``n`` logged rollouts (prompt and completion text, reward, advantage)."""
    tok = load_tokenizer(model_path)
    shown = 0
    for gi, g in enumerate(qlog.groups):
        prompt = tok.decode(g.prompt_ids, skip_special_tokens=True)
        for ci, c in enumerate(g.completions):
            if shown >= n:
                return
            text = tok.decode(c.token_ids, skip_special_tokens=True)
            print(f"--- [{gi},{ci}] {g.prompt_id} actor={g.actor_id} v{c.policy_version} "
                  f"reward={c.reward:.3f} A={c.advantage:+.3f} {c.finish_reason}")  # fmt: skip
            print(f"prompt: {prompt.strip()[-300:]}")
            print(f"completion: {text.strip()}")
            shown += 1


def run_replay_command(cmd: ReplayCommand) -> dict | None:
    """``start.py replay``: inspect, show, or replay (the default)."""
    run_dir = Path(cmd.run_dir)
    log_path = run_dir / ROLLOUT_LOG if run_dir.is_dir() else run_dir
    if cmd.inspect or cmd.show:
        if not log_path.exists():
            raise FileNotFoundError(f"{log_path}: no queue log")
        qlog = read_queue_log(log_path)
        print(f"log: {qlog.report.describe()}")
        if not qlog.report.accountable:  # its log indices cannot be trusted
            raise DamagedLogError(f"{log_path}: damaged beyond a torn tail: "
                                  f"{qlog.report.describe()}")  # fmt: skip
        if cmd.inspect:
            cfg_path = log_path.parent.parent / "config.json"
            max_uses = load_config(cfg_path).queue.max_uses if cfg_path.exists() else 1
            print_inspect(inspect(qlog, max_uses))
        if cmd.show:
            cfg_path = log_path.parent.parent / "config.json"
            show(qlog, load_config(cfg_path).model.path, cmd.show)
        return None
    result = replay(cmd)
    verdict = "identical" if result["identical"] else f"differs: {result['first_difference']}"
    print(f"replayed {result['steps_replayed']} of {result['steps_original']} steps "
          f"from {result['micro_batches_logged']} logged micro-batches: {verdict}")  # fmt: skip
    return result
