"""The queue process: receives rollouts over ZeroMQ, ranks them, serves learner micro-batches.

Why a process of its own rather than a task inside the learner: the learner spends most
of its time in forward/backward, holding the GIL and both its threads; a queue inside
it would decode, filter and log rollouts only between micro-batches, so actors would
block on a full socket. As its own process it keeps accepting at socket speed, and it
outlives a learner crash, so nothing already accepted is lost. Its CPU cost is small
(decoding, a sorted insert and a file append per group).

Sockets (all bound on the configured loopback host):
- PULL  ``rollout_port``: actors PUSH RolloutGroup frames (and an ActorStats frame after
  each batch). PUSH/PULL never drops a
  frame silently: when the queue lags, the actor's send blocks at its high-water mark.
- ROUTER ``request_port``: the learner's DEALER sends MicroBatchRequest and gets a
  MicroBatchReply (empty when fewer samples than a micro-batch are held).

The handlers (decode, filter, store, log, serve) are in queue/handlers.py; this module
is the socket loop. Admission (protocol/security.py ``Gate``): at most
``transport.max_connections`` connections per socket, and with keys only authorised
clients. Fairness (queue/peers.py): rollout intake and requests alternate in bounded
turns, each peer holds at most ``transport.max_pending_requests`` waiting requests, and
peers are answered in turn.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path

import zmq

from dashrl.protocol import ProtocolError
from dashrl.protocol.config import Config, load_config
from dashrl.protocol.runtime import StopFlag, pin_cores, setup_logging
from dashrl.protocol.security import server_setup
from dashrl.queue.handlers import FINAL_STATS, QueueServer, actor_totals
from dashrl.queue.peers import RequestInbox

__all__ = ["FINAL_STATS", "QueueServer", "actor_totals", "raise_fd_limit", "serve"]

log = logging.getLogger("dashrl.queue")

DRAIN_BATCH = 256
"""Most rollout frames taken in before pending learner requests are answered."""
REQUESTS_PER_TURN = 8
"""Most micro-batch requests answered before rollouts are taken in again."""
READ_REQUESTS = 4096
"""Most request frames read into the per-peer inbox per turn (reading is cheap: a frame
is decoded only when it is answered)."""


def raise_fd_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit (1,024 is a common soft
    limit, and idle connections beyond it would lock new actors out); returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("could not raise the open-file limit from %d: %s", soft, e)
    return soft


def serve(
    cfg: Config, run_dir: Path | None, stop: StopFlag | None = None, reload: bool = False
) -> None:
    """Run the queue's socket loop until SIGTERM/SIGINT (or ``stop`` is set); ``reload``:
    this queue replaces one that died, so it reloads pending samples from the log."""
    stop = stop or StopFlag()
    raise_fd_limit()  # many actors and nodes: each connection holds a descriptor
    server = QueueServer(cfg, run_dir, reload)
    t = cfg.transport
    ctx = zmq.Context()
    server.gate = server_setup(ctx, t.curve_dir, "queue", t.max_connections, t.handshake_s)
    server.inbox = inbox = RequestInbox(t.max_pending_requests)
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 1000)
    router = ctx.socket(zmq.ROUTER)
    server.gate.bind(pull, f"tcp://{t.host}:{t.rollout_port}")
    server.gate.bind(router, f"tcp://{t.host}:{t.request_port}")
    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    poller.register(router, zmq.POLLIN)
    log.info(
        "serving: rollouts on %s, requests on %s",
        cfg.transport.rollout_port,
        cfg.transport.request_port,
    )
    last_report = time.monotonic()
    try:
        while not stop:
            # a blocked log (full disk): take in nothing until it is writable again (the
            # actors' sends then block). The rate limiter acts earlier, before generation:
            # it holds back the actors' generation permits (grant_permits below).
            poller.register(pull, zmq.POLLIN if server.flush_backlog() else 0)
            # requests still waiting in the inbox: look at the sockets without sleeping
            events = dict(poller.poll(timeout=0 if len(inbox) else 200))
            # Take in what has arrived, but at most DRAIN_BATCH frames: with many actors
            # the PULL socket never runs dry, and a learner request must not wait for it.
            if pull in events:
                for _ in range(DRAIN_BATCH):
                    try:
                        server.on_rollout_frame(pull.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
            # then read waiting requests into the per-peer inbox and answer at most
            # REQUESTS_PER_TURN, one per peer in turn: clients that flood requests (and
            # never read the replies) must starve neither rollout intake nor the learner
            for _ in range(READ_REQUESTS):
                try:
                    parts = router.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if len(parts) != 2:
                    server._reject("request", ProtocolError(f"{len(parts)}-part message"))
                    continue
                inbox.put(parts[0], parts[1])
            for peer, frame in inbox.take(REQUESTS_PER_TURN):
                reply = server.on_request_frame(frame, peer)
                if reply is not None:
                    router.send_multipart([peer, reply])
            # actors waiting for the rate limiter: let them generate once it allows
            for peer, grant in server.grant_permits():
                router.send_multipart([peer, grant])
            if time.monotonic() - last_report > 30:
                last_report = time.monotonic()
                log.info(
                    "size=%d accepted=%d filtered=%d stale=%d rejected=%d",
                    len(server.buffer),
                    server.buffer.counters.accepted,
                    server.buffer.counters.filtered,
                    server.buffer.counters.evicted_stale,
                    server.rejected_frames,
                )
    finally:
        server.close()
        pull.close(linger=0)
        router.close(linger=0)
        server.gate.close()
        ctx.term()
        final = server.stats()
        if run_dir is not None:  # the launcher's summary reads the queue's last word
            (run_dir / FINAL_STATS).parent.mkdir(parents=True, exist_ok=True)
            (run_dir / FINAL_STATS).write_text(json.dumps(final))
        log.info("stopped: %s", final)


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m dashrl.queue.server <run_dir>/config.json [--reload]``."""
    argv = argv if argv is not None else sys.argv[1:]
    setup_logging("queue")
    cfg = load_config(Path(argv[0]))
    pin_cores(cfg.actor.cpus, "queue")  # off the learner's cores
    serve(cfg, cfg.run_dir, reload="--reload" in argv[1:])


if __name__ == "__main__":
    main()
