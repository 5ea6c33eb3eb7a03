"""`estlora demo`: the whole product on the shipped toy SDXL and its LoRAs, offline, in about a minute.

The toy model was trained from scratch on a world of coloured shapes (estlora.toy.world), so the
result can be seen: the subject LoRA's new shape, drawn with the style LoRA's texture. On the same
seeds it renders the subject LoRA alone, the style LoRA alone, EST-LoRA and the two baselines that
fuse best on the toy benchmark, and writes them with an enlarged, labelled overview sheet (one row
per method, with what the toy scorer sees in it), the plan heatmap and a one-page summary.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import FusionConfig, ModelConfig, SamplingConfig
from ..errors import SettingError
from ..images import labelled_sheet
from ..outputs import write_text
from ..session import Request, Session
from ..toy.model import DEMO_PAIR, GUIDANCE, PROMPT, SAMPLE_STEPS
from ..toy.world import STYLES, SUBJECTS
from .plan_view import heatmap, summary

# The baselines shown beside est: the two other fusion methods that show both most often on the toy benchmark
# (benchmarks/RESULTS.md; a test keeps this in step with the shipped benchmark.json).
BASELINES = ("switch", "composite")
FILE_STEMS = {"subject": "subject-only", "style": "style-only"}  # the fused methods: fused-<method>


def scorer_line(method: str, images: list, subject: str, style: str) -> str:
    """What the toy scorer sees in a method's images: how many show the subject's shape, the style's
    texture, and both."""
    from ..toy.scorer import load_scorer, predict

    labels = predict(load_scorer(), images)
    shape = sum(label.shape == subject for label in labels)
    texture = sum(label.texture == style for label in labels)
    both = sum(label.shape == subject and label.texture == style for label in labels)
    n = len(labels)
    return f"{method}: {subject} {shape}/{n}, {style} {texture}/{n}, both {both}/{n}"


def typicality(subject: str, style: str) -> str:
    """How this pair fared against the others on the toy benchmark, for each method the demo shows."""
    from ..toy.model import benchmark_both

    both, pair = benchmark_both(), f"{subject} x {style}"
    parts = []
    for method in ("est", *BASELINES):
        rank = 1 + sorted(both, key=lambda p: -both[p][method]).index(pair)
        mean = sum(row[method] for row in both.values()) / len(both)
        parts.append(f"{method} {both[pair][method]:.2f} (rank {rank} of {len(both)} pairs; mean {mean:.2f})")
    return f"On the toy benchmark, the share of images showing both for this pair: {', '.join(parts)}."


def run_demo(
    out: str | Path = "estlora-demo",
    steps: int = SAMPLE_STEPS,
    num_images: int = 4,
    device: str = "auto",
    subject: str | None = None,
    style: str | None = None,
) -> Path:
    out, subject, style = Path(out), subject or DEMO_PAIR[0], style or DEMO_PAIR[1]
    if subject not in SUBJECTS or style not in STYLES:
        raise SettingError(None, f"the demo's subjects are {', '.join(SUBJECTS)} and its styles {', '.join(STYLES)}")
    request = Request(
        subject=f"toy:{subject}",
        style=f"toy:{style}",
        prompt=PROMPT,
        fusion=FusionConfig(method="est"),
        sampling=SamplingConfig(steps=steps, guidance=GUIDANCE, num_images=num_images, dino_model="toy"),
    )
    session = Session.open(ModelConfig(base="toy", device=device), check=request)
    try:
        print("measuring beta: subject-only and style-only renders, style discrepancy ...")
        est = session.configure(request, use_cache=False)
        probe, plan = est.probe, est.plan
        heatmap(plan, session.family, out / "plan.png")
        files, rendered = [], {}
        for method in ("est", "subject", "style", *BASELINES):  # est first: its prepared run is the probed one
            prepared = est
            if method != "est":
                prepared = session.configure(dataclasses.replace(request, fusion=FusionConfig(method=method)))
            rendered[method] = []
            for k in range(num_images):
                image = session.render(prepared, k, f"{method} {k + 1}/{num_images}")
                stem = FILE_STEMS.get(method, f"fused-{method}")
                files.append(session.save(prepared, image, out / f"{stem}-seed{k}.png", k))
                rendered[method].append(image)
        order = ("subject", "style", "est", *BASELINES)
        lines = [scorer_line(method, rendered[method], subject, style) for method in order]
        rows = [(line, rendered[method]) for line, method in zip(lines, order, strict=True)]
        labelled_sheet(rows, out / "overview.png")
        page = "\n".join(
            [
                "# estlora demo",
                "",
                f"Prompt: `{PROMPT}`. Base: the shipped toy SDXL, trained from scratch on 32 x 32 coloured shapes.",
                f'Subject LoRA: `toy:{subject}` ("a sks shape" is a {subject}); style LoRA: `toy:{style}`',
                f'("in szn style" is the {style} texture). Neither LoRA saw the other\'s concept.',
                "",
                "[overview.png](overview.png): one row per method on the same seeds, enlarged; each row says what",
                "the toy scorer sees in it:",
                "",
                *(f"- {line}" for line in lines),
                "",
                f"beta = {probe.beta:.4g}, measured as 1 - cosine between the subject-only and style-only",
                "renders (seed 0, same settings) in the toy scorer's feature space, the toy world's DINO; the",
                f"baselines ({', '.join(BASELINES)}) are the two other methods that show both most often on the",
                "toy benchmark.",
                typicality(subject, style),
                'The benchmark\'s tables: benchmarks/RESULTS.md, "Fusion quality on the toy world".',
                "",
                "| image | file |",
                "| --- | --- |",
                *(f"| {p.stem} | [{p.name}]({p.name}) |" for p in files),
                "| plan heatmap (orange subject, blue style) | [plan.png](plan.png) |",
                "",
                "## The plan",
                "",
                "```",
                summary(plan, session.family),
                "```",
                "",
                "Regenerate any image with the `command` in its JSON sidecar (or its PNG `estlora` text chunk).",
                "",
            ]
        )
        write_text(out / "summary.md", page)
    finally:
        session.close()
    print(f"demo written to {out.resolve()}: {len(files)} images, overview.png, plan.png, summary.md")
    for line in lines:
        print(f"  {line}")
    print(f"beta {probe.beta:.4g}; look at {out / 'overview.png'}")
    return out
