#!/usr/bin/env bash
# The GPU run of the harness, as one command for a machine that has the project's Python packages
# (or carries them as wheels in .whl/, installed to /tmp/site without touching the system).
#   bash bench/gpu.sh [OUT_DIR]        # writes load_gpu.json, load_gpu.png and log.txt to OUT_DIR
set -uo pipefail
OUT_DIR=${1:-${OUT:-bench/results}}
mkdir -p "$OUT_DIR"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
timeout "${BENCH_TIMEOUT:-520}" python3 bench/run.py --profile gpu --out "$OUT_DIR/load_gpu.json" --logs "$OUT_DIR" "${@:2}" 2>&1 | tee "$OUT_DIR/log.txt"
