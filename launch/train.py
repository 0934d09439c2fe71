"""``start.py [train]``: run a job end to end: queue, learner and actors as processes.

What a run does, top to bottom (:func:`run`):
  1. resolve the config (model path, free ports, run directory) and write config.json,
     the contract every child process reads;
  2. measure the held-out mean reward of the base model (all cores, nothing else running);
  3. spawn the queue, the learner and the actors, each with its own thread budget, and
     follow metrics.jsonl with a progress bar until the learner finishes, restarting a
     dead queue or actor (:class:`Supervisor`);
  4. stop every child by its pid, measure the held-out reward of the final checkpoint,
     and write plot.png and summary.json.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from datetime import datetime
from pathlib import Path

from tqdm import tqdm

from dashrl.actors.data import load_task
from dashrl.actors.engine import HFEngine
from dashrl.actors.rewards import Rewards
from dashrl.actors.tasks import Task, chat_prompt_ids, system_prompt
from dashrl.launch.attach import NodeClient
from dashrl.launch.children import Children, reap_group
from dashrl.launch.evaluate import heldout_reward
from dashrl.launch.plot import plot_run
from dashrl.learner.checkpoint import resumable_checkpoint
from dashrl.protocol.config import PORT_FIELDS, Config
from dashrl.protocol.model import load_tokenizer, resolve_model
from dashrl.protocol.placement import (
    child_env,
    cuda_available,
    resolve_cpus,
    resolve_weight_backend,
)
from dashrl.protocol.runtime import (
    available_cores,
    free_ports,
    read_jsonl,
    set_thread_budget,
    setup_logging,
)
from dashrl.queue.server import FINAL_STATS

log = logging.getLogger("dashrl.launch")


def _absolute_fn(spec: str) -> str:
    where, sep, name = spec.rpartition(":")
    return f"{Path(where).resolve()}:{name}" if sep and where.endswith(".py") else spec


def absolute_data_paths(cfg: Config) -> dict:
    """{"data", "reward"} with the data files and reward files made absolute, so every
    child process (whatever its working directory) and a later --config of the saved
    config.json find the same files."""
    d, r = cfg.data, cfg.reward
    data = d.model_copy(update={"gsm8k_dir": d.gsm8k_dir.resolve()})
    if d.path is not None and Path(d.path).expanduser().exists():
        data = data.model_copy(update={"path": str(Path(d.path).expanduser().resolve())})
    reward = r.model_copy(update={
        "fns": [_absolute_fn(f) for f in r.fns],
        "correctness": None if r.correctness is None else _absolute_fn(r.correctness),
    })  # fmt: skip
    return {"data": data, "reward": reward}


def write_data_split(run_dir: Path, task: Task) -> Path:
    """run_dir/data_split.json: the task, its training prompt count and every held-out
    prompt (id, question, answer), the record that held-out and training are disjoint."""
    path = run_dir / "data_split.json"
    path.write_text(json.dumps({
        "task": task.name, "train_prompts": len(task.train),
        "heldout": [{"id": p.id, "question": p.question, "answer": p.answer}
                    for p in task.heldout],
    }, indent=1))  # fmt: skip
    return path


def check_prompt_lengths(cfg: Config, task: Task) -> int:
    """The longest chat-formatted prompt (tokens) among those it tokenises; every prompt
    must leave room for ``actor.max_new_tokens`` within vLLM's ``max_model_len`` (vLLM
    engine) and fit the queue's ``max_seq_len``.

    Start-up should not tokenise a whole dataset (the default job's 14,807 prompts took
    about 2 s here; a large file takes proportionally longer): a prompt's tokens are at
    most its UTF-8 bytes plus the chat template's own tokens (each byte-level BPE token
    covers at least one byte), so only prompts whose bytes could reach the limit are
    tokenised, and the 64 longest (for the reported maximum).

    Raises:
        ValueError: names the first prompt (its id and the start of its text) that does not.
    """
    tok = load_tokenizer(cfg.model.path)
    d, a, limits = cfg.data, cfg.actor, [(cfg.queue.max_seq_len, "--queue.max-seq-len")]
    if a.engine == "vllm":
        limits.append((a.vllm.max_model_len - a.max_new_tokens,
                       "--actor.vllm.max-model-len minus --actor.max-new-tokens"))  # fmt: skip
    limit, name = min(limits)
    overhead = len(chat_prompt_ids(tok, "", "", "x")) + 16  # template, system turn, margin

    def size_bound(p) -> int:
        text = p.question + d.prompt_suffix + (system_prompt(p, d.system_prompt) or "")
        return len(text.encode()) + overhead

    prompts = sorted([*task.heldout, *task.train], key=size_bound, reverse=True)
    longest = 0
    for i, p in enumerate(prompts):
        if i >= 64 and size_bound(p) <= limit:
            break  # this one and every shorter one fit
        n = len(
            chat_prompt_ids(tok, p.question, d.prompt_suffix, system_prompt(p, d.system_prompt))
        )
        if n > limit:
            raise ValueError(f"prompt {p.id} ({p.question[:60]!r}...) is {n} tokens, more than "
                             f"{limit} ({name}): shorten it or raise the limit")  # fmt: skip
        longest = max(longest, n)
    return longest


def resolve(cfg: Config) -> Config:
    """Fill in run_dir, model path and ports; create the run directory and write config.json.

    Raises:
        FileExistsError: the run directory already holds a run.
    """
    if cfg.resume:  # no checkpoint, or a damaged one: one line now, not a dead learner later
        resumable_checkpoint(Path(cfg.run_dir))
    run_dir = cfg.run_dir or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = run_dir.resolve()
    if (run_dir / "metrics.jsonl").exists() and not cfg.resume:  # logs only append
        raise FileExistsError(f"{run_dir} already holds a run; choose another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    t = cfg.transport
    fresh = iter(free_ports(len(PORT_FIELDS), t.host))  # distinct from each other
    ports = {k: getattr(t, k) or next(fresh) for k in PORT_FIELDS}
    model = cfg.model.model_copy(
        update={"path": resolve_model(cfg.model.name, cfg.model.cache_dir)}
    )
    # the weight transport, decided once here for every child (protocol/placement.py)
    a, cuda = cfg.actor, cuda_available()
    backend = resolve_weight_backend(t.weight_backend, cfg.learner.gpus, a.gpus, a.num_actors,
                                     a.engine, cuda, cfg.learner.num_ranks)  # fmt: skip
    log.info("weights travel over %s (transport.weight_backend %s; learner.gpus %s, "
             "actor.gpus %s)", backend, t.weight_backend, cfg.learner.gpus, a.gpus)  # fmt: skip
    # and the cores: the learner's own, the rest for everything else (learner.own_cores;
    # async only: in sync and dash modes the roles take turns, each with every core)
    lc = cfg.learner
    own = lc.own_cores and cfg.mode == "async"
    gpu = cuda and lc.device != "cpu"
    learner_cpus, actor_cpus = resolve_cpus(lc.cpus, a.cpus, own, lc.torch_threads * lc.num_ranks,
                                            available_cores(), gpu)  # fmt: skip
    log.info("cores: learner %s, actors, queue and background evaluation %s (learner.own_cores "
             "%s, mode %s; None = every core)", learner_cpus, actor_cpus, lc.own_cores,
             cfg.mode)  # fmt: skip
    resolved = cfg.model_copy(
        update={"run_dir": run_dir, "model": model, **absolute_data_paths(cfg),
                "transport": t.model_copy(update={**ports, "weight_backend": backend}),
                "learner": lc.model_copy(update={"cpus": learner_cpus}),
                "actor": a.model_copy(update={"cpus": actor_cpus})}
    )  # fmt: skip
    resolved = Config.model_validate(resolved.model_dump())  # re-validate the whole tree
    (run_dir / "config.json").write_text(resolved.model_dump_json(indent=2))
    return resolved


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
                self.node = NodeClient(f"{t.host}:{t.control_port}", "launcher", 1, t.curve_dir)
                self.node.register(timeout_s=60)
            self.children.spawn(role, "dashrl.actors.actor", self.config_path,
                                role.removeprefix("actor"), "launcher",
                                f"tcp://{t.host}:{t.weights_port}",
                                env_extra=child_env(self.cfg, role, cuda_available()))  # fmt: skip
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


def follow(cfg: Config, children: Children, interrupted: list[bool], failures: list[dict]) -> None:
    """Show a progress bar from metrics.jsonl until the learner exits; stop it on Ctrl-C.

    A queue or actor that dies once training runs is restarted (:class:`Supervisor`). One
    that dies before the first learner step (a bad task, model or setting: restarting
    would only repeat it, and the learner would wait for it for an hour), or past its
    restarts, is a failure: it is added to ``failures`` and the job stops at once.
    """
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
                    started = seen or read_jsonl(cfg.run_dir / "metrics.jsonl")  # a step yet?
                    if not started or not supervisor.restart(role):
                        failures.append(children.failure(role))
                        log.info("stopping the learner (it saves a checkpoint first)")
                        # before its first step it may be blocked joining the weight group,
                        # deaf to SIGTERM, and has nothing to save: do not wait long
                        children.stop("learner", timeout_s=300 if started else 10)
                        return
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


def heldout(cfg: Config, model: Path, when: str, summary: dict, task: Task) -> None:
    """Held-out reward of ``model`` into ``summary["heldout_<when>"]`` (and its mean into
    ``heldout_reward_<when>``); ``when`` is "before" or "after" training."""
    # nothing else runs now: the GPU where there is one, else every core
    res = heldout_reward(cfg, HFEngine(model, device="cuda" if cuda_available() else None),
                         task=task)  # fmt: skip
    log.info("held-out reward %s training: %.4f (%.0f s)", when, res["reward_mean"],
             res["seconds"])  # fmt: skip
    summary[f"heldout_{when}"] = res
    summary[f"heldout_reward_{when}"] = res["reward_mean"]


def run(cfg: Config) -> dict:
    """Run one training job end to end; returns the summary written to summary.json.

    Raises:
        ValueError, FileNotFoundError: the data config names no task or file that exists,
            or the run directory or model is unusable (before any child starts).
    """
    setup_logging("launch")
    t_start = time.monotonic()
    task = load_task(cfg.data, cfg.seed)  # a bad task, source or data file fails here, in seconds
    Rewards(cfg.reward, task)  # and so does a reward function that cannot be imported
    cfg = resolve(cfg)
    run_dir = cfg.run_dir
    longest = check_prompt_lengths(cfg, task)
    write_data_split(run_dir, task)
    log.info("run directory: %s; longest prompt %d tokens", run_dir, longest)
    summary: dict = {"run_dir": str(run_dir), "model": str(cfg.model.path)}

    if cfg.eval.heldout and not cfg.resume:
        set_thread_budget(cfg.eval.torch_threads)  # nothing else runs yet: all cores
        heldout(cfg, cfg.model.path, "before", summary, task)

    interrupted = [False]

    def on_signal(signum, frame):
        interrupted[0] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    children, failures = Children(run_dir), []
    config_path = str(run_dir / "config.json")
    t_train = time.monotonic()
    cuda = cuda_available()
    try:
        t = cfg.transport
        log.info("nodes can attach with: python launch/start.py attach --connect %s:%d",
                 t.host, t.control_port)  # fmt: skip
        children.spawn("queue", "dashrl.queue.server", config_path)
        for i in range(cfg.actor.num_actors):
            children.spawn(f"actor{i}", "dashrl.actors.actor", config_path, str(i),
                           env_extra=child_env(cfg, f"actor{i}", cuda))  # fmt: skip
        ranks, t = cfg.learner.num_ranks, cfg.transport
        torchrun = ["torch.distributed.run", f"--nproc-per-node={ranks}", f"--master-addr={t.host}",
                    f"--master-port={t.learner_port}", "--module"]  # fmt: skip
        children.spawn("learner", "dashrl.launch.learn", config_path,
                       launcher=torchrun if ranks > 1 else None,
                       env_extra=child_env(cfg, "learner", cuda))  # fmt: skip
        follow(cfg, children, interrupted, failures)
    finally:
        children.stop_all()
    summary["train_wall_s"] = time.monotonic() - t_train
    summary["exit_codes"] = {r: p.returncode for r, p in children.procs.items()}
    if children.procs["learner"].returncode not in (0, None) and not failures:
        failures.append(children.failure("learner"))  # it died: not stopped by us
    if failures:
        summary["failure"] = failures[0]
        log.error("%s failed (exit code %s): %s", failures[0]["role"],
                  failures[0]["exit_code"], failures[0]["error"])  # fmt: skip

    rows = read_jsonl(run_dir / "metrics.jsonl")
    last = rows[-1] if rows else {}
    final = run_dir / "checkpoints" / "final"
    if cfg.eval.heldout and (final / "config.json").exists() and not (interrupted[0] or failures):
        heldout(cfg, final, "after", summary, task)
    plot_run(
        rows,
        run_dir / "plot.png",
        summary.get("heldout_reward_before"),
        summary.get("heldout_reward_after"),
    )
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
            "failed_role": failures[0]["role"] if failures else None,
            "wall_s": time.monotonic() - t_start,
        }
    )
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info(
        "summary: %s", json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)})
    )
    return summary
