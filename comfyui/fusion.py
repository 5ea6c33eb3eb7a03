"""The EST-LoRA fusion of a ComfyUI MODEL: the plan from estlora (the one implementation of the method,
the same plan as `estlora plan`), the LoRA patches from ComfyUI's own LoRA reader, tied together by
projection name (diffusers names on estlora's side, ComfyUI's weight keys, or FLUX.1's fused slices,
on the other)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import comfy.lora
import comfy.lora_convert
import comfy.model_base
import comfy.patcher_extension
import comfy.utils
import torch

from estlora.config import FusionConfig
from estlora.errors import EstloraError
from estlora.families import family_named
from estlora.loading.lora import load_pair
from estlora.plan import Plan, build_plan
from estlora.score_cache import cached_pair_scores

from .routing import WRAPPER_KEY, PlannedWeight, StepClock

ATTACHMENT = "estlora"  # the fusion, attached to the MODEL it made (for the Plan Preview node)


class NodeError(ValueError):
    """One line for ComfyUI's error box."""


def family_of_model(model) -> str:
    """estlora's name for the family of a ComfyUI model: SDXL (and its fine-tunes) or FLUX.1."""
    if isinstance(model.model, comfy.model_base.Flux):
        return "flux1"
    if isinstance(model.model, comfy.model_base.SDXL):
        return "sdxl"
    raise NodeError(f"EST-LoRA serves SDXL and FLUX.1 models; this MODEL is {type(model.model).__name__}")


def weight_keys(model, family: str) -> dict[str, str | tuple]:
    """diffusers weight name -> ComfyUI's weight key, or (fused key, (dim, offset, size)) for a slice."""
    unet_config = model.model.model_config.unet_config
    if family == "flux1":
        return comfy.utils.flux_to_diffusers(unet_config, output_prefix="diffusion_model.")
    return {name: f"diffusion_model.{key}" for name, key in comfy.utils.unet_to_diffusers(unet_config).items()}


def model_shapes(model, family, targets: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of the MODEL's routable linears under their diffusers names (a slice: its rows)."""
    state = model.model.state_dict()
    shapes = {}
    for name, target in targets.items():
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or not family.routable(module):
            continue
        key, offset = (target, None) if isinstance(target, str) else target[:2]
        if key in state and state[key].dim() == 2:
            out_features, in_features = state[key].shape
            shapes[module] = (offset[2] if offset else out_features, in_features)
    return shapes


def comfy_patches(path: Path, key_map: dict) -> dict:
    """The LoRA as ComfyUI's `LoraLoader` reads it: model key -> weight adapter."""
    tensors = comfy.utils.load_torch_file(str(path), safe_load=True)
    return comfy.lora.load_lora(comfy.lora_convert.convert_lora(tensors), key_map, log_missing=False)


@dataclasses.dataclass
class ComfyFusion:
    """What the Fuse node made: the config, the pair's scores, and the plan for any number of steps."""

    config: FusionConfig
    family: str
    scores: object
    hashes: tuple[str, str]
    beta_source: str | None

    def plan(self, steps: int) -> Plan:
        return build_plan(self.scores, self.config, steps, self.hashes, self.beta_source)


def fuse(model, clip, subject: Path, style: Path, config: FusionConfig, steps: int = 0):
    """(MODEL, CLIP, fusion): clones of the inputs that apply the plan at every step of any sampler."""
    family_name = family_of_model(model)
    family = family_named(family_name)
    targets = weight_keys(model, family_name)
    try:
        # checked against this MODEL's widths; alpha 0 read as ComfyUI applies it (scale 0), so the
        # plan scores what is applied
        pair = load_pair(subject, style, model_shapes(model, family, targets), f"this {family.label} MODEL", family,
                         zero_alpha="zero")
    except EstloraError as exc:
        raise NodeError(str(exc)) from None
    for role, lora in zip(("subject", "style"), pair, strict=True):
        if "dora" in lora.kinds:
            why = "DoRA is not served by the ComfyUI node yet (estlora generate is)"
            raise NodeError(f"{role} LoRA {lora.path.name}: {why}")
    config = family.resolve_fusion(config)
    layers = family.routed(set(pair[0].projections) | set(pair[1].projections), config.route)
    fusion = ComfyFusion(
        config, family_name, cached_pair_scores(*pair, layers, config), (pair[0].sha256, pair[1].sha256),
        None if config.beta is None else "given",
    )

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    loaded = [comfy_patches(lora.path, key_map) for lora in pair]
    members: dict[str, list] = {}
    routed = set()
    for row, name in enumerate(fusion.scores.layers):
        target = targets.get(f"{name}.weight")
        found = [patches.get(target) for patches in loaded]
        for lora, patch in zip(pair, found, strict=True):
            if name in lora.projections and patch is None:
                raise NodeError(f"{lora.path.name}: ComfyUI reads no update for {name}; estlora reads one")
        key, offset = (target, None) if isinstance(target, str) else target[:2]
        members.setdefault(key, []).append((row, *found, offset))
        routed.add(target)

    clone = model.clone()
    clock = StepClock(lambda n: fusion.plan(n).weights, steps)
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, clock)
    for key, parts in members.items():
        stored = comfy.utils.get_attr(model.model, key).dtype
        clone.add_weight_wrapper(key, PlannedWeight(key, parts, clock, stored))  # slices are disjoint: any order
    clone.set_attachments(ATTACHMENT, fusion)

    new_clip = clip.clone() if clip is not None else None
    for patches, strength in zip(loaded, config.static_weights, strict=True):
        # what the route leaves out: ignored (the reference), or merged at the LoRA's strength
        others = {key: patch for key, patch in patches.items() if key not in routed}
        if strength and others:
            clone.add_patches(others, strength)
            if new_clip is not None:
                new_clip.add_patches(others, strength)
    return clone, new_clip, fusion


def image_tensor(path: Path) -> torch.Tensor:
    """A PNG as ComfyUI's IMAGE: (1, H, W, 3) floats in [0, 1]."""
    import numpy as np
    from PIL import Image

    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array)[None]
