"""The queue's state and message handlers: decode, bound, filter, store and log rollouts;
answer micro-batch requests. No sockets here (queue/server.py runs the socket loop), so
every handler is tested by calling it with frames.

Every accepted group (only its accepted completions) is appended to
``<run_dir>/queue/rollouts.msgpack``, with a record of every micro-batch served and every
eviction (queue/log.py), so a run can be replayed exactly. One buffer entry is the
algorithm's unit (``Algorithm.unit``): under ``--algo iterative_dpo`` each group's
(chosen, rejected) pair, so a micro-batch never splits a pair. A bad frame is counted
(``queue/rejected_frames``), logged in one line, and the loop goes on.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np

from dashrl.protocol import (
    ActorStats,
    DecodeLimits,
    GenerationPermit,
    MicroBatchReply,
    MicroBatchRequest,
    PriorityUpdate,
    ProtocolError,
    QueueEvent,
    RolloutGroup,
    Sample,
    decode,
    encode,
    group_to_samples,
)
from dashrl.protocol.algorithms import get_algorithm
from dashrl.protocol.config import Config
from dashrl.queue.batches import BATCH_LEFT, BatchGate
from dashrl.queue.buffer import ReplayBuffer, version_lag
from dashrl.queue.log import ROLLOUT_LOG, LogWriteError, RolloutLog, read_queue_log
from dashrl.queue.permits import PermitDesk
from dashrl.queue.policies import RateLimit, unit_grouping

log = logging.getLogger("dashrl.queue")

LENT_REQUESTS = 64
"""Most recent micro-batches whose priority update the queue still waits for."""


def rate_limit(cfg: Config) -> RateLimit | None:
    """The queue's rate limiter from the config (None when ``samples_per_insert`` is)."""
    q, lc = cfg.queue, cfg.learner
    if q.samples_per_insert is None:
        return None
    step = lc.micro_batch_size * lc.micro_batches_per_step
    # one optimizer step of slack by sequences (why: QueueConfig.rate_error_buffer)
    error = q.rate_error_buffer or (step if lc.micro_batch_unit == "sequences" else 64.0)
    return RateLimit(q.samples_per_insert, float(error), q.min_size)


FINAL_STATS = "queue/final_stats.json"
"""The queue's counters when it stopped (accepted, filtered, evicted, rejected frames...)."""


def actor_totals(stats: list[ActorStats]) -> dict[str, float]:
    """Metrics over the actors' latest statistics: faults and in-flight updates summed,
    generator utilisation (``actor/busy_frac``) and the share of time their sends were
    blocked (``actor/paced_frac``) averaged; empty before any arrived."""
    if not stats:
        return {}
    return {
        "actor/verifier_timeouts": float(sum(s.verifier_timeouts for s in stats)),
        "actor/verifier_errors": float(sum(s.verifier_errors for s in stats)),
        "actor/busy_frac": sum(s.busy_frac for s in stats) / len(stats),
        "actor/paced_frac": sum(s.paced_frac for s in stats) / len(stats),
        "actor/rollouts_updated_in_flight": float(sum(s.updated_in_flight for s in stats)),
        "actor/groups_sent": float(sum(s.groups_sent for s in stats)),
    }


class QueueServer:
    """The queue's state and message handlers, separate from the socket loop for testing.

    Args:
        cfg: the run config (queue section and run_dir are used).
        run_dir: where the rollout log goes; None disables the log.
        reload: a restarted queue: reload the log's pending samples (also when cfg.resume).
    """

    def __init__(self, cfg: Config, run_dir: Path | None, reload: bool = False):
        q = cfg.queue
        self.buffer = ReplayBuffer(
            q.capacity, q.filter_threshold, q.max_staleness, q.length_window, q.max_uses,
            q.sampling, q.priority_exponent, q.is_beta, rate_limit(cfg), cfg.seed,
            q.samples_per_insert is not None if q.expiring_first is None else q.expiring_first,
        )  # fmt: skip
        self._lent: OrderedDict[int, list[Sample]] = OrderedDict()  # request id -> its samples
        self.rejected_updates = 0  # priority updates that match no recent micro-batch
        # actors waiting for the rate limiter before they generate (queue/permits.py)
        self.permits = PermitDesk(self.buffer)
        self.limits = DecodeLimits(
            max_frame_bytes=q.max_frame_bytes,
            max_seq_len=q.max_seq_len,
            max_group_size=q.max_group_size,
        )
        self._refs: dict[int, tuple[int, int]] = {}  # id(held sample) -> its name in the log
        self.reloaded = 0
        self.log = RolloutLog(run_dir / ROLLOUT_LOG) if run_dir and q.log_rollouts else None
        # an entry is the algorithm's unit (a sample, DPO's pair) or a whole group
        lc = cfg.learner
        self.units = unit_grouping(get_algorithm(cfg.algo).unit, q.serve_groups,
                                   q.filter_threshold, lc.micro_batch_size
                                   if lc.micro_batch_unit == "sequences" else None)  # fmt: skip
        self.cfg = cfg
        # mode dash: a version's samples are served once every actor's batch has arrived
        self.batches = BatchGate(cfg.actor.num_actors) if cfg.mode == "dash" else None
        self._backlog: list[bytes] = []  # records not yet written (the log failed), in order
        self._held: list[bytes] = []  # rollout frames received while blocked
        self._serve_failed = False
        self.rejected_frames = 0
        self.rejected_values = 0  # groups refused for out-of-range rewards or advantages
        self.rejected_requests = 0  # requests refused for an implausible learner version
        self._requests_seen = 0
        self.handler_errors = 0
        self.groups_received = 0
        self.actor_stats: dict[str, ActorStats] = {}  # actor id -> its latest statistics
        self.gate = None  # admission refusals (protocol/security.py), set by the socket loop
        self.inbox = None  # waiting requests per peer (queue/peers.py), set by the socket loop
        self._window: dict[str, float] = {}  # actor-side stats since the last served batch
        self._reset_window()
        if (cfg.resume or reload) and self.log is not None:  # a restart holds what it held
            self.reload(run_dir / ROLLOUT_LOG)

    def _reset_window(self) -> None:
        self._window = {"reward_sum": 0.0, "n": 0.0, "tokens": 0.0, "length": 0.0}

    def _reject(self, what: str, err: Exception) -> None:
        self.rejected_frames += 1
        n = self.rejected_frames
        if n <= 100 or n % 1000 == 0:  # one line per bad frame, until a flood: then 1 in 1000
            log.warning("rejected %s frame #%d: %s", what, n, err)

    def on_rollout_frame(self, frame: bytes) -> None:
        """Decode, filter, store and log one rollout frame; bad frames are counted, not raised.

        Any other error while handling it (a bug, a full disk) is counted as
        ``queue/handler_errors`` and logged: the queue never dies on one message.
        """
        if self.blocked:  # the log cannot take it now: keep it, in order, for later
            self._held.append(frame)
            return
        try:
            msg = decode(frame, self.limits, expect=(RolloutGroup, ActorStats))
        except ProtocolError as e:
            self._reject("rollout", e)
            return
        try:
            if isinstance(msg, ActorStats):  # each actor's latest running statistics
                self.actor_stats[msg.actor_id] = msg
                self.permits.on_batch_end()  # one ActorStats ends each batch
                if self.batches is not None:
                    self.batches.on_batch_end(msg.actor_id, self.buffer.learner_version)
            else:
                self._accept(msg, frame)
        except Exception:
            self.handler_errors += 1
            log.exception("error handling a rollout group (%d so far)", self.handler_errors)

    def _out_of_bounds(self, group: RolloutGroup) -> str | None:
        """Why a decoded group's values are refused (None: they are within the limits)."""
        q = self.cfg.queue
        for i, c in enumerate(group.completions):
            if abs(c.reward) > q.max_abs_reward:
                return f"completions[{i}].reward={c.reward:.3g} beyond +-{q.max_abs_reward:g}"
            if abs(c.advantage) > q.max_abs_advantage:
                return (f"completions[{i}].advantage={c.advantage:.3g} beyond "
                        f"+-{q.max_abs_advantage:g}")  # fmt: skip
        return None

    def _accept(self, group: RolloutGroup, frame: bytes | None = None) -> None:
        if self.batches is not None:  # refused or filtered, it still belongs to its batch
            version = max((c.policy_version for c in group.completions), default=0)
            self.batches.on_group(group.actor_id, version)
        if (why := self._out_of_bounds(group)) is not None:
            self.rejected_values += 1
            self._reject("rollout", ProtocolError(f"rollout_group {group.prompt_id!r}: {why}"))
            return
        self.groups_received += 1
        w = self._window
        for c in group.completions:
            w["reward_sum"] += c.reward
            w["n"] += 1
            w["tokens"] += len(c.token_ids)
            w["length"] += c.finish_reason == "length"
        samples = group_to_samples(group)
        result = self.buffer.add(samples, self.units([s.advantage for s in samples]))
        if self.log is not None and result.accepted:
            whole = len(result.accepted) == len(group.completions)  # the frame is the record
            group.completions = [group.completions[i] for i in result.accepted]
            g = self.log.num_groups  # its log index, even if the write has to wait
            self.log.num_groups += 1
            self._write(frame if whole else encode(group))
            for c, i in enumerate(result.accepted):
                self._refs[id(samples[i])] = (g, c)
            self._log_event("evicted_capacity", result.evicted_samples)

    def reload(self, path: Path) -> int:
        """Put back every logged sample that was accepted and is neither evicted nor used up
        (a restarted queue's state), with its log name, use count and last priority;
        returns how many. The staleness rule applies again when the learner's version
        arrives."""
        qlog = read_queue_log(path)
        if not qlog.report.accountable:  # log indices after the damage cannot be trusted
            log.error("%s: not reloading from a damaged log (%s)", path, qlog.report.describe())
            return 0
        state = qlog.pending(self.cfg.queue.max_uses)
        by_group: dict[int, list[int]] = {}
        for g, c in state:
            by_group.setdefault(g, []).append(c)
        for g, cs in by_group.items():
            samples = [group_to_samples(qlog.groups[g])[c] for c in cs]
            for u in self.units([s.advantage for s in samples]):
                unit = [samples[i] for i in u]
                uses = max(state[(g, cs[i])][0] for i in u)
                prios = [state[(g, cs[i])][1] for i in u]
                prio = None if all(p is None for p in prios) else max(p or 0.0 for p in prios)
                if self.buffer.restore(unit, uses, prio):
                    for i in u:
                        self._refs[id(samples[i])] = (g, cs[i])
                    self.reloaded += len(u)
        log.info("reloaded %d pending samples from %s", self.reloaded, path)
        return self.reloaded

    @property
    def blocked(self) -> bool:
        """True while the log cannot be written: the queue then reads no rollouts (the
        actors' sends block at their high-water mark) and serves nothing."""
        return bool(self._backlog) or self._serve_failed

    def _write(self, frame: bytes) -> None:
        """Append a record of something that already happened in memory (an accepted group,
        an eviction); if the log fails, it waits in the backlog, in order."""
        if not self._backlog:
            try:
                self.log.write_frame(frame)
                return
            except LogWriteError as e:
                log.error("queue log not writable (%s): pausing intake and serving", e)
        self._backlog.append(frame)

    def flush_backlog(self) -> bool:
        """Retry the records that could not be written (the socket loop calls it on every
        turn); once all are written, take in the rollouts held meanwhile. Returns whether
        the queue is unblocked."""
        while self._backlog:
            try:
                self.log.write_frame(self._backlog[0])
            except LogWriteError:
                return False
            self._backlog.pop(0)
        if self._serve_failed:
            self._serve_failed = False
            log.warning("queue log writable again: resuming intake and serving")
        held, self._held = self._held, []
        for frame in held:
            self.on_rollout_frame(frame)
        return not self.blocked

    def _event(self, kind: str, samples: list[Sample], request_id: int = 0,
               values: list[float] | None = None) -> bytes:  # fmt: skip
        """The QueueEvent frame naming ``samples`` by their log references."""
        vs = values or [0.0] * len(samples)
        known = [(self._refs[id(s)], v) for s, v in zip(samples, vs, strict=True)
                 if id(s) in self._refs]  # fmt: skip
        arr = np.asarray([r for r, _ in known], dtype=np.int32).reshape(-1, 2)
        vals = np.asarray([v for _, v in known] if values else [], dtype=np.float32)
        return encode(QueueEvent(kind, arr, self.buffer.learner_version, request_id, vals))

    def _forget(self, samples: list[Sample]) -> None:
        for s in samples:
            self._refs.pop(id(s), None)

    def _log_event(self, kind: str, samples: list[Sample], request_id: int = 0) -> None:
        """Record samples that left the queue (evicted) in the log."""
        if self.log is not None and samples:
            self._write(self._event(kind, samples, request_id))
        self._forget(samples)

    def _commit_served(self, request_id: int):
        """The buffer's commit hook for a micro-batch: its serve record (with the importance
        weights, unless all are 1) is written and fsynced before anything leaves the
        buffer (raises LogWriteError if it cannot be)."""

        def commit(samples: list[Sample], weights: list[float]) -> None:
            if self.log is not None:
                values = weights if any(w != 1.0 for w in weights) else None
                frame = self._event("served", samples, request_id, values)
                self.log.write_frame(frame, durable=True)

        return commit

    def on_priority_update(self, update: PriorityUpdate) -> None:
        """Apply the learner's priorities to the samples of one served micro-batch: they are
        logged, and units that fall to or below the filter threshold leave the queue."""
        samples = self._lent.pop(update.request_id, None)
        if samples is None or len(samples) != len(update.priorities):
            self.rejected_updates += 1
            why = "unknown request" if samples is None else f"{len(samples)} samples"
            self._reject("priority update", ProtocolError(
                f"priority_update for request {update.request_id}: {why}, "
                f"{len(update.priorities)} priorities"))  # fmt: skip
            return
        prios = [float(p) for p in update.priorities]
        live = [(s, p) for s, p in zip(samples, prios, strict=True) if self.buffer.uses_of(s)]
        if live and self.log is not None:
            self._write(self._event("priority", [s for s, _ in live], update.request_id,
                                    [p for _, p in live]))  # fmt: skip
        self._log_event("evicted_low_priority", self.buffer.update_priorities(samples, prios))

    def on_request_frame(self, frame: bytes, peer: bytes = b"") -> bytes | None:
        """Answer one frame of the request socket from ``peer``: a micro-batch request
        (returns the reply frame), a priority update (None), or a generation permit (the
        grant now if the rate limiter lets inserts in, else None and it waits for
        :meth:`grant_permits`); None too if the frame is rejected."""
        try:
            req = decode(frame, self.limits,
                         expect=(MicroBatchRequest, PriorityUpdate, GenerationPermit))  # fmt: skip
            if isinstance(req, PriorityUpdate):
                self.on_priority_update(req)
                return None
            if isinstance(req, GenerationPermit):  # the grant echoes the request
                return self.permits.request(peer, frame, self.blocked)
            known, jump = self.buffer.learner_version, self.cfg.queue.max_version_jump
            if self._requests_seen and req.learner_version > known + jump:
                self.rejected_requests += 1
                raise ProtocolError(f"learner_version {req.learner_version} jumps more than "
                                    f"{jump} past {known}")  # fmt: skip
        except ProtocolError as e:
            self._reject("request", e)
            return None
        self._requests_seen += 1
        try:
            self._log_event("evicted_stale", self.buffer.set_learner_version(req.learner_version))
            samples: list[Sample] = []
            size, whole = req.size, self.batches is None
            if not whole and self.batches.complete(req.learner_version):
                size, whole = min(req.size, len(self.buffer)), True  # the last may be smaller
            if not self.blocked and whole and size:  # serve nothing that cannot be logged first
                try:
                    samples = self.buffer.pop_micro_batch(
                        size, req.unit, commit=self._commit_served(req.request_id)
                    )
                except LogWriteError as e:  # nothing left the buffer
                    log.error("serve record not writable (%s): serving paused", e)
                    self._serve_failed = True
            self._forget([s for s in samples if not self.buffer.uses_of(s)])  # used up
            if samples and self.cfg.queue.max_uses > 1:  # await the learner's priorities
                self._lent[req.request_id] = samples
                while len(self._lent) > LENT_REQUESTS:
                    self._lent.popitem(last=False)
            weights = np.asarray([s.is_weight for s in samples], dtype=np.float32)
            stats = self.stats(samples)
            if self.batches is not None and whole and not self.blocked:
                stats[BATCH_LEFT] = float(len(self.buffer))  # 0 with no samples: none passed
            reply = MicroBatchReply(req.request_id, samples, stats, weights)
            return encode(reply)
        except Exception:
            self.handler_errors += 1
            log.exception("error answering a request (%d so far)", self.handler_errors)
            return None

    def grant_permits(self) -> list[tuple[bytes, bytes]]:
        """(peer, grant) for waiting generation permits, oldest first, as many as the rate
        limiter allows now (each lets one actor loop generate one batch)."""
        return self.permits.grant(self.blocked)

    def stats(self, served: list[Sample] | None = None) -> dict[str, float]:
        """Queue counters plus actor-side means over the groups received since the last batch."""
        c, w = self.buffer.counters, self._window
        out = {
            "queue/size": float(len(self.buffer)),
            "queue/tokens": float(self.buffer.num_tokens),
            "queue/received": float(c.received),
            "queue/accepted": float(c.accepted),
            "queue/filtered": float(c.filtered),
            "queue/evicted_stale": float(c.evicted_stale),
            # of those, refused as they arrived (generation took longer than the staleness
            # allows) rather than aged in the buffer
            "queue/stale_on_arrival": float(c.stale_on_arrival),
            "queue/evicted_capacity": float(c.evicted_capacity),
            "queue/evicted_low_priority": float(c.evicted_low_priority),
            "queue/served": float(c.served),
            "queue/reused_frac": c.reused / c.served if c.served else 0.0,
            "queue/uses_mean": c.served / (c.served - c.reused) if c.served > c.reused else 0.0,
            "queue/samples_per_insert": c.served / c.accepted if c.accepted else 0.0,
            "queue/paced": float(not self.buffer.accepting()),
            "queue/permits_waiting": float(len(self.permits.waiting)),
            "queue/permits_out": float(len(self.permits.out)),
            "queue/rejected_updates": float(self.rejected_updates),
            "queue/rejected_frames": float(self.rejected_frames),
            "queue/rejected_values": float(self.rejected_values),
            "queue/rejected_requests": float(self.rejected_requests),
            "queue/handler_errors": float(self.handler_errors),
            "queue/log_blocked": float(self.blocked),
            "queue/log_write_errors": float(self.log.write_errors if self.log else 0),
            "queue/log_backlog": float(len(self._backlog)),
            "queue/groups_received": float(self.groups_received),
            "queue/refused_clients": float(self.gate.refused if self.gate else 0),
            "queue/refused_connections": float(self.gate.refused_full if self.gate else 0),
            "queue/dropped_requests": float(self.inbox.dropped if self.inbox else 0),
            **actor_totals(list(self.actor_stats.values())),
        }
        if served:
            lags = [version_lag(s.policy_version, self.buffer.learner_version) for s in served]
            out["queue/served_lag_mean"] = sum(lags) / len(lags)
        if w["n"] and served:
            out["actor/reward_mean"] = w["reward_sum"] / w["n"]
            out["actor/completion_len"] = w["tokens"] / w["n"]
            out["actor/truncated_frac"] = w["length"] / w["n"]
            out["actor/window_samples"] = w["n"]
            self._reset_window()
        return out

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
