"""Start a dashrl run: queue, learner and actors as processes, with progress, metrics and a plot.

    python launch/start.py                  # the default run (SmolLM2-135M on chain_sum)
    python launch/start.py --help           # every config field with its docstring
    python launch/start.py eval --benchmark gsm8k math500 --k 4 --limit 50

What a run does, top to bottom:
  1. parse the config (tyro; heavy imports only after parsing, so --help is fast);
  2. resolve the model to an HF directory, pick free ports, write <run_dir>/config.json;
  3. measure the held-out mean reward of the base model (all cores, nothing else running);
  4. spawn the queue, the learner and the actors, each with its own thread budget,
     and follow metrics.jsonl with a progress bar until the learner finishes;
  5. stop every child by its pid, measure the held-out reward of the final checkpoint,
     and write plot.png and summary.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Running as a script puts launch/ first on sys.path, where config.py, model.py, ...
# could shadow unrelated top-level modules of other libraries. Only `dashrl.*` is ours.
_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]

import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from datetime import datetime  # noqa: E402

import tyro  # noqa: E402

from dashrl.launch.config import Config  # noqa: E402
from dashrl.launch.runtime import actor_env, free_port, read_jsonl, setup_logging  # noqa: E402

log = logging.getLogger("dashrl.launch")


def resolve(cfg: Config) -> Config:
    """Fill in run_dir, model path and ports; create the run directory and write config.json.

    Raises:
        FileExistsError: the run directory already holds a run.
    """
    from dashrl.launch.model import resolve_model

    run_dir = cfg.run_dir or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = run_dir.resolve()
    if (run_dir / "metrics.jsonl").exists() and not cfg.resume:  # logs only append
        raise FileExistsError(f"{run_dir} already holds a run; choose another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    t = cfg.transport
    transport = t.model_copy(
        update={
            "rollout_port": t.rollout_port or free_port(t.host),
            "request_port": t.request_port or free_port(t.host),
            "dist_port": t.dist_port or free_port(t.host),
            "learner_port": t.learner_port or free_port(t.host),
            "control_port": t.control_port or free_port(t.host),
            "weights_port": t.weights_port or free_port(t.host),
        }
    )
    model = cfg.model.model_copy(
        update={"path": resolve_model(cfg.model.name, cfg.model.cache_dir)}
    )
    resolved = cfg.model_copy(update={"run_dir": run_dir, "transport": transport, "model": model})
    resolved = Config.model_validate(resolved.model_dump())  # re-validate the whole tree
    (run_dir / "config.json").write_text(resolved.model_dump_json(indent=2))
    return resolved


DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")  # fmt: skip
"""torch.distributed variables a child must not inherit from whoever started the launcher."""


class Children:
    """The run's child processes, started with their own sessions and stopped by pid."""

    def __init__(self, run_dir: Path):
        self.logs = run_dir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def spawn(
        self,
        role: str,
        module: str,
        *args: str,
        launcher: list[str] | None = None,
        env_extra: dict[str, str] | None = None,
    ) -> subprocess.Popen:
        """Start ``python -m module args`` (or ``python -m <launcher...> module args``, e.g.
        torchrun) in its own session, logging to logs/<role>.log; ``env_extra`` is added to
        its environment."""
        out = (self.logs / f"{role}.log").open("ab")
        env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}  # torchrun sets its own
        env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", **(env_extra or {}))
        # A session of its own: a terminal Ctrl-C reaches only the launcher, which then
        # stops the learner first (so it checkpoints) and the others after.
        p = subprocess.Popen(
            [sys.executable, "-m", *(launcher or []), module, *args],
            stdout=out,
            stderr=out,
            env=env,
            start_new_session=True,
        )
        self.procs[role] = p
        log.info("started %s (pid %d), log: %s", role, p.pid, out.name)
        return p

    def stop(self, role: str, timeout_s: float = 60.0) -> int | None:
        """SIGTERM the child by pid, wait up to ``timeout_s``, then SIGKILL it."""
        p = self.procs.get(role)
        if p is None:
            return None
        if p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM; killing it", role, p.pid)
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
        reap_group(p.pid)
        return p.returncode

    def stop_all(self) -> None:
        """Stop the learner first (it checkpoints), then the actors, the queue last (so
        actors blocked on a full socket can still hand over their last groups)."""
        order = {"learner": 0, "queue": 2}
        for role in sorted(self.procs, key=lambda r: order.get(r, 1)):
            self.stop(role)


def reap_group(pid: int) -> None:
    """SIGKILL what is left of the process group that child ``pid`` led (it was started in
    a session of its own). A vLLM actor's engine-core process outlives an actor that died
    without shutting it down (SIGKILL, a crash) and would hold gigabytes forever."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Supervisor:
    """Restarts a dead queue or actor while the learner runs (up to MAX_RESTARTS per role).

    - The queue comes back on the same ports and reloads from its log every sample it had
      accepted but not yet served or evicted; ZeroMQ peers reconnect by themselves.
    - An actor comes back as a generator of node "launcher" (weights from the learner's
      ZeroMQ publisher, since the launch-time weight group cannot take a new member); the
      launcher registers that node and sends its heartbeats.
    """

    MAX_RESTARTS = 5

    def __init__(self, cfg: Config, children: Children):
        self.cfg, self.children = cfg, children
        self.restarts: dict[str, int] = {}
        self.node = None
        self.config_path = str(cfg.run_dir / "config.json")

    def restart(self, role: str) -> bool:
        """Restart ``role`` if allowed; returns whether it did."""
        n = self.restarts.get(role, 0)
        if n >= self.MAX_RESTARTS or not (role == "queue" or role.startswith("actor")):
            return False
        self.restarts[role] = n + 1
        dead = self.children.procs.get(role)
        if dead is not None:  # e.g. the orphaned vLLM engine core of a killed actor
            reap_group(dead.pid)
        if role == "queue":
            self.children.spawn("queue", "dashrl.queue.server", self.config_path, "--reload")
        else:
            t = self.cfg.transport
            if self.node is None:
                from dashrl.launch.attach import NodeClient

                self.node = NodeClient(f"{t.host}:{t.control_port}", "launcher", 1, t.curve_dir)
                self.node.register(timeout_s=60)
            self.children.spawn(role, "dashrl.actors.actor", self.config_path,
                                role.removeprefix("actor"), "launcher",
                                f"tcp://{t.host}:{t.weights_port}",
                                env_extra=actor_env(self.cfg.actor.engine))  # fmt: skip
        log.warning("restarted %s (restart %d of %d)", role, n + 1, self.MAX_RESTARTS)
        return True

    def heartbeat(self) -> None:
        if self.node is not None:
            self.node.heartbeat()

    def close(self) -> None:
        if self.node is not None:
            self.node.leave()
            self.node.close()


@contextlib.contextmanager
def supervisor_closed(supervisor: Supervisor):
    try:
        yield supervisor
    finally:
        supervisor.close()


def follow(cfg: Config, children: Children, interrupted: list[bool]) -> None:
    """Show a progress bar from metrics.jsonl until the learner exits; stop it on Ctrl-C."""
    from tqdm import tqdm

    learner = children.procs["learner"]
    supervisor = Supervisor(cfg, children)
    deadline = time.monotonic() + cfg.time_limit_s + 600  # the learner stops itself earlier
    seen = 0
    with (
        supervisor_closed(supervisor),
        tqdm(total=cfg.learner.steps, desc="learner steps", unit="step", dynamic_ncols=True) as bar,
    ):
        while learner.poll() is None:
            if interrupted[0] or time.monotonic() > deadline:
                log.info("stopping the learner (it saves a checkpoint first)")
                children.stop("learner", timeout_s=300)
                break
            for role, p in list(children.procs.items()):
                if role != "learner" and p.poll() is not None:
                    log.error("%s exited with code %s: see %s", role, p.returncode,
                              children.logs / f"{role}.log")  # fmt: skip
                    if not supervisor.restart(role):
                        interrupted[0] = True
            supervisor.heartbeat()
            rows = read_jsonl(cfg.run_dir / "metrics.jsonl")
            if len(rows) > seen:
                r = rows[-1]
                bar.update(len(rows) - seen)
                seen = len(rows)
                # Steps during which no new group arrived carry no actor reward: show the last.
                rewards = [
                    x["actor/reward_mean"] for x in rows if x.get("actor/reward_mean") is not None
                ]
                bar.set_postfix(
                    reward=f"{rewards[-1] if rewards else float('nan'):.3f}",
                    queue=int(r.get("queue/size", 0)),
                    lag=f"{r.get('learner/staleness_mean', 0):.1f}",
                    loss=f"{r.get('learner/loss') or 0:.3f}",
                )
            time.sleep(1.0)


def run(cfg: Config) -> dict:
    """Run one training job end to end; returns the summary written to summary.json."""
    setup_logging("launch")
    t_start = time.monotonic()
    cfg = resolve(cfg)
    run_dir = cfg.run_dir
    log.info("run directory: %s", run_dir)
    summary: dict = {"run_dir": str(run_dir), "model": str(cfg.model.path)}

    if cfg.eval.heldout and not cfg.resume:
        from dashrl.actors.engine import HFEngine
        from dashrl.launch.evaluate import heldout_reward
        from dashrl.launch.runtime import set_thread_budget

        set_thread_budget(cfg.eval.torch_threads)
        before = heldout_reward(cfg, HFEngine(cfg.model.path))
        log.info(
            "held-out reward before training: %.4f (%.0f s)",
            before["reward_mean"],
            before["seconds"],
        )
        summary["heldout_before"] = before
        summary["heldout_reward_before"] = before["reward_mean"]

    interrupted = [False]

    def on_signal(signum, frame):
        interrupted[0] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    children = Children(run_dir)
    config_path = str(run_dir / "config.json")
    t_train = time.monotonic()
    try:
        t = cfg.transport
        log.info("nodes can attach with: python launch/start.py attach --connect %s:%d",
                 t.host, t.control_port)  # fmt: skip
        children.spawn("queue", "dashrl.queue.server", config_path)
        for i in range(cfg.actor.num_actors):
            children.spawn(f"actor{i}", "dashrl.actors.actor", config_path, str(i),
                           env_extra=actor_env(cfg.actor.engine))  # fmt: skip
        ranks, t = cfg.learner.num_ranks, cfg.transport
        torchrun = ["torch.distributed.run", f"--nproc-per-node={ranks}", f"--master-addr={t.host}",
                    f"--master-port={t.learner_port}", "--module"]  # fmt: skip
        children.spawn("learner", "dashrl.learner.learner", config_path,
                       launcher=torchrun if ranks > 1 else None)  # fmt: skip
        follow(cfg, children, interrupted)
    finally:
        children.stop_all()
    summary["train_wall_s"] = time.monotonic() - t_train
    summary["exit_codes"] = {r: p.returncode for r, p in children.procs.items()}

    rows = read_jsonl(run_dir / "metrics.jsonl")
    last = rows[-1] if rows else {}
    final = run_dir / "checkpoints" / "final"
    if cfg.eval.heldout and (final / "config.json").exists() and not interrupted[0]:
        from dashrl.actors.engine import HFEngine
        from dashrl.launch.evaluate import heldout_reward

        after = heldout_reward(cfg, HFEngine(final))
        log.info("held-out reward after training: %.4f", after["reward_mean"])
        summary["heldout_after"] = after
        summary["heldout_reward_after"] = after["reward_mean"]

    from dashrl.launch.plot import plot_run

    plot_run(
        rows,
        run_dir / "plot.png",
        summary.get("heldout_reward_before"),
        summary.get("heldout_reward_after"),
    )
    from dashrl.queue.server import FINAL_STATS

    q = dict(last)  # the queue's final counters when it wrote them, else the last step's
    if (run_dir / FINAL_STATS).exists():
        q.update(json.loads((run_dir / FINAL_STATS).read_text()))
    summary.update(
        {
            "learner_steps": int(last.get("step", 0)),
            "final_version": int(last.get("version", 0)),
            "rollouts_received": int(q.get("queue/received", 0)),
            "rollouts_accepted": int(q.get("queue/accepted", 0)),
            "rollouts_filtered": int(q.get("queue/filtered", 0)),
            "rollouts_evicted_stale": int(q.get("queue/evicted_stale", 0)),
            "rejected_frames": int(q.get("queue/rejected_frames", 0)),
            "interrupted": interrupted[0],
            "wall_s": time.monotonic() - t_start,
        }
    )
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info(
        "summary: %s", json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)})
    )
    return summary


def resume_config(run_dir: Path) -> Config:
    """The saved config of ``run_dir`` marked for resuming, with fresh ports.

    Raises:
        SystemExit: no config.json there (printed as one error line).
    """
    from dashrl.launch.config import load_config

    path = run_dir / "config.json"
    if not path.exists():
        print(f"error: {path} not found: nothing to resume", file=sys.stderr)
        sys.exit(2)
    cfg = load_config(path)
    ports = {k: 0 for k in ("rollout_port", "request_port", "dist_port", "learner_port",
                            "control_port", "weights_port")}  # fmt: skip
    return cfg.model_copy(update={"resume": True, "run_dir": run_dir.resolve(),
                                  "transport": cfg.transport.model_copy(update=ports)})  # fmt: skip


def _or_exit(fn, *errors: type[Exception]):
    """``fn()``, or one "error: ..." line on stderr and exit status 2 for the expected
    errors (a bad name, file, address or value: no traceback for the user)."""
    try:
        return fn()
    except (ValueError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    sub = sys.argv[1:2]
    if sub == ["eval"]:
        from dashrl.launch.config import EvalCommand
        from dashrl.launch.eval_command import run_eval

        cmd = tyro.cli(EvalCommand, args=sys.argv[2:], prog="start.py eval",
                       config=(tyro.conf.FlagConversionOff,))  # fmt: skip
        setup_logging("eval")
        _or_exit(lambda: run_eval(cmd), ValueError, FileNotFoundError)
        return
    if sub == ["keys"]:
        if len(sys.argv) != 3:
            print("usage: start.py keys DIR", file=sys.stderr)
            sys.exit(2)
        from dashrl.launch.security import generate_keys

        out = _or_exit(lambda: generate_keys(Path(sys.argv[2])), FileExistsError)
        print(f"CurveZMQ keys written to {out}; use --transport.curve-dir {out} "
              "(and copy the folder to attaching nodes)")  # fmt: skip
        return
    if sub == ["attach"]:
        from dashrl.launch.attach import attach
        from dashrl.launch.config import AttachCommand

        cmd = tyro.cli(AttachCommand, args=sys.argv[2:], prog="start.py attach")
        setup_logging("attach")
        print(_or_exit(lambda: attach(cmd), ValueError, TimeoutError))
        return
    if sub == ["replay"]:
        from dashrl.launch.config import ReplayCommand
        from dashrl.launch.replay import run_replay_command

        cmd = tyro.cli(ReplayCommand, args=sys.argv[2:], prog="start.py replay")
        setup_logging("replay")
        result = _or_exit(lambda: run_replay_command(cmd), ValueError, FileNotFoundError,
                          FileExistsError)  # fmt: skip
        if result is not None and not result["identical"]:
            sys.exit(1)
        return
    if sys.argv[1:2] == ["--resume"]:
        if len(sys.argv) < 3:
            print("usage: start.py --resume RUN_DIR [--field value ...]", file=sys.stderr)
            sys.exit(2)
        # the saved config, with any further flags (e.g. --learner.steps) applied on top
        cfg = tyro.cli(Config, default=resume_config(Path(sys.argv[2])), args=sys.argv[3:],
                       prog="start.py --resume RUN_DIR",
                       config=(tyro.conf.FlagConversionOff,))  # fmt: skip
    else:
        cfg = tyro.cli(Config, config=(tyro.conf.FlagConversionOff,))
    _or_exit(lambda: run(cfg), FileExistsError, FileNotFoundError)  # bad run dir or model


if __name__ == "__main__":
    main()
