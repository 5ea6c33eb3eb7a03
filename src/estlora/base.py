"""The base model a LoRA is used with: where it is, and the shapes of its UNet's attention projections.

Shapes come from the UNet's config alone (the model is built on the meta device), so checking a
LoRA against SDXL costs a config read, not a 5 GB load.
"""

from __future__ import annotations

import os
import warnings
from functools import lru_cache

from .errors import BaseModelError
from .lora import ATTENTION_PROJECTION

DEFAULT_BASE = "stabilityai/stable-diffusion-xl-base-1.0"

# The UNet config of SDXL base 1.0 (as published with the model). It lets LoRAs be checked against
# the default base, and benchmarks use SDXL's real shapes, with no network and no weights.
SDXL_UNET_CONFIG = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
KNOWN_UNET_CONFIGS = {DEFAULT_BASE: SDXL_UNET_CONFIG}
# SDXL base 1.0's default sampler settings.
SDXL_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


TOY_BASE = "toy"  # the shipped toy SDXL (estlora.toy_model)


def resolve_base(base: str | os.PathLike) -> str:
    """A base as diffusers can load it: `toy` names the shipped toy model's folder."""
    if str(base) == TOY_BASE:
        from .toy_model import toy_model_path

        return str(toy_model_path())
    return str(base)


def check_local_path(base: str | os.PathLike) -> None:
    """A base spelled as a path must exist (else the hub client reports a confusing repo-id error)."""
    text = str(base)
    if text.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(text)):
        raise BaseModelError(base, "no such folder")


def unet_config(base: str | os.PathLike) -> dict:
    """The UNet config of a diffusers pipeline folder or hub id."""
    from diffusers import UNet2DConditionModel

    base = resolve_base(base)
    check_local_path(base)
    try:
        with warnings.catch_warnings():  # diffusers 0.42 passes a deprecated argument to the hub client
            warnings.simplefilter("ignore")
            return dict(UNet2DConditionModel.load_config(str(base), subfolder="unet"))
    except Exception as exc:
        if str(base) in KNOWN_UNET_CONFIGS:  # offline, but we know its shapes
            return dict(KNOWN_UNET_CONFIGS[str(base)])
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BaseModelError(base, f"cannot read the base model's UNet config ({first})") from None


@lru_cache(maxsize=8)
def _shapes_from_config(config_items: tuple) -> dict[str, tuple[int, int]]:
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(config_items))
    return {
        name: (module.out_features, module.in_features)
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear) and ATTENTION_PROJECTION.search(name)
    }


def projection_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """UNet module path -> (out_features, in_features) for every attention projection."""
    hashable = tuple(sorted((k, _freeze(v)) for k, v in config.items() if not k.startswith("_")))
    return dict(_shapes_from_config(hashable))


def _freeze(value):
    return tuple(_freeze(v) for v in value) if isinstance(value, list | tuple) else value
