"""LoRA keys as every layout spells them: which module a key belongs to, and the checks on a key's
tensor that name it as the file does."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import LoraShapeError
from ..lazy import torch


def module_of(key: str) -> str:
    """The module a LoRA key belongs to, in whichever layout's spelling: 'x.lora_A.weight' -> 'x'."""
    for suffix in (
        ".lora_A.weight",
        ".lora_B.weight",
        ".lora_down.weight",
        ".lora_up.weight",
        ".lora.down.weight",
        ".lora.up.weight",
        ".alpha",
    ):
        if key.endswith(suffix):
            return key.removesuffix(suffix)
    head, _, part = key.removesuffix(".weight").rpartition(".")
    if part.startswith(("lokr_", "hada_")):  # LyCORIS' parts: `<module>.lokr_w1`
        return head
    return key.rsplit(".", 2)[0]


def pattern_key(patterns, module: str) -> str | None:
    """The first key of a peft `alpha_pattern` / `rank_pattern` that names `module`: the pattern
    matches the module path whole or a dotted suffix of it (peft's `get_pattern_key`, whose import
    would pull in peft and transformers, seconds at every `inspect`); None when none does."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", module)), None)


def check_alpha(path: Path, name: str, alpha: torch.Tensor) -> torch.Tensor:
    """A LoRA's alpha is one number; `name` is the module as the message should call it."""
    if alpha.numel() != 1:
        raise LoraShapeError(path, f"{name}: alpha has shape {tuple(alpha.shape)}, expected one number")
    return alpha


# ComfyUI saves LoRAs as `diffusion_model.<model path with dots>.<part>`, with kohya's or peft's part names.
COMFY_PARTS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}


def comfy_to_kohya(tensors: dict[str, torch.Tensor], key: re.Pattern) -> dict[str, torch.Tensor]:
    """ComfyUI's keys that `key` matches (groups: the module path, the part) in kohya's spelling,
    `lora_unet_<path with underscores>.lora_down.weight`; other keys kept."""
    renamed = {}
    for name, value in tensors.items():
        match = key.match(name)
        if match:
            module, part = match.groups()
            name = f"lora_unet_{module.replace('.', '_')}.{COMFY_PARTS.get(part, part)}"
        renamed[name] = value
    return renamed
