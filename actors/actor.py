"""The actor process: generate groups, score them, compute advantages, stream them to the queue.

One long-running asyncio loop on uvloop. ``generate`` is blocking torch work, so it runs
in a worker thread (``asyncio.to_thread``) and the loop stays free to send the previous
batch's groups and to notice SIGTERM. Weights arrive on a background thread
(:class:`~dashrl.learner.weights.WeightReceiver`) and are applied between generate
calls, so every rollout is stamped with exactly the policy version that produced it.

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
from dashrl.actors.engine import FakeEngine, Generation, GenerationEngine, HFEngine
from dashrl.actors.tasks import (
    Problem,
    Task,
    VerifierTimeout,
    chat_prompt_ids,
    format_reward,
    load_task,
    rcrl_question,
    time_limit,
)
from dashrl.launch.config import Config, load_config
from dashrl.launch.runtime import StopFlag, set_thread_budget, setup_logging
from dashrl.launch.security import client_setup
from dashrl.learner.weights import WeightReceiver, ZmqWeightReceiver
from dashrl.protocol import Completion, RolloutGroup, encode

log = logging.getLogger("dashrl.actor")

SFT_BATCH_PAUSE_S = 0.05
"""Pause after each batch of reference solutions (algo sft), in seconds."""


def score_group(
    task: Task,
    problem: Problem,
    texts: list[str],
    eps: float,
    estimator: Estimator = grpo_advantages,
    finished: list[bool] | None = None,
    format_coef: float = 0.0,
    timeout_s: float = 0.0,
    stats: dict[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Rewards [G] and advantages [G] (float32) of one group's decoded completions.

    reward = verifier + format_coef * format_reward (``finished``: the completion ended
    with EOS). A verifier that raises or runs past ``timeout_s`` scores 0 for that
    completion (logged, and counted in ``stats`` as verifier_errors / verifier_timeouts),
    so one bad answer cannot stop the actor. A group the estimator discards gets A = 0
    everywhere: it is still sent (its rewards count in the metrics) and the queue's filter
    drops it.
    """
    rewards = []
    for i, text in enumerate(texts):
        try:
            with time_limit(timeout_s):
                r = task.score(problem, text)
        except VerifierTimeout as e:
            log.warning("verifier timed out on %s: %s", problem.id, e)
            if stats is not None:
                stats["verifier_timeouts"] = stats.get("verifier_timeouts", 0.0) + 1
            r = 0.0
        except Exception as e:  # a verifier bug must not kill a long-running actor
            log.warning("verifier failed on %s: %s", problem.id, e)
            if stats is not None:
                stats["verifier_errors"] = stats.get("verifier_errors", 0.0) + 1
            r = 0.0
        if format_coef:
            r += format_coef * format_reward(text, True if finished is None else finished[i])
        rewards.append(r)
    r = np.asarray(rewards, dtype=np.float32)
    adv = estimator(r, eps)
    return r, np.zeros_like(r) if adv is None else adv


class Actor:
    """State of one generator: task, engine, weight receiver and rollout socket.

    Args:
        cfg: the resolved run config.
        index: actor index (0-based); its torch.distributed rank is index + 1.
        engine: a generation engine (default: HFEngine on the resolved model).
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
        self.task = load_task(cfg.data, cfg.seed)
        if engine is None and cfg.actor.engine == "fake":
            engine = FakeEngine(cfg.model.path, seed=seed % 2**32)
        self.engine = engine or HFEngine(cfg.model.path, seed=seed % 2**32)
        self.tokenizer = self.engine.tokenizer
        if weights_endpoint:  # an attached node: weights from the learner's publisher
            self.receiver = ZmqWeightReceiver(
                self.engine.sync_parameters(),
                weights_endpoint,
                client_setup(cfg.transport.curve_dir),
            )
        else:  # started with the job: the launch-time process group (local actors only)
            self.receiver = WeightReceiver(
                self.engine.sync_parameters(),
                init_method=f"tcp://127.0.0.1:{cfg.transport.dist_port}",
                world_size=1 + cfg.actor.num_actors,
                rank=1 + index,
                timeout_s=cfg.learner.weight_sync_timeout_s,
            )
        self.estimator = estimator_for(cfg.algo, cfg.actor.reinforce_baseline)
        self._prompt_cache: dict[tuple[str, bool | None], list[int]] = {}
        self.groups_sent = 0
        self.tokens_generated = 0

    def _fallback_if_group_broke(self) -> None:
        """If the launch-time weight group broke (another actor died, so the learner now
        publishes over ZeroMQ), subscribe to the learner's publisher instead."""
        r = self.receiver
        if isinstance(r, ZmqWeightReceiver) or not r.stopped.is_set() or r.error is None:
            return
        t = self.cfg.transport
        log.warning("weight group gone (%s): subscribing to the learner's publisher", r.error)
        self.receiver = ZmqWeightReceiver(
            self.engine.sync_parameters(), f"tcp://{t.host}:{t.weights_port}",
            client_setup(t.curve_dir),
        )  # fmt: skip
        self.receiver.version = r.version  # keep generating with the weights it has

    def prompt_ids(self, problem: Problem, good: bool | None = None) -> list[int]:
        """Chat prompt token ids; ``good`` adds the RCRL return tag (None: no tag, or the good
        tag when the algorithm is rcrl, which always generates conditioned on it)."""
        if good is None and self.cfg.algo == "rcrl":
            good = True
        key = (problem.id, good)
        if key not in self._prompt_cache:
            q = problem.question if good is None else rcrl_question(problem.question, good)
            self._prompt_cache[key] = chat_prompt_ids(
                self.tokenizer, q, self.cfg.data.prompt_suffix
            )
        return self._prompt_cache[key]

    def reference_generation(self, problem: Problem) -> Generation:
        """The problem's reference solution as a one-completion "group" (algo sft).

        Its behaviour logprobs are unknown and sent as 0; the SFT loss does not use them.
        """
        ids = self.tokenizer(problem.solution, add_special_tokens=False)["input_ids"]
        ids = ids[: self.cfg.actor.max_new_tokens - 1] + [self.tokenizer.eos_token_id]
        return Generation(np.asarray(ids, np.int32), np.zeros(len(ids), np.float32), "stop")

    def build_groups(
        self, problems: list[Problem], generations, version: int, gen_s: float
    ) -> list[RolloutGroup]:
        """Score one generate call's output as RolloutGroups stamped with ``version``."""
        a = self.cfg.actor
        groups = []
        for problem, gens in zip(problems, generations, strict=True):
            t0 = time.perf_counter()
            texts = [self.tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in gens]
            faults: dict[str, float] = {}
            rewards, adv = score_group(
                self.task, problem, texts, a.advantage_eps, self.estimator,
                [g.finish_reason == "stop" for g in gens], self.cfg.reward.format_coef,
                a.verifier_timeout_s, faults,
            )  # fmt: skip
            if self.cfg.algo == "expert_iteration":
                adv = dedupe_advantages(adv, [tuple(g.token_ids.tolist()) for g in gens])
            comps = [
                Completion(g.token_ids, g.logprobs, float(r), float(x), g.finish_reason, version)
                for g, r, x in zip(gens, rewards, adv, strict=True)
            ]
            timings = {"generate_s": gen_s / len(problems), "score_s": time.perf_counter() - t0,
                       **faults}  # fmt: skip
            if self.cfg.algo == "rcrl":  # relabel: each sample under the tag of its own return
                parts = [(f"{problem.id}#{tag}", [c for c in comps if (c.reward >= 1) == good],
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
                    timings=timings,
                    created_at=time.time(),
                )
                for pid, cs, ids in parts
                if cs
            ]
        return groups

    @staticmethod
    async def _send(sock, frame: bytes, stop: StopFlag) -> bool:
        """Send one frame, waiting while the queue applies backpressure (high-water mark),
        but giving up when ``stop`` is set (the queue may already be gone at shutdown)."""
        while True:
            try:
                await asyncio.wait_for(sock.send(frame), timeout=1.0)
                return True
            except TimeoutError:
                if stop:
                    return False

    async def run(self, stop: StopFlag) -> None:
        """Generate and stream until ``stop`` is set."""
        a, t = self.cfg.actor, self.cfg.transport
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.PUSH)
        secure = client_setup(t.curve_dir)
        if secure:  # CurveZMQ client of a job bound beyond the loopback
            secure(sock)
        sock.setsockopt(zmq.SNDHWM, t.send_hwm)
        sock.setsockopt(zmq.LINGER, 5000)  # on shutdown, give queued groups 5 s to leave
        sock.connect(f"tcp://{t.host}:{t.rollout_port}")
        started = time.perf_counter()
        try:
            while not stop and self.receiver.apply() < 0:  # attached: wait for first weights
                await asyncio.sleep(0.2)
            while not stop:
                self._fallback_if_group_broke()
                version = self.receiver.apply()
                problems = [self.rng.choice(self.task.train) for _ in range(a.prompts_per_batch)]
                prompts = [self.prompt_ids(p) for p in problems]
                t0 = time.perf_counter()
                if self.cfg.algo == "sft":
                    gens = [[self.reference_generation(p)] for p in problems]
                    # reference solutions cost nothing: without a pause the actor would
                    # flood the queue (and its log) with thousands of groups per second
                    await asyncio.sleep(SFT_BATCH_PAUSE_S)
                else:
                    gens = await asyncio.to_thread(
                        self.engine.generate, prompts, a.group_size, a.max_new_tokens,
                        a.temperature,
                    )  # fmt: skip
                gen_s = time.perf_counter() - t0
                for group in self.build_groups(problems, gens, version, gen_s):
                    if not await self._send(sock, encode(group), stop):
                        break
                    self.groups_sent += 1
                    self.tokens_generated += sum(len(c.token_ids) for c in group.completions)
                if self.groups_sent % (10 * a.prompts_per_batch) < a.prompts_per_batch:
                    elapsed = time.perf_counter() - started
                    log.info(
                        "v%d groups=%d actor/tokens_per_s=%.1f",
                        version,
                        self.groups_sent,
                        self.tokens_generated / elapsed,
                    )
        finally:
            sock.close()
            ctx.term()


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m dashrl.actors.actor <config.json> <index> [<node> <weights
    endpoint>]`` (the last two for actors of an attached node, see launch/attach.py)."""
    argv = argv if argv is not None else sys.argv[1:]
    cfg = load_config(Path(argv[0]))
    index = int(argv[1])
    node, endpoint = (argv[2], argv[3]) if len(argv) == 4 else (None, None)
    setup_logging(f"{node}/actor{index}" if node else f"actor{index}")
    set_thread_budget(cfg.actor.torch_threads)
    stop = StopFlag()
    actor = Actor(cfg, index, node=node, weights_endpoint=endpoint)
    import uvloop

    uvloop.run(actor.run(stop))
    log.info("stopped after %d groups", actor.groups_sent)


if __name__ == "__main__":
    main()
