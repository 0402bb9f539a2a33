#!/usr/bin/env bash
# Prove the GPU path on a machine with an NVIDIA GPU, from a copy of the repository:
#   bash bench/gpu_check.sh                      # uses $PYTHON, or an existing venv (see below)
#   PYTHON=/path/to/python bash bench/gpu_check.sh
# 1. a Python whose torch sees CUDA, taken from the first of: $PYTHON; $OPDVIZ_GPU_VENV/bin/python;
#    .venv/bin/python; .venv-gpu/bin/python. Nothing is installed when one is given or found, so the
#    check runs on an offline machine. Only when none exists is .venv-gpu created with
#    `pip install -r requirements.txt` and opdviz (this needs the network);
# 2. GPU against CPU results on a small pair, within the documented tolerances (bench/gpu_check.py);
# 3. the engine benchmark on the GPU with a Llama-2-7B-shaped bf16 pair (13.5 GB a checkpoint; generated
#    once under $GPU_CHECK_OUT, default bench/out-7b; $GPU_CHECK_LAYERS layers, default 32), printing wall
#    time, time by stage, peak RSS and peak GPU memory.
# Exits 3, saying why, when there is no CUDA device or the chosen torch cannot use it; non-zero when a
# check fails. opdviz is imported from this checkout (PYTHONPATH), so the venv need not contain it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${GPU_CHECK_OUT:-bench/out-7b}"
LAYERS="${GPU_CHECK_LAYERS:-32}"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi missing or sees no device); run this on a CUDA machine." >&2
    exit 3
fi
nvidia-smi -L

PY=""
for cand in "${PYTHON:-}" "${OPDVIZ_GPU_VENV:+$OPDVIZ_GPU_VENV/bin/python}" .venv/bin/python .venv-gpu/bin/python; do
    if [ -n "$cand" ] && [ -x "$cand" ] && "$cand" -c "import torch" 2>/dev/null; then
        PY="$cand"
        break
    elif [ -n "$cand" ] && [ "$cand" = "${PYTHON:-}" ]; then
        echo "gpu_check: PYTHON=$cand cannot import torch; point it at a Python with a CUDA build of torch." >&2
        exit 3
    fi
done
if [ -z "$PY" ]; then
    echo "== no Python with torch found (\$PYTHON, \$OPDVIZ_GPU_VENV, .venv, .venv-gpu): creating .venv-gpu (needs the network)"
    python3 -m venv .venv-gpu
    .venv-gpu/bin/python -m pip install -q --upgrade pip
    .venv-gpu/bin/python -m pip install -q -r requirements.txt
    .venv-gpu/bin/python -m pip install -q --no-deps -e .
    PY=.venv-gpu/bin/python
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "== python: $PY"
"$PY" -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'device', torch.cuda.get_device_name(0) if ok else None); sys.exit(0 if ok else 3)" \
    || { echo "gpu_check: torch in $PY sees no CUDA device (a CPU-only wheel?); install a CUDA build of torch==2.13.0 there, or set PYTHON to one that has it." >&2; exit 3; }

echo "== 1/2: GPU against CPU on a small pair"
"$PY" bench/gpu_check.py

echo "== 2/2: engine benchmark on the GPU, Llama-2-7B-shaped pair ($LAYERS layers)"
"$PY" bench/bench_engine.py --shape 7b --layers "$LAYERS" --device cuda --spectrum exact --posts 1 \
    --no-cache-run --out "$OUT"
