#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py) on a machine with one GPU and no network, where torch,
# transformers and msgpack are installed and the rest comes from .gpu/ (bench/gpu_prepare.sh).
# Writes ${OUT:-runs}/gpu_check.json; at most 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs}
mkdir -p "$out" /tmp/dashrl-pk
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/dashrl-site .gpu/whl/*.whl || exit 1
# the repo root is the package `dashrl`: import it through a link named so
ln -sfn "$(pwd)" /tmp/dashrl-pk/dashrl
export PYTHONPATH=/tmp/dashrl-site:/tmp/dashrl-pk PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 -c "import torch, transformers, deepspeed, pydantic, zmq; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)"
timeout 480 python3 bench/gpu_check.py --out "$out/gpu_check.json" "$@"
