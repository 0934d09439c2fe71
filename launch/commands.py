"""The launcher's subcommands other than ``train`` (whose config is :class:`Config`): typed
argument trees parsed by tyro, one per entry point (``start.py eval | replay | attach | keys``).
They live here, not in :mod:`dashrl.protocol.config`, because no child process reads them.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from tyro.conf import Positional

from dashrl.protocol.config import Strict


class EvalCommand(Strict):
    """dashrl eval: pass@k, maj@k, avg@k and greedy accuracy of a model on benchmarks."""

    model: str = "smollm2-135m-instruct"
    """A model name ("smollm2-135m-instruct"), an HF model directory, or a run directory
    (its checkpoints/final is evaluated, with the run's data config for "heldout")."""
    benchmark: tuple[str, ...] = ("gsm8k",)
    """Benchmarks: gsm8k, math500, minerva_math, olympiadbench, aime24, amc23, or heldout
    (the training task's held-out prompts)."""
    k: int = Field(4, ge=1)
    """Samples per problem (pass@j for j = 1, 2, 4, ... <= k, maj@k, avg@k)."""
    limit: int | None = None
    """Evaluate only the first N problems of each benchmark."""
    greedy: bool = True
    """Also decode one greedy completion per problem (greedy accuracy)."""
    max_new_tokens: int = Field(256, ge=1)
    """Completion budget in tokens."""
    temperature: float = Field(0.7, gt=0)
    """Sampling temperature of the k samples."""
    data_dir: Path = Path("data")
    """Folder holding gsm8k/ and eval/ (the benchmark files; relative to the working
    directory)."""
    out_dir: Path | None = None
    """Where results go; default <run_dir>/eval for a run directory, else runs/eval-<time>."""
    seed: int = 0
    """Sampling seed."""
    threads: int = Field(2, ge=1)
    """Torch threads."""
    batch_prompts: int = Field(16, ge=1)
    """Problems per generate call (each with k samples)."""
    cache_dir: Path = Path("~/.cache/dashrl/models")
    """Model cache, as in the training config."""


class ReplayCommand(Strict):
    """dashrl replay: re-run a run's learner on its logged micro-batches (no actors, no queue)
    and report whether its metrics match the original step by step; or inspect the log."""

    run_dir: Positional[Path]
    """The run directory (with config.json, metrics.jsonl and queue/rollouts.msgpack), or,
    with --inspect/--show, a log file."""
    out: Path | None = None
    """Where the replay writes its metrics and replay.json (default RUN_DIR/replay)."""
    overwrite: bool = False
    """Reuse an existing output directory."""
    steps: int | None = None
    """Replay only the first N steps (default: as many as the original run took)."""
    inspect: bool = False
    """Print a summary of the log (counts, versions, staleness, |advantage|, reward per task)."""
    show: int = 0
    """Print the first N logged rollouts as text."""


class AttachCommand(Strict):
    """dashrl attach: start generator processes on this machine that join a running job."""

    connect: str
    """The learner's control socket, HOST:PORT (transport.control_port in the job's
    config.json, also printed by the launcher)."""
    actors: int = Field(1, ge=1)
    """Actor processes to start on this node."""
    node_id: str | None = None
    """Name of this node in the job (default: node-<random>)."""
    work_dir: Path | None = None
    """Where the node keeps its config copy and logs (default: a new temporary directory)."""
    timeout_s: float = 60.0
    """How long to wait for the learner's welcome, in seconds."""
    curve_dir: Path | None = None
    """CurveZMQ keys folder (a copy of the job's ``start.py keys`` folder) when the job binds
    beyond the loopback."""


class KeysCommand(Strict):
    """dashrl keys: write a CurveZMQ key folder (server and client key pairs) for a job that
    binds beyond the loopback."""

    out: Positional[Path]
    """The folder to create (it must not exist)."""


class SweepCommand(Strict):
    """dashrl sweep: run an experiment file's configurations x seeds (resumable) and write
    its table and curves (launch/sweep.py; experiments/README.md)."""

    experiment: Positional[str]
    """An experiment file (.toml), or the name of one under experiments/ ("kl")."""
    runs: Path | None = None
    """Where the run directories go (default runs/sweep/NAME)."""
    results: Path | None = None
    """Where NAME.json, NAME.md and NAME.png go (default experiments/results)."""
    only: tuple[str, ...] = ()
    """Run only these configurations now (the report covers every recorded run)."""
    seeds: tuple[int, ...] = ()
    """Run only these seeds now: e.g. one whole seed of every configuration on one machine,
    so that a speed-up paired by seed compares runs made on the same CPU."""
    report_only: bool = False
    """Start no run; rewrite the report from the recorded runs."""
