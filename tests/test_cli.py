"""The launcher's command line: --help imports nothing heavy; bad config is refused clearly."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from conftest import REPO
from dashrl.protocol.config import Config

START = str(REPO / "launch" / "start.py")


def test_help_lists_fields_without_importing_torch() -> None:
    code = (
        "import runpy, sys; sys.argv = ['start.py', '--help']\n"
        "try:\n    runpy.run_path(sys.argv_path, run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print('HEAVY', [m for m in ('torch', 'transformers', 'zmq') if m in sys.modules])"
    ).replace("sys.argv_path", repr(START))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--learner.micro-batches-per-step" in out.stdout
    assert "Gradient accumulation" in out.stdout  # field docstrings are shown
    assert "HEAVY []" in out.stdout


def test_unknown_flag_is_refused() -> None:
    out = subprocess.run(
        [sys.executable, START, "--learner.no-such-field", "1"], capture_output=True, text=True
    )
    assert out.returncode != 0 and "no-such-field" in out.stderr


def test_config_forbids_extra_fields_and_bad_values() -> None:
    with pytest.raises(ValidationError, match="extra"):
        Config.model_validate({"learner": {"lrr": 1.0}})
    with pytest.raises(ValidationError):
        Config.model_validate({"actor": {"group_size": 1}})
    with pytest.raises(ValidationError, match="loopback"):
        Config.model_validate({"transport": {"host": "0.0.0.0"}})
    cfg = Config()
    assert Config.model_validate_json(cfg.model_dump_json()) == cfg


def test_a_used_run_dir_is_refused(tmp_path) -> None:
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    out = subprocess.run([sys.executable, START, "--run-dir", str(tmp_path)],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 2 and "already holds a run" in out.stderr
    assert "Traceback" not in out.stderr


def test_vllm_actor_env_never_preloads_two_openmp_runtimes(monkeypatch) -> None:
    """A process that imported vLLM has torch's libgomp in LD_PRELOAD; a vLLM actor started
    from it with Intel OpenMP as well would die in vLLM's start-up check."""
    from dashrl.protocol.runtime import actor_env

    monkeypatch.setenv("LD_PRELOAD", "/t/torch/lib/libgomp.so.1:/other/libkeep.so")
    env = actor_env("vllm")
    if env:  # libiomp5 and/or tcmalloc exist on this machine
        libs = env["LD_PRELOAD"].split(":")
        assert "/other/libkeep.so" in libs and not any("libgomp" in x for x in libs)
        assert any("libiomp5" in x or "tcmalloc" in x for x in libs)
    assert actor_env("hf") == {}  # HF actors keep torch's own OpenMP
