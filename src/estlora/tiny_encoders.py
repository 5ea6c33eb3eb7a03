"""Seeded tiny image encoders built in code, standing in for DINO in tests and the offline demo.

The tiny DINO is a real `transformers` ViT with a DINO-style image processor, so everything that
loads `facebook/dino-vits16` by id loads this folder the same way; its embeddings mean nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from .tiny_model import cache_dir

TINY_SEED = 0
# Bump when the weights or the layout change, so cached copies are rebuilt.
TINY_DINO_VERSION = 1
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def build_tiny_dino(seed: int = TINY_SEED):
    """Build a tiny ViT and its processor in memory; the same seed gives the same weights.

    Returns (ViTModel, ViTImageProcessorPil). The PIL processor is what `ViTImageProcessor` and
    `AutoImageProcessor` resolve to without torchvision; its saved config names the backend-neutral
    `ViTImageProcessor`, so the folder loads with either backend.
    """
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=32,
        patch_size=8,
    )
    with torch.random.fork_rng(devices=[]):  # seed the weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = ViTModel(config, add_pooling_layer=False)  # DINO checkpoints carry no pooler
    processor = ViTImageProcessorPil(
        do_resize=True,
        size={"height": 32, "width": 32},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    return model.eval(), processor


def write_tiny_dino(directory: str | os.PathLike, seed: int = TINY_SEED) -> Path:
    """Write the tiny DINO (safetensors weights + processor config) as one folder, atomically.

    The folder appears complete or not at all, so an interrupted write never leaves a half model.
    """
    target = Path(directory)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target}: folder exists and is not empty")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model, processor = build_tiny_dino(seed)
        model.save_pretrained(staging)  # transformers 5 always writes safetensors
        processor.save_pretrained(staging)
        if target.exists():
            target.rmdir()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def builtin_tiny_dino() -> Path:
    """The built-in tiny DINO's folder, written to the cache on first use."""
    folder = cache_dir() / f"tiny-dino-v{TINY_DINO_VERSION}"
    if not (folder / "config.json").exists():
        shutil.rmtree(folder, ignore_errors=True)
        try:
            write_tiny_dino(folder)
        except FileExistsError:  # another process won the race; its folder is complete
            pass
    return folder
