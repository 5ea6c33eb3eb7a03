"""Try a toy LoRA recipe: train one LoRA with some of the recipe's settings changed, then score it as
`quality_toy.py` scores the shipped ones (does its job on its own prompts; base prompts still right).

The shipped recipe is `estlora.toy.training.SETTINGS["lora"]`; one recipe trains all six LoRAs, so a
change is tried here on the hardest concepts first. About 0.22 s per step on one thread (4000 steps:
15 minutes); run two at once on two cores.

    .venv/bin/python benchmarks/lora_recipe.py cross --set steps=4000 prior=0.25 --work /tmp/recipe-a
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging
from quality_toy import cell, lora_table

from estlora.loading.base import load_pipeline
from estlora.toy import training
from estlora.toy.model import GUIDANCE, SAMPLE_STEPS, toy_model_path
from estlora.toy.scorer import load_scorer
from estlora.toy.world import STYLES, SUBJECTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=SUBJECTS + STYLES)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe settings changed")
    parser.add_argument("--work", type=Path, required=True, help="checkpoints and the LoRA (resumable)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    changes = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.set)}
    unknown = set(changes) - set(training.SETTINGS["lora"])
    if unknown:
        parser.error(f"no such recipe setting: {', '.join(sorted(unknown))}")
    training.SETTINGS["lora"].update(changes)
    out = args.work / "out"
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "model").exists():
        (out / "model").symlink_to(toy_model_path().resolve())  # the shipped base, read only
    entry = training.fit_lora(args.name, args.work / "checkpoints", out, 0, None)
    diffusers_logging.set_verbosity_error()
    pipe = load_pipeline(toy_model_path(), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    seeds = list(range(args.seeds))
    row = lora_table(
        pipe, load_scorer(), seeds, SAMPLE_STEPS, GUIDANCE, [args.name], lambda n: out / "loras" / f"{n}.safetensors"
    )
    recipe = training.SETTINGS["lora"]
    print(f"{args.name} with {recipe}: " + ", ".join(f"{k} {cell(v)}" for k, v in row[args.name].items()))
    print(f"trained in {entry['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
