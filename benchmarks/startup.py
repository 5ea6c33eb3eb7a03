"""Start-up cost of the command line: `estlora --help` and `estlora inspect` of a small LoRA, each a
fresh process, beside `python -c "import torch"` (the floor for any command that reads tensors).
Interleaved repeats, medians.

    .venv/bin/python benchmarks/startup.py --repeats 15 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def small_lora(folder: Path) -> Path:
    """A 0.3 MB diffusers-layout SDXL LoRA (two attention projections, rank 4)."""
    import torch
    from safetensors.torch import save_file

    path = folder / "small.safetensors"
    module = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    state = {}
    for name in ("to_q", "to_k"):
        state[f"{module}.{name}.lora_A.weight"] = torch.randn(4, 640)
        state[f"{module}.{name}.lora_B.weight"] = torch.randn(640, 4)
    save_file(state, str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        lora = small_lora(Path(folder))
        commands = {
            "estlora --help": [sys.executable, "-m", "estlora.cli", "--help"],
            "estlora inspect": [sys.executable, "-m", "estlora.cli", "inspect", str(lora)],
            "import torch": [sys.executable, "-c", "import torch"],
        }
        times = {name: [] for name in commands}
        for repeat in range(args.repeats):
            for name in random.sample(list(commands), len(commands)):
                start = time.perf_counter()
                subprocess.run(commands[name], check=True, capture_output=True)
                times[name].append(time.perf_counter() - start)
            print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{n} {t[-1]:.2f}" for n, t in times.items()))
    results = {name: {"median_s": statistics.median(t), "min_s": min(t), "times_s": t} for name, t in times.items()}
    for name, r in results.items():
        print(f"{name:16} median {r['median_s']:.3f} s   min {r['min_s']:.3f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"repeats": args.repeats, "commands": results}, indent=2))


if __name__ == "__main__":
    main()
