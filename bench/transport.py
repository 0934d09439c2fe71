"""Transport: rollouts/s through protocol + ZeroMQ + priority queue + micro-batch reply,
against raw ZeroMQ PUSH/PULL moving the same bytes; and the queue's memory per rollout.

dashrl path: this process encodes RolloutGroups (G completions of ``--tokens`` tokens each,
a 128-token prompt) and PUSHes them to a real queue process (``python -m
dashrl.queue.server``: strict decode, |A| ranking, rollout log on disk), while a
:class:`~dashrl.queue.client.QueueClient` pulls micro-batches until every rollout came
back. Raw path: the same encoded frames PUSHed to a process that only PULLs and counts
bytes. Both cross a process boundary over TCP on the loopback. Memory: the queue
process's RSS growth while it holds ``--hold`` rollouts, divided by that number.

    python bench/transport.py                # 2,000 groups x 8 rollouts of 1k tokens
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import header

RAW_SINK = """
import sys, zmq
ctx = zmq.Context(); pull = ctx.socket(zmq.PULL); pull.bind(sys.argv[1])
done = ctx.socket(zmq.PUSH); done.connect(sys.argv[2])
n, total = 0, int(sys.argv[3])
while n < total:
    pull.recv(copy=False); n += 1
done.send(b"done"); done.close(linger=5000); pull.close(linger=0); ctx.term()
"""


def _groups(n: int, g: int, tokens: int):
    import numpy as np

    from dashrl.protocol import Completion, RolloutGroup

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 49152, 128).astype(np.int32)
    for i in range(n):
        comps = [Completion(rng.integers(0, 49152, tokens).astype(np.int32),
                            np.full(tokens, -0.5, np.float32), float(j % 2),
                            float(j % 2) - 0.5, "length", 0) for j in range(g)]  # fmt: skip
        yield RolloutGroup(f"p{i}", prompt, comps, "bench", "bench")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def bench_queue(frames: list[bytes], rollouts: int, run_dir: Path, hold: int, g: int,
                log: bool = True):  # fmt: skip
    import zmq

    from dashrl.protocol.config import Config
    from dashrl.protocol.runtime import free_port
    from dashrl.queue.client import QueueClient

    rollout_port, request_port = free_port(), free_port()
    cfg = Config.model_validate({
        "run_dir": str(run_dir), "model": {"name": "tiny-random"},
        "queue": {"capacity": max(rollouts, hold) + 1, "max_staleness": 10**6,
                  "log_rollouts": log},
        "transport": {"rollout_port": rollout_port, "request_port": request_port},
    })  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.model_dump_json())
    proc = subprocess.Popen([sys.executable, "-m", "dashrl.queue.server",
                             str(run_dir / "config.json")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{rollout_port}")
    client = QueueClient(f"tcp://127.0.0.1:{request_port}")
    try:
        client.request(0, 1, "sequences", timeout_s=60)  # the queue is up
        base = _rss_mb(proc.pid)
        for f in frames[: hold // g]:  # memory: hold rollouts, nothing pulled
            push.send(f)
        too_many = 10**7  # a request the queue cannot fill: an empty reply with its stats
        while client.request(0, too_many, "sequences").stats.get("queue/size", 0) < hold:
            time.sleep(0.1)
        per_rollout_kb = (_rss_mb(proc.pid) - base) * 1024 / hold
        got = 0
        while got < hold:  # drain them
            got += len(client.request(0, min(256, hold - got), "sequences").samples)
        t0 = time.perf_counter()
        sender = threading.Thread(target=lambda: [push.send(f) for f in frames])
        sender.start()
        got = 0
        while got < rollouts:
            got += len(client.request(0, min(64, rollouts - got), "sequences").samples)
        seconds = time.perf_counter() - t0
        sender.join()
        return seconds, per_rollout_kb
    finally:
        client.close()
        push.close(0)
        ctx.term()
        proc.terminate()
        proc.wait(30)


def bench_raw(frames: list[bytes]) -> float:
    import zmq

    from dashrl.protocol.runtime import free_port

    data, done = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(done)
    proc = subprocess.Popen([sys.executable, "-c", RAW_SINK, data, done, str(len(frames))])
    push = ctx.socket(zmq.PUSH)
    push.connect(data)
    time.sleep(1.0)
    t0 = time.perf_counter()
    for f in frames:
        push.send(f)
    pull.recv()
    seconds = time.perf_counter() - t0
    proc.wait(30)
    push.close(0)
    pull.close(0)
    ctx.term()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--groups", type=int, default=2000)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024, help="completion tokens per rollout")
    ap.add_argument("--hold", type=int, default=8000, help="rollouts held for the memory figure")
    ap.add_argument("--out", type=Path, default=Path("bench/results/transport.json"))
    args = ap.parse_args()
    from dashrl.protocol import encode

    t0 = time.perf_counter()
    frames = [encode(grp) for grp in _groups(args.groups, args.group_size, args.tokens)]
    encode_s = time.perf_counter() - t0
    rollouts = args.groups * args.group_size
    mb = sum(len(f) for f in frames) / 1e6
    raw_s = bench_raw(frames)
    with tempfile.TemporaryDirectory() as tmp:
        queue_s, kb = bench_queue(frames, rollouts, Path(tmp) / "run", args.hold, args.group_size)
        nolog_s, _ = bench_queue(frames, rollouts, Path(tmp) / "nolog", args.hold,
                                 args.group_size, log=False)  # fmt: skip
    rows = {"raw_zmq": rollouts / raw_s, "dashrl_queue": rollouts / queue_s,
            "dashrl_queue_no_log": rollouts / nolog_s}  # fmt: skip
    print(f"{rollouts} rollouts of {args.tokens} tokens, {mb:.0f} MB of frames "
          f"(encoding them took {encode_s:.2f} s, not counted below)")  # fmt: skip
    print(f"{'path':<21}{'seconds':>9}{'rollouts/s':>12}{'MB/s':>8}")
    for name, s in (("raw_zmq", raw_s), ("dashrl_queue", queue_s),
                    ("dashrl_queue_no_log", nolog_s)):  # fmt: skip
        print(f"{name:<21}{s:>9.2f}{rollouts / s:>12.0f}{mb / s:>8.0f}")
    ratio = rows["dashrl_queue"] / rows["raw_zmq"]
    print(f"dashrl / raw = {ratio:.2f}; queue memory {kb:.1f} KB per held rollout "
          f"({args.tokens * 8 / 1024:.0f} KB of token ids + logprobs)")  # fmt: skip
    result = {**header(), "rollouts": rollouts, "tokens": args.tokens, "frame_mb": round(mb, 1),
              "encode_s": round(encode_s, 2), "raw_s": round(raw_s, 2),
              "queue_s": round(queue_s, 2), "raw_rollouts_per_s": round(rows["raw_zmq"]),
              "queue_no_log_rollouts_per_s": round(rows["dashrl_queue_no_log"]),
              "queue_rollouts_per_s": round(rows["dashrl_queue"]), "ratio": round(ratio, 3),
              "queue_kb_per_rollout": round(kb, 1)}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
