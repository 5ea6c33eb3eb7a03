"""`estlora ui`: a local web page (Gradio) to fuse a subject and a style LoRA, compare methods and see the plan.

A shell over one `Session`, as the command line is: the base is loaded once per app, each LoRA file
once (by path and content hash), one fusion is kept for the current pair and re-planned for a new
method or option, and beta is measured under the very sampler and settings of the render. Every
widget is built from its setting's declaration (`estlora.config`). Everything that touches the
pipeline shares one queue slot, so a second request waits in line instead of being lost or racing
the first. Every image is saved with its settings (PNG text chunk + JSON sidecar), and the page
serves those very files, so the settings travel with each download.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import secrets
import shutil
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from .commands.plan_view import heatmap, summary
from .config import FusionConfig, ModelConfig, SamplingConfig, Setting, number, settings_of
from .errors import EstloraError, LoraError, SettingError
from .families import FAMILIES, ModelFamily
from .loading.inspect import training_info
from .loading.lora import check_pair
from .outputs import atomic_path
from .registry import BASES
from .session import Request, Session

if TYPE_CHECKING:
    import gradio as gr

UPLOAD = "upload"
DEFAULT = "default"  # the choice that leaves an optional setting to the base or the family
OTHER_PROMPT = "a photo of sks dog in szn style"
MAX_UPLOAD_ENV = "ESTLORA_UI_MAX_UPLOAD_MB"  # uploads above this many MiB are refused (default 1024)
OUT_ENV = "ESTLORA_UI_OUT"  # where images are saved (default ./estlora-ui-outputs)
BETA_NOTES = {
    "measured": "measured: 1 - {embedder} cosine of the subject-only and style-only renders",
    "given": "given",
    "default": "K-LoRA's default, not measured",
}
# Ctrl+Enter (Cmd+Enter) generates from anywhere on the page, as in A1111 and ComfyUI.
SHORTCUTS = """<script>
document.addEventListener("keydown", (event) => {
  if ((event.ctrlKey || event.metaKey) && event.key === "Enter") {
    const button = document.querySelector("#generate");
    if (button) { event.preventDefault(); button.click(); }
  }
});
</script>"""
# Small images (toy: 32 px) enlarged for display without blur.
CSS = """#gallery img { image-rendering: pixelated; }
#heatmaps img { max-width: 100%; height: auto; }
#heatmaps figure { margin: 0 0 12px 0; }
.filename .stem { white-space: normal !important; overflow-wrap: anywhere; }
#files .filename, #subject-file .filename, #style-file .filename { overflow: visible !important; }"""
# The system's fonts: none is fetched (the page works offline, and calls no font server).
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "DejaVu Sans", "sans-serif"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Consolas", "DejaVu Sans Mono", "monospace"]
# Settings shown above the option panels; the rest follow in declaration order.
UP_FRONT = ("negative_prompt", "method", "beta")


def _gradio():
    """Gradio is an optional dependency: import it only when the UI is asked for."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    # A closed tab is noticed at the next heartbeat (Gradio's default: 15 s); its run then stops.
    os.environ.setdefault("GRADIO_HEARTBEAT_INTERVAL", "2")
    try:
        import gradio
    except ImportError:
        raise EstloraError(None, "the UI needs gradio: pip install 'estlora[ui]'") from None
    return gradio


def max_upload_bytes() -> int:
    return int(float(os.environ.get(MAX_UPLOAD_ENV, "1024")) * 2**20)


def output_dir() -> Path:
    return Path(os.environ.get(OUT_ENV, "estlora-ui-outputs")).resolve()


class Stopped(Exception):
    """The page's Stop button, raised between two denoising steps."""


class StepProgress:
    """The page's progress bar, advanced by the pipeline's `callback_on_step_end` at every denoising
    step; where Stop was asked, the run ends there, between two steps."""

    def __init__(self, progress, stop: threading.Event | None = None):
        self.progress = progress
        self.stop = stop or threading.Event()
        self.start("", 1)

    def start(self, desc: str, total: int) -> None:
        self.desc, self.total, self.done = desc, total, 0
        self.progress((0, total), desc=desc, unit="steps")

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        if self.stop.is_set():
            raise Stopped
        self.done += 1
        self.progress((self.done, self.total), desc=self.desc, unit="steps")
        return callback_kwargs


class Studio:
    """What the page works on: one session (the pipeline, the LoRAs loaded so far, the current pair's fusion)."""

    def __init__(self, base: str | None, out: Path, base_config: str | None = None, vae: str | None = None):
        self.out = out
        # default: the shipped toy SDXL, offline, out of the box; its config and VAE go with the launched base
        self.launched = ModelConfig(base=base or "toy", base_config=base_config, vae=vae)
        self.max_upload = max_upload_bytes()
        self.stopping = threading.Event()  # set by Stop from the page whose run is in progress
        self.running: str | None = None  # that page's session
        # settings the page shows as a choice, where None is the `default` entry
        self.choice_fields = {
            item.name
            for group in (FusionConfig, SamplingConfig)
            for item in settings_of(group)
            if item.optional and item.choices
        }
        self.open(self.launched.base)

    def open(self, base: str) -> None:
        """Load `base` in place of the current one (the page's base choice); where it cannot load, the
        current one stays and the message says why."""
        model = self.launched if base == self.launched.base else ModelConfig(base=base)
        try:
            session = Session.open(model, report=lambda _: None)
        except EstloraError as exc:
            raise user_error(str(exc)) from None
        session.console_progress = False  # progress goes to the page, not the server's console
        self.session, self.base = session, base
        self.preset = session.source.preset
        self.builtin = self.preset.loras if self.preset else {"subject": (), "style": ()}
        self.base_name = session.label
        # Widget defaults: sampling as this base runs it when left unset; fusion settings left unset
        # (`default` in the page), since what they resolve to can depend on the method (klora's pattern).
        resolved = session.resolve(Request("", "", ""))
        self.defaults = dataclasses.replace(resolved, fusion=FusionConfig())

    def bases(self) -> list[str]:
        """The page's base choices: the one launched, the built-in ones, each family's standard base
        (any other folder, hub id or file can be typed in)."""
        return list(dict.fromkeys([self.launched.base, *BASES, *(family.default_base for family in FAMILIES)]))

    @property
    def family(self) -> ModelFamily:
        return self.session.family

    def heading(self) -> str:
        family, preset = self.family, self.preset
        about = f", {preset.description}." if preset and preset.description else "."
        hint = f" For {family.label} itself, choose `{family.default_base}`." if preset else ""
        kind = "" if family.label in self.base_name else f" ({family.label})"
        return f"Base: `{self.base_name}`{kind}{about}{hint}"

    @property
    def pipe(self):
        return self.session.pipe

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return self.session.shapes

    # ------------------------------------------------------------ LoRAs

    def lora(self, role: str, choice: str, upload: str | None):
        """The chosen LoRA, loaded once per file and checked against the loaded base."""
        if choice == UPLOAD:
            if not upload:
                raise user_error(f"{role} LoRA: choose a .safetensors file to upload")
            path = Path(upload)
            if path.suffix.lower() != ".safetensors":
                raise user_error(f"{role} LoRA {path.name}: only .safetensors files are accepted")
            if path.stat().st_size > self.max_upload:
                limit = f"{self.max_upload / 2**20:g} MiB"
                raise user_error(f"{role} LoRA {path.name}: larger than the upload limit ({limit})")
            source = str(path)
        elif choice in self.builtin[role]:
            source = choice
        else:
            raise user_error(f"{role} LoRA: unknown choice {choice!r}")
        try:
            lora = self.session.lora(source)
        except LoraError as exc:
            raise user_error(lora_message(role, exc)) from None
        if choice == UPLOAD:  # Gradio's upload cache is cleared: saved images' commands must not point there
            source = str(self.keep_upload(Path(source), lora.sha256))
            lora = self.session.lora(source)
        return source, lora

    def keep_upload(self, path: Path, sha256: str) -> Path:
        """An uploaded LoRA kept with the outputs once per content (`<out>/loras/<sha256 prefix>-<name>`),
        after it loaded: the runs that use it, and their images' commands, refer to this copy."""
        kept = self.out / "loras" / f"{sha256[:16]}-{path.name}"
        if not kept.exists():
            with atomic_path(kept) as staging:
                shutil.copyfile(path, staging)
        return kept

    def pair(self, settings: dict):
        """((subject source, subject), (style source, style)), both loaded and checked against each other,
        on the page's base (loaded first where another page chose another since)."""
        if settings.get("base", self.base) != self.base:
            self.open(settings["base"])
        subject = self.lora("subject", settings["subject_choice"], settings["subject_file"])
        style = self.lora("style", settings["style_choice"], settings["style_file"])
        try:
            check_pair(subject[1], style[1])
        except LoraError as exc:
            raise user_error(lora_message("style", exc)) from None
        return subject, style

    def describe(self, settings: dict) -> str:
        """What the "Load LoRAs" button shows: both LoRAs, and that they fit the base and each other."""
        (_, subject), (_, style) = self.pair(settings)
        lines = [f"Both LoRAs fit {self.base_name} and each other."]
        for role, lora in (("subject", subject), ("style", style)):
            ranks = ", ".join(str(r) for r in sorted(lora.ranks))
            choice = settings[f"{role}_choice"]
            name = Path(settings[f"{role}_file"]).name if choice == UPLOAD else choice
            other = f", {len(lora.other)} tensors outside them" if lora.other else ""
            training = training_info(lora.metadata)
            words = training.get("trigger") or training.get("top_tags")
            trigger = f"; trigger words: {words}" if words else ""
            lines.append(
                f"- **{role}**: `{name}` ({lora.layout}, {len(lora.projections)} routable projections{other}, "
                f"rank {ranks}, sha256 {lora.sha256[:12]}){trigger}"
            )
        if subject.other or style.other:
            lines.append(
                "\nWeights outside the routed linears (convolutions, text encoders, ...) are ignored, as the "
                "reference does, unless *other weights* is set to merge (Fusion options)."
            )
        return "\n".join(lines)

    def settings_from_png(self, path: str, names: set[str]) -> tuple[dict, str]:
        """The page's values from a PNG estlora wrote (its `estlora` text chunk), for the fields in
        `names`, and a line saying what was loaded: its beta as a manual one (the image's own), a LoRA
        that is not one of this base's built-in choices named for upload."""
        from PIL import Image

        try:
            meta = json.loads(Image.open(path).text["estlora"])
            settings = dict(meta["settings"])
        except (OSError, KeyError, ValueError, TypeError):
            raise user_error(f"{Path(path).name}: not a PNG written by estlora (no settings in it)") from None
        values = {}
        for name, value in settings.items():
            if name in names and name not in ("subject", "style", "beta"):
                values[name] = value if value is not None else DEFAULT if name in self.choice_fields else ""
        if meta.get("beta") is not None:
            values |= {"beta_mode": "manual", "beta": meta["beta"]}
        missing = []
        for role in ("subject", "style"):
            source = str(settings.get(role) or "")
            if source in self.builtin[role]:
                values[f"{role}_choice"] = source
            else:
                missing.append(f"{role} {Path(source).name or '?'}")
        note = f"Loaded the settings of {Path(path).name}"
        note += f"; upload its LoRAs: {', '.join(missing)}." if missing else "."
        return {name: value for name, value in values.items() if name in names}, note

    # ------------------------------------------------------------ rendering

    def request(self, settings: dict) -> Request:
        """The page's values as a request; a value out of range is a message on the page."""
        (subject, _), (style, _) = self.pair(settings)
        values = dict(settings)
        if values.pop("beta_mode") == "auto":
            values["beta"] = None
        try:
            return Request(
                subject=subject,
                style=style,
                prompt=settings["prompt"],
                fusion=FusionConfig(**_typed(FusionConfig, values)),
                sampling=SamplingConfig(**_typed(SamplingConfig, values)),
            )
        except SettingError as exc:
            raise user_error(str(exc)) from None

    def stop(self, owner: str | None) -> None:
        """Stop the run in progress if it is this page's (`owner`: its session), between two steps."""
        if owner is not None and owner == self.running:
            self.stopping.set()

    def run(
        self, settings: dict, methods: list[str], num_images: int | None, progress, owner: str | None = None
    ) -> tuple:
        """Render `num_images` seeds (None: the page's images setting, checked) with every method into a
        new run folder; what the result panel shows. Stop ends it between two steps: the image being
        rendered is not saved (nothing partial is written), those saved before stay."""
        self.stopping.clear()
        self.running = owner
        try:
            return self._run(settings, methods, num_images, progress)
        except Stopped:
            raise user_error("stopped: the image in progress was not saved") from None
        finally:
            self.running = None

    def _run(self, settings: dict, methods: list[str], num_images: int | None, progress) -> tuple:
        if not settings["prompt"].strip():
            raise user_error("write a prompt")
        if not methods:
            raise user_error("tick at least one method to compare")
        base_request = self.request(settings)
        count = base_request.sampling.num_images if num_images is None else num_images
        seeds = [base_request.sampling.seed + k for k in range(count)]
        run_dir = self.out / datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        stem = run_dir.name  # in every file name too: downloads from two runs never share a name
        steps = StepProgress(progress, self.stopping)
        images, heatmaps, files, notes, summaries = [], [], [], [], []
        for method in methods:
            request = dataclasses.replace(base_request, fusion=dataclasses.replace(base_request.fusion, method=method))
            if method == "est" and request.fusion.beta is None:
                probe_steps = (
                    request.sampling.beta_probe_steps or request.sampling.steps or self.defaults.sampling.steps
                )
                steps.start("measuring beta: subject-only and style-only renders", 2 * probe_steps)
            try:
                prepared = self.session.configure(request, callback=steps)
            except EstloraError as exc:
                raise user_error(str(exc)) from None
            steps.start(f"{method}: rendering {len(seeds)} image(s)", prepared.steps * len(seeds))
            for seed in seeds:
                image = self.session.render(prepared, seed, callback=steps)
                path = self.session.save(prepared, image, run_dir / f"{stem}-{method}-seed{seed}.png", seed)
                images.append((str(path), f"{method} · seed {seed}"))
                files += [str(path), str(path.with_suffix(".json"))]
            plan = prepared.plan
            plan_png = run_dir / f"{stem}-plan-{method}.png"
            heatmap(plan, self.session.family, plan_png)
            heatmaps.append((str(plan_png), f"plan: {method}"))
            files.append(str(plan_png))
            notes.append(f"- **{method}**: {beta_note(prepared)}")
            summaries.append(summary(plan, self.session.family))
        notes.append(
            f"\nSaved to `{run_dir}`: each PNG carries its settings (text chunk `estlora`, and a JSON sidecar)."
        )
        return images, "\n".join(notes), heatmaps, "\n\n".join(summaries), files


def _typed(group: type, values: dict) -> dict:
    """A group's settings out of the page's values: numbers as their type, `default` and blanks as None."""
    typed = {}
    for item in settings_of(group):
        if item.name not in values:
            continue
        value = values[item.name]
        if item.optional and value in (DEFAULT, ""):
            value = None
        elif item.kind in (int, float) and isinstance(value, str):
            value = item.parse(value.strip())
        elif item.kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        typed[item.name] = value
    return typed


def beta_note(prepared) -> str:
    plan = prepared.plan
    if not prepared.fusion.config.gated:
        return "beta not used"
    cached = ", cached" if prepared.probe is not None and prepared.probe.cached else ""
    model = prepared.request.sampling.dino_model or ""
    embedder = "DINO" if "/" in model or "dino" in model.lower() or not model else f"the {model} scorer's"
    note = BETA_NOTES[plan.beta_source].format(embedder=embedder)
    return f"beta = {plan.beta:.4g} ({note}{cached})"


def lora_message(role: str, exc: LoraError) -> str:
    """One line naming the file as the user knows it (an upload's name, not the server's temp path)."""
    name = Path(exc.path).name if exc.path else ""
    return f"{role} LoRA {name}: {exc.problem}" if name else f"{role} LoRA: {exc.problem}"


def user_error(message: str):
    """A one-line message in the page, without a server traceback. Markup is escaped (it may quote a file
    name) but quotes are not: the API's clients read the message as text, and `&#x27;` is noise there."""
    return _gradio().Error(html.escape(message, quote=False), print_exception=False)


def not_loaded(exc) -> str:
    """The LoRA panel's word for a base or LoRA that did not load (the toast says it too)."""
    return f"**Not loaded: {html.escape(exc.message, quote=False)}.**"


def widget(
    gr, item: Setting, value, choices: tuple[str, ...] | None = None, step: float | None = None, help: str | None = None
):
    """The widget a setting's declaration calls for, labelled and explained by it."""
    label, elem_id = item.name.replace("_", " "), item.name.replace("_", "-")
    info = _with_range(item, help)
    choices = choices or item.choices
    if choices:
        options = [DEFAULT, *choices] if item.optional else list(choices)
        kind = gr.Radio if len(options) <= 8 else gr.Dropdown  # all seven methods stay one click away
        return kind(options, value=DEFAULT if value is None else value, label=label, info=info, elem_id=elem_id)
    if item.kind is bool:
        return gr.Checkbox(value, label=label, info=info, elem_id=elem_id)
    if item.kind in (int, float) and value is not None:
        # A number box, not a slider, and no limits or rounding of Gradio's: a slider clamps what is typed
        # (1000 steps became 100) and rounding turned 2.5 steps into 2. The declaration checks the value
        # and says which field and range (`Setting.check`).
        default_step = item.ui[2] if item.ui else None
        return gr.Number(value, step=step or default_step or 1, label=label, info=info, elem_id=elem_id)
    # text, or a number left unset by default: blank is the default, which the placeholder names
    return gr.Textbox(value or "", placeholder=item.unset or None, label=label, info=info, elem_id=elem_id)


def _with_range(item: Setting, help: str | None = None) -> str:
    """A setting's help (or the family's word for it) with its declared range, where it has one."""
    low, high, help = item.minimum, item.maximum, help or item.help
    if low is None and high is None:
        return help
    span = (
        f"{number(low)} to {number(high)}"
        if low is not None and high is not None
        else (f"at least {number(low)}" if low is not None else f"at most {number(high)}")
    )
    return f"{help} ({span})"


class Panels:
    """The result panels' labels: as they are after a run, or marked stale when the latest request
    failed or was stopped (they still show the run before it)."""

    LABELS = {
        "gallery": "Images",
        "heatmaps": "Plan: projections (rows) x denoising steps; orange subject, blue style, purple both",
        "plan_summary": "Plan summary",
        "downloads": "Files (PNG with settings, JSON sidecars, heatmaps)",
    }
    STALE = " (stale: from the run before; the latest one failed)"

    @classmethod
    def fresh(cls, gr, components: dict, values: tuple) -> dict:
        images, notes, heatmaps, summaries, files = values
        shown = {"gallery": images, "heatmaps": maps_html(heatmaps), "plan_summary": summaries, "downloads": files}
        updates = {components[name]: gr.update(value=shown[name], label=label) for name, label in cls.LABELS.items()}
        return updates | {components["result"]: notes}

    @classmethod
    def stale(cls, gr, components: dict, message: str) -> dict:
        updates = {components[name]: gr.update(label=label + cls.STALE) for name, label in cls.LABELS.items()}
        note = f"**Not rendered: {html.escape(message, quote=False)}.** The panels show the run before, if any."
        return updates | {components["result"]: note}


def maps_html(heatmaps: list[tuple[str, str]]) -> str:
    """The plan heatmaps one under the other at their own size (never shrunk into a square cell: a
    FLUX.1 plan has 494 rows), each a link to the file."""
    figures = []
    for path, caption in heatmaps:
        url = html.escape(f"gradio_api/file={path}")
        figures.append(
            f'<figure><a href="{url}" target="_blank"><img src="{url}" alt="{html.escape(caption)}"></a>'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    return "".join(figures)


def base_view(gr, studio: Studio, fields: dict) -> dict:
    """What the page shows for the loaded base: its built-in LoRAs, samplers, size step and defaults,
    the family's word for guidance, and only the sampling settings its family takes."""
    family, defaults = studio.family, studio.defaults.sampling
    refused = {name for other in FAMILIES for name in other.refused_settings}
    guidance = SAMPLING["guidance"]
    updates = {
        fields["base"]: gr.update(value=studio.base, choices=studio.bases()),
        fields["scheduler"]: gr.update(value=DEFAULT, choices=[*family.schedulers]),
        fields["guidance"]: gr.update(value=defaults.guidance, info=_with_range(guidance, family.guidance_help)),
        fields["steps"]: gr.update(value=defaults.steps),
        fields["dino_model"]: gr.update(value=defaults.dino_model or ""),
    }
    for side in ("width", "height"):
        updates[fields[side]] = gr.update(value=getattr(defaults, side), step=family.size_multiple)
    for name in refused:
        updates[fields[name]] = gr.update(visible=name not in family.refused_settings)
    for role in ("subject", "style"):
        builtin = studio.builtin[role]
        updates[fields[f"{role}_choice"]] = gr.update(
            choices=[*builtin, UPLOAD], value=builtin[0] if builtin else UPLOAD
        )
    return updates


SAMPLING = {item.name: item for item in settings_of(SamplingConfig)}
# What the page keeps in the browser across a reload (its localStorage): every setting but the base
# (one base serves every page) and uploads (the server's temporary files). Not secret: settings only.
KEPT_KEY = "estlora-ui-settings"
NOT_KEPT = ("base", "subject_file", "style_file")


def restorable(studio: Studio, components: dict, kept: dict | None) -> dict:
    """The kept settings that still fit the page: known fields, of their type, and for a choice one of
    the choices the loaded base offers (a reload after a base change keeps what still applies)."""
    restored = {}
    for name, value in (kept or {}).items():
        component = components.get(name)
        if component is None or name in NOT_KEPT:
            continue
        choices = [
            choice[1] if isinstance(choice, tuple) else choice for choice in getattr(component, "choices", None) or []
        ]
        if name.endswith("_choice"):
            choices = [*studio.builtin[name.removesuffix("_choice")]]  # an upload does not survive a reload
        elif name == "scheduler":
            choices = [*studio.family.schedulers]  # the loaded base's, which may have changed since the page was built
        if choices and not all(v in choices for v in (value if isinstance(value, list) else [value])):
            continue
        if isinstance(component.value, bool) != isinstance(value, bool):
            continue
        if isinstance(component.value, int | float) and not isinstance(value, int | float):
            continue
        restored[component] = value
    return restored


def build_app(base: str | None = None, base_config: str | None = None, vae: str | None = None) -> gr.Blocks:
    """The page: LoRAs and settings on the left, images, beta and plan on the right."""
    gr = _gradio()
    studio = Studio(base, output_dir(), base_config, vae)
    family = studio.family
    defaults = {**dataclasses.asdict(studio.defaults.fusion), **dataclasses.asdict(studio.defaults.sampling)}
    special = {
        "scheduler": {"choices": tuple(family.schedulers)},
        "width": {"step": family.size_multiple},
        "guidance": {"help": family.guidance_help},
    }
    special["height"] = special["width"]
    fusion, sampling = settings_of(FusionConfig), settings_of(SamplingConfig)
    by_name = {item.name: item for item in (*fusion, *sampling)}
    fields = {}

    def add(name: str) -> None:
        fields[name] = widget(gr, by_name[name], defaults[name], **special.get(name, {}))
        fields[name].visible = name not in family.refused_settings

    with gr.Blocks(title="estlora") as app:
        gr.Markdown("# estlora: a subject LoRA in a style LoRA (EST-LoRA)", elem_id="title")
        with gr.Row():
            with gr.Column(scale=2):
                fields["base"] = gr.Dropdown(
                    studio.bases(),
                    value=studio.base,
                    allow_custom_value=True,
                    label="Base model",
                    info="a built-in one, a family's standard base, or type a diffusers folder, hub id or "
                    ".safetensors file; loading takes a while",
                    elem_id="base",
                )
                heading = gr.Markdown(studio.heading(), elem_id="heading")
                with gr.Row():
                    for role in ("subject", "style"):
                        builtin = studio.builtin[role]
                        with gr.Column(min_width=200):
                            fields[f"{role}_choice"] = gr.Dropdown(
                                [*builtin, UPLOAD],
                                value=builtin[0] if builtin else UPLOAD,
                                label=f"{role.capitalize()} LoRA",
                                elem_id=f"{role}-choice",
                            )
                            fields[f"{role}_file"] = gr.File(
                                label="or upload one (.safetensors)",
                                file_types=[".safetensors"],
                                height=150,
                                elem_id=f"{role}-file",
                            )
                load = gr.Button("Load LoRAs", elem_id="load")
                settings_png = gr.File(
                    label="or load every setting from a PNG made here",
                    file_types=[".png"],
                    height=120,
                    elem_id="settings-png",
                )
                lora_info = gr.Markdown(elem_id="lora-info")
                prompt = studio.preset.prompt if studio.preset and studio.preset.prompt else OTHER_PROMPT
                fields["prompt"] = gr.Textbox(prompt, label="Prompt", lines=2, elem_id="prompt")
                # The action beside the prompt, its progress and result in the column next to it, in view.
                with gr.Row():
                    generate = gr.Button("Generate (Ctrl+Enter)", variant="primary", scale=4, elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
                with gr.Row():
                    fields["compare_methods"] = gr.CheckboxGroup(
                        list(by_name["method"].choices),
                        value=["est", "klora"],
                        label="Compare: the same seed with these methods",
                        elem_id="compare-methods",
                    )
                    compare = gr.Button("Compare", elem_id="compare")
                add("negative_prompt")
                add("method")
                beta = by_name["beta"]
                with gr.Row():
                    fields["beta_mode"] = gr.Radio(
                        ["auto", "manual"], value="auto", label="beta", info=beta.help, elem_id="beta-mode"
                    )
                    fields["beta"] = gr.Number(0.5, label="manual beta", elem_id="beta")
                with gr.Accordion("Fusion options", open=False):
                    for item in fusion:
                        if item.name not in UP_FRONT:
                            add(item.name)
                with gr.Accordion("Sampling", open=True):
                    for item in sampling:
                        if item.name not in UP_FRONT:
                            add(item.name)
                        if item.name == "seed":  # the seed drawn is shown in its box and saved with the image
                            dice = gr.Button("Random seed", size="sm", elem_id="random-seed")
            with gr.Column(scale=3):
                # Each image whole (contain, no preview pane stretching one image over the width); a click
                # opens it full size; small (toy) images are enlarged without blur (CSS below).
                panels = {
                    "gallery": gr.Gallery(
                        label=Panels.LABELS["gallery"],
                        columns=2,
                        object_fit="contain",
                        height="auto",
                        preview=False,
                        allow_preview=True,
                        elem_id="gallery",
                    ),
                    "result": gr.Markdown(elem_id="result"),
                    "heatmaps": gr.HTML(
                        label=Panels.LABELS["heatmaps"], show_label=True, container=True, elem_id="heatmaps"
                    ),
                    "plan_summary": gr.Code(
                        label=Panels.LABELS["plan_summary"], language=None, interactive=False, elem_id="plan-summary"
                    ),
                    "downloads": gr.File(label=Panels.LABELS["downloads"], file_count="multiple", elem_id="files"),
                }
        kept = gr.BrowserState({}, storage_key=KEPT_KEY, secret=KEPT_KEY)

        names = {component: name for name, component in fields.items()}
        inputs = set(fields.values())  # handlers get {component: value}
        outputs = list(panels.values())

        def named(values: dict) -> dict:
            return {names[component]: value for component, value in values.items() if component in names}

        def results(render):
            """The panels after a render, or marked stale (with why) where it failed or was stopped; the
            message shows as well. A generator: the stale marks reach the page before the error."""
            try:
                values = render()
            except gr.Error as exc:
                yield Panels.stale(gr, panels, exc.message)
                raise
            yield Panels.fresh(gr, panels, values)

        def on_generate(values: dict, request: gr.Request, progress=gr.Progress()):  # noqa: B008 (Gradio injects)
            settings = named(values)
            yield from results(lambda: studio.run(settings, [settings["method"]], None, progress, request.session_hash))

        def on_compare(values: dict, request: gr.Request, progress=gr.Progress()):  # noqa: B008
            settings = named(values)
            yield from results(
                lambda: studio.run(settings, settings["compare_methods"], 1, progress, request.session_hash)
            )

        def on_stop(request: gr.Request) -> None:
            studio.stop(request.session_hash)

        for handler in (on_generate, on_compare, on_stop):  # Gradio injects the request by its annotation,
            handler.__annotations__["request"] = gr.Request  # which `from __future__` left a string

        def on_load(values: dict):
            """The LoRA panel: what is chosen now, or why it does not load (never the pair before)."""
            try:
                yield studio.describe(named(values))
            except gr.Error as exc:
                yield not_loaded(exc)
                raise

        def on_base(base: str):
            """Load the chosen base and show its family's settings; where it does not load, the page
            says why and goes back to the base still loaded."""
            if base == studio.base:  # the dropdown may fire twice (pick, then blur)
                yield {lora_info: gr.skip()}
                return
            yield {lora_info: "Loading the base..."}
            try:
                studio.open(base)
            except gr.Error as exc:
                yield {fields["base"]: studio.base, lora_info: not_loaded(exc)}
                raise
            yield base_view(gr, studio, fields) | {heading: studio.heading()}

        # One queue slot for everything that uses the studio: a second request waits for the first.
        serial = {"concurrency_id": "studio", "concurrency_limit": 1}
        for button, handler in ((generate, on_generate), (compare, on_compare)):
            button.click(handler, inputs, outputs, show_progress_on=panels["gallery"], **serial)
        # Not queued: it must reach the run in progress. (Gradio's `cancels` would free the queue slot
        # while the render's thread still runs, and let the next request race it on the pipeline.)
        stop.click(on_stop, None, None, queue=False)
        app.unload(on_stop)  # a closed tab's run ends at its next step; Gradio drops its queued ones
        dice.click(lambda: secrets.randbelow(2**32), None, fields["seed"], queue=False)
        load.click(on_load, inputs, lora_info, **serial)
        base_outputs = [*fields.values(), heading, lora_info]
        fields["base"].input(on_base, fields["base"], base_outputs, show_progress_on=lora_info, **serial).success(
            on_load, inputs, lora_info, **serial
        )
        for role in ("subject", "style"):
            choice, upload = fields[f"{role}_choice"], fields[f"{role}_file"]
            # Any change of a LoRA re-checks the pair, so the panel always describes what is chosen now.
            choice.input(on_load, inputs, lora_info, **serial)
            upload.upload(lambda: UPLOAD, None, choice).then(on_load, inputs, lora_info, **serial)
            upload.clear(
                lambda role=role: studio.builtin[role][0] if studio.builtin[role] else UPLOAD, None, choice
            ).then(on_load, inputs, lora_info, **serial)

        def on_settings_png(path: str | None) -> dict:
            if not path:
                return {lora_info: gr.skip()}
            values, note = studio.settings_from_png(path, set(fields))
            return {fields[name]: value for name, value in values.items()} | {lora_info: note}

        settings_png.upload(on_settings_png, settings_png, [*fields.values(), lora_info], queue=False)

        # Settings kept across a reload: saved on every change, restored when the page opens.
        persisted = [component for name, component in fields.items() if name not in NOT_KEPT]
        gr.on(
            [component.change for component in persisted],
            lambda values: named(values),
            set(persisted),
            kept,
            queue=False,
            show_progress="hidden",
            preprocess=False,  # kept as sent: a value from before a base change is no error here (restore checks)
        )
        app.load(
            lambda saved: restorable(studio, fields, saved) or {fields["prompt"]: gr.skip()},
            kept,
            persisted,
            queue=False,
        )
    app.queue(default_concurrency_limit=1)
    return app


def read_auth(value: str | None) -> list[tuple[str, str]] | None:
    """`--auth user:password`, or a file of such lines (blank lines and `#` comments skipped)."""
    if not value:
        return None
    path = Path(value)
    lines = path.read_text().splitlines() if path.is_file() else [value]
    pairs = []
    for line in (line.strip() for line in lines):
        if not line or line.startswith("#"):
            continue
        user, colon, password = line.partition(":")
        if not (user and colon and password):
            where = f"{path}: " if path.is_file() else ""
            raise SettingError("auth", f"{where}expects user:password, or a file of such lines; a line lacks its colon")
        pairs.append((user, password))
    if not pairs:
        raise SettingError("auth", f"{path} holds no user:password line")
    return pairs


def network_warning(host: str, port: int, auth: list | None) -> str | None:
    """What to say when the page listens beyond this machine (None on a loopback address)."""
    if host in ("localhost", "::1") or host.startswith("127."):
        return None
    guard = (
        f"it asks for one of {len(auth)} logins (--auth)"
        if auth
        else "anyone who can reach this machine can render on it and read its outputs; "
        "--auth user:password asks for a login"
    )
    return f"warning: the page is open to the network on {host}:{port}: {guard}"


def launch(
    base: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    block: bool = True,
    base_config: str | None = None,
    vae: str | None = None,
    auth: list[tuple[str, str]] | None = None,
):
    """Serve the page (this machine only unless `host` says otherwise; `auth`: the logins it asks for);
    returns the app when not blocking."""
    warning = network_warning(host, port, auth)
    if warning:
        print(warning, file=sys.stderr)
    app = build_app(base, base_config, vae)
    out = output_dir()
    out.mkdir(parents=True, exist_ok=True)
    gr = _gradio()
    fonts = gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS)  # no web fonts: offline, and
    app.launch(  # Chromium drew the web font's "LoRA" with a small-cap "A"
        theme=fonts,
        head=SHORTCUTS,
        css=CSS,
        server_name=host,
        server_port=port,
        max_file_size=max_upload_bytes(),
        allowed_paths=[str(out)],
        show_error=True,
        prevent_thread_lock=not block,
        quiet=not block,
        auth=auth,
    )
    return app
