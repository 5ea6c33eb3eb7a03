"""How cheap can the beta probe be? beta from fewer steps (and a smaller image) against the full render's.

For every toy pair (and the tiny SDXL's example pair), beta is measured with the run's own settings
and with cheaper probes; per probe: |beta - beta_full| over the pairs, the share of the est plan's
(step, projection) choices that stay the same with the probe's beta, and the probe's time.

    .venv/bin/python benchmarks/beta_probe.py [--json benchmarks/beta-probe.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from diffusers.utils import logging as diffusers_logging

import estlora
from estlora.loading.base import load_pipeline
from estlora.testing.examples import example_lora_path
from estlora.testing.tiny_encoders import builtin_tiny_dino
from estlora.testing.tiny_sdxl import builtin_tiny_sdxl
from estlora.toy.model import GUIDANCE, PROMPT, SAMPLE_STEPS, toy_model_path
from estlora.toy.world import STYLES, SUBJECTS

TOY_PROBES = {"full": {}, "steps 4": {"steps": 4}, "steps 8": {"steps": 8}, "steps 12": {"steps": 12},
              "16 px, steps 8": {"steps": 8, "size": 16}}  # fmt: skip


def probe(fusion, prompt: str, steps: int, size: int, guidance: float, dino: str) -> tuple[float, float]:
    start = time.perf_counter()
    call = {"num_inference_steps": steps, "guidance_scale": guidance, "width": size, "height": size}
    beta = estlora.measure_beta(fusion, prompt, dino_model=dino, use_cache=False, **call).beta
    return beta, time.perf_counter() - start


def study(pipe, pairs, prompt, steps, size, guidance, dino, probes) -> dict:
    rows = {name: {"beta": [], "seconds": [], "plan_same": []} for name in probes}
    for subject, style in pairs:
        with estlora.fuse(pipe, subject, style, method="est") as fusion:
            full_plan = None
            for name, change in probes.items():
                beta, seconds = probe(
                    fusion, prompt, change.get("steps", steps), change.get("size", size), guidance, dino
                )
                plan = fusion.plan_for(steps).weights
                full_plan = plan if full_plan is None else full_plan
                rows[name]["beta"].append(beta)
                rows[name]["seconds"].append(seconds)
                rows[name]["plan_same"].append(float((plan == full_plan).all(-1).float().mean()))
    full = np.array(rows["full"]["beta"])
    return {
        name: {
            "mean_abs_delta": float(np.abs(np.array(r["beta"]) - full).mean()),
            "max_abs_delta": float(np.abs(np.array(r["beta"]) - full).max()),
            "plan_same": float(np.mean(r["plan_same"])),
            "seconds": float(np.median(r["seconds"])),
            "betas": r["beta"],
        }
        for name, r in rows.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "beta-probe.json")
    args = parser.parse_args()
    diffusers_logging.set_verbosity_error()
    results = {}
    pipe = load_pipeline(toy_model_path(), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    pairs = [(f"toy:{s}", f"toy:{t}") for s in SUBJECTS for t in STYLES]
    results["toy"] = study(pipe, pairs, PROMPT, SAMPLE_STEPS, 32, GUIDANCE, "toy", TOY_PROBES)
    tiny = load_pipeline(str(builtin_tiny_sdxl()), device="cpu")
    tiny.set_progress_bar_config(disable=True)
    pair = [(str(example_lora_path("example:subject")), str(example_lora_path("example:style")))]
    probes = {
        "full": {},
        "steps 10": {"steps": 10},
        "steps 5": {"steps": 5},
        "32 px, steps 10": {"steps": 10, "size": 32},
    }
    results["tiny-sdxl"] = study(tiny, pair, "a sks dog in szn style", 20, 64, 5.0, str(builtin_tiny_dino()), probes)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    for world, table in results.items():
        print(f"{world}:")
        for name, r in table.items():
            print(f"  {name:16s} |d beta| mean {r['mean_abs_delta']:.4f} max {r['max_abs_delta']:.4f}  "
                  f"plan same {r['plan_same']:.4f}  {r['seconds']:.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
