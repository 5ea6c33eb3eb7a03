"""`estlora ui`: a local web page (Gradio) to fuse a subject and a style LoRA, compare methods and see the plan.

The pipeline is loaded once per app, each LoRA file once (by path and content hash), and one `Fusion` is kept
per (subject, style) pair: a new method or option re-plans it with `Fusion.set`, never reloads. Everything
that touches the pipeline shares one queue slot, so a second request waits in line instead of being lost
or racing the first. Every image is saved with `save_image` (PNG text chunk + JSON sidecar), and the page
serves those very files, so the settings travel with each download.
"""

from __future__ import annotations

import html
import os
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .demo import PROMPT
from .discrepancy import DEFAULT_DINO
from .errors import EstloraError, LoraError
from .fusion import Fusion, fuse, unet_projection_shapes
from .generate import Request, metadata, render, save_image
from .lora import Lora, check_pair, file_sha256, load_lora
from .pipelines import SCHEDULERS, TIMESTEP_SPACINGS
from .plan import GAMMA_RULES, METHODS, OTHER_WEIGHTS, PATTERNS
from .plan_view import heatmap, summary
from .toy_model import GUIDANCE, SAMPLE_STEPS, toy_lora_path
from .toy_world import STYLES, SUBJECTS

if TYPE_CHECKING:
    import gradio as gr

UPLOAD = "upload"
# The toy LoRAs, defaults first: outline is the style that fuses best on the toy model (benchmarks/RESULTS.md).
BUILTIN = {
    "subject": tuple(f"toy:{s}" for s in SUBJECTS),
    "style": tuple(f"toy:{s}" for s in sorted(STYLES, key=lambda s: s != "outline")),
}
OTHER_PROMPT = "a photo of sks dog in szn style"
MAX_UPLOAD_ENV = "ESTLORA_UI_MAX_UPLOAD_MB"  # uploads above this many MiB are refused (default 1024)
OUT_ENV = "ESTLORA_UI_OUT"  # where images are saved (default ./estlora-ui-outputs)
KEPT_LORAS = 4  # loaded LoRAs kept in memory; SDXL ones weigh hundreds of MB each
BETA_NOTES = {
    "measured": "measured: 1 - DINO cosine of the subject-only and style-only renders",
    "given": "given",
    "default": "K-LoRA's default, not measured",
}


def _gradio():
    """Gradio is an optional dependency: import it only when the UI is asked for."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError:
        raise EstloraError(None, "the UI needs gradio: pip install 'estlora[ui]'") from None
    return gradio


def max_upload_bytes() -> int:
    return int(float(os.environ.get(MAX_UPLOAD_ENV, "1024")) * 2**20)


def output_dir() -> Path:
    return Path(os.environ.get(OUT_ENV, "estlora-ui-outputs")).resolve()


class StepProgress:
    """The page's progress bar, advanced by the pipeline's `callback_on_step_end` at every denoising step."""

    def __init__(self, progress):
        self.progress = progress
        self.start("", 1)

    def start(self, desc: str, total: int) -> None:
        self.desc, self.total, self.done = desc, total, 0
        self.progress((0, total), desc=desc, unit="steps")

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        self.done += 1
        self.progress((self.done, self.total), desc=self.desc, unit="steps")
        return callback_kwargs


class Studio:
    """What the page works on: one pipeline, the LoRAs loaded so far and the fusion of the current pair."""

    def __init__(self, base: str | None, out: Path, base_config: str | None = None, vae: str | None = None):
        from .pipelines import load_pipeline

        self.toy = base in (None, "toy")  # the shipped toy SDXL and its LoRAs: works offline, out of the box
        self.base, self.out = "toy" if self.toy else str(base), out
        self.dino = "toy" if self.toy else DEFAULT_DINO
        self.base_name = "the toy SDXL" if self.toy else self.base
        self.base_config, self.vae = base_config, vae
        self.pipe = load_pipeline(self.base, config=base_config, vae=vae)
        self.pipe.set_progress_bar_config(disable=True)  # progress goes to the page, not the server's console
        self.shapes = unet_projection_shapes(self.pipe.unet)
        self.default_size = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        self.max_upload = max_upload_bytes()
        self.loras: dict[tuple[str, str], Lora] = {}  # by (path, sha256)
        self.fusion: Fusion | None = None

    # ------------------------------------------------------------ LoRAs

    def lora(self, role: str, choice: str, upload: str | None) -> Lora:
        """The chosen LoRA, loaded once per file and checked against the loaded UNet."""
        if choice == UPLOAD:
            if not upload:
                raise user_error(f"{role} LoRA: choose a .safetensors file to upload")
            path = Path(upload)
            if path.suffix.lower() != ".safetensors":
                raise user_error(f"{role} LoRA {path.name}: only .safetensors files are accepted")
            if path.stat().st_size > self.max_upload:
                limit = f"{self.max_upload / 2**20:g} MiB"
                raise user_error(f"{role} LoRA {path.name}: larger than the upload limit ({limit})")
        elif choice in BUILTIN[role]:
            path = toy_lora_path(choice)
        else:
            raise user_error(f"{role} LoRA: unknown choice {choice!r}")
        key = (str(path), file_sha256(path))  # an upload reusing a name with new bytes is a new LoRA
        if key not in self.loras:
            try:
                lora = load_lora(path, self.shapes, self.base_name)
            except LoraError as exc:
                raise user_error(lora_message(role, exc)) from None
            if len(self.loras) >= KEPT_LORAS:
                self.loras.pop(next(iter(self.loras)))
            self.loras[key] = lora
        return self.loras[key]

    def pair(self, settings: dict) -> tuple[Lora, Lora]:
        subject = self.lora("subject", settings["subject_choice"], settings["subject_file"])
        style = self.lora("style", settings["style_choice"], settings["style_file"])
        try:
            check_pair(subject, style)
        except LoraError as exc:
            raise user_error(lora_message("style", exc)) from None
        return subject, style

    def describe(self, settings: dict) -> str:
        """What the "Load LoRAs" button shows: both LoRAs, and that they fit the base and each other."""
        subject, style = self.pair(settings)
        lines = [f"Both LoRAs fit {self.base_name} and each other."]
        for role, lora, choice in (
            ("subject", subject, settings["subject_choice"]),
            ("style", style, settings["style_choice"]),
        ):
            ranks = ", ".join(str(r) for r in sorted(lora.ranks))
            name = lora.path.name if choice == UPLOAD else choice
            other = f", {len(lora.other)} tensors outside them" if lora.other else ""
            training = lora.training()
            words = training.get("trigger") or training.get("top_tags")
            trigger = f"; trigger words: {words}" if words else ""
            lines.append(
                f"- **{role}**: `{name}` ({lora.layout}, {len(lora.projections)} attention projections{other}, "
                f"rank {ranks}, sha256 {lora.sha256[:12]}){trigger}"
            )
        if subject.other or style.other:
            lines.append(
                "\nWeights outside the attention projections (feed-forward, conv, text encoders) are ignored, "
                "as the reference does, unless *other weights* is set to merge (Fusion options)."
            )
        return "\n".join(lines)

    def fusion_for(self, subject: Lora, style: Lora) -> Fusion:
        """The pair's fusion, created once; another pair takes its place in the pipeline (one at a time)."""
        if self.fusion is not None and self.fusion.subject is subject and self.fusion.style is style:
            return self.fusion
        if self.fusion is not None:
            self.fusion.remove()
            self.fusion = None
        self.fusion = fuse(self.pipe, subject, style)
        return self.fusion

    # ------------------------------------------------------------ rendering

    def request(self, settings: dict, subject: Lora, style: Lora) -> Request:
        def source(choice: str, lora: Lora) -> str:
            return str(lora.path) if choice == UPLOAD else choice

        manual = settings["beta_mode"] == "manual"
        for name in ("alpha", "switch_every", "seed", *(("beta",) if manual else ())):
            if settings[name] is None:  # a cleared number field
                raise user_error(f"{name.replace('_', ' ')} is empty")
        return Request(
            subject=source(settings["subject_choice"], subject),
            style=source(settings["style_choice"], style),
            prompt=settings["prompt"],
            base=self.base,
            base_config=self.base_config,
            vae=self.vae,
            negative_prompt=settings["negative_prompt"] or None,
            method=settings["method"],
            steps=int(settings["steps"]),
            scheduler=settings["scheduler"],
            timestep_spacing=None if settings["timestep_spacing"] == "default" else settings["timestep_spacing"],
            guidance=float(settings["guidance"]),
            guidance_rescale=float(settings["guidance_rescale"]),
            width=int(settings["width"]),
            height=int(settings["height"]),
            seed=int(settings["seed"]),
            num_images=int(settings["num_images"]),
            beta=float(settings["beta"]) if manual else None,
            dino_model=self.dino,
            alpha=float(settings["alpha"]),
            pattern=settings["pattern"],
            gamma_rule=settings["gamma_rule"],
            subject_scale=float(settings["subject_scale"]),
            style_scale=float(settings["style_scale"]),
            switch_every=int(settings["switch_every"]),
            other_weights=settings["other_weights"],
        )

    def configure(self, fusion: Fusion, request: Request, steps: StepProgress) -> str:
        """Re-plan the fusion for this request (measuring beta for est on auto); returns how beta was set."""
        fusion.set(method=request.method, beta=request.beta, **request.config_options())
        note = ""
        if request.method == "est" and request.beta is None:
            probe_steps = request.beta_probe_steps or request.steps
            steps.start("measuring beta: subject-only and style-only renders", 2 * probe_steps)
            probe = fusion.measure_beta(
                request.prompt,
                seed=0,
                dino_model=request.dino_model,
                callback_on_step_end=steps,
                **request.pipe_kwargs(probe_steps),
            )
            note = ", cached" if probe.cached else ""
        plan = fusion.plan_for(request.steps)
        if not fusion.config.gated:
            return "beta not used"
        return f"beta = {plan.beta:.4g} ({BETA_NOTES[plan.beta_source]}{note})"

    def run(self, settings: dict, methods: list[str], num_images: int, progress) -> tuple:
        """Render `num_images` seeds with every method into a new run folder; what the result panel shows."""
        if not settings["prompt"].strip():
            raise user_error("write a prompt")
        if not methods:
            raise user_error("tick at least one method to compare")
        subject, style = self.pair(settings)
        try:
            base_request = self.request(settings, subject, style)
        except ValueError as exc:  # a setting out of range (Request checks them)
            raise user_error(str(exc)) from None
        try:
            fusion = self.fusion_for(subject, style)
        except LoraError as exc:
            raise user_error(lora_message("style", exc)) from None
        seeds = [base_request.seed + k for k in range(num_images)]
        run_dir = self.out / datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        steps = StepProgress(progress)
        images, heatmaps, files, notes, summaries = [], [], [], [], []
        for method in methods:
            request = replace(base_request, method=method, out=str(run_dir))
            try:
                beta = self.configure(fusion, request, steps)
            except (EstloraError, ValueError) as exc:
                raise user_error(str(exc)) from None
            steps.start(f"{method}: rendering {len(seeds)} image(s)", request.steps * len(seeds))
            for seed in seeds:
                image = render(fusion, request, seed, callback_on_step_end=steps)
                path = save_image(image, run_dir / f"{method}-seed{seed}.png", metadata(request, fusion, seed))
                images.append((str(path), f"{method} · seed {seed}"))
                files += [str(path), str(path.with_suffix(".json"))]
            plan = fusion.plan_for(request.steps)
            plan_png = run_dir / f"plan-{method}.png"
            heatmap(plan, plan_png)
            heatmaps.append((str(plan_png), f"plan: {method}"))
            files.append(str(plan_png))
            notes.append(f"- **{method}**: {beta}")
            summaries.append(summary(plan))
        notes.append(
            f"\nSaved to `{run_dir}`: each PNG carries its settings (text chunk `estlora`, and a JSON sidecar)."
        )
        return images, "\n".join(notes), heatmaps, "\n\n".join(summaries), files


def lora_message(role: str, exc: LoraError) -> str:
    """One line naming the file as the user knows it (an upload's name, not the server's temp path)."""
    name = Path(exc.path).name if exc.path else ""
    return f"{role} LoRA {name}: {exc.problem}" if name else f"{role} LoRA: {exc.problem}"


def user_error(message: str):
    """A one-line message in the page (escaped: it may quote a file name), without a server traceback."""
    return _gradio().Error(html.escape(message), print_exception=False)


def build_app(base: str | None = None, base_config: str | None = None, vae: str | None = None) -> gr.Blocks:
    """The page: LoRAs and settings on the left, images, beta and plan on the right."""
    gr = _gradio()
    studio = Studio(base, output_dir(), base_config, vae)
    toy = studio.toy  # the toy LoRAs fit the toy model only
    fields = {}
    with gr.Blocks(title="estlora") as app:
        gr.Markdown(
            "# estlora: a subject LoRA in a style LoRA (EST-LoRA)\n"
            f"Base: `{studio.base_name}`"
            + (
                ", trained on 32 x 32 coloured shapes: `sks` is the subject LoRA's shape, `szn` the style LoRA's"
                " texture. For SDXL itself: `estlora ui --base stabilityai/stable-diffusion-xl-base-1.0`."
                if toy
                else "."
            )
        )
        with gr.Row():
            with gr.Column(scale=2):
                with gr.Row():
                    for role in ("subject", "style"):
                        with gr.Column(min_width=200):
                            fields[f"{role}_choice"] = gr.Dropdown(
                                [*BUILTIN[role], UPLOAD] if toy else [UPLOAD],
                                value=BUILTIN[role][0] if toy else UPLOAD,
                                label=f"{role.capitalize()} LoRA",
                                elem_id=f"{role}-choice",
                            )
                            fields[f"{role}_file"] = gr.File(
                                label=f"or upload a {role} LoRA (.safetensors)",
                                file_types=[".safetensors"],
                                height=150,
                                elem_id=f"{role}-file",
                            )
                load = gr.Button("Load LoRAs", elem_id="load")
                lora_info = gr.Markdown(elem_id="lora-info")
                prompt = PROMPT if toy else OTHER_PROMPT
                fields["prompt"] = gr.Textbox(prompt, label="Prompt", lines=2, elem_id="prompt")
                fields["negative_prompt"] = gr.Textbox(label="Negative prompt", elem_id="negative-prompt")
                fields["method"] = gr.Radio(list(METHODS), value="est", label="Method", elem_id="method")
                with gr.Row():
                    fields["beta_mode"] = gr.Radio(
                        ["auto", "manual"],
                        value="auto",
                        label="beta",
                        info="auto: measured for est, K-LoRA's 0.5 for klora",
                        elem_id="beta-mode",
                    )
                    fields["beta"] = gr.Number(0.5, label="manual beta", elem_id="beta")
                with gr.Accordion("Fusion options", open=False):
                    with gr.Row():
                        fields["alpha"] = gr.Number(1.5, label="alpha (time-scale slope)")
                        fields["pattern"] = gr.Radio(list(PATTERNS), value="s", label="pattern")
                        fields["gamma_rule"] = gr.Radio(list(GAMMA_RULES), value="reference", label="gamma rule")
                    with gr.Row():
                        fields["subject_scale"] = gr.Slider(0, 2, 1.0, step=0.05, label="subject strength")
                        fields["style_scale"] = gr.Slider(0, 2, 1.0, step=0.05, label="style strength")
                        fields["switch_every"] = gr.Number(5, precision=0, minimum=1, label="switch every (steps)")
                    fields["other_weights"] = gr.Radio(
                        list(OTHER_WEIGHTS),
                        value="ignore",
                        label="other weights",
                        info="LoRA weights outside the attention projections: ignore (reference) or merge statically",
                    )
                with gr.Accordion("Sampling", open=True):
                    with gr.Row():
                        steps = SAMPLE_STEPS if toy else 30
                        fields["steps"] = gr.Slider(1, 100, steps, step=1, label="steps", elem_id="steps")
                        fields["guidance"] = gr.Slider(1, 15, GUIDANCE if toy else 5.0, step=0.5, label="guidance")
                        fields["guidance_rescale"] = gr.Slider(0, 1, 0, step=0.05, label="guidance rescale")
                    with gr.Row():
                        fields["scheduler"] = gr.Dropdown(list(SCHEDULERS), value="default", label="scheduler")
                        spacings = ["default", *TIMESTEP_SPACINGS]
                        fields["timestep_spacing"] = gr.Dropdown(spacings, value="default", label="timestep spacing")
                    with gr.Row():
                        size = studio.default_size
                        fields["width"] = gr.Slider(32, 2048, size, step=8, label="width", elem_id="width")
                        fields["height"] = gr.Slider(32, 2048, size, step=8, label="height", elem_id="height")
                    with gr.Row():
                        fields["seed"] = gr.Number(0, precision=0, label="seed (image k: seed + k)", elem_id="seed")
                        fields["num_images"] = gr.Slider(1, 8, 1, step=1, label="images", elem_id="num-images")
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Row():
                    compare_methods = gr.CheckboxGroup(
                        list(METHODS),
                        value=["est", "klora"],
                        label="Compare: the same seed with these methods",
                        elem_id="compare-methods",
                    )
                    compare = gr.Button("Compare", elem_id="compare")
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Images", columns=4, object_fit="contain", height=360, elem_id="gallery")
                result = gr.Markdown(elem_id="result")
                heatmaps = gr.Gallery(
                    label="Plan: projections (rows) x denoising steps; orange subject, blue style, purple both",
                    columns=2,
                    fit_columns=False,  # a lone heatmap stays whole instead of being cropped to the width
                    object_fit="contain",
                    height=420,
                    elem_id="heatmaps",
                )
                plan_summary = gr.Code(label="Plan summary", language=None, interactive=False, elem_id="plan-summary")
                downloads = gr.File(
                    label="Files (PNG with settings, JSON sidecars, heatmaps)", file_count="multiple", elem_id="files"
                )

        names = {component: name for name, component in fields.items()}
        inputs = set(fields.values())  # handlers get {component: value}
        outputs = [gallery, result, heatmaps, plan_summary, downloads]

        def named(values: dict) -> dict:
            return {names[component]: value for component, value in values.items() if component in names}

        def on_generate(values: dict, progress=gr.Progress()):  # noqa: B008 (Gradio injects it by default)
            settings = named(values)
            return studio.run(settings, [settings["method"]], int(settings["num_images"]), progress)

        def on_compare(values: dict, progress=gr.Progress()):  # noqa: B008
            return studio.run(named(values), values[compare_methods], 1, progress)

        def on_load(values: dict) -> str:
            return studio.describe(named(values))

        # One queue slot for everything that uses the studio: a second request waits for the first.
        serial = {"concurrency_id": "studio", "concurrency_limit": 1}
        generate.click(on_generate, inputs, outputs, show_progress_on=gallery, **serial)
        compare.click(on_compare, inputs | {compare_methods}, outputs, show_progress_on=gallery, **serial)
        load.click(on_load, inputs, lora_info, **serial)
        for role in ("subject", "style"):
            choice, upload = fields[f"{role}_choice"], fields[f"{role}_file"]
            default = choice.value
            upload.upload(lambda: UPLOAD, None, choice).then(on_load, inputs, lora_info, **serial)
            upload.clear(lambda default=default: default, None, choice)
    app.queue(default_concurrency_limit=1)
    return app


def launch(
    base: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    block: bool = True,
    base_config: str | None = None,
    vae: str | None = None,
):
    """Serve the page (this machine only unless `host` says otherwise); returns the app when not blocking."""
    app = build_app(base, base_config, vae)
    out = output_dir()
    out.mkdir(parents=True, exist_ok=True)
    app.launch(
        server_name=host,
        server_port=port,
        max_file_size=max_upload_bytes(),
        allowed_paths=[str(out)],
        show_error=True,
        prevent_thread_lock=not block,
        quiet=not block,
    )
    return app
