#!/usr/bin/env bash
# The GPU run of the benchmarks, random weights of the real shapes (no network, no weights):
#   1. SDXL's UNet, fp16, 1024 x 1024, 30 steps: speed (diffusers' fused LoRA and estlora's merged
#      routing included), interleaved repeats for SDXL_SECONDS (180)
#   2. SDXL peak memory of none / single / est, each in a fresh process (2 steps: the peak is
#      reached in the first)
#   3. FLUX.1-dev's transformer (19 + 38 blocks), bf16, 1024 x 1024, 28 steps: speed for
#      FLUX_SECONDS (200)
#   4. FLUX.1 peak memory of single / est (2 steps)
# Every stage logs as it goes and rewrites its JSON after each repeat or configuration, so a run
# cut short still leaves numbers. Sized for about 8 minutes on one H100-class card, inside the
# 10-minute limit of one device call.
#   bash benchmarks/gpu.sh [OUT_DIR]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-$here/../.venv/bin/python}"
out="$(mkdir -p "${1:-$here/gpu-results}" && cd "${1:-$here/gpu-results}" && pwd)"
cd "$here"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/card.txt"
"$python" generation.py --model sdxl --steps 30 --repeats 15 --max-seconds "${SDXL_SECONDS:-180}" \
    --configs none,single,fused,merge,est,est-merged,klora --json "$out/generation-sdxl.json" 2>&1 | tee "$out/generation-sdxl.txt"
"$python" memory.py --model sdxl --steps 2 --configs none,single,est \
    --json "$out/memory-sdxl.json" 2>&1 | tee "$out/memory-sdxl.txt"
"$python" generation.py --model flux1 --dtype bf16 --ranks 16,64 --steps 28 --repeats 15 \
    --max-seconds "${FLUX_SECONDS:-200}" --configs none,single,fused,est,est-merged,klora \
    --json "$out/generation-flux.json" 2>&1 | tee "$out/generation-flux.txt"
"$python" memory.py --model flux1 --dtype bf16 --ranks 16,64 --steps 2 --configs single,est \
    --json "$out/memory-flux.json" 2>&1 | tee "$out/memory-flux.txt"
