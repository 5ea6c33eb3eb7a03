#!/usr/bin/env bash
# The GPU run of the benchmarks: SDXL's real UNet config with random weights (no network, no weights),
# fp16, 1024 x 1024, 30 steps; speed with up to 15 interleaved repeats (as many as fit in
# GEN_SECONDS, default 330), then peak memory per configuration, each in a fresh process (2 steps:
# the peak is reached in the first). Every stage logs as it goes and rewrites its JSON after each
# repeat or configuration, so a run cut short still leaves numbers. Sized for 10 minutes on one
# H100-class card.
#   bash benchmarks/gpu.sh [OUT_DIR]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-$here/../.venv/bin/python}"
out="$(mkdir -p "${1:-$here/gpu-results}" && cd "${1:-$here/gpu-results}" && pwd)"
cd "$here"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/card.txt"
"$python" generation.py --model sdxl --steps 30 --repeats 15 --max-seconds "${GEN_SECONDS:-330}" \
    --json "$out/generation.json" 2>&1 | tee "$out/generation.txt"
"$python" memory.py --model sdxl --steps 2 --json "$out/memory.json" 2>&1 | tee "$out/memory.txt"
