"""torch.compile and est: how many graphs a fused UNet compiles, and its speed beside one LoRA.

est changes which LoRA each projection applies from step to step. The routing hands the compiled
UNet each step's scales as a tensor, so it should compile once and never again (README, "Python").
This run compiles the UNet with est (estlora) and with a single LoRA (diffusers/peft), times the
first call (which compiles), then interleaves repeats of all four (eager and compiled, single and
est) and reports medians, the graphs each compiled UNet built, and any recompilation.

    .venv/bin/python benchmarks/compile.py --model tiny --repeats 15 --json out.json
    python benchmarks/compile.py --model sdxl --steps 30            # on a GPU (SDXL shapes, random weights)
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from dataclasses import replace

import torch
import torch._dynamo
from generation import DTYPES, build, model_arguments, peft_state, random_lora, timed_run

import estlora
from estlora.families import family_named
from estlora.updates import Lora

CONFIGS = ("single eager", "est eager", "single compiled", "est compiled")


def spread(lora: Lora) -> Lora:
    """The LoRA with its energy scaled differently in each projection, so that est's projections
    flip from subject to style at different steps: many distinct rows, each a recompilation if
    the scales were baked into the graph."""
    projections = {
        name: replace(f, up=f.up * (0.25 + 0.5 * (i % 7))) for i, (name, f) in enumerate(lora.projections.items())
    }
    return replace(lora, projections=projections, sha256=lora.sha256 + "-spread")


def main() -> None:
    parser = model_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (eager: tracing only)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    clock = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - clock:6.1f} s] {message}", flush=True)

    pipe, kwargs = build(args.model, args.device, args.size, DTYPES[args.dtype])
    shapes = family_named("sdxl").linear_shapes(pipe.unet, "attention")
    rank_c, rank_s = (int(r) for r in args.ranks.split(","))
    subject, style = random_lora(shapes, rank_c, 1, "subject"), spread(random_lora(shapes, rank_s, 2, "style"))
    routed_unet = pipe.unet
    pipe.unet = peft_unet = copy.deepcopy(routed_unet)
    pipe.load_lora_weights(peft_state(subject), adapter_name="subject")
    pipe.unet = routed_unet
    fusion = estlora.fuse(pipe, subject, style, method="est", beta=0.4)
    rows = {str(row) for row in fusion.plan_for(args.steps).weights.tolist()}
    log(f"model built, LoRAs loaded; est plan: {len(rows)} distinct rows over {args.steps} steps")

    unets = {
        "single eager": peft_unet,
        "est eager": routed_unet,
        "single compiled": torch.compile(peft_unet, backend=args.backend),
        "est compiled": torch.compile(routed_unet, backend=args.backend),
    }

    def run_once(config: str) -> float:
        pipe.unet = unets[config]
        return timed_run(pipe, kwargs, args.steps, args.device)

    def graphs() -> int:
        return torch._dynamo.utils.counters["stats"]["unique_graphs"]

    first, built = {}, {}
    for config in CONFIGS:  # the first call of a compiled UNet compiles it
        before = graphs()
        first[config] = run_once(config)
        built[config] = graphs() - before
        log(f"first run {config}: {first[config]:.2f} s, {built[config]} graphs compiled")
    settled = graphs()
    times = {c: [] for c in CONFIGS}
    for repeat in range(args.repeats):
        for config in random.sample(CONFIGS, len(CONFIGS)):
            times[config].append(run_once(config))
        log(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{c} {times[c][-1]:.3f}" for c in CONFIGS))
    pipe.unet = routed_unet
    fusion.remove()

    medians = {c: statistics.median(times[c]) for c in CONFIGS}
    results = {
        "model": args.model,
        "steps": args.steps,
        "size": kwargs["height"],
        "dtype": str(routed_unet.dtype).removeprefix("torch."),
        "device": args.device,
        "card": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "threads": torch.get_num_threads(),
        "backend": args.backend,
        "ranks": [rank_c, rank_s],
        "distinct_plan_rows": len(rows),
        "repeats": args.repeats,
        "configs": {
            c: {"first_s": first[c], "graphs": built[c], "median_s": medians[c], "times_s": times[c]} for c in CONFIGS
        },
        "recompiled_graphs_after_first_runs": graphs() - settled,
        "est_vs_single": {
            "eager": medians["est eager"] / medians["single eager"],
            "compiled": medians["est compiled"] / medians["single compiled"],
        },
    }
    print(f"model {args.model}, {args.steps} steps, backend {args.backend}, {args.repeats} interleaved repeats")
    print(f"{'config':<16}{'first s':>10}{'graphs':>8}{'median s':>10}{'vs single eager':>17}")
    for c in CONFIGS:
        ratio = medians[c] / medians["single eager"]
        print(f"{c:<16}{first[c]:>10.2f}{built[c]:>8}{medians[c]:>10.3f}{ratio:>17.3f}")
    print(f"graphs compiled after the first runs: {results['recompiled_graphs_after_first_runs']}")
    ratios = results["est_vs_single"]
    print(f"est / single: eager {ratios['eager']:.3f}, compiled {ratios['compiled']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
