"""The EST-LoRA nodes: thin shells over `fusion.fuse` and estlora's beta and plan views. Their inputs
are built from estlora's own setting declarations (names, defaults, ranges, help as tooltips), so the
node, the CLI and the web UI offer the same settings."""

from __future__ import annotations

import tempfile
from pathlib import Path

import folder_paths
import torch

from estlora.config import DEFAULT_DINO, FusionConfig, Setting, settings_of
from estlora.errors import EstloraError

from .fusion import ATTACHMENT, NodeError, fuse, image_tensor

DEFAULT = "default"  # an optional setting left to the model family (route, pattern)
# LoRA Composite runs the denoiser once per LoRA per step: a model wrapper, not a weight patch; not here yet.
UNSUPPORTED_CHOICES = {"method": ("composite",)}
NOT_MEASURED = -1.0  # beta's widget value for "not given": K-LoRA's default until the Beta node measures it
CATEGORY = "loaders/EST-LoRA"


def setting_input(item: Setting) -> tuple:
    """A ComfyUI input spec from an estlora setting's declaration."""
    extra = {"tooltip": item.help}
    if item.choices:
        choices = [c for c in item.choices if c not in UNSUPPORTED_CHOICES.get(item.name, ())]
        options = [DEFAULT, *choices] if item.optional else choices
        return options, {**extra, "default": options[0] if item.optional else item.default}
    if item.kind is bool:
        return "BOOLEAN", {**extra, "default": item.default}
    if item.name == "beta":  # None (auto) has no widget value: -1 stands for it
        tooltip = f"{item.help}; {NOT_MEASURED:g}: not given (K-LoRA's default), or connect the EST-LoRA Beta node"
        return "FLOAT", {"default": NOT_MEASURED, "min": NOT_MEASURED, "max": 100.0, "step": 0.001, "tooltip": tooltip}
    kind = "INT" if item.kind is int else "FLOAT"
    spec = {**extra, "default": item.default}
    spec["min"] = item.minimum if item.minimum is not None else (0 if kind == "INT" else -100.0)
    if item.maximum is not None:
        spec["max"] = item.maximum
    if kind == "FLOAT":
        spec["step"] = item.ui[2] if item.ui else 0.01
    return kind, spec


def fusion_config(values: dict) -> FusionConfig:
    typed = {}
    for item in settings_of(FusionConfig):
        value = values[item.name]
        if (item.optional and value == DEFAULT) or (item.name == "beta" and value <= NOT_MEASURED):
            value = None
        typed[item.name] = value
    try:
        return FusionConfig(**typed)
    except EstloraError as exc:
        raise NodeError(str(exc)) from None


class EstLoraFuse:
    """MODEL (+ CLIP) with a subject and a style LoRA fused by EST-LoRA, per projection and per step,
    inside any sampler placed after it."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        loras = folder_paths.get_filename_list("loras")
        required = {
            "model": ("MODEL",),
            "subject_lora": (loras, {"tooltip": "the LoRA of your subject (DreamBooth: a dog, a product, a face)"}),
            "style_lora": (loras, {"tooltip": "the LoRA of the style"}),
        }
        required |= {item.name: setting_input(item) for item in settings_of(FusionConfig)}
        required["steps"] = (
            "INT",
            {
                "default": 0,
                "min": 0,
                "max": 1000,
                "tooltip": "the plan's steps: 0 follows each sampler's own "
                "(with denoise < 1 or start/end steps: the steps it runs); another number makes a sampler that "
                "runs a different count an error",
            },
        )
        return {
            "required": required,
            "optional": {"clip": ("CLIP", {"tooltip": "merged statically when other weights is merge"})},
        }

    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = "EST-LoRA (Zhang & Xiong 2025): my subject in that style, without training"

    def apply(self, model, subject_lora: str, style_lora: str, steps: int, clip=None, **settings):
        paths = [Path(folder_paths.get_full_path_or_raise("loras", name)) for name in (subject_lora, style_lora)]
        fused, new_clip, _ = fuse(model, clip, *paths, fusion_config(settings), steps)
        return fused, new_clip


class EstLoraBeta:
    """beta = 1 - cos(DINO(subject-only render), DINO(style-only render)), EST-LoRA's S factor, as
    `estlora generate` measures it; render the two images with ComfyUI's own nodes (LoraLoader)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "subject_image": ("IMAGE", {"tooltip": "the render with the subject LoRA alone"}),
                "style_image": ("IMAGE", {"tooltip": "the same seed and prompt with the style LoRA alone"}),
                "dino_model": (
                    "STRING",
                    {
                        "default": DEFAULT_DINO,
                        "tooltip": "a hub id in the local cache, a folder, or a folder name under ComfyUI/models/dino",
                    },
                ),
            }
        }

    RETURN_TYPES = ("FLOAT",)
    RETURN_NAMES = ("beta",)
    FUNCTION = "measure"
    CATEGORY = CATEGORY

    def measure(self, subject_image: torch.Tensor, style_image: torch.Tensor, dino_model: str):
        from PIL import Image

        from estlora.discrepancy import image_embedder, style_discrepancy

        local = Path(folder_paths.models_dir) / "dino" / dino_model
        try:
            embedder = image_embedder(str(local) if local.is_dir() else dino_model)
        except EstloraError as exc:
            raise NodeError(str(exc)) from None
        images = [
            Image.fromarray((image[0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())
            for image in (subject_image, style_image)
        ]
        return (style_discrepancy(*images, embedder),)


class EstLoraPlanPreview:
    """The plan of a fused MODEL for a number of steps: the heatmap `estlora plan --png` draws, and its summary."""

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "the EST-LoRA Fuse node's MODEL"}),
                "steps": ("INT", {"default": 30, "min": 1, "max": 1000}),
            }
        }

    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("heatmap", "summary")
    FUNCTION = "preview"
    CATEGORY = CATEGORY

    def preview(self, model, steps: int):
        from estlora.commands.plan_view import heatmap, summary
        from estlora.families import family_named

        fusion = model.get_attachment(ATTACHMENT)
        if fusion is None:
            raise NodeError("EST-LoRA Plan Preview: this MODEL does not come from an EST-LoRA Fuse node")
        plan, family = fusion.plan(steps), family_named(fusion.family)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "plan.png"
            heatmap(plan, family, path)
            image = image_tensor(path)
        return image, summary(plan, family)


NODE_CLASS_MAPPINGS = {"EstLoraFuse": EstLoraFuse, "EstLoraBeta": EstLoraBeta, "EstLoraPlanPreview": EstLoraPlanPreview}
NODE_DISPLAY_NAME_MAPPINGS = {
    "EstLoraFuse": "EST-LoRA Fuse",
    "EstLoraBeta": "EST-LoRA Beta",
    "EstLoraPlanPreview": "EST-LoRA Plan Preview",
}
