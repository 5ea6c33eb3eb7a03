"""`estlora generate`: load the base, fuse the two LoRAs, measure beta, render, save with settings.

Every image is saved with its full settings twice (a PNG text chunk `estlora` and a JSON sidecar),
including the beta actually used and the plan hash, and with the command that regenerates it.
Files are written atomically, so an interrupted run leaves no half-written image.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .base import DEFAULT_BASE, TOY_BASE, base_projection_shapes
from .discrepancy import DEFAULT_DINO, TOY_EMBEDDER
from .fusion import Fusion, fuse, unet_fingerprint
from .lora import load_pair
from .other_weights import describe
from .outputs import atomic_path, write_text
from .pipelines import load_pipeline, set_scheduler


@dataclass
class Request:
    """Everything that determines a set of images (the CLI's flags, one to one)."""

    subject: str
    style: str
    prompt: str
    base: str = DEFAULT_BASE
    base_config: str | None = None  # a single-file base's configs: a diffusers SDXL folder or id (default SDXL 1.0)
    vae: str | None = None  # replaces the base's VAE: folder, hub id or single file
    negative_prompt: str | None = None
    method: str = "est"
    steps: int = 30
    scheduler: str = "default"  # a key of pipelines.SCHEDULERS
    timestep_spacing: str | None = None  # None: the base's own (SDXL: leading)
    guidance: float = 5.0
    guidance_rescale: float = 0.0  # 0.7 is the usual for v-prediction / zero-terminal-SNR models
    width: int | None = None
    height: int | None = None
    seed: int = 0
    num_images: int = 1
    beta: float | None = None  # None: "auto" (measured for est, K-LoRA's default for klora)
    beta_probe_steps: int | None = None
    dino_model: str = DEFAULT_DINO
    alpha: float = 1.5
    pattern: str = "s"
    gamma_rule: str = "reference"
    subject_scale: float = 1.0
    style_scale: float = 1.0
    raw_energy: bool = False
    switch_every: int = 5
    other_weights: str = "ignore"
    device: str = "auto"
    dtype: str = "auto"
    cpu_offload: bool = False
    out: str = "outputs"

    def __post_init__(self) -> None:
        if self.base == TOY_BASE and self.dino_model == DEFAULT_DINO:
            self.dino_model = TOY_EMBEDDER  # DINO knows nothing of 32 x 32 toy shapes; the toy scorer does
        # Checked before the model loads: diffusers would fail later, some of it with a traceback.
        for name in ("steps", "num_images", "beta_probe_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be at least 1, not {value}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise ValueError(f"{name} must be a positive multiple of 8 (the VAE's scale), not {value}")
        if not 0 <= self.guidance_rescale <= 1:
            raise ValueError(f"guidance-rescale must be between 0 and 1, not {self.guidance_rescale:g}")

    def config_options(self) -> dict:
        from .plan import FUSION_OPTIONS

        return {name: getattr(self, name) for name in FUSION_OPTIONS}

    def pipe_kwargs(self, steps: int | None = None) -> dict:
        kwargs = {"num_inference_steps": steps or self.steps, "guidance_scale": self.guidance}
        if self.guidance_rescale:
            kwargs["guidance_rescale"] = self.guidance_rescale
        for name in ("negative_prompt", "width", "height"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        return kwargs


def render(fusion: Fusion, request: Request, seed: int, label: str = "", **extra):
    """One image at `seed` with the fusion's current config (CPU generator: same noise on any device).

    `extra` goes to the pipeline call as is (e.g. `callback_on_step_end` for a progress display).
    """
    set_scheduler(fusion.pipe, request.scheduler, request.timestep_spacing)
    fusion.pipe.set_progress_bar_config(desc=label or None, leave=False)
    generator = torch.Generator("cpu").manual_seed(seed)
    return fusion.pipe(request.prompt, generator=generator, **request.pipe_kwargs(), **extra).images[0]


def metadata(request: Request, fusion: Fusion, seed: int) -> dict:
    """The settings that regenerate this image bit for bit on the same hardware."""
    import diffusers
    import peft
    import transformers

    from . import __version__

    plan = fusion.plan_for(request.steps)
    settings = asdict(request)
    settings.update(seed=seed, num_images=1, method=fusion.config.method, beta=plan.beta)
    return {
        "estlora": __version__,
        "settings": settings,
        "beta": plan.beta,
        "beta_source": plan.beta_source,
        "gamma": plan.gamma,
        "plan_hash": plan.hash(),
        "base_unet": unet_fingerprint(fusion.pipe.unet),  # which weights, whatever the base's path
        "subject_sha256": fusion.subject.sha256,
        "style_sha256": fusion.style.sha256,
        "scheduler": type(fusion.pipe.scheduler).__name__,
        "device": str(fusion.pipe.unet.device) if not request.cpu_offload else request.device,
        "torch_dtype": str(fusion.pipe.unet.dtype),
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "command": regenerate_command(settings),
    }


def regenerate_command(settings: dict) -> str:
    """`estlora generate ...` with every setting spelled out (beta as used: no new probe)."""
    words = ["estlora", "generate"]
    skip = {"num_images", "out", "beta_probe_steps", "dino_model"}
    for key, value in settings.items():
        if key in skip or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        words += [flag] if value is True else [flag, repr(value) if isinstance(value, float) else str(value)]
    return shlex.join(words)


def save_image(image, path: Path, meta: dict) -> Path:
    """PNG with an `estlora` text chunk, plus a JSON sidecar; both written atomically."""
    from PIL.PngImagePlugin import PngInfo

    text = json.dumps(meta, indent=2)
    write_text(path.with_suffix(".json"), text + "\n")
    info = PngInfo()
    info.add_text("estlora", text)
    with atomic_path(path) as staging:
        image.save(staging, format="PNG", pnginfo=info)
    return path


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "image"


def measure_beta(fusion: Fusion, request: Request, use_cache: bool = True):
    """Set the fusion's beta from style discrepancy, with the run's settings (fewer steps if asked)."""
    set_scheduler(fusion.pipe, request.scheduler, request.timestep_spacing)
    return fusion.measure_beta(
        request.prompt,
        seed=0,
        dino_model=request.dino_model,
        use_cache=use_cache,
        **request.pipe_kwargs(request.beta_probe_steps),
    )


def generate(request: Request, pipe=None) -> list[Path]:
    """The whole story: base, LoRAs, plan, beta, images. Returns the PNG paths."""
    # Check both LoRAs against the base's UNet config first: bad input fails fast, before the slow load.
    shapes = base_projection_shapes(request.base, request.base_config)
    subject, style = load_pair(request.subject, request.style, shapes, request.base)
    pipe = pipe or load_pipeline(
        request.base, request.device, request.dtype, request.cpu_offload, request.base_config, request.vae
    )
    scheduler = pipe.scheduler.config
    if scheduler.get("prediction_type", "epsilon") != "epsilon":
        zero_snr = " trained to zero terminal SNR" if scheduler.get("rescale_betas_zero_snr") else ""
        print(f"base: a {scheduler.prediction_type} model{zero_snr}; {type(pipe.scheduler).__name__} is set for it")
    options = request.config_options()
    with fuse(pipe, subject, style, method=request.method, beta=request.beta, **options) as fusion:
        strengths = fusion.config.static_weights
        energies = fusion.scores.energy.sum(dim=0).tolist()
        for role, lora, strength, energy in zip(
            ("subject", "style"), (subject, style), strengths, energies, strict=True
        ):
            line = describe(role, lora, strength, request.other_weights)
            if line:
                print(line)
            if energy == 0:
                print(f"warning: the {role} LoRA changes nothing: its update is zero in every attention projection")
        if request.method == "est" and request.beta is None:
            probe = measure_beta(fusion, request)
            print(f"beta = {probe.beta:.4g} (style discrepancy{', cached' if probe.cached else ''})")
        out = Path(request.out)
        paths = []
        for k in range(request.num_images):
            seed = request.seed + k
            image = render(fusion, request, seed, f"image {k + 1}/{request.num_images}")
            path = out / f"{slug(request.prompt)}-{request.method}-seed{seed}.png"
            paths.append(save_image(image, path, metadata(request, fusion, seed)))
            print(f"wrote {path}")
    return paths
