"""The repository passes ruff (lint and format), so a style slip fails CI, not review.

ruff comes with the ``dev`` extra; the rules are in pyproject.toml ``[tool.ruff]``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_ruff(args: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
