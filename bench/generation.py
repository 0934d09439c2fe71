"""Generation throughput: vLLM against HF ``generate``, same prompts, model, G and budget.

Both engines sample G completions for each of the same chat prompts of the default task
(SmolLM2-135M-Instruct), with the same temperature and max new tokens, on the same
machine, in this one script: HF first in this process, then vLLM (AsyncLLM, every
prompt in flight at once). Each engine gets one warm-up call, then ``--repeats`` timed
calls. Prints tokens/s of both and the ratio, and writes JSON.

    python bench/generation.py                      # 64 prompts x G=4, 128 new tokens
    python bench/generation.py --dtype bfloat16 --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path


def _prompts(n: int, model_path: Path) -> list[list[int]]:
    from dashrl.actors.tasks import chat_prompt_ids, load_task
    from dashrl.launch.config import DataConfig
    from dashrl.launch.model import load_tokenizer

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
    ap.add_argument("--dtype", default="bfloat16", help="vLLM dtype (HF runs float32)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/generation.json"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from dashrl.launch.model import resolve_model

    model_path = resolve_model("smollm2-135m-instruct", Path("~/.cache/dashrl/models"))
    prompts = _prompts(args.prompts, model_path)
    common = (prompts, args.group_size, args.max_new_tokens, args.temperature, args.repeats)
    hf_tokens, hf_s = bench_hf(model_path, *common)
    print(f"hf: {hf_tokens} tokens in {hf_s:.1f} s", flush=True)
    v_tokens, v_s, start_s = asyncio.run(bench_vllm(model_path, *common, args.dtype))
    hf_tps, v_tps = hf_tokens / hf_s, v_tokens / v_s
    row = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "prompts": args.prompts, "group_size": args.group_size,
        "max_new_tokens": args.max_new_tokens, "threads": args.threads, "vllm_dtype": args.dtype,
        "hf_tokens": hf_tokens, "hf_s": round(hf_s, 2), "hf_tokens_per_s": round(hf_tps, 1),
        "vllm_tokens": v_tokens, "vllm_s": round(v_s, 2), "vllm_tokens_per_s": round(v_tps, 1),
        "vllm_start_s": round(start_s, 1), "ratio": round(v_tps / hf_tps, 2),
    }  # fmt: skip
    print(f"{'engine':<8}{'tokens':>9}{'seconds':>9}{'tokens/s':>10}")
    print(f"{'hf':<8}{hf_tokens:>9}{hf_s:>9.1f}{hf_tps:>10.1f}")
    print(f"{'vllm':<8}{v_tokens:>9}{v_s:>9.1f}{v_tps:>10.1f}")
    print(f"vllm / hf = {row['ratio']:.2f}x  (vLLM start {start_s:.0f} s, {args.dtype})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
