"""`estlora demo`: the whole product on the shipped toy SDXL and its LoRAs, offline, in under a minute.

The toy model was trained from scratch on a world of coloured shapes (estlora.toy.world), so the
result can be seen: the subject LoRA's new shape, drawn with the style LoRA's texture. Writes the
fused images, the subject-only and style-only references (the very renders beta is measured from),
an enlarged overview sheet, the plan heatmap and a one-page summary into one folder.
"""

from __future__ import annotations

from pathlib import Path

from ..config import FusionConfig, ModelConfig, SamplingConfig
from ..errors import SettingError
from ..images import overview
from ..outputs import write_text
from ..session import Request, Session
from ..toy.model import GUIDANCE, SAMPLE_STEPS
from ..toy.world import STYLES, SUBJECTS
from .plan_view import heatmap, summary

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
        prepared = session.configure(request, use_cache=False)
        probe = prepared.probe
        files, sheet = [], []
        for method in ("subject", "style"):
            image = probe.images[method]
            files.append(session.save(prepared, image, out / f"{method}-only-seed0.png", 0, method=method))
            sheet.append(image)
        for k in range(num_images):
            image = session.render(prepared, k, f"fused image {k + 1}/{num_images}")
            files.append(session.save(prepared, image, out / f"fused-est-seed{k}.png", k))
            sheet.append(image)
        overview(sheet, out / "overview.png")
        plan = prepared.plan
        heatmap(plan, session.family, out / "plan.png")
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
    print(f"beta {probe.beta:.4g}; look at {out / 'overview.png'}")
    return out
