"""Generation throughput: vLLM against HF ``generate``, same prompts, model, G and budget.

Both engines sample G completions for each of the same chat prompts of the default task
(SmolLM2-135M-Instruct), with the same temperature and max new tokens, on the same
machine, in this one script: HF first in this process, then vLLM (AsyncLLM, every
prompt in flight at once) for each dtype, each in a child process started as the
launcher starts a vLLM actor. Each engine gets one warm-up call, then ``--repeats`` timed
calls. Prints tokens/s of both and the ratio, and writes JSON.

    python bench/generation.py                # 64 prompts x G=4, 128 new tokens; vLLM bf16, fp32
    python bench/generation.py --dtypes float32 --threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import header


def _prompts(n: int, model_path: Path) -> list[list[int]]:
    from dashrl.actors.data import load_task
    from dashrl.actors.tasks import chat_prompt_ids
    from dashrl.protocol.config import DataConfig
    from dashrl.protocol.model import load_tokenizer

    tok = load_tokenizer(model_path)
    task = load_task(DataConfig(), seed=0)
    return [chat_prompt_ids(tok, p.question) for p in task.train[:n]]


def _tokens(gens) -> int:
    return sum(len(g.token_ids) for group in gens for g in group)


def bench_hf(model_path: Path, prompts, g: int, max_new: int, temp: float, repeats: int):
    from dashrl.actors.engine import HFEngine

    engine = HFEngine(model_path, seed=0)
    engine.generate(prompts[:2], g, 8, temp)  # warm-up
    tokens, t0 = 0, time.perf_counter()
    for _ in range(repeats):
        tokens += _tokens(engine.generate(prompts, g, max_new, temp))
    return tokens, time.perf_counter() - t0


async def bench_vllm(model_path: Path, prompts, g, max_new, temp, repeats, dtype):
    from dashrl.actors.vllm_engine import VLLMEngine

    t0 = time.perf_counter()
    engine = await VLLMEngine.create(model_path, seed=0, dtype=dtype)
    start_s = time.perf_counter() - t0
    try:
        await engine.agenerate(prompts[:2], g, 8, temp)  # warm-up
        tokens, t0 = 0, time.perf_counter()
        for _ in range(repeats):
            tokens += _tokens(await engine.agenerate(prompts, g, max_new, temp))
        return tokens, time.perf_counter() - t0, start_s
    finally:
        engine.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch/OpenMP threads of both engines")  # fmt: skip
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"],
                    help="vLLM dtypes, one engine each (HF runs float32)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=Path("bench/results/generation.json"))
    ap.add_argument("--vllm-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from dashrl.protocol.model import resolve_model
    from dashrl.protocol.runtime import actor_env

    model_path = resolve_model("smollm2-135m-instruct", Path("~/.cache/dashrl/models"))
    prompts = _prompts(args.prompts, model_path)
    common = (prompts, args.group_size, args.max_new_tokens, args.temperature, args.repeats)
    if args.vllm_child:  # one vLLM engine, in the environment an actor gives it
        print(json.dumps(asyncio.run(bench_vllm(model_path, *common, args.vllm_child))))
        return
    hf_tokens, hf_s = bench_hf(model_path, *common)
    hf_tps = hf_tokens / hf_s
    print(f"hf: {hf_tokens} tokens in {hf_s:.1f} s", flush=True)
    rows = []
    for dtype in args.dtypes:
        # a child process with the actor's environment (LD_PRELOAD tcmalloc + Intel OpenMP,
        # protocol/runtime.py actor_env), as the launcher starts a vLLM actor; HF ran here
        # without it, as an HF actor runs
        child = subprocess.run([sys.executable, *sys.argv, "--vllm-child", dtype],
                               env={**os.environ, **actor_env("vllm")}, capture_output=True,
                               text=True, check=True)  # fmt: skip
        line = [x for x in child.stdout.splitlines() if x.startswith("[")][-1]
        v_tokens, v_s, start_s = json.loads(line)
        rows.append({"engine": f"vllm-{dtype}", "tokens": v_tokens, "seconds": round(v_s, 2),
                     "tokens_per_s": round(v_tokens / v_s, 1), "start_s": round(start_s, 1),
                     "x_hf": round(v_tokens / v_s / hf_tps, 2)})  # fmt: skip
        print(f"vllm {dtype}: {v_tokens} tokens in {v_s:.1f} s (start {start_s:.0f} s)", flush=True)
    print(f"{'engine':<16}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}{'x hf':>7}")
    print(f"{'hf-float32':<16}{hf_tokens:>8}{hf_s:>9.1f}{hf_tps:>10.1f}{1.0:>7.2f}")
    for r in rows:
        print(f"{r['engine']:<16}{r['tokens']:>8}{r['seconds']:>9.1f}{r['tokens_per_s']:>10.1f}"
              f"{r['x_hf']:>7.2f}")  # fmt: skip
    result = {
        **header(), "prompts": args.prompts, "group_size": args.group_size,
        "max_new_tokens": args.max_new_tokens, "threads": args.threads,
        "hf_tokens": hf_tokens, "hf_s": round(hf_s, 2), "hf_tokens_per_s": round(hf_tps, 1),
        "vllm": rows,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
