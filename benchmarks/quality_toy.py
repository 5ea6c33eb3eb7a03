"""Fusion quality on the toy world, scored by the toy scorers: every subject x style pair, several seeds.

Four tables from the shipped weights (src/estlora/toy/assets), in about 13 minutes on 2 CPU cores:

1. the base model alone: does it draw the asked shape, colour and texture?
2. each LoRA alone, loaded with plain diffusers (`load_lora_weights`): does it do its job, and does the
   base world survive it (prior preservation)?
3. fusion: "a sks shape in szn style" for every subject x style pair and seed, per method: the share of
   images showing the subject's shape, the style's texture, and both at once, with 95% bootstrap
   intervals, overall and per pair. `est` measures beta per pair (style discrepancy in the scorer's
   feature space: the toy world's DINO); `est-energy` is est with the energy-consistent gamma;
   `composite` is LoRA Composite (twice the denoiser's work).
4. the oracle sweep: est over a grid of (beta, alpha) per pair, "both" per cell on fewer seeds: the
   best share the gate can reach, and where the measured beta falls in that grid. It tells whether
   EST's S factor picks a good beta, or whether the gate itself is the limit.

    .venv/bin/python benchmarks/quality_toy.py [--seeds 32] [--first-seed 0] [--out benchmarks/quality-toy]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging

import estlora
from estlora.commands.evaluation import bootstrap_ci
from estlora.config import FusionConfig
from estlora.loading.base import load_pipeline
from estlora.toy.model import BENCHMARK, DEMO_PAIR, GUIDANCE, PROMPT, SAMPLE_STEPS, toy_lora_path, toy_model_path
from estlora.toy.scorer import load_scorer, predict
from estlora.toy.world import BASE_SHAPES, BASE_TEXTURES, COLOURS, STYLES, SUBJECTS, Scene, caption

ORACLE_BETAS = (0.0, 0.25, 0.5, 1.0, 2.0)
ORACLE_ALPHAS = (0.5, 1.5, 3.0)
METHODS = {  # row name: fusion settings
    "est": {"method": "est"},
    "est-energy": {"method": "est", "gamma_rule": "energy"},
    "klora": {"method": "klora", "beta": None},  # K-LoRA's own hand-set beta, not the measured one
    "merge": {"method": "merge"},
    "switch": {"method": "switch"},
    "composite": {"method": "composite"},
    "subject": {"method": "subject"},
    "style": {"method": "style"},
}


def sample(pipe, prompt: str, seeds: list[int], steps: int, guidance: float) -> list:
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return pipe(
        prompt,
        num_images_per_prompt=len(seeds),
        generator=generators,
        num_inference_steps=steps,
        guidance_scale=guidance,
    ).images


def share(flags: list[bool]) -> dict:
    mean, low, high = bootstrap_ci([float(f) for f in flags])
    return {"mean": round(mean, 4), "low": round(low, 4), "high": round(high, 4), "n": len(flags)}


def cell(s: dict) -> str:
    return f"{s['mean']:.2f} [{s['low']:.2f}, {s['high']:.2f}]"


def base_table(pipe, scorer, seeds, steps, guidance) -> dict:
    hits = {"shape": [], "colour": [], "texture": [], "all three": []}
    for shape in BASE_SHAPES:
        for colour in COLOURS:
            for texture in BASE_TEXTURES:
                scene = Scene(shape, colour, texture)
                for p in predict(scorer, sample(pipe, caption(scene), seeds, steps, guidance)):
                    right = [p.shape == shape, p.colour == colour, p.texture == texture]
                    for key, value in zip(hits, [*right, all(right)], strict=True):
                        hits[key].append(value)
    return {key: share(v) for key, v in hits.items()}


def lora_table(pipe, scorer, seeds, steps, guidance, names=SUBJECTS + STYLES, path=toy_lora_path) -> dict:
    """Each LoRA alone, through plain diffusers, on its own prompts and on base prompts (`path`: a
    LoRA's name -> its file; the shipped ones by default)."""
    base_prompts = [caption(Scene(s, c, "solid")) for s, c in zip(BASE_SHAPES, ["red", "green", "blue"], strict=True)]
    base_prompts.append(caption(Scene("circle", "yellow", "stripes")))
    rows = {}
    for name in names:
        # the one loaded adapter is the active one; diffusers' `set_adapters` cannot expand its scales on a
        # UNet whose `layers_per_block` is a list (`_maybe_expand_lora_scales` adds 1 to it)
        pipe.load_lora_weights(str(path(name)), adapter_name=name)
        own, attribute = [], []
        if name in SUBJECTS:
            for colour in [None, *COLOURS]:
                prompt = caption(Scene(name, colour or "red", "solid"), say_colour=colour is not None)
                for p in predict(scorer, sample(pipe, prompt, seeds, steps, guidance)):
                    own.append(p.shape == name)
                    if colour:
                        attribute.append(p.colour == colour)
        else:
            for shape in BASE_SHAPES:
                prompt = caption(Scene(shape, "red", name), say_colour=False)
                for p in predict(scorer, sample(pipe, prompt, seeds, steps, guidance)):
                    own.append(p.texture == name)
                    attribute.append(p.shape == shape)  # for a style: the asked shape is kept
        kept = []
        for prompt in base_prompts:
            words = prompt.split()
            for p in predict(scorer, sample(pipe, prompt, seeds, steps, guidance)):
                texture = "stripes" if "stripes" in words else "solid"
                kept.append(p.shape in words and p.colour in words and p.texture == texture)
        rows[name] = {"own": share(own), "attribute": share(attribute), "base kept": share(kept)}
        print(f"  {name}: " + ", ".join(f"{k} {cell(v)}" for k, v in rows[name].items()), flush=True)
        pipe.delete_adapters([name])
    return rows


def fusion_table(pipe, scorer, seeds, steps, guidance, grid_pair) -> tuple[dict, dict, dict, dict]:
    hits = {m: {"subject": [], "style": [], "both": []} for m in METHODS}
    per_pair, betas, grid = {}, {}, {}
    call = {"num_inference_steps": steps, "guidance_scale": guidance}
    for subject in SUBJECTS:
        for style in STYLES:
            pair = f"{subject} x {style}"
            with estlora.fuse(pipe, f"toy:{subject}", f"toy:{style}", method="est") as fusion:
                betas[pair] = estlora.measure_beta(fusion, PROMPT, seed=0, dino_model="toy", **call).beta
                per_pair[pair] = {}
                for method, options in METHODS.items():
                    with fusion.using(**options):
                        images = sample(pipe, PROMPT, seeds, steps, guidance)
                    predictions = predict(scorer, images)
                    flags = [(p.shape == subject, p.texture == style) for p in predictions]
                    for s, t in flags:
                        hits[method]["subject"].append(s)
                        hits[method]["style"].append(t)
                        hits[method]["both"].append(s and t)
                    per_pair[pair][method] = share([s and t for s, t in flags])
                    if (subject, style) == grid_pair:
                        grid[method] = images
                print(f"  {pair} (beta {betas[pair]:.3f}): " + ", ".join(
                    f"{m} {r['mean']:.2f}" for m, r in per_pair[pair].items()), flush=True)  # fmt: skip
    table = {m: {k: share(v) for k, v in h.items()} for m, h in hits.items()}
    return table, per_pair, betas, grid


def oracle_sweep(pipe, scorer, seeds, steps, guidance, betas: dict) -> dict:
    """est over ORACLE_BETAS x ORACLE_ALPHAS per pair: "both" per cell, the best cell, and the cell
    nearest the measured beta (at the default alpha)."""
    sweep = {}
    for subject in SUBJECTS:
        for style in STYLES:
            pair = f"{subject} x {style}"
            cells = {}
            with estlora.fuse(pipe, f"toy:{subject}", f"toy:{style}", method="est") as fusion:
                for alpha in ORACLE_ALPHAS:
                    for beta in ORACLE_BETAS:
                        with fusion.using(alpha=alpha, beta=beta):
                            predictions = predict(scorer, sample(pipe, PROMPT, seeds, steps, guidance))
                        cells[f"alpha={alpha:g} beta={beta:g}"] = round(
                            sum(p.shape == subject and p.texture == style for p in predictions) / len(predictions), 3
                        )
            best = max(cells, key=cells.get)
            nearest = min(ORACLE_BETAS, key=lambda b: abs(b - betas[pair]))
            measured = cells[f"alpha={FusionConfig().alpha:g} beta={nearest:g}"]  # the default alpha
            sweep[pair] = {
                "cells": cells,
                "best": best,
                "best_both": cells[best],
                "measured_beta": betas[pair],
                "at_measured": measured,
                "rank_of_measured": sorted(cells.values(), reverse=True).index(measured) + 1,
            }
    return sweep


def save_grid(grid: dict, path: Path, zoom: int = 3) -> None:
    from PIL import Image, ImageDraw

    names = list(grid)
    n = len(grid[names[0]])
    label_width, size = 90, 32 * zoom
    canvas = Image.new("RGB", (label_width + n * size, len(names) * size), "white")
    draw = ImageDraw.Draw(canvas)
    for row, name in enumerate(names):
        draw.text((4, row * size + size // 2 - 6), name, fill="black")
        for col, image in enumerate(grid[name]):
            canvas.paste(image.resize((size, size), Image.NEAREST), (label_width + col * size, row * size))
    canvas.save(path)


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(table)
    x = np.arange(len(methods))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for k, (key, colour) in enumerate([("subject", "tab:orange"), ("style", "tab:blue"), ("both", "tab:green")]):
        means = [table[m][key]["mean"] for m in methods]
        errors = [[means[i] - table[m][key]["low"] for i, m in enumerate(methods)],
                  [table[m][key]["high"] - means[i] for i, m in enumerate(methods)]]  # fmt: skip
        ax.bar(x + (k - 1) * 0.27, means, 0.27, yerr=errors, capsize=2, color=colour, label=f"shows {key}")
    ax.set_xticks(x, methods)
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of images (95% CI)")
    ax.set_title(f'toy world: "{PROMPT}", all subject x style pairs')
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(base: dict, loras: dict, table: dict, per_pair: dict, betas: dict, sweep: dict, seeds: int) -> str:
    lines = ["### Base model alone", "", "| asked | shown (share, 95% CI) |", "|---|---|"]
    lines += [f"| {k} | {cell(v)} |" for k, v in base.items()]
    lines += ["", "### Each LoRA alone (plain diffusers `load_lora_weights`)", ""]
    lines += ["| LoRA | does its job | asked colour (subject) / asked shape (style) | base prompts still right |"]
    lines += ["|---|---|---|---|"]
    lines += [f"| {n} | {cell(r['own'])} | {cell(r['attribute'])} | {cell(r['base kept'])} |" for n, r in loras.items()]
    lines += ["", f'### Fusion: "{PROMPT}", 9 pairs x {seeds} seeds per method', ""]
    lines += ["| method | shows subject | shows style | shows both |", "|---|---|---|---|"]
    lines += [f"| {m} | {cell(r['subject'])} | {cell(r['style'])} | **{cell(r['both'])}** |" for m, r in table.items()]
    methods = list(table)
    lines += ["", '### "Shows both" per pair (95% CI)', "", "| pair | " + " | ".join(methods) + " |"]
    lines += ["|---|" + "---|" * len(methods)]
    lines += [f"| {pair} | " + " | ".join(cell(row[m]) for m in methods) + " |" for pair, row in per_pair.items()]
    lines += ["", "Measured betas (est): " + ", ".join(f"{p} {b:.3f}" for p, b in betas.items()), ""]
    cells = len(ORACLE_BETAS) * len(ORACLE_ALPHAS)
    lines += [f"### Oracle sweep: est over beta {ORACLE_BETAS} x alpha {ORACLE_ALPHAS} ({cells} cells)", ""]
    lines += ["| pair | measured beta | both at it (default alpha, nearest beta) | its rank | best cell | best both |"]
    lines += ["|---|---|---|---|---|---|"]
    lines += [
        f"| {pair} | {r['measured_beta']:.3f} | {r['at_measured']:.2f} | {r['rank_of_measured']}/{cells} "
        f"| {r['best']} | {r['best_both']:.2f} |"
        for pair, r in sweep.items()
    ]
    mean_best = np.mean([r["best_both"] for r in sweep.values()])
    mean_measured = np.mean([r["at_measured"] for r in sweep.values()])
    lines += ["", f"Mean over pairs: best cell {mean_best:.3f}, at the measured beta {mean_measured:.3f}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=32, help="seeds per prompt (fusion and LoRA tables)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed, first-seed + 1, ...")
    parser.add_argument("--oracle-seeds", type=int, default=8, help="seeds per cell of the oracle sweep (0: none)")
    parser.add_argument("--steps", type=int, default=SAMPLE_STEPS)
    parser.add_argument("--guidance", type=float, default=GUIDANCE)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "quality-toy")
    parser.add_argument("--ship", action="store_true", help=f"also write the per-pair shares to {BENCHMARK.name} "
                        "in the toy assets (the demo says from it how typical its pair is)")  # fmt: skip
    args = parser.parse_args()
    diffusers_logging.set_verbosity_error()  # "no LoRA keys for the text encoders": the toy LoRAs have none
    start = time.perf_counter()
    pipe = load_pipeline(toy_model_path(), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    scorer = load_scorer()
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    base = base_table(pipe, scorer, seeds[:4], args.steps, args.guidance)
    print(f"base done ({time.perf_counter() - start:.0f} s)", flush=True)
    loras = lora_table(pipe, scorer, seeds, args.steps, args.guidance)
    print(f"LoRAs done ({time.perf_counter() - start:.0f} s)", flush=True)
    table, per_pair, betas, grid = fusion_table(pipe, scorer, seeds, args.steps, args.guidance, DEMO_PAIR)
    print(f"fusion done ({time.perf_counter() - start:.0f} s)", flush=True)
    oracle = seeds[: args.oracle_seeds]
    sweep = oracle_sweep(pipe, scorer, oracle, args.steps, args.guidance, betas) if oracle else {}
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(base, loras, table, per_pair, betas, sweep, args.seeds)
    (args.out / "table.md").write_text(text)
    results = {"settings": {k: str(v) for k, v in vars(args).items()}, "base": base, "loras": loras}
    results.update(fusion=table, both_per_pair=per_pair, betas=betas, oracle=sweep)
    results["seconds"] = round(time.perf_counter() - start, 1)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.ship:
        shipped = {pair: {m: r["mean"] for m, r in row.items()} for pair, row in per_pair.items()}
        record = {"command": "benchmarks/quality_toy.py", "seeds": args.seeds, "first_seed": args.first_seed}
        BENCHMARK.write_text(json.dumps({**record, "both_per_pair": shipped}, indent=1) + "\n")
    save_grid(grid, args.out / f"{DEMO_PAIR[0]}-x-{DEMO_PAIR[1]}.png")
    plot(table, args.out / "fusion.png")
    print(text)
    print(f"{results['seconds']} s; written to {args.out}")


if __name__ == "__main__":
    main()
