"""`estlora demo`: the whole product on the built-in tiny SDXL and example LoRAs, offline, in a minute.

Writes the fused images, the subject-only and style-only references (the very renders beta is
measured from), the plan heatmap and a one-page summary into one folder.
"""

from __future__ import annotations

from pathlib import Path

from .examples import example_lora_path
from .fusion import fuse
from .generate import Request, measure_beta, metadata, render, save_image
from .outputs import write_text
from .pipelines import load_pipeline
from .plan_view import heatmap, summary
from .tiny_encoders import builtin_tiny_dino
from .tiny_model import builtin_tiny_sdxl

PROMPT = "a photo of sks dog in szn style"


def run_demo(out: str | Path = "estlora-demo", steps: int = 20, num_images: int = 2, device: str = "auto") -> Path:
    out = Path(out)
    request = Request(
        subject=str(example_lora_path("example:subject")),
        style=str(example_lora_path("example:style")),
        prompt=PROMPT,
        base=str(builtin_tiny_sdxl()),
        steps=steps,
        num_images=num_images,
        dino_model=str(builtin_tiny_dino()),
        device=device,
        out=str(out),
    )
    pipe = load_pipeline(request.base, request.device)
    with fuse(pipe, request.subject, request.style, method="est") as fusion:
        print("measuring beta: subject-only and style-only renders, DINO similarity ...")
        probe = measure_beta(fusion, request, use_cache=False)
        files = []
        for method in ("subject", "style"):
            with fusion.using(method=method):
                files.append(
                    save_image(probe.images[method], out / f"{method}-only-seed0.png", metadata(request, fusion, 0))
                )
        for k in range(num_images):
            image = render(fusion, request, k, f"fused image {k + 1}/{num_images}")
            files.append(save_image(image, out / f"fused-est-seed{k}.png", metadata(request, fusion, k)))
        plan = fusion.plan_for(steps)
        heatmap(plan, out / "plan.png")
        page = "\n".join(
            [
                "# estlora demo",
                "",
                f"Prompt: `{PROMPT}`; base: the built-in tiny SDXL (random weights: it draws noise, the point is",
                "the machinery); subject and style: the built-in example LoRAs.",
                "",
                f"beta = {probe.beta:.4g}, measured as 1 - DINO cosine between the subject-only and style-only",
                "renders below (seed 0, same settings).",
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
    print(f"demo written to {out.resolve()}: {len(files)} images, plan.png, summary.md (beta {probe.beta:.4g})")
    return out
