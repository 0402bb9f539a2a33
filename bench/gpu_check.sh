#!/usr/bin/env bash
# Prove the GPU path on a machine with an NVIDIA GPU, from a fresh copy of the repository:
#   bash bench/gpu_check.sh
# 1. a virtual environment (.venv-gpu, or $OPDVIZ_GPU_VENV) with requirements.txt and opdviz;
#    an existing one whose torch sees CUDA is reused;
# 2. GPU against CPU results on a small pair, within the documented tolerances (bench/gpu_check.py);
# 3. the engine benchmark on the GPU with a Llama-2-7B-shaped bf16 pair (13.5 GB a checkpoint; generated
#    once under $GPU_CHECK_OUT, default bench/out-7b; $GPU_CHECK_LAYERS layers, default 32), printing wall
#    time, time by stage, peak RSS and peak GPU memory.
# Exits non-zero, saying why, when there is no CUDA device or a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${OPDVIZ_GPU_VENV:-.venv-gpu}"
OUT="${GPU_CHECK_OUT:-bench/out-7b}"
LAYERS="${GPU_CHECK_LAYERS:-32}"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi missing or sees no device); run this on a CUDA machine." >&2
    exit 3
fi
nvidia-smi -L

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "== creating $VENV (pip install -r requirements.txt, then opdviz)"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -r requirements.txt
    "$VENV/bin/python" -m pip install -q --no-deps -e .
fi
PY="$VENV/bin/python"
"$PY" -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'device', torch.cuda.get_device_name(0) if ok else None); sys.exit(0 if ok else 3)" \
    || { echo "gpu_check: torch in $VENV sees no CUDA device (a CPU-only wheel?); install a CUDA build of torch==2.13.0 there." >&2; exit 3; }

echo "== 1/2: GPU against CPU on a small pair"
"$PY" bench/gpu_check.py

echo "== 2/2: engine benchmark on the GPU, Llama-2-7B-shaped pair ($LAYERS layers)"
"$PY" bench/bench_engine.py --shape 7b --layers "$LAYERS" --device cuda --spectrum exact --posts 1 \
    --no-cache-run --out "$OUT"
