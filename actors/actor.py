"""The actor process: generate groups, score them, compute advantages, stream them to the queue.

One long-running asyncio loop on uvloop. With vLLM (the default engine) the loop keeps
``actor.batches_in_flight`` batches of requests in the engine at once and loads new
weights in flight (see actors/vllm_engine.py: a rollout is stamped with the version it
started on). With the HF fallback, ``generate`` is blocking torch work in a worker thread
(``asyncio.to_thread``) so the loop stays free to send groups and notice SIGTERM, and
weights are applied between generate calls, so every rollout is stamped with exactly
the version that produced it. Weights arrive on a background thread
(:mod:`dashrl.protocol.weights`; inside vLLM's worker process for vLLM).

The rollout socket is a ZeroMQ PUSH with a high-water mark: if the queue falls behind,
``send`` waits (backpressure) rather than dropping anything.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import zmq
import zmq.asyncio

from dashrl.actors.advantages import Estimator, dedupe_advantages, estimator_for, grpo_advantages
from dashrl.actors.data import load_task
from dashrl.actors.engine import FakeEngine, GenerationEngine, HFEngine
from dashrl.actors.pacing import Permits
from dashrl.actors.rewards import Rewards
from dashrl.actors.tasks import Problem, chat_prompt_ids, rcrl_question, system_prompt
from dashrl.actors.timeshare import TimeShare
from dashrl.protocol import ActorStats, Completion, RolloutGroup, encode
from dashrl.protocol.algorithms import get_algorithm
from dashrl.protocol.config import Config, load_config
from dashrl.protocol.hardware import local_device, resolve_dtype
from dashrl.protocol.placement import role_device
from dashrl.protocol.runtime import StopFlag, pin_cores, set_thread_budget, setup_logging
from dashrl.protocol.security import client_setup
from dashrl.protocol.weights import WeightSource

log = logging.getLogger("dashrl.actor")

SFT_BATCH_PAUSE_S = 0.05
"""Pause after each batch of reference solutions (algo sft), in seconds."""


def score_group(
    rewards: Rewards,
    problem: Problem,
    texts: list[str],
    eps: float,
    estimator: Estimator = grpo_advantages,
    finished: list[bool] | None = None,
    timeout_s: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rewards [G] (float32), advantages [G] (float32) and correctness [G] (bool) of one
    group's decoded completions.

    The reward is the weighted sum of the run's reward functions and the correctness that
    of its correctness function alone (actors/rewards.py); the estimator gets both, so
    the algorithms that select by correctness never select a wrong answer that a shaped
    reward ranks high. A function that raises, returns NaN or runs past ``timeout_s``
    scores 0 for that completion and is counted (``rewards.fault_counts()``), so one bad
    answer cannot stop the actor. A group the estimator discards gets A = 0 everywhere:
    it is still sent (its rewards count in the metrics) and the queue's filter drops it.
    """
    done = [True] * len(texts) if finished is None else finished
    scored = [rewards.score(problem, t, f, timeout_s) for t, f in zip(texts, done, strict=True)]
    r = np.asarray([s.reward for s in scored], dtype=np.float32)
    correct = np.asarray([s.correct for s in scored], dtype=bool)
    adv = estimator(r, eps, correct=correct)
    return r, np.zeros_like(r) if adv is None else adv, correct


class Actor:
    """State of one generator: task, engine, weight receiver and rollout socket.

    Args:
        cfg: the resolved run config.
        index: actor index (0-based); its torch.distributed rank is index + 1.
        engine: a generation engine (default: built by :meth:`start` from actor.engine).
        node: the attached node's id (None: started with the job).
        weights_endpoint: the learner's weight publisher (attached nodes only).
    """

    def __init__(
        self,
        cfg: Config,
        index: int,
        engine: GenerationEngine | None = None,
        node: str | None = None,
        weights_endpoint: str | None = None,
    ):
        self.cfg, self.index = cfg, index
        self.actor_id = f"{node}/actor{index}" if node else f"actor{index}"
        # an attached node's actors sample other prompts and noise than the job's own
        salt = zlib.crc32(node.encode()) * 1_000_003 if node else 0
        seed = cfg.seed * 1000 + index + salt
        self.rng = random.Random(seed)
        self.seed = seed % 2**32
        self.task = load_task(cfg.data, cfg.seed)
        self.rewards = Rewards(cfg.reward, self.task)
        self.engine = engine  # built in start() unless given (vLLM starts asynchronously)
        self.tokenizer = engine.tokenizer if engine is not None else None
        self.weights_endpoint = weights_endpoint
        self.algo = get_algorithm(cfg.algo)
        self.estimator = estimator_for(self.algo, cfg.actor.reinforce_baseline)
        self._prompt_cache: dict[tuple[str, bool | None], list[int]] = {}
        self.groups_sent = 0
        self.tokens_generated = 0
        self.updated_in_flight = 0
        self._on_group = False  # whether weights come from the launch-time group
        self._started = False
        self.busy = TimeShare()  # the engine holds at least one request
        self.paced = TimeShare(min_s=0.01)  # waiting for a permit or a blocked send

    async def start(self) -> None:
        """Build the engine (``actor.engine``) and connect it to the learner's weights: an
        attached node (or a restarted actor) to the ZeroMQ publisher, a launch-time actor to
        the stateless weight group."""
        cfg, a, t = self.cfg, self.cfg.actor, self.cfg.transport
        if self.engine is None:
            if a.engine == "vllm":
                from dashrl.actors.vllm_engine import VLLMEngine

                v = a.vllm
                # auto: bf16 where the matrix units have it (protocol/hardware.py)
                dtype = str(resolve_dtype(v.dtype, local_device(), "actor")).removeprefix("torch.")
                self.engine = await VLLMEngine.create(
                    cfg.model.path, self.seed, dtype, v.kv_cache_gib, v.cpu_threads_bind,
                    v.max_model_len, v.gpu_memory_utilization, v.enforce_eager,
                    v.kv_on_update, v.kv_cache_memory_bytes, v.block_size, v.prefix_cache,
                )  # fmt: skip
            elif a.engine == "fake":
                self.engine = FakeEngine(cfg.model.path, seed=self.seed)
            else:  # on this process's GPU where it sees one (actor.gpus)
                device = role_device("auto", local_rank=0)
                log.info("HF engine on %s", device)
                self.engine = HFEngine(cfg.model.path, seed=self.seed, device=device)
            self.tokenizer = self.engine.tokenizer
        if self.weights_endpoint or t.weight_backend == "zmq":  # the learner's publisher
            endpoint = self.weights_endpoint or f"tcp://{t.host}:{t.weights_port}"
            source = WeightSource("zmq", endpoint=endpoint, curve_dir=_str_or_none(t.curve_dir))
        else:  # started with the job: the launch-time process group (local actors only)
            source = WeightSource(
                "group",
                init_method=f"tcp://127.0.0.1:{t.dist_port}",
                world_size=1 + a.num_actors,
                rank=1 + self.index,
                timeout_s=cfg.learner.weight_sync_timeout_s,
                backend=t.weight_backend,  # the learner's plan must say the same
            )
            self._on_group = True
        await self.engine.connect_weights(source)

    async def refresh_weights(self) -> int:
        """Use the newest weights received; returns the policy version now in use.

        If the launch-time weight group broke (another actor died, so the learner now
        publishes over ZeroMQ), it first subscribes to the learner's publisher instead.
        """
        if self._on_group:
            status = await self.engine.weight_status()
            if status["stopped"] and status["error"] is not None:
                t = self.cfg.transport
                log.warning("weight group gone (%s): subscribing to the learner's publisher",
                            status["error"])  # fmt: skip
                await self.engine.connect_weights(WeightSource(
                    "zmq", endpoint=f"tcp://{t.host}:{t.weights_port}",
                    curve_dir=_str_or_none(t.curve_dir),
                ))  # fmt: skip
                self._on_group = False
        return await self.engine.apply_weights()

    def prompt_ids(self, problem: Problem, good: bool | None = None) -> list[int]:
        """Chat prompt token ids; ``good`` adds the RCRL return tag (None: no tag, or the good
        tag when the algorithm has ``prompt_tags``: RCRL always generates under it)."""
        if good is None and self.algo.prompt_tags:
            good = True
        key = (problem.id, good)
        if key not in self._prompt_cache:
            q = problem.question if good is None else rcrl_question(problem.question, good)
            d = self.cfg.data
            self._prompt_cache[key] = chat_prompt_ids(
                self.tokenizer, q, d.prompt_suffix, system_prompt(problem, d.system_prompt)
            )
        return self._prompt_cache[key]

    def reference_generation(self, problem: Problem) -> Completion:
        """The problem's reference solution as a one-completion "group" (algo sft).

        Its behaviour logprobs are unknown and sent as 0; the SFT loss does not use them.
        """
        ids = self.tokenizer(problem.solution, add_special_tokens=False)["input_ids"]
        ids = ids[: self.cfg.actor.max_new_tokens - 1] + [self.tokenizer.eos_token_id]
        return Completion(np.asarray(ids, np.int32), np.zeros(len(ids), np.float32))

    def build_groups(
        self, problems: list[Problem], completions: list[list[Completion]], version: int
    ) -> list[RolloutGroup]:
        """Score one generate call's completions (reward, advantage and ``version`` are set
        on the engine's own Completion objects) and group them by prompt."""
        a = self.cfg.actor
        groups = []
        for problem, comps in zip(problems, completions, strict=True):
            texts = [self.tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in comps]
            rewards, adv, correct = score_group(
                self.rewards, problem, texts, a.advantage_eps, self.estimator,
                [c.finish_reason == "stop" for c in comps], a.verifier_timeout_s,
            )  # fmt: skip
            if self.algo.dedupe:
                adv = dedupe_advantages(adv, [tuple(c.token_ids.tolist()) for c in comps])
            for c, r, x in zip(comps, rewards, adv, strict=True):
                c.reward, c.advantage, c.policy_version = float(r), float(x), version
            if self.algo.prompt_tags:  # relabel: each sample under the tag of its own return
                parts = [(f"{problem.id}#{tag}",
                          [c for c, ok in zip(comps, correct, strict=True) if ok == good],
                          self.prompt_ids(problem, good))
                         for tag, good in (("good", True), ("bad", False))]  # fmt: skip
            else:
                parts = [(problem.id, comps, self.prompt_ids(problem))]
            groups += [
                RolloutGroup(
                    prompt_id=pid,
                    prompt_ids=np.asarray(ids, dtype=np.int32),
                    completions=cs,
                    actor_id=self.actor_id,
                    task=self.task.name,
                    created_at=time.time(),
                )
                for pid, cs, ids in parts
                if cs
            ]
        return groups

    async def _send(self, sock, frame: bytes, stop: StopFlag) -> bool:
        """Send one frame, waiting while the queue applies backpressure (high-water mark:
        its rate limiter or a full log), but giving up when ``stop`` is set (the queue may
        already be gone at shutdown). Time spent waiting counts as paced."""
        with self.paced.during():
            while True:
                try:
                    await asyncio.wait_for(sock.send(frame), timeout=1.0)
                    return True
                except TimeoutError:
                    if stop:
                        return False

    async def _wait_permit(self, permits: Permits, stop: StopFlag) -> bool:
        """The queue's rate limiter: wait (counted as paced) until it lets one batch be
        generated; False if ``stop`` came first."""
        with self.paced.during():
            return await permits.wait(stop)

    async def run(self, stop: StopFlag) -> None:
        """Generate and stream until ``stop`` is set.

        ``actor.batches_in_flight`` batch loops run at once (1 for the local engines), so a
        vLLM engine always has the next batch's requests queued while one batch finishes
        and is scored. An engine with in-flight updates gets new weights from a separate
        loop every ``actor.weight_poll_s``; the local engines between generate calls.
        """
        t = self.cfg.transport
        if not self._started:
            await self.start()
            self._started = True
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.PUSH)
        secure = client_setup(t.curve_dir)
        if secure:  # CurveZMQ client of a job bound beyond the loopback
            secure(sock)
        sock.setsockopt(zmq.SNDHWM, t.send_hwm)
        sock.setsockopt(zmq.LINGER, 5000)  # on shutdown, give queued groups 5 s to leave
        sock.connect(f"tcp://{t.host}:{t.rollout_port}")
        self._started_at = time.perf_counter()
        self.busy.restart()
        self.paced.restart()
        try:
            while not stop and await self.refresh_weights() < 0:  # attached: wait for weights
                await asyncio.sleep(0.2)
            # sync/dash mode: one batch per version, weights refreshed inline (no second loop)
            in_flight = self.engine.in_flight_updates and self.cfg.mode == "async"
            # The other batch loops start once the first batch is out: all of them at once
            # would share the engine from the start and double the wait for the learner's
            # first data (measured: 25 s -> 17 s on 2 cores).
            first_out = asyncio.Event()
            loops = [self._batch_loop(sock, stop, in_flight, sent=first_out)]
            if in_flight:
                loops += [self._batch_loop(sock, stop, True, after=first_out)
                          for _ in range(self.cfg.actor.batches_in_flight - 1)]  # fmt: skip
                loops.append(self._weight_loop(stop))
            await asyncio.gather(*loops)
        finally:
            sock.close()
            ctx.term()

    def busy_frac(self) -> float:
        """Share of wall time since the first batch during which the engine held at least
        one of this actor's requests (generator utilisation; 1.0: it never waited for
        weights, the queue or scoring)."""
        return self.busy.frac()

    def stats(self, generate_s: float = 0.0) -> ActorStats:
        """This actor's running statistics (sent after every batch)."""
        return ActorStats(
            self.actor_id, self.groups_sent, self.tokens_generated, self.busy_frac(),
            self.updated_in_flight, self.rewards.timeouts,
            sum(self.rewards.errors.values()), generate_s, self.paced.frac(),
        )  # fmt: skip

    async def _weight_loop(self, stop: StopFlag) -> None:
        while not stop:
            await self.refresh_weights()
            await asyncio.sleep(self.cfg.actor.weight_poll_s)

    async def _batch_loop(
        self,
        sock,
        stop: StopFlag,
        in_flight: bool,
        sent: asyncio.Event | None = None,
        after: asyncio.Event | None = None,
    ) -> None:
        """Generate, score and send batches until ``stop``; ``sent`` is set once this loop's
        first batch is out, and the loop starts only once ``after`` is set."""
        a = self.cfg.actor
        while after is not None and not after.is_set() and not stop:
            try:
                await asyncio.wait_for(after.wait(), timeout=0.5)
            except TimeoutError:
                pass
        permits = Permits.open(sock.context, self.cfg, self.actor_id)
        try:
            while not stop:
                if permits is not None and not await self._wait_permit(permits, stop):
                    break
                version = self.engine.version if in_flight else await self.refresh_weights()
                problems = [self.rng.choice(self.task.train) for _ in range(a.prompts_per_batch)]
                prompts = [self.prompt_ids(p) for p in problems]
                t0 = time.perf_counter()
                if self.algo.data == "reference_solutions":
                    gens = [[self.reference_generation(p)] for p in problems]
                    # reference solutions cost nothing: without a pause the actor would
                    # flood the queue (and its log) with thousands of groups per second
                    await asyncio.sleep(SFT_BATCH_PAUSE_S)
                else:
                    with self.busy.during():
                        gens = await self.engine.agenerate(
                            prompts, a.group_size, a.max_new_tokens, a.temperature
                        )
                gen_s = time.perf_counter() - t0
                if in_flight and self.engine.version != version:  # straddled a weight update
                    self.updated_in_flight += sum(len(g) for g in gens)
                for group in self.build_groups(problems, gens, version):
                    if not await self._send(sock, encode(group), stop):
                        return
                    self.groups_sent += 1
                    self.tokens_generated += sum(len(c.token_ids) for c in group.completions)
                if not await self._send(sock, encode(self.stats(gen_s)), stop):
                    return
                if sent is not None:
                    sent.set()
                if self.cfg.mode != "async":  # sync and dash: wait for the step on this batch
                    while not stop and await self.refresh_weights() <= version:
                        await asyncio.sleep(0.05)
                if self.groups_sent % (10 * a.prompts_per_batch) < a.prompts_per_batch:
                    elapsed = time.perf_counter() - self._started_at
                    log.info(
                        "v%d groups=%d actor/tokens_per_s=%.1f actor/rollouts_updated_in_flight=%d",
                        version, self.groups_sent, self.tokens_generated / elapsed,
                        self.updated_in_flight,
                    )  # fmt: skip
                    faults = {k: v for k, v in self.rewards.fault_counts().items()
                              if "/" in k and v}  # fmt: skip
                    if faults:  # per reward function: raised / non-finite, and None
                        log.info("actor/reward faults so far: %s", faults)

        finally:
            if permits is not None:
                permits.close()


def _str_or_none(path: Path | None) -> str | None:
    return None if path is None else str(path)


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m dashrl.actors.actor <config.json> <index> [<node> <weights
    endpoint>]`` (the last two for actors of an attached node, see launch/attach.py)."""
    argv = argv if argv is not None else sys.argv[1:]
    cfg = load_config(Path(argv[0]))
    index = int(argv[1])
    node, endpoint = (argv[2], argv[3]) if len(argv) == 4 else (None, None)
    setup_logging(f"{node}/actor{index}" if node else f"actor{index}")
    pin_cores(cfg.actor.cpus, f"actor{index}")  # vLLM's engine processes inherit the cores
    set_thread_budget(cfg.actor.torch_threads)
    stop = StopFlag()
    actor = Actor(cfg, index, node=node, weights_endpoint=endpoint)
    import uvloop

    try:
        uvloop.run(actor.run(stop))
    finally:
        if hasattr(actor.engine, "shutdown"):
            actor.engine.shutdown()
    log.info("stopped after %d groups", actor.groups_sent)


if __name__ == "__main__":
    main()
