"""``launch/start.py eval``: evaluate a model or a run's final checkpoint on benchmarks."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

from dashrl.actors.engine import HFEngine
from dashrl.launch.benchmarks import BENCHMARKS, HELDOUT, grade, load_benchmark
from dashrl.launch.commands import EvalCommand
from dashrl.launch.evaluate import (
    EvalSpec,
    heldout_spec,
    markdown_table,
    run_samples,
    summarize,
    write_results,
)
from dashrl.protocol.config import Config, load_config
from dashrl.protocol.model import resolve_model
from dashrl.protocol.runtime import set_thread_budget

log = logging.getLogger("dashrl.eval")


def resolve_eval_model(cmd: EvalCommand) -> tuple[Path, Config]:
    """The HF directory to evaluate and the run config whose data section "heldout" uses.

    Raises:
        FileNotFoundError: a run directory without checkpoints/final, or an unknown model.
    """
    path = Path(cmd.model).expanduser()
    if (path / "config.json").exists() and (path / "metrics.jsonl").exists():  # a run dir
        final = path / "checkpoints" / "final"
        if not (final / "config.json").exists():
            raise FileNotFoundError(f"run {path} has no checkpoints/final to evaluate")
        return final, load_config(path / "config.json")
    return resolve_model(cmd.model, cmd.cache_dir), Config()


def _as_reward(graded: tuple[str, bool]) -> tuple[str, float]:
    return graded[0], float(graded[1])


def run_eval(cmd: EvalCommand) -> dict:
    """Evaluate every requested benchmark; print and write the tables. Returns the summaries."""
    # Validate every benchmark (name, file, rows) before loading the model.
    loaded = {}
    for name in cmd.benchmark:
        if name == HELDOUT:
            continue
        loaded[name] = load_benchmark(name, cmd.data_dir, cmd.limit)
    set_thread_budget(cmd.threads)
    model_path, run_cfg = resolve_eval_model(cmd)
    out_dir = cmd.out_dir or (
        model_path.parent.parent / "eval"
        if model_path.name == "final"
        else Path("runs") / f"eval-{datetime.now():%Y%m%d-%H%M%S}"
    )
    import torch

    torch.manual_seed(cmd.seed)
    engine = HFEngine(model_path, seed=cmd.seed)
    summaries = {}
    for name in cmd.benchmark:
        if name == HELDOUT:
            spec = heldout_spec(run_cfg, cmd.limit)
        else:
            bench, probs = BENCHMARKS[name], loaded[name]
            spec = EvalSpec(
                problems=[(p.id, p.question, p.gold, p.groups) for p in probs],
                render=lambda q, t=bench.template: t.format(question=q),
                grade=lambda i, text, name=name, probs=probs: _as_reward(
                    grade(name, text, probs[i].gold)
                ),
                meta={"template": bench.template, "grader": bench.grader},
            )
        log.info("%s: %d problems x %d samples", name, len(spec.problems), cmd.k)
        results = run_samples(
            engine,
            spec,
            cmd.k,
            cmd.max_new_tokens,
            cmd.temperature,
            greedy=cmd.greedy,
            batch_prompts=cmd.batch_prompts,
            progress=True,
        )
        summary = summarize(results)
        meta = {**spec.meta, "model": str(model_path), "k": cmd.k, "limit": cmd.limit,
                "temperature": cmd.temperature, "max_new_tokens": cmd.max_new_tokens,
                "seed": cmd.seed, "chat_template": True}  # fmt: skip
        samples_path, md_path = write_results(out_dir, name, results, summary, meta)
        print(markdown_table(name, summary))
        log.info("wrote %s and %s", samples_path, md_path)
        summaries[name] = summary
    return summaries
