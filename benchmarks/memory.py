"""Peak memory per configuration: peak RSS on the CPU, peak allocated on the GPU.

Each configuration runs in a fresh process holding one denoiser and only the LoRAs it needs
(single: the subject LoRA; merge, est, klora, research: both), so peaks are comparable.

    .venv/bin/python benchmarks/memory.py --model tiny [--steps 8] [--json out.json]
    .venv/bin/python benchmarks/memory.py --model sdxl --steps 30      # on a GPU
    .venv/bin/python benchmarks/memory.py --model flux1 --dtype bf16 --steps 2      # on a GPU
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
from generation import (
    CONFIGS,
    DTYPES,
    FAMILY,
    FUSIONS,
    PEFT_CONFIGS,
    blocks_of,
    build,
    fused_by_estlora,
    install_research,
    model_arguments,
    peft_state,
    random_lora,
)

from estlora.families import family_named


def one(config: str, args: argparse.Namespace, ranks: tuple[int, int]) -> dict:
    model, device, steps = args.model, args.device, args.steps
    pipe, kwargs = build(model, device, args.size, DTYPES[args.dtype], blocks_of(args), args.tokens)
    family = family_named(FAMILY[model])
    denoiser = getattr(pipe, family.denoiser)
    shapes = family.linear_shapes(denoiser, family.default_route)
    # Only the LoRAs this configuration holds: on the CPU, unused factors would count in its peak RSS.
    # Stored in the model's dtype, as a LoRA trained for it is: est holds its factors as loaded.
    dtype = denoiser.dtype
    subject = None if config == "none" else random_lora(shapes, ranks[0], 1, "subject", dtype)
    style = None if config in ("none", "single", "fused") else random_lora(shapes, ranks[1], 2, "style", dtype)
    if config in PEFT_CONFIGS:
        pipe.load_lora_weights(peft_state(subject, family.lora_prefix), adapter_name="subject")
        if config == "merge":
            pipe.load_lora_weights(peft_state(style, family.lora_prefix), adapter_name="style")
            pipe.set_adapters(["subject", "style"])
        if config == "fused":
            pipe.fuse_lora(adapter_names=["subject"])
    elif config in FUSIONS:  # merged: the kept copy of W0 and, on a CPU, the variants it forms
        fused_by_estlora(pipe, subject, style, config)
    elif config == "research":
        install_research(denoiser, subject, style, steps)
    del subject, style
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    pipe(num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(0), **kwargs)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {"config": config, "peak_mib": peak, "kind": "GPU peak allocated" if cuda else "CPU peak RSS"}


def main() -> None:
    parser = model_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one configuration in this process
    parser.add_argument("--json")
    args = parser.parse_args()
    ranks = tuple(int(r) for r in args.ranks.split(","))
    if args.one:
        print(json.dumps(one(args.one, args, ranks)))
        return

    results = []
    for config in args.configs.split(","):
        command = [
            sys.executable,
            __file__,
            "--one",
            config,
            "--model",
            args.model,
            "--steps",
            str(args.steps),
            "--ranks",
            args.ranks,
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--tokens",
            str(args.tokens),
            *(["--size", str(args.size)] if args.size else []),
            *(["--blocks", args.blocks] if args.blocks else []),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{config}: {results[-1]['peak_mib']:.0f} MiB", flush=True)
        if args.json:  # after every configuration: a run cut short still leaves its numbers
            with open(args.json, "w") as out:
                header = {
                    "model": args.model,
                    "dtype": args.dtype,
                    "size": args.size,
                    "steps": args.steps,
                    "ranks": ranks,
                    "blocks": args.blocks,
                }
                json.dump({**header, "results": results}, out, indent=2)
    single = next((r["peak_mib"] for r in results if r["config"] == "single"), None)
    print(f"model {args.model}, ranks {args.ranks}, {args.steps} steps, {results[0]['kind']} (fresh process each)")
    for r in results:
        ratio = f"{r['peak_mib'] / single:.3f}" if single else "-"
        print(f"  {r['config']:10} {r['peak_mib']:9.0f} MiB   vs single {ratio}")


if __name__ == "__main__":
    main()
