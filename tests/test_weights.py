"""The weight broadcast: weights and versions reach a receiver in the learner's dtype and
buckets; a receiver that cannot honour the learner's plan (wrong backend, no GPU for NCCL,
another layout) fails at once on both sides; a load never sees a partial version."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

from dashrl.protocol.runtime import free_port


def spawn_receiver(target, *args):
    """(port, process, result queue): ``target(port, *args, queue)`` started in a spawned
    process, to be the receiving rank of a weight group on ``port``."""
    port = free_port()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=target, args=(port, *args, out))
    p.start()
    return port, p, out


def _receiver(port: int, shapes, out) -> None:
    from dashrl.protocol.receivers import WeightReceiver

    params = [torch.zeros(s) for s in shapes]
    rx = WeightReceiver(params, f"tcp://127.0.0.1:{port}", 2, 1, 60)
    seen = []
    deadline = time.monotonic() + 60
    while not rx.stopped.is_set() and time.monotonic() < deadline:
        v = rx.apply()
        if not seen or seen[-1] != v:
            seen.append(v)
        time.sleep(0.01)
    v = rx.apply()
    # numpy, not tensors: torch would share memory with a process that is about to exit
    out.put(
        (seen + ([v] if seen[-1] != v else []), [p.numpy().copy() for p in params], rx.rejected)
    )


def run_pair(send_shapes, recv_shapes):
    from dashrl.protocol.weights import WeightSender

    port, p, out = spawn_receiver(_receiver, recv_shapes)
    params = [torch.randn(s) for s in send_shapes]
    tx = WeightSender(params, f"tcp://127.0.0.1:{port}", 2, 60)
    tx.send(1)
    time.sleep(0.5)
    with torch.no_grad():
        params[0].add_(1.0)
    tx.send(2)
    time.sleep(0.5)
    tx.close()
    result = out.get(timeout=60)
    p.join(30)
    return params, result


def test_broadcast_delivers_weights_and_versions() -> None:
    params, (versions, got, rejected) = run_pair([(3, 4), (5,)], [(3, 4), (5,)])
    assert versions[0] == 0 and versions[-1] == 2 and versions == sorted(versions)
    for a, b in zip(params, got, strict=True):
        torch.testing.assert_close(a, torch.from_numpy(b), rtol=0, atol=0)
    assert rejected == 0


def _refusing_receiver(port: int, shapes, backend: str, out) -> None:
    from dashrl.protocol.receivers import WeightReceiver

    t0 = time.monotonic()
    try:
        WeightReceiver([torch.zeros(s) for s in shapes], f"tcp://127.0.0.1:{port}", 2, 1, 120,
                       backend=backend)  # fmt: skip
        out.put(("joined", time.monotonic() - t0))
    except RuntimeError as e:
        out.put((str(e), time.monotonic() - t0))


@pytest.mark.parametrize(
    "sender_backend, receiver_backend, recv_shapes, why",
    [
        ("gloo", "nccl", [(3, 4), (5,)], "sends weights over gloo but this receiver was started "
                                        "for nccl"),
        ("nccl", "", [(3, 4), (5,)], "nccl, which needs a GPU in every receiver"),
        ("gloo", "", [(4, 3), (5,)], "another parameter layout"),
    ],
)  # fmt: skip
def test_a_plan_the_receiver_cannot_honour_fails_fast_on_both_sides(
    sender_backend, receiver_backend, recv_shapes, why
) -> None:
    """120 s is the group's timeout; both sides must give up with the reason in seconds."""
    from dashrl.protocol.weights import WeightSender

    port, p, out = spawn_receiver(_refusing_receiver, recv_shapes, receiver_backend)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="receiver rank 1 refused") as e:
        WeightSender([torch.zeros(3, 4), torch.zeros(5)], f"tcp://127.0.0.1:{port}", 2, 120,
                     backend=sender_backend)  # fmt: skip
    assert why in str(e.value) and time.monotonic() - t0 < 30
    message, seconds = out.get(timeout=60)
    p.join(30)
    assert why in message and seconds < 30


def _bf16_receiver(port: int, shapes, out) -> None:
    from dashrl.protocol.receivers import WeightReceiver

    params = [torch.zeros(s) for s in shapes]
    rx = WeightReceiver(params, f"tcp://127.0.0.1:{port}", 2, 1, 60)
    plan = rx.group.plan
    deadline = time.monotonic() + 60
    while rx.apply() < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    out.put(((plan.backend, plan.dtype, plan.bucket_numel), str(rx.dtype),
             [p.numpy().copy() for p in params]))  # fmt: skip
    rx._thread.join(30)


def test_the_learners_dtype_and_buckets_reach_the_receiver() -> None:
    """bf16 on the wire in 48-byte buckets (24 values: every parameter straddles a bucket
    edge): the receiver learns the plan from the learner and ends up with exactly the
    learner's weights rounded to bf16."""
    from dashrl.protocol.weights import WeightSender

    shapes = [(7, 5), (13,), (3, 3, 3)]
    port, p, out = spawn_receiver(_bf16_receiver, shapes)
    params = [torch.randn(s) for s in shapes]
    tx = WeightSender(params, f"tcp://127.0.0.1:{port}", 2, 60, dtype=torch.bfloat16,
                      bucket_bytes=48)  # fmt: skip
    assert len(tx.plan.buckets()) == 4  # 75 values, 24 per bucket
    tx.send(1)
    plan, dtype, got = out.get(timeout=60)
    tx.close()
    p.join(30)
    assert plan == ("gloo", "bfloat16", 24) and dtype == "torch.bfloat16"
    for a, b in zip(params, got, strict=True):
        assert torch.equal(a.to(torch.bfloat16).float(), torch.from_numpy(b))


def test_buckets_concatenate_to_the_flat_buffer() -> None:
    from dashrl.protocol.weights import fill_buckets

    params = [torch.randn(s) for s in [(4, 6), (1,), (17,), (2, 2, 5)]]
    flat = torch.cat([p.reshape(-1) for p in params])
    for size in (1, 7, 24, flat.numel(), 1000):
        buf, parts = torch.empty(size), []
        for n in fill_buckets(params, buf):
            parts.append(buf[:n].clone())
        assert [len(x) for x in parts[:-1]] == [size] * (len(parts) - 1)
        assert torch.equal(torch.cat(parts), flat)


def _slow_loading_receiver(port: int, numel: int, out) -> None:
    """Loads each staged version slowly, a slice at a time, recording whether every value
    it read belongs to one version (the one apply() then reports)."""
    from dashrl.protocol.receivers import WeightReceiver

    reads: list[tuple[float, float, int]] = []
    seen: list[tuple[float, float]] = []

    def slow_load(flat: torch.Tensor) -> None:
        lo = hi = None
        for start in range(0, flat.numel(), flat.numel() // 8):
            part = flat[start : start + flat.numel() // 8]
            lo = float(part.min()) if lo is None else min(lo, float(part.min()))
            hi = float(part.max()) if hi is None else max(hi, float(part.max()))
            time.sleep(0.01)  # the sender meanwhile sends the next versions
        seen.append((lo, hi))

    rx = WeightReceiver([torch.zeros(numel)], f"tcp://127.0.0.1:{port}", 2, 1, 60,
                        load=slow_load)  # fmt: skip
    while not rx.stopped.is_set():
        before = len(seen)
        v = rx.apply()
        if len(seen) > before:
            reads.append((*seen[-1], v))
        time.sleep(0.001)
    out.put((reads, rx.received))


def test_a_load_never_sees_a_partial_version() -> None:
    """The sender sends 30 versions back to back (version v: every weight equals v, in 4
    buckets) while each load takes ~80 ms: every load must read one whole version."""
    from dashrl.protocol.weights import WeightSender

    numel = 4096
    port, p, out = spawn_receiver(_slow_loading_receiver, numel)
    param = torch.zeros(numel)
    tx = WeightSender([param], f"tcp://127.0.0.1:{port}", 2, 60, bucket_bytes=numel)
    for v in range(1, 31):
        param.fill_(float(v))
        tx.send(v)
    tx.close()
    reads, received = out.get(timeout=60)
    p.join(30)
    assert received == 30 and len(reads) >= 2
    assert all(lo == hi == float(v) for lo, hi, v in reads), reads


def test_zmq_source_stages_into_a_custom_loader_with_a_meta_layout() -> None:
    """What a vLLM worker does: its receiver only knows the learner's shapes (meta tensors)
    and loads each staged version through a callback, not into its own tensors."""
    from dashrl.learner.nodes import WeightPublisher
    from dashrl.protocol.receivers import open_receiver
    from dashrl.protocol.weights import WeightSource, layout_hash

    shapes = [(3, 2), (4,)]
    metas = [torch.empty(s, device="meta") for s in shapes]
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    publisher = WeightPublisher(endpoint, layout_hash([torch.zeros(s) for s in shapes]))
    loaded: list[torch.Tensor] = []
    rx = open_receiver(
        WeightSource("zmq", endpoint=endpoint), metas, load=lambda f: loaded.append(f.clone())
    )
    try:
        assert rx.device.type == "cpu" and rx.apply() == -1 and rx.staged_version is None
        deadline = time.monotonic() + 10
        while rx.staged_version is None and time.monotonic() < deadline:
            publisher.publish(7, torch.arange(10, dtype=torch.float32))
            time.sleep(0.2)
        assert rx.staged_version == 7
        assert rx.apply() == 7 and rx.staged_version is None
        assert len(loaded) == 1 and torch.equal(loaded[0], torch.arange(10, dtype=torch.float32))
        assert rx.apply() == 7 and len(loaded) == 1  # nothing new: nothing loaded
    finally:
        rx.close()
        publisher.close()
