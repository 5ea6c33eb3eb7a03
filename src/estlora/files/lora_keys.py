"""LoRA keys as every layout spells them: which module a key belongs to, and the checks on a key's
tensor that name it as the file does."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import LoraShapeError


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
    return key.rsplit(".", 2)[0]


def check_alpha(path: Path, name: str, alpha: torch.Tensor) -> torch.Tensor:
    """A LoRA's alpha is one number; `name` is the module as the message should call it."""
    if alpha.numel() != 1:
        raise LoraShapeError(path, f"{name}: alpha has shape {tuple(alpha.shape)}, expected one number")
    return alpha
