"""Is the toy scorer right on what the toy model draws? Images labelled by eye, blind, against its calls.

    .venv/bin/python benchmarks/scorer_agreement.py draw --out labelling/   # sheet.png + key.json
    (look at sheet.png, write labels.json: {"labels": [[shape, texture], ...]} in sheet order,
     "unclear" where a person cannot tell)
    .venv/bin/python benchmarks/scorer_agreement.py score labelling/        # agreement, per head and method

`draw` renders fused images from every method (and each LoRA alone) on random pairs and seeds,
shuffles them and writes a numbered sheet without saying which is which; the key (method, pair,
prompt, seed) stays in key.json, unread until the labels are written. `score` compares the labels
with the scorer's calls (images a person called unclear are counted apart) and writes the labelled
set as tests/data/toy_generated_labelled.{png,json} with `--keep`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import estlora
from estlora.loading.base import load_pipeline
from estlora.toy.model import GUIDANCE, SAMPLE_STEPS, toy_model_path
from estlora.toy.scorer import load_scorer, predict
from estlora.toy.world import SIZE, STYLES, SUBJECTS

METHODS = ("est", "klora", "merge", "switch", "composite", "subject", "style")
PROMPT = "a sks shape in szn style"
ZOOM, COLUMNS = 4, 8
DATA = Path(__file__).parents[1] / "tests" / "data"


def draw(out: Path, per_method: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pipe = load_pipeline(toy_model_path(), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    key, images = [], []
    for method in METHODS:
        for _ in range(per_method):
            subject, style = str(rng.choice(SUBJECTS)), str(rng.choice(STYLES))
            image_seed = int(rng.integers(1000, 10**6))
            with estlora.fuse(pipe, f"toy:{subject}", f"toy:{style}", method=method, beta=0.5):
                image = pipe(PROMPT, num_inference_steps=SAMPLE_STEPS, guidance_scale=GUIDANCE,
                             generator=torch.Generator().manual_seed(image_seed)).images[0]  # fmt: skip
            key.append({"method": method, "subject": subject, "style": style, "prompt": PROMPT, "seed": image_seed})
            images.append(np.asarray(image))
    order = rng.permutation(len(images))
    key, images = [key[i] for i in order], np.stack([images[i] for i in order])
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "images.npy", images)
    (out / "key.json").write_text(json.dumps(key, indent=1) + "\n")
    numbered_sheet(images).save(out / "sheet.png")
    print(f"{len(images)} images: look at {out / 'sheet.png'}, then write {out / 'labels.json'}")


def numbered_sheet(images: np.ndarray) -> Image.Image:
    cell = SIZE * ZOOM
    rows = -(-len(images) // COLUMNS)
    sheet = Image.new("RGB", (COLUMNS * (cell + 6), rows * (cell + 20)), "white")
    pen = ImageDraw.Draw(sheet)
    for k, array in enumerate(images):
        x, y = k % COLUMNS * (cell + 6), k // COLUMNS * (cell + 20)
        pen.text((x + 2, y + 2), str(k), fill="black")
        sheet.paste(Image.fromarray(array).resize((cell, cell), Image.NEAREST), (x, y + 16))
    return sheet


def score(folder: Path, keep: bool) -> None:
    images = np.load(folder / "images.npy")
    key = json.loads((folder / "key.json").read_text())
    labels = json.loads((folder / "labels.json").read_text())["labels"]
    calls = predict(load_scorer(), images)
    report = {"images": len(labels), "heads": {}}
    for h, head in enumerate(("shape", "texture")):
        clear = [(lab[h], getattr(c, head), k["method"]) for lab, c, k in zip(labels, calls, key, strict=True)
                 if lab[h] != "unclear"]  # fmt: skip
        agree = [a == b for a, b, _ in clear]
        fused = [a == b for a, b, m in clear if m not in ("subject", "style")]
        report["heads"][head] = {
            "clear": len(clear),
            "agreement": round(float(np.mean(agree)), 3),
            "agreement_fused": round(float(np.mean(fused)), 3) if fused else None,
            "per_method": {
                m: f"{sum(a == b for a, b, mm in clear if mm == m)}/{sum(mm == m for *_, mm in clear)}" for m in METHODS
            },  # fmt: skip
            "disagreements": [f"{a} called {b} ({m})" for a, b, m in clear if a != b],
        }
    print(json.dumps(report, indent=1))
    (folder / "agreement.json").write_text(json.dumps(report, indent=1) + "\n")
    if keep:
        sheet = Image.new("RGB", (COLUMNS * SIZE, -(-len(images) // COLUMNS) * SIZE), "white")
        for k, array in enumerate(images):
            sheet.paste(Image.fromarray(array), (k % COLUMNS * SIZE, k // COLUMNS * SIZE))
        sheet.save(DATA / "toy_generated_labelled.png")
        entries = [{"shape": lab[0], "texture": lab[1], **k} for lab, k in zip(labels, key, strict=True)]
        about = (
            f"Images the shipped toy model generated ({SAMPLE_STEPS} steps, guidance {GUIDANCE}), every fusion "
            "method and each LoRA alone, labelled by eye blind (shuffled, key unread), 'unclear' where a person "
            f"cannot tell. Row-major in the PNG, {COLUMNS} per row, {SIZE} x {SIZE} each."
        )
        (DATA / "toy_generated_labelled.json").write_text(json.dumps({"about": about, "images": entries}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    d = commands.add_parser("draw")
    d.add_argument("--out", type=Path, default=Path("labelling"))
    d.add_argument("--per-method", type=int, default=8)
    d.add_argument("--seed", type=int, default=2026)
    s = commands.add_parser("score")
    s.add_argument("folder", type=Path)
    s.add_argument("--keep", action="store_true", help="write the labelled set into tests/data")
    args = parser.parse_args()
    if args.command == "draw":
        draw(args.out, args.per_method, args.seed)
    else:
        score(args.folder, args.keep)


if __name__ == "__main__":
    main()
