"""Held-out evaluation with vLLM's prefix caching off and on: seconds and metrics.

The experiment runner's evaluator (launch/sweep_eval.py) samples k completions for each
held-out prompt. Without prefix caching vLLM prefills the prompt (chat template
included) once per sample; with it, the k samples share one prefill. Evaluation is about
half of each sweep run's wall time on 2 cores (a 256 x 32 evaluation of the base model
took 626 s), so this decides how many runs fit in a sitting.

vLLM's CPU backend defaults to 128 tokens per KV block and only whole blocks are shared,
so a ~50-token task prompt shares nothing until the block size is 32.

Every setting evaluates the same checkpoint (the base model) on the same prompts, each in
its own process (the runner's own path: ``python -m dashrl.launch.sweep_eval``), off
first; a speed-up is the ratio of two times measured in this one script. The
metrics must agree within sampling noise (the samples are random, not identical).

    python bench/eval_prefix_cache.py --prompts 32 --k 32
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from common import header, print_table  # noqa: E402  (bench/ scripts are run as files)


def run_eval(config: Path, model: Path, prompts: int, k: int, prefix_cache: bool,
             block_size: int | None, work: Path) -> dict:  # fmt: skip
    """One evaluation in its own process; the metrics plus ``wall_s`` (engine start
    included) and ``eval_s`` (sampling and grading only)."""
    tag = f"{'on' if prefix_cache else 'off'}/{block_size or 'default'}"
    job = {"config": str(config), "prompts": prompts, "engine": "vllm",
           "prefix_cache": prefix_cache, "block_size": block_size,
           "checkpoints": [{"label": tag, "path": str(model), "k": k}]}  # fmt: skip
    name = tag.replace("/", "_")
    (work / f"job_{name}.json").write_text(json.dumps(job))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dashrl.launch.sweep_eval",
                    str(work / f"job_{name}.json"), str(work / f"out_{name}.json")],
                   check=True)  # fmt: skip
    out = json.loads((work / f"out_{name}.json").read_text())[tag]
    return {"setting": tag, "wall_s": time.perf_counter() - t0, **out}


SETTINGS = [(False, None), (True, None), (True, 32)]
"""(prefix caching, block size): the old evaluator, caching with vLLM's CPU default of 128
tokens per block, and caching with 32 (the evaluator's setting)."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default="sft_vs_rl", help="its base config and task")
    ap.add_argument("--prompts", type=int, default=32, help="held-out prompts")
    ap.add_argument("--k", type=int, default=32, help="samples per prompt")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "eval_prefix_cache.json")
    args = ap.parse_args()

    from dashrl.launch.experiment import load_experiment, run_config
    from dashrl.protocol.model import resolve_model

    exp = load_experiment(REPO / "experiments" / f"{args.experiment}.toml")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg = run_config(exp, next(iter(exp.configs)), exp.seeds[0], work / "run")
        (work / "config.json").write_text(cfg.model_dump_json(indent=1))
        model = resolve_model(cfg.model.name, cfg.model.cache_dir)
        rows = [run_eval(work / "config.json", model, args.prompts, args.k, pc, bs, work)
                for pc, bs in SETTINGS]  # fmt: skip
    off, on = rows[0], rows[-1]
    result = {**header(), "experiment": args.experiment, "prompts": args.prompts, "k": args.k,
              "speedup_eval": off["eval_s"] / on["eval_s"],
              "speedup_wall": off["wall_s"] / on["wall_s"], "rows": rows}  # fmt: skip
    print_table(rows, [("setting", "cache/block", "s"), ("wall_s", "wall s", ".1f"),
                       ("eval_s", "eval s", ".1f"), (f"avg@{args.k}", f"avg@{args.k}", ".3f"),
                       (f"avg@{args.k}_ci95", "+-", ".3f"),
                       (f"pass@{args.k}", f"pass@{args.k}", ".3f"),
                       ("completion_len", "tokens", ".2f")])  # fmt: skip
    print(
        f"speed-up with prefix caching: evaluation {result['speedup_eval']:.2f}x, "
        f"with engine start {result['speedup_wall']:.2f}x"
    )
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
