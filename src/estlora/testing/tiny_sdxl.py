"""A tiny, seeded Stable Diffusion XL pipeline built entirely in code (no hub, no downloads).

Its UNet has SDXL's real block layout (transformer depths 0/2/10 down, 10 mid, 10/2/0 up: 70
transformer blocks, 140 attention modules, 560 attention projections) with tiny widths, so every
module path a real SDXL LoRA names exists here too. It draws noise; it exists so that loading,
planning and routing can be tested end to end on a CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..cache import cache_dir
from ..families.sdxl import SDXL_SCHEDULER_CONFIG
from ..outputs import cached_folder, write_folder
from ..tokenizers import tiny_clip_tokenizer
from .parts import tiny_clip_text_config, tiny_vae

TINY_SEED = 0
# Bump when the weights or the layout change, so cached copies are rebuilt.
TINY_MODEL_VERSION = 1


def tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64, 64),
        attention_head_dim=(2, 4, 4),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,  # 6 * 8 + text_encoder_2's projection_dim (32)
        cross_attention_dim=64,  # 32 + 32: SDXL concatenates its two text encoders' states
        norm_num_groups=1,
    )


def build_tiny_sdxl(seed: int = TINY_SEED):
    """Build the tiny pipeline in memory; the same seed gives the same weights."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = tiny_unet()
    torch.manual_seed(seed)
    vae = tiny_vae(128)
    text_config = tiny_clip_text_config(32, 5, projection_dim=32)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tiny_clip_tokenizer(),
        tokenizer_2=tiny_clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=scheduler,
    )


def write_tiny_sdxl(directory: str | os.PathLike, seed: int = TINY_SEED) -> Path:
    """Write the tiny pipeline as a diffusers folder (safetensors), atomically."""
    return write_folder(directory, lambda staging: build_tiny_sdxl(seed).save_pretrained(staging))


def builtin_tiny_sdxl() -> Path:
    """The built-in tiny model's folder, written to the cache on first use."""
    return cached_folder(cache_dir() / f"tiny-sdxl-v{TINY_MODEL_VERSION}", "model_index.json", write_tiny_sdxl)
