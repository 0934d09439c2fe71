"""Evaluation as the seed papers report it: pass@k, maj@k, avg@k and greedy accuracy.

``launch/start.py eval`` samples K completions per problem (and one greedy completion)
with the actors' generation engine, grades them, and writes every sample to JSON and a
summary table (overall and per subject/level/type where the data has them) to Markdown.
:func:`heldout_reward` is the small in-run version: avg@k reward on the training task's
held-out prompts, used before/after training and every ``eval.every_steps`` steps.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dashrl.actors.data import load_task
from dashrl.actors.rewards import Rewards
from dashrl.actors.tasks import (
    RCRL_GOOD,
    Task,
    chat_prompt_ids,
    last_number,
    rcrl_question,
    system_prompt,
)
from dashrl.launch.eval_metrics import avg_at_k, maj_at_k, mean_ci95, pass_at_k
from dashrl.protocol.algorithms import get_algorithm
from dashrl.protocol.config import Config


@dataclass
class Graded:
    """One graded completion."""

    completion: str
    extracted: str
    reward: float
    """Verifier reward in [0, 1] (benchmarks: 0 or 1; reasoning-gym may give partial credit)."""
    tokens: int
    finish_reason: str

    @property
    def correct(self) -> bool:
        """Fully correct: reward 1."""
        return self.reward >= 1.0


@dataclass
class ProblemResult:
    """All samples of one problem."""

    id: str
    gold: str
    groups: dict[str, str]
    samples: list[Graded]
    greedy: Graded | None = None
    prompt: str = ""


@dataclass
class EvalSpec:
    """How to prompt and grade a list of problems: id, question, gold, groups per problem."""

    problems: list[tuple[str, str, str, dict[str, str]]]
    render: Callable[[str], str]  # question -> user message
    grade: Callable[[int, str], tuple[str, float]]  # (problem index, completion) -> answer, reward
    meta: dict[str, Any] = field(default_factory=dict)
    system: Callable[[int], str | None] = lambda i: None  # problem index -> system message


def run_samples(
    engine,
    spec: EvalSpec,
    k: int,
    max_new_tokens: int,
    temperature: float,
    greedy: bool = True,
    batch_prompts: int = 16,
    progress: bool = False,
) -> list[ProblemResult]:
    """Generate ``k`` samples (plus one greedy completion) per problem and grade them."""
    from tqdm import tqdm

    tok = engine.tokenizer
    results: list[ProblemResult] = []
    bar = tqdm(total=len(spec.problems), desc="eval", unit="problem", disable=not progress)
    for start in range(0, len(spec.problems), batch_prompts):
        chunk = spec.problems[start : start + batch_prompts]
        prompts = [chat_prompt_ids(tok, spec.render(q), system=spec.system(start + j))
                   for j, (_, q, _, _) in enumerate(chunk)]  # fmt: skip
        sampled = engine.generate(prompts, k, max_new_tokens, temperature)
        greedy_out = engine.generate(prompts, 1, max_new_tokens, 0.0) if greedy else None
        for j, (pid, q, gold, groups) in enumerate(chunk):

            def graded(g, idx=start + j) -> Graded:
                text = tok.decode(g.token_ids, skip_special_tokens=True)
                extracted, reward = spec.grade(idx, text)
                return Graded(text, extracted, float(reward), len(g.token_ids), g.finish_reason)

            results.append(
                ProblemResult(
                    id=pid,
                    gold=gold,
                    groups=groups,
                    samples=[graded(g) for g in sampled[j]],
                    greedy=graded(greedy_out[j][0]) if greedy_out else None,
                    prompt=spec.render(q),
                )
            )
        bar.update(len(chunk))
    bar.close()
    return results


def _pass_ks(k: int) -> list[int]:
    ks, x = [], 1
    while x < k:
        ks.append(x)
        x *= 2
    return [*ks, k]


def summarize(results: list[ProblemResult]) -> dict[str, dict[str, Any]]:
    """Metrics with 95% intervals, overall ("all") and per group value ("subject=Algebra").

    Each metric is ``{"mean": m, "ci95": half_width}`` over problems; pass@j uses the
    unbiased estimator with n = k samples; maj@j for j < k (j = 1, 2, 4, ... dividing k)
    is the mean of maj@j over the k / j disjoint blocks of j samples, in sampling order
    (unbiased, as each block is j independent samples), so maj@1 is the accuracy of one
    sample, Havrilla et al.'s maj@1.
    """
    buckets: dict[str, list[ProblemResult]] = defaultdict(list)
    for r in results:
        buckets["all"].append(r)
        for key, value in r.groups.items():
            buckets[f"{key}={value}"].append(r)
    out: dict[str, dict[str, Any]] = {}
    for name, rs in buckets.items():
        k = len(rs[0].samples)
        per: dict[str, list[float]] = defaultdict(list)
        for r in rs:
            correct = [s.correct for s in r.samples]
            per[f"avg@{k}"].append(avg_at_k(correct))
            answers = [s.extracted for s in r.samples]
            for j in _pass_ks(k):
                if k % j == 0:  # maj@j: the mean over the k / j disjoint blocks of j samples
                    blocks = [
                        maj_at_k(answers[i : i + j], correct[i : i + j]) for i in range(0, k, j)
                    ]
                    per[f"maj@{j}"].append(sum(blocks) / len(blocks))
            for j in _pass_ks(k):
                per[f"pass@{j}"].append(pass_at_k(k, sum(correct), j))
            if r.greedy is not None:
                per["greedy"].append(float(r.greedy.correct))
        row: dict[str, Any] = {"n": len(rs)}
        for metric, values in per.items():
            m, ci = mean_ci95(values)
            row[metric] = {"mean": m, "ci95": ci}
        out[name] = row
    return out


def markdown_table(title: str, summary: dict[str, dict[str, Any]]) -> str:
    """The summary as a Markdown table: one row per bucket, mean ± 95% CI in percent."""
    metrics = [m for m in summary["all"] if m != "n"]
    lines = [f"### {title}", "", "| subset | n | " + " | ".join(metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]  # fmt: skip
    for name in ["all", *sorted(b for b in summary if b != "all")]:
        row = summary[name]
        cells = []
        for m in metrics:
            if m in row:
                ci = row[m]["ci95"]
                ci_txt = "" if ci != ci else f" ± {100 * ci:.1f}"  # NaN for n == 1
                cells.append(f"{100 * row[m]['mean']:.1f}{ci_txt}")
            else:
                cells.append("-")
        lines.append(f"| {name} | {row['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def heldout_spec(cfg: Config, limit: int | None = None, task: Task | None = None) -> EvalSpec:
    """The training task's held-out prompts (first ``limit``), graded by the task's verifier
    (its reward, partial credit included); the extracted answer is the last number."""
    task = task or load_task(cfg.data, cfg.seed)  # a caller that has it loaded passes it
    probs = task.heldout[:limit]
    suffix = cfg.data.prompt_suffix
    rcrl = get_algorithm(cfg.algo).prompt_tags  # an RCRL policy is evaluated under the good tag
    rewards = Rewards(cfg.reward, task)  # graded by correctness alone, never a format bonus
    timeout = cfg.actor.verifier_timeout_s
    return EvalSpec(
        problems=[(p.id, p.question, p.answer, {}) for p in probs],
        render=lambda q: (rcrl_question(q, True) if rcrl else q) + suffix,
        grade=lambda i, text: (
            last_number(text) or "",
            rewards.correctness_value(probs[i], text, timeout_s=timeout),
        ),
        meta={
            "template": (RCRL_GOOD + " " if rcrl else "") + "{question}" + suffix,
            "task": task.name,
            "correctness": rewards.correctness,
            "system_prompt": cfg.data.system_prompt,
        },  # fmt: skip
        system=lambda i: system_prompt(probs[i], cfg.data.system_prompt),
    )


def heldout_reward(
    cfg: Config, engine, batch_prompts: int = 16, task: Task | None = None
) -> dict[str, float]:
    """Mean reward (the task's verifier, as in training) of k samples per held-out prompt at
    the training temperature; pass_at_k counts prompts with a fully correct sample.

    Returns:
        {"reward_mean", "pass_at_k", "prompts", "samples_per_prompt", "seconds"}.
    """
    import torch

    t0 = time.perf_counter()
    spec = heldout_spec(cfg, task=task)
    rng_state = torch.get_rng_state()
    torch.manual_seed(cfg.seed + 777)  # same sampling noise before, during and after training
    try:
        results = run_samples(
            engine,
            spec,
            cfg.eval.samples_per_prompt,
            cfg.actor.max_new_tokens,
            cfg.actor.temperature,
            greedy=False,
            batch_prompts=batch_prompts,
        )
    finally:
        torch.set_rng_state(rng_state)
    rewards = [s.reward for r in results for s in r.samples]
    return {
        "reward_mean": sum(rewards) / len(rewards),
        "pass_at_k": sum(any(s.correct for s in r.samples) for r in results) / len(results),
        "prompts": float(len(results)),
        "samples_per_prompt": float(cfg.eval.samples_per_prompt),
        "seconds": time.perf_counter() - t0,
    }


def write_results(
    out_dir: Path, name: str, results: list[ProblemResult], summary: dict, meta: dict[str, Any]
) -> tuple[Path, Path]:
    """Write ``<name>_samples.json`` (every sample) and ``<name>_summary.md``/``.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = out_dir / f"{name}_samples.json"
    problems = [asdict(r) for r in results]
    for p, r in zip(problems, results, strict=True):  # asdict() leaves out the property
        for d, g in zip(p["samples"], r.samples, strict=True):
            d["correct"] = g.correct
        if r.greedy is not None:
            p["greedy"]["correct"] = r.greedy.correct
    samples.write_text(json.dumps({"meta": meta, "problems": problems}, indent=1))
    (out_dir / f"{name}_summary.json").write_text(json.dumps({"meta": meta, "summary": summary},
                                                             indent=2))  # fmt: skip
    md = out_dir / f"{name}_summary.md"
    md.write_text(markdown_table(name, summary) + f"\nprompt template: `{meta['template']!r}`\n")
    return samples, md
