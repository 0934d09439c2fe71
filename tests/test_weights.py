"""The gloo weight broadcast: weights and versions reach a receiver; a wrong layout is refused."""

from __future__ import annotations

import multiprocessing as mp
import time

import torch

from dashrl.protocol.runtime import free_port


def _receiver(port: int, shapes, out) -> None:
    from dashrl.protocol.weights import WeightReceiver

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

    port = free_port()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_receiver, args=(port, recv_shapes, out))
    p.start()
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


def test_receiver_refuses_a_different_layout() -> None:
    _, (versions, got, rejected) = run_pair([(3, 4), (5,)], [(4, 3), (5,)])
    assert versions == [0] and rejected == 2
    assert all((p == 0).all() for p in got)  # untouched


def test_zmq_source_stages_into_a_custom_loader_with_a_meta_layout() -> None:
    """What a vLLM worker does: its receiver only knows the learner's shapes (meta tensors)
    and loads each staged version through a callback, not into its own tensors."""
    from dashrl.learner.nodes import WeightPublisher
    from dashrl.protocol.weights import WeightSource, layout_hash, open_receiver

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
