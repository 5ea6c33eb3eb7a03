"""Seeded tiny image encoders built in code, standing in for DINO and CLIP in tests and the offline demo.

The tiny DINO is a real `transformers` ViT with a DINO-style image processor, and the tiny CLIP a
real `CLIPModel` with a CLIP processor, so everything that loads `facebook/dino-vits16` or
`openai/clip-vit-base-patch32` by id loads these folders the same way; their embeddings mean nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..cache import cache_dir
from ..outputs import cached_folder, write_folder
from ..tokenizers import tiny_clip_tokenizer

TINY_SEED = 0
# Bump when the weights or the layout change, so cached copies are rebuilt.
TINY_DINO_VERSION = 1
TINY_CLIP_VERSION = 1
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TINY_ENCODER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37}
TINY_IMAGES = {"image_size": 32, "patch_size": 8}


def _seeded(build: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    """build() under torch.manual_seed(seed), without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def build_tiny_dino(seed: int = TINY_SEED):
    """Build a tiny ViT and its processor in memory; the same seed gives the same weights.

    Returns (ViTModel, ViTImageProcessorPil). The PIL processor is what `ViTImageProcessor` and
    `AutoImageProcessor` resolve to without torchvision; its saved config names the backend-neutral
    `ViTImageProcessor`, so the folder loads with either backend.
    """
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    config = ViTConfig(**TINY_ENCODER, **TINY_IMAGES)
    model = _seeded(lambda: ViTModel(config, add_pooling_layer=False), seed)  # DINO checkpoints carry no pooler
    processor = ViTImageProcessorPil(
        do_resize=True,
        size={"height": 32, "width": 32},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    return model, processor


def build_tiny_clip(seed: int = TINY_SEED):
    """Build a tiny CLIP (text and vision towers) and its processor in memory; the same seed gives the same weights.

    Returns (CLIPModel, CLIPProcessor) with the character-level tiny tokenizer, whose end-of-text
    token (513) is also the padding, as in OpenAI's CLIP, and `CLIPImageProcessorPil` (what
    `CLIPImageProcessor` resolves to without torchvision) resizing the short side to 32 and
    centre-cropping 32x32, as CLIP does at 224.
    """
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    tokenizer = tiny_clip_tokenizer()
    config = CLIPConfig(
        text_config={
            **TINY_ENCODER,
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "max_position_embeddings": tokenizer.model_max_length,
        },
        vision_config={**TINY_ENCODER, **TINY_IMAGES},
        projection_dim=16,
    )
    model = _seeded(lambda: CLIPModel(config), seed)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _write(directory: str | os.PathLike, build: Callable[[int], tuple], seed: int) -> Path:
    """Write build(seed)'s model (safetensors) and processor as one folder, atomically."""

    def fill(staging: Path) -> None:
        model, processor = build(seed)
        model.save_pretrained(staging)  # transformers 5 always writes safetensors
        processor.save_pretrained(staging)

    return write_folder(directory, fill)


def write_tiny_dino(directory: str | os.PathLike, seed: int = TINY_SEED) -> Path:
    """Write the tiny DINO (safetensors weights + processor config) as one folder, atomically."""
    return _write(directory, build_tiny_dino, seed)


def write_tiny_clip(directory: str | os.PathLike, seed: int = TINY_SEED) -> Path:
    """Write the tiny CLIP (safetensors weights + tokenizer + processor configs) as one folder, atomically."""
    return _write(directory, build_tiny_clip, seed)


def builtin_tiny_dino() -> Path:
    """The built-in tiny DINO's folder, written to the cache on first use."""
    return cached_folder(cache_dir() / f"tiny-dino-v{TINY_DINO_VERSION}", "config.json", write_tiny_dino)


def builtin_tiny_clip() -> Path:
    """The built-in tiny CLIP's folder, written to the cache on first use."""
    return cached_folder(cache_dir() / f"tiny-clip-v{TINY_CLIP_VERSION}", "config.json", write_tiny_clip)
