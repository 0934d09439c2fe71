"""The actor's batch loops with an engine that takes weight updates in flight (as vLLM).

The engine here is the fake one (random tokens, no model compute) with vLLM's flag set
and a fixed generate latency, so the order of generate calls is all that is measured.
"""

from __future__ import annotations

import asyncio
import time

import zmq

from dashrl.actors.actor import Actor
from dashrl.actors.engine import FakeEngine
from dashrl.protocol import decode
from dashrl.protocol.runtime import free_port


class InFlightFake(FakeEngine):
    """FakeEngine that says it takes updates in flight and records each call's interval."""

    in_flight_updates = True
    latency_s = 0.3
    version = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[float, float]] = []

    async def agenerate(self, prompts, n, max_new_tokens, temperature):
        t0 = time.monotonic()
        await asyncio.sleep(self.latency_s)
        out = self.generate(prompts, n, max_new_tokens, temperature)
        self.calls.append((t0, time.monotonic()))
        return out

    async def apply_weights(self) -> int:
        return 0

    async def weight_status(self) -> dict:
        return {"version": 0, "stopped": False, "error": None}


class Stop:
    """A stop flag without signal handlers (StopFlag's are the process's)."""

    stop = False

    def __bool__(self) -> bool:
        return self.stop


def test_extra_batches_in_flight_start_after_the_first_batch_is_out(tiny_cfg) -> None:
    """With batches_in_flight = 3 the first batch has the engine to itself (the learner's
    first data comes one batch time after start, not three), then all loops run at once."""
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.actor.batches_in_flight = 3
    cfg.transport.rollout_port = free_port()
    ctx = zmq.Context()
    sink = ctx.socket(zmq.PULL)
    sink.bind(f"tcp://{cfg.transport.host}:{cfg.transport.rollout_port}")
    engine = InFlightFake(cfg.model.path)
    actor = Actor(cfg, 0, engine=engine)
    actor._started = True  # the engine is given: no weight group to join
    stop = Stop()

    async def main() -> None:
        async def stopper() -> None:
            await asyncio.sleep(1.5)
            stop.stop = True

        await asyncio.gather(actor.run(stop), stopper())

    try:
        asyncio.run(main())
        kinds = []
        while sink.poll(0):
            kinds.append(type(decode(sink.recv())).__name__)
    finally:
        sink.close(0)
        ctx.term()
    calls = sorted(engine.calls)
    first_end = calls[0][1]
    assert len(calls) >= 5
    assert all(start >= first_end for start, _ in calls[1:])  # nothing beside the first batch
    # afterwards: three loops at once (they overlap)
    later = [(s, e) for s, e in calls[1:] if s < first_end + 0.05]
    assert len(later) == 3, calls
    # every batch's groups were sent, each batch followed by the actor's statistics
    assert kinds.count("RolloutGroup") == len(calls) * cfg.actor.prompts_per_batch
    assert kinds.count("ActorStats") == len(calls) and kinds[-1] == "ActorStats"
