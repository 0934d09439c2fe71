"""Weight sync: seconds from the learner's send to every actor using the new weights.

The learner side is the real :class:`~dashrl.protocol.weights.WeightSender` (launch-time
actors: a stateless gloo group) or :class:`~dashrl.learner.nodes.WeightPublisher`
(attached nodes: ZeroMQ PUB), holding SmolLM2-135M-Instruct's parameters. Each actor is a
separate process with the real receiver and tensors of the same shapes; it polls
``apply()`` (the HF engine's swap-in) and reports the wall-clock time at which the new
version is in its tensors. Delivery time = last actor's apply time - send start. The
last row loads them into a live vLLM engine (ZeroMQ into its worker, then the actor's
in-flight ``apply_weights``: pause, in-place reload, KV reset, resume). The
baseline is a plain memcpy of the same bytes (``torch.Tensor.copy_`` of one flat float32
buffer) in this process. Prints one table, writes JSON.

    python bench/weight_sync.py     # 1 and 4 actors, gloo and ZeroMQ, and one live vLLM engine
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from pathlib import Path

from common import header, print_table


def _actor(kind: str, address: str, rank: int, world: int, shapes, versions: int, out) -> None:
    import torch

    from dashrl.protocol.receivers import open_receiver
    from dashrl.protocol.weights import WeightSource

    torch.set_num_threads(1)
    params = [torch.zeros(s) for s in shapes]
    if kind == "gloo":
        src = WeightSource("group", init_method=address, world_size=world, rank=rank)
    else:
        src = WeightSource("zmq", endpoint=address)
    rx = open_receiver(src, params)
    out.put(("ready", rank, 0.0))
    for v in range(1, versions + 1):
        while rx.apply() < v:
            if rx.stopped.is_set():
                out.put(("error", rank, str(rx.error)))
                return
            time.sleep(0.0005)
        out.put(("applied", v, time.time()))
    if kind == "zmq":
        rx.close()
    else:
        rx._thread.join(timeout=30)  # until the sender's stop header


def run(kind: str, actors: int, params, versions: int) -> list[float]:
    """Delivery seconds of each version (the first version is a warm-up, dropped)."""
    import torch

    from dashrl.learner.nodes import WeightPublisher
    from dashrl.protocol.runtime import free_port
    from dashrl.protocol.weights import WeightSender, layout_hash

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    shapes = [tuple(p.shape) for p in params]
    procs = [ctx.Process(target=_actor, args=(kind, address, i + 1, actors + 1, shapes,
                                              versions, out)) for i in range(actors)]  # fmt: skip
    publisher = None
    if kind == "zmq":
        publisher = WeightPublisher(address, layout_hash(params))
    for p in procs:
        p.start()
    sender = WeightSender(params, address, actors + 1, 600) if kind == "gloo" else None
    for _ in range(actors):
        assert out.get(timeout=300)[0] == "ready"
    time.sleep(1.0)  # SUB sockets finish connecting
    flat = torch.cat([p.reshape(-1) for p in params]) if kind == "zmq" else None
    times = []
    for v in range(1, versions + 1):
        t0 = time.time()
        if sender is not None:
            sender.send(v)
        else:
            publisher.publish(v, torch.cat([p.reshape(-1) for p in params], out=flat))
        applied = [out.get(timeout=300) for _ in range(actors)]
        if any(a[0] != "applied" for a in applied):
            raise RuntimeError(f"an actor failed: {applied}")
        times.append(max(a[2] for a in applied) - t0)
    if sender is not None:
        sender.close()
    for p in procs:
        p.join(60)
    if publisher is not None:
        publisher.close()
    return times[1:]


async def _vllm_apply(path: Path, params, versions: int) -> list[tuple[float, float]]:
    """(delivery s, load s) per version into one live vLLM engine over the ZeroMQ path:
    delivery = publish -> staged in vLLM's worker; load = apply_weights (pause, in-place
    reload, resume; the engine's default ``kv_on_update="keep"`` resets no cache)."""
    import asyncio

    import torch

    from dashrl.actors.vllm_engine import VLLMEngine
    from dashrl.learner.nodes import WeightPublisher
    from dashrl.protocol.runtime import free_port
    from dashrl.protocol.weights import WeightSource, layout_hash

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    publisher = WeightPublisher(endpoint, layout_hash(params))
    engine = await VLLMEngine.create(path, dtype="float32", kv_cache_gib=1)
    flat = torch.cat([p.reshape(-1) for p in params])
    out = []
    try:
        await engine.connect_weights(WeightSource("zmq", endpoint=endpoint))
        await asyncio.sleep(1.0)
        for v in range(1, versions + 1):
            t0 = time.time()
            publisher.publish(v, flat)
            while (await engine.llm.collective_rpc("dashrl_staged_version"))[0] != v:
                await asyncio.sleep(0.005)
            t1 = time.time()
            assert await engine.apply_weights() == v
            out.append((t1 - t0, time.time() - t1))
    finally:
        engine.shutdown()
        publisher.close()
    return out[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--versions", type=int, default=4, help="updates per row (first = warm-up)")
    ap.add_argument("--no-vllm", action="store_true", help="skip the live vLLM engine row")
    ap.add_argument("--out", type=Path, default=Path("bench/results/weight_sync.json"))
    args = ap.parse_args()
    import torch

    from dashrl.protocol.config import Config
    from dashrl.protocol.model import load_causal_lm, resolve_model

    path = resolve_model("smollm2-135m-instruct", Config().model.cache_dir)
    params = [p.detach() for p in load_causal_lm(path).parameters()]
    nbytes = sum(p.numel() for p in params) * 4
    src = torch.cat([p.reshape(-1) for p in params])
    dst = torch.empty_like(src)
    copies = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        copies.append(time.perf_counter() - t0)
    memcpy_s = statistics.median(copies)
    rows = []
    for kind in ("gloo", "zmq"):
        for n in args.actors:
            times = run(kind, n, params, args.versions)
            s = statistics.median(times)
            rows.append({"transport": kind, "actors": n, "seconds": round(s, 3),
                         "gb_per_s": round(nbytes * n / s / 1e9, 2),
                         "x_memcpy": round(s / memcpy_s, 1)})  # fmt: skip
    if not args.no_vllm:  # the same bytes into vLLM's worker, then in use in the engine
        import asyncio

        got = asyncio.run(_vllm_apply(path, params, args.versions))
        d = statistics.median(x for x, _ in got)
        load = statistics.median(y for _, y in got)
        rows.append({"transport": "zmq+vllm", "actors": 1, "seconds": round(d + load, 3),
                     "gb_per_s": round(nbytes / (d + load) / 1e9, 2),
                     "x_memcpy": round((d + load) / memcpy_s, 1),
                     "delivery_s": round(d, 3), "vllm_load_s": round(load, 3)})  # fmt: skip
    print(f"weights: {nbytes / 1e6:.0f} MB float32; memcpy {memcpy_s:.3f} s "
          f"({nbytes / memcpy_s / 1e9:.1f} GB/s)")  # fmt: skip
    print_table(rows, [("transport", "transport", ""), ("actors", "actors", "d"),
                       ("seconds", "seconds", ".3f"), ("gb_per_s", "GB/s", ".2f"),
                       ("x_memcpy", "x memcpy", ".1f")])  # fmt: skip
    result = {**header(), "bytes": nbytes, "memcpy_s": round(memcpy_s, 4), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
