"""GPU check (issue 20): what only a GPU can prove about dashrl's learner and weight sync,
in one run of at most 8 minutes on one GPU with no network and without vLLM.

Sections (each reports its figures or its error; one failing does not stop the others):

1. ``learner``: one optimizer step of the real Learner (torch backend, float32) on the GPU
   equals the same step on the CPU (max abs parameter difference), and in bf16 autocast;
2. ``deepspeed``: the DeepSpeed backend at ZeRO 0, 2 and 3, float32 and bf16, one step each
   against the torch backend on the same device;
3. ``sync``: two processes on one GPU with dashrl's real sender and receiver: the backend
   that auto picks for a shared GPU (gloo), weights arriving exact while the receiver's GPU
   runs a matmul loop standing in for the engine; and NCCL forced onto one GPU, which must
   fail (NCCL refuses two ranks of a group on one GPU) rather than hang;
4. ``transfer``: seconds per weight version for SmolLM2-135M's and a ~1.5B-parameter
   model's layout (random bf16 weights), against a device-to-device copy of the same bytes.

On a machine without a GPU, ``--device cpu`` runs every section that can run on the CPU
(the same code paths, CPU tensors), so the script itself is checked before a GPU is lent.

    bash bench/gpu_check.sh                      # on the GPU machine (README "Running on GPUs")
    python bench/gpu_check.py --device cpu --sizes 135m --model-dir .gpu/models/tiny
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

LAYOUTS = {  # (vocab, hidden, intermediate, layers, kv width): Llama-family shapes
    "135m": (49152, 576, 1536, 30, 192),  # SmolLM2-135M
    "1.5b": (151936, 1536, 8960, 28, 256),  # Qwen2.5-1.5B's shapes
}


def layout_shapes(name: str) -> list[tuple[int, ...]]:
    """Parameter shapes of a Llama-family model (tied embedding once)."""
    vocab, h, inter, layers, kv = LAYOUTS[name]
    shapes: list[tuple[int, ...]] = [(vocab, h)]
    for _ in range(layers):
        shapes += [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter), (h,), (h,)]
    return [*shapes, (h,)]


def make_config(model_dir: Path, run_dir: Path, **learner):
    from dashrl.protocol.config import Config

    return Config.model_validate({
        "run_dir": str(run_dir), "model": {"name": str(model_dir), "path": str(model_dir)},
        "actor": {"group_size": 4, "prompts_per_batch": 2, "engine": "hf"},
        "queue": {"filter_threshold": None},
        "learner": {"micro_batch_size": 4, "micro_batches_per_step": 2, "dtype": "float32",
                    "backend": "torch", **learner},
        "eval": {"heldout": False},
    })  # fmt: skip


def make_samples(vocab: int, n: int = 8, seed: int = 0) -> list:
    from dashrl.protocol import Sample

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, c = rng.integers(1, vocab, 12).astype(np.int32), rng.integers(1, vocab, 16)
        out.append(Sample.make(f"p{i // 2}", p, c.astype(np.int32),
                               np.full(16, -2.0, np.float32), 1.0, (-1.0) ** i, 0))  # fmt: skip
    return out


def step_params(model_dir: str, device: str, backend: str, stage: int, dtype: str, out) -> None:
    """One learner step on ``device``; puts the full parameters (CPU float32) on ``out``."""
    try:
        from dashrl.learner.learner import Learner

        torch.manual_seed(0)
        cfg = make_config(Path(model_dir), Path("/tmp/dashrl-gpu-check"), device=device,
                          backend=backend, zero_stage=stage, dtype=dtype)  # fmt: skip
        learner = Learner(cfg, connect=False)
        before = [p.detach().float().cpu().clone() for p in learner.backend.iter_full_parameters()]
        vocab = learner.model.get_input_embeddings().num_embeddings
        s = make_samples(vocab)
        learner.train_micro_batch(s[:4], scale=0.5, last=False)
        learner.train_micro_batch(s[4:], scale=0.5, last=True)
        norm, took = learner.optimizer_step()
        params = [p.detach().float().cpu().clone() for p in learner.backend.iter_full_parameters()]
        update = max(float((a - b).abs().max()) for a, b in zip(params, before, strict=True))
        out.put(("ok", [p.numpy() for p in params], float(norm), bool(took), update))
    except Exception:
        out.put(("error", traceback.format_exc(limit=6), 0.0, False, 0.0))


def in_process(target, *args, timeout_s: float = 240):
    """Run ``target(*args, queue)`` in a fresh spawned process; its one result."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    try:
        return q.get(timeout=timeout_s)
    finally:
        p.join(30)
        if p.is_alive():
            p.kill()


def max_diff(a: list, b: list) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def check_learner(args) -> dict:
    res: dict = {}
    cpu = in_process(step_params, args.model_dir, "cpu", "torch", 0, "float32")
    assert cpu[0] == "ok", cpu[1]
    for dtype in ("float32", "bfloat16"):
        dev = in_process(step_params, args.model_dir, args.device, "torch", 0, dtype)
        assert dev[0] == "ok", dev[1]
        res[f"{args.device}_{dtype}_vs_cpu_float32_max_abs_diff"] = max_diff(dev[1], cpu[1])
        res[f"{args.device}_{dtype}_grad_norm"] = dev[2]
    res["cpu_grad_norm"] = cpu[2]
    res["cpu_update_max_abs"] = cpu[4]  # what one step moved: the scale of the diffs above
    return res


def check_deepspeed(args) -> dict:
    res: dict = {}
    for dtype in ("float32", "bfloat16"):
        ref = in_process(step_params, args.model_dir, args.device, "torch", 0, dtype)
        assert ref[0] == "ok", ref[1]
        for stage in (0, 2, 3):
            got = in_process(step_params, args.model_dir, args.device, "deepspeed", stage, dtype)
            key = f"zero{stage}_{dtype}"
            if got[0] != "ok":
                res[key] = {"error": got[1][-1500:]}
                continue
            res[key] = {"max_abs_diff_vs_torch": max_diff(got[1], ref[1]), "stepped": got[3]}
    return res


def checksum(params: list[torch.Tensor]) -> tuple[float, list[float]]:
    """(sum of every value, the first 4096 values): equal only for the same weights."""
    return (sum(float(p.double().sum()) for p in params),
            params[0].reshape(-1)[:4096].float().cpu().tolist())  # fmt: skip


def _receiver(address: str, shapes, device: str, versions: int, busy: bool, out) -> None:
    """Receive ``versions`` versions into ``device`` tensors, a matmul loop running on the
    device meanwhile (the engine's stand-in); reports each version's checksum and time."""
    try:
        import threading

        from dashrl.protocol.receivers import WeightReceiver

        params = [torch.zeros(s, device=device) for s in shapes]
        rx = WeightReceiver(params, address, 2, 1, 120)
        out.put(("ready", rx.group.backend, time.time()))
        stop = threading.Event()

        def engine() -> None:  # keeps the device busy, as generation would
            a = torch.randn(2048, 2048, device=device)
            while not stop.is_set():
                a = (a @ a).clamp_(-1, 1)

        loop = threading.Thread(target=engine, daemon=True)
        if busy:
            loop.start()
        for v in range(1, versions + 1):
            while rx.apply() < v:
                if rx.stopped.is_set():
                    raise RuntimeError(f"receiver stopped: {rx.error!r}")
                time.sleep(0.001)
            out.put(("applied", v, time.time(), checksum(params)))
        stop.set()
        if busy:  # a daemon thread killed mid-matmul at exit aborts the process ("terminate
            loop.join(60)  # called without an active exception")
        rx._thread.join(60)
    except Exception:
        out.put(("error", traceback.format_exc(limit=6), 0.0, 0.0))


def run_sync(shapes, device: str, dtype: torch.dtype, versions: int, backend: str,
             busy: bool = True) -> dict:  # fmt: skip
    """Sender here, receiver in a spawned process; per-version send and delivery seconds."""
    from dashrl.protocol.runtime import free_port
    from dashrl.protocol.weights import WeightSender

    address = f"tcp://127.0.0.1:{free_port()}"
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_receiver, args=(address, shapes, device, versions, busy, out))
    proc.start()
    try:
        # values exact in the wire dtype; each version negates them (exact in any dtype)
        params = [torch.randn(s, device=device).to(dtype).float() for s in shapes]
        t0 = time.monotonic()
        tx = WeightSender(params, address, 2, 120, backend=backend, dtype=dtype)
        first = out.get(timeout=180)
        if first[0] != "ready":
            raise RuntimeError(first[1])
        rows = []
        for v in range(1, versions + 1):
            for p in params:
                p.neg_()
            expect = checksum(params)
            t_send = time.time()
            send_s = tx.send(v)
            got = out.get(timeout=300)
            if got[0] != "applied":
                raise RuntimeError(got[1])
            rows.append(
                {
                    "version": v,
                    "send_s": send_s,
                    "delivered_s": got[2] - t_send,
                    "exact": got[3][1] == expect[1]
                    and math.isclose(got[3][0], expect[0], rel_tol=1e-9, abs_tol=1e-3),
                }
            )
        tx.close()
        return {"backend": first[1], "rendezvous_s": time.monotonic() - t0, "versions": rows}
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()


def check_sync(args) -> dict:
    from dashrl.protocol.placement import resolve_weight_backend

    cuda = args.device == "cuda"
    auto = resolve_weight_backend("auto", [0], [0], 1, "vllm", cuda_available=cuda)
    shapes = [(8192, 8192)]  # 256 MB of float32
    res = {"auto_backend_on_a_shared_gpu": auto,
           "gloo": run_sync(shapes, args.device, torch.float32, 3, auto)}  # fmt: skip
    if not cuda:
        res["nccl_on_one_gpu"] = "skipped: no GPU"
        return res
    t0 = time.monotonic()
    try:
        run_sync(shapes, args.device, torch.float32, 1, "nccl", busy=False)
        res["nccl_on_one_gpu"] = {"failed": False, "seconds": time.monotonic() - t0}
    except Exception as e:
        res["nccl_on_one_gpu"] = {"failed": True, "seconds": time.monotonic() - t0,
                                  "error": str(e)[-600:]}  # fmt: skip
    return res


def check_transfer(args) -> dict:
    res = {}
    for name in args.sizes:
        shapes = layout_shapes(name)
        numel = sum(math.prod(s) for s in shapes)
        r = run_sync(shapes, args.device, torch.bfloat16, 2, "gloo", busy=False)
        flat = torch.empty(numel, dtype=torch.bfloat16, device=args.device)
        copy = torch.empty_like(flat)
        times = []
        for _ in range(3):
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            copy.copy_(flat)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        del flat, copy
        last = r["versions"][-1]
        res[name] = {"params": numel, "bytes_bf16": numel * 2, "backend": r["backend"],
                     "send_s": last["send_s"], "delivered_s": last["delivered_s"],
                     "exact": all(v["exact"] for v in r["versions"]),
                     "device_copy_s": min(times),
                     "delivered_over_device_copy": last["delivered_s"] / min(times)}  # fmt: skip
    return res


SECTIONS = {"learner": check_learner, "deepspeed": check_deepspeed, "sync": check_sync,
            "transfer": check_transfer}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--model-dir",
        type=Path,
        default=Path(".gpu/models/tiny"),
        help="a small HF model directory (bench/gpu_prepare.sh copies the tiny one)",
    )
    p.add_argument("--sizes", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--only", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--out", type=Path, default=Path("runs/gpu_check.json"))
    args = p.parse_args()
    args.model_dir = args.model_dir.resolve()
    info = {"device": args.device, "torch": torch.__version__, "python": sys.version.split()[0]}
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    results: dict = {"info": info}
    for name in args.only:
        t0 = time.monotonic()
        try:
            results[name] = SECTIONS[name](args)
        except Exception:
            results[name] = {"error": traceback.format_exc(limit=8)}
        results[name + "_s"] = round(time.monotonic() - t0, 1)
        print(json.dumps({name: results[name]}, indent=1, default=str), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
