#!/usr/bin/env bash
# The GPU run of the benchmarks: SDXL's real UNet config with random weights (no network, no weights),
# fp16, 1024 x 1024, 30 steps; speed with 15 interleaved repeats, then peak memory per configuration,
# each in a fresh process. Sized to finish in under 10 minutes on one H100-class card.
#   bash benchmarks/gpu.sh [OUT_DIR]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-$here/../.venv/bin/python}"
out="${1:-$here/gpu-results}"
mkdir -p "$out"
cd "$here"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/card.txt"
"$python" generation.py --model sdxl --steps 30 --repeats 15 --json "$out/generation.json" | tee "$out/generation.txt"
"$python" memory.py --model sdxl --steps 30 --json "$out/memory.json" | tee "$out/memory.txt"
