"""`estlora demo`: the whole product on the shipped toy SDXL and its LoRAs, offline, in under a minute.

The toy model was trained from scratch on a world of coloured shapes (estlora.toy_world), so the
result can be seen: the subject LoRA's new shape, drawn with the style LoRA's texture. Writes the
fused images, the subject-only and style-only references (the very renders beta is measured from),
an enlarged overview sheet, the plan heatmap and a one-page summary into one folder.
"""

from __future__ import annotations

from pathlib import Path

from .fusion import fuse
from .generate import Request, measure_beta, metadata, render, save_image
from .outputs import atomic_path, write_text
from .pipelines import load_pipeline
from .plan_view import heatmap, summary
from .toy_model import GUIDANCE, SAMPLE_STEPS, toy_lora_path
from .toy_world import STYLES, SUBJECTS

PROMPT = "a sks shape in szn style"


def run_demo(
    out: str | Path = "estlora-demo",
    steps: int = SAMPLE_STEPS,
    num_images: int = 4,
    device: str = "auto",
    subject: str = "heart",
    style: str = "outline",
) -> Path:
    out = Path(out)
    if subject not in SUBJECTS or style not in STYLES:
        raise ValueError(f"the demo's subjects are {', '.join(SUBJECTS)} and its styles {', '.join(STYLES)}")
    request = Request(
        subject=str(toy_lora_path(subject)),
        style=str(toy_lora_path(style)),
        prompt=PROMPT,
        base="toy",
        steps=steps,
        guidance=GUIDANCE,
        num_images=num_images,
        dino_model="toy",
        device=device,
        out=str(out),
    )
    pipe = load_pipeline(request.base, request.device)
    with fuse(pipe, request.subject, request.style, method="est") as fusion:
        print("measuring beta: subject-only and style-only renders, style discrepancy ...")
        probe = measure_beta(fusion, request, use_cache=False)
        files, sheet = [], []
        for method in ("subject", "style"):
            with fusion.using(method=method):
                image = probe.images[method]
                files.append(save_image(image, out / f"{method}-only-seed0.png", metadata(request, fusion, 0)))
                sheet.append(image)
        for k in range(num_images):
            image = render(fusion, request, k, f"fused image {k + 1}/{num_images}")
            files.append(save_image(image, out / f"fused-est-seed{k}.png", metadata(request, fusion, k)))
            sheet.append(image)
        overview(sheet, out / "overview.png")
        plan = fusion.plan_for(steps)
        heatmap(plan, out / "plan.png")
        page = "\n".join(
            [
                "# estlora demo",
                "",
                f"Prompt: `{PROMPT}`. Base: the shipped toy SDXL, trained from scratch on 32 x 32 coloured shapes.",
                f'Subject LoRA: `toy:{subject}` ("a sks shape" is a {subject}); style LoRA: `toy:{style}`',
                f'("in szn style" is the {style} texture). Neither LoRA saw the other\'s concept.',
                "",
                "[overview.png](overview.png): subject only, style only, then the fused images, enlarged 4x.",
                "",
                f"beta = {probe.beta:.4g}, measured as 1 - cosine between the subject-only and style-only",
                "renders (seed 0, same settings) in the toy scorer's feature space, the toy world's DINO.",
                "",
                "| image | file |",
                "| --- | --- |",
                *(f"| {p.stem} | [{p.name}]({p.name}) |" for p in files),
                "| plan heatmap (orange subject, blue style) | [plan.png](plan.png) |",
                "",
                "## The plan",
                "",
                "```",
                summary(plan),
                "```",
                "",
                "Regenerate any image with the `command` in its JSON sidecar (or its PNG `estlora` text chunk).",
                "",
            ]
        )
        write_text(out / "summary.md", page)
    print(f"demo written to {out.resolve()}: {len(files)} images, overview.png, plan.png, summary.md")
    print(f"beta {probe.beta:.4g}; look at {out / 'overview.png'}")
    return out


def overview(images: list, path: Path, zoom: int = 4) -> None:
    """One enlarged row: toy images are 32 x 32, too small to judge at their own size."""
    from PIL import Image

    w, h = images[0].size
    sheet = Image.new("RGB", (len(images) * (w * zoom + 8) - 8, h * zoom), "white")
    for i, image in enumerate(images):
        sheet.paste(image.resize((w * zoom, h * zoom), Image.NEAREST), (i * (w * zoom + 8), 0))
    with atomic_path(path) as staging:
        sheet.save(staging, format="PNG")
