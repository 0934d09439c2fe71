#!/usr/bin/env bash
# Build .gpu/ (ignored by git, at most 64 MiB) for bench/gpu_check.sh on a GPU machine with
# no network: wheels of what such a machine lacks (DeepSpeed, pydantic, tyro, pyzmq and
# their own needs; torch, transformers, msgpack, numpy are there) for its Python, and a
# tiny model directory. Run it here, in the repo root, with the project's virtualenv:
#   bash bench/gpu_prepare.sh [PYTHON_VERSION]      # default 3.12 (the H200 image's)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-3.12}
PIP=".venv/bin/pip"
rm -rf .gpu && mkdir -p .gpu/whl .gpu/models
# the versions this checkout is tested with (pip list of the CI install)
pin() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
PKGS=""
for p in pydantic pydantic_core annotated-types typing-inspection typing_extensions tyro \
         docstring_parser typeguard pyzmq hjson sortedcontainers; do
  PKGS="$PKGS $p==$(pin $p)"
done
$PIP download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .gpu/whl $PKGS
# DeepSpeed ships only a source archive; its wheel is pure Python (ops are compiled on first
# use), so one built here installs on any Python 3 there
$PIP wheel -q --no-deps --no-build-isolation -w .gpu/whl "deepspeed==$(pin deepspeed)"
.venv/bin/python - <<'PY'
from pathlib import Path
import shutil
from dashrl.protocol.config import Config
from dashrl.protocol.model import TINY, resolve_model
shutil.copytree(resolve_model(TINY, Config().model.cache_dir), ".gpu/models/tiny")
PY
du -sh .gpu .gpu/whl .gpu/models
size=$(du -sm .gpu | cut -f1)
if [ "$size" -gt 64 ]; then echo "error: .gpu is ${size} MiB, over the 64 MiB a GPU check carries"; exit 1; fi
ls .gpu/whl
