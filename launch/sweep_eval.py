"""The experiment runner's evaluator: one process, one engine, a run's checkpoints in turn.

``python -m dashrl.launch.sweep_eval JOB.json OUT.json`` reads a job written by
launch/sweep.py (the run's config file, the engine, and a list of checkpoints, each with
its k) and writes, per checkpoint, the held-out metrics as the seed papers report them:
avg@k (the task verifier's mean reward, partial credit included), maj@k, pass@j for
j = 1, 2, 4, ..., k (unbiased estimator, Chen et al. 2021), the mean completion length
and the share of completions cut at the token budget. Every system and every checkpoint
sees the same prompts (the run's held-out split, first N) and the same sampler settings
(the training temperature and completion budget), and the sampler's seed is the same
for each checkpoint.

It runs apart from the training run (after it), so evaluation never takes the cores from
training; and it is its own process so that vLLM's memory and threads go with it. With
vLLM one engine is started on the first checkpoint and each next one is loaded into it in
place (actors/vllm_worker.py ``dashrl_load_checkpoint``), which saves the engine's start
per checkpoint; the HF engine (tiny test models, which vLLM's CPU attention refuses)
loads each checkpoint afresh.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from dashrl.actors.engine import HFEngine
from dashrl.actors.vllm_engine import VLLMEngine
from dashrl.launch.evaluate import heldout_spec, run_samples, summarize
from dashrl.protocol.config import load_config
from dashrl.protocol.hardware import local_device, resolve_dtype
from dashrl.protocol.runtime import set_thread_budget, setup_logging


class _SyncVLLM:
    """A VLLMEngine behind the blocking ``generate`` that :func:`run_samples` calls."""

    def __init__(self, path: Path, dtype: str, seed: int, max_model_len: int,
                 prefix_cache: bool, block_size: int | None):  # fmt: skip
        self.loop = asyncio.new_event_loop()
        # Prefix caching lets the k samples of a prompt (and every prompt's chat template)
        # share one prefill; no weights change while requests run, and load_checkpoint
        # drops the cache with the old weights. Blocks of 32 tokens by default, as only
        # whole blocks are shared and a task prompt is ~50 (bench/eval_prefix_cache.py)
        start = VLLMEngine.create(path, seed=seed, dtype=dtype, max_model_len=max_model_len,
                                  enforce_eager=True,
                                  prefix_cache=prefix_cache, block_size=block_size)  # fmt: skip
        self.engine = self.loop.run_until_complete(start)
        self.tokenizer = self.engine.tokenizer

    def load(self, path: Path) -> None:
        self.loop.run_until_complete(self.engine.load_checkpoint(path))

    def generate(self, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float):
        return self.loop.run_until_complete(
            self.engine.agenerate(prompts, n, max_new_tokens, temperature)
        )

    def close(self) -> None:
        self.engine.shutdown()
        self.loop.close()


def checkpoint_metrics(results: list) -> dict[str, float]:
    """Flat metrics of one evaluated checkpoint: the "all" row of :func:`summarize` (each
    metric's mean, and its 95% half-width over prompts as ``<metric>_ci95``) plus the mean
    completion length (tokens) and the truncated share."""
    row = summarize(results)["all"]
    out: dict[str, float] = {"prompts": float(row["n"])}
    for metric, v in row.items():
        if isinstance(v, dict):
            out[metric], out[f"{metric}_ci95"] = v["mean"], v["ci95"]
    samples = [s for r in results for s in r.samples]
    out["reward_mean"] = sum(s.reward for s in samples) / len(samples)
    out["completion_len"] = sum(s.tokens for s in samples) / len(samples)
    out["truncated_frac"] = sum(s.finish_reason == "length" for s in samples) / len(samples)
    return out


def evaluate(job: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Evaluate ``job["checkpoints"]`` ([{"label", "path", "k"}]) of the run whose config is
    ``job["config"]`` on its first ``job["prompts"]`` held-out prompts; label -> metrics.
    Optional keys: ``threads`` (default 2), ``batch_prompts`` (64), ``prefix_cache`` (True:
    vLLM's prefix caching on), ``block_size`` (32 tokens per KV block; None: vLLM's).

    Raises:
        FileNotFoundError: a checkpoint directory does not exist.
        ValueError: an unknown engine.
    """
    import torch

    cfg = load_config(Path(job["config"]))
    set_thread_budget(job.get("threads", 2))
    spec = heldout_spec(cfg, limit=job["prompts"])
    engine, out = None, {}
    try:
        for ck in job["checkpoints"]:
            path = Path(ck["path"])
            if not (path / "config.json").exists():
                raise FileNotFoundError(f"checkpoint {path} not found (no config.json)")
            t0 = time.perf_counter()
            if job["engine"] == "vllm":
                if engine is None:
                    # the dtype the run's actors sampled in (auto: bf16 with bf16 units)
                    dtype = resolve_dtype(cfg.actor.vllm.dtype, local_device(), "eval")
                    engine = _SyncVLLM(path, str(dtype).removeprefix("torch."), cfg.seed,
                                       cfg.actor.vllm.max_model_len,
                                       job.get("prefix_cache", True),
                                       job.get("block_size", 32))  # fmt: skip
                else:
                    engine.load(path)
            elif job["engine"] == "hf":
                engine = HFEngine(path, seed=cfg.seed)
            else:
                raise ValueError(f"unknown engine {job['engine']!r} (vllm or hf)")
            torch.manual_seed(cfg.seed + 777)  # the same sampling noise for every checkpoint
            results = run_samples(engine, spec, int(ck["k"]), cfg.actor.max_new_tokens,
                                  cfg.actor.temperature, greedy=False,
                                  batch_prompts=job.get("batch_prompts", 64))  # fmt: skip
            out[ck["label"]] = {**checkpoint_metrics(results), "k": float(ck["k"]),
                                "eval_s": time.perf_counter() - t0}  # fmt: skip
            print(json.dumps({ck["label"]: out[ck["label"]]}), flush=True)
    finally:
        if isinstance(engine, _SyncVLLM):
            engine.close()
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    setup_logging("sweep-eval")
    job = json.loads(Path(argv[0]).read_text())
    Path(argv[1]).write_text(json.dumps(evaluate(job), indent=1) + "\n")


if __name__ == "__main__":
    main()
