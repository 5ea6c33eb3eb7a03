"""The style-discrepancy score beta: how far apart the subject LoRA's and the style LoRA's images are.

EST-LoRA renders the prompt once with each LoRA alone (same seed) and compares the two images in
DINO's feature space; a large distance means the style LoRA pulls hard away from the subject, so
fusion should lean on it more. Measured betas are cached on disk because each costs two renders.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
from PIL import Image

from . import cache
from .config import DEFAULT_DINO
from .errors import EstloraError, first_line
from .registry import EMBEDDERS


class ImageEmbedderError(EstloraError, OSError):
    """The image model or its processor cannot be loaded (offline and not cached, or not a model)."""


@functools.lru_cache(maxsize=4)
def _load(model_id: str, device: torch.device, processor_class: str):
    """Load once per (model, device): probes and metric grids embed many images and must not reload each time."""
    import transformers

    try:
        model = transformers.AutoModel.from_pretrained(model_id)  # first: its errors say more (offline, not a model)
        processor = getattr(transformers, processor_class).from_pretrained(model_id)
    except (OSError, ValueError) as error:
        reason = first_line(error)
        raise ImageEmbedderError(model_id, f"cannot load the image model ({reason}); give a local folder") from None
    return model.to(device=device, dtype=torch.float32).eval(), processor


class PretrainedEmbedder:
    """A pretrained model and its processor, loaded once, run in fp32 on one device a batch at a time.

    Batches bound the memory a large grid of images needs; results do not depend on the batch size beyond rounding.
    """

    processor_class = "AutoImageProcessor"

    def __init__(self, model_id: str | os.PathLike, device: str | torch.device = "cpu", batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model_id = str(model_id)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model, self.processor = _load(self.model_id, self.device, self.processor_class)

    @torch.inference_mode()
    def _batched(self, items: list, forward: Callable[[list], torch.Tensor]) -> torch.Tensor:
        """forward over batch_size items at a time, concatenated as (n, d) fp32 on the CPU."""
        if not items:
            raise ValueError("nothing to embed")
        batches = (items[start : start + self.batch_size] for start in range(0, len(items), self.batch_size))
        return torch.cat([forward(batch).float().cpu() for batch in batches])

    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        return pixels["pixel_values"].to(device=self.device, dtype=torch.float32)


class DinoEmbedder(PretrainedEmbedder):
    """DINO's CLS embedding of images: the feature space in which EST-LoRA measures style distance."""

    def __init__(
        self, model_id: str | os.PathLike = DEFAULT_DINO, device: str | torch.device = "cpu", batch_size: int = 16
    ):
        super().__init__(model_id, device, batch_size)

    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        """(n, hidden) fp32 CLS vectors on the CPU."""
        return self._batched(images, lambda batch: self.model(pixel_values=self._pixels(batch)).last_hidden_state[:, 0])


def image_embedder(model_id: str | os.PathLike, device: str | torch.device = "cpu"):
    """DINO (a hub id or folder), or a registered embedder (`toy`: the toy world's own feature space)."""
    if str(model_id) in EMBEDDERS:
        return EMBEDDERS[str(model_id)](device)
    return DinoEmbedder(model_id, device=device)


def style_discrepancy(subject_image: Image.Image, style_image: Image.Image, embedder: DinoEmbedder) -> float:
    """beta = 1 - cos(CLS_subject, CLS_style), EST-LoRA's S factor (Zhang & Xiong 2025, arXiv 2508.02165).

    The cosine is taken in fp64 so that identical images give 0 up to rounding of the fp32 vectors.
    """
    subject, style = embedder.embed([subject_image, style_image]).double()
    return float(1 - torch.nn.functional.cosine_similarity(subject, style, dim=0))


def cached_beta(key: dict) -> float | None:
    """The beta measured earlier under exactly this key (base model, LoRA hashes, prompt, settings)."""
    entry = cache.read("beta", key)
    return None if entry is None else entry.get("beta")


def store_beta(key: dict, beta: float, extra: dict) -> None:
    """Remember a measured beta with whatever else explains it (e.g. the embedder id)."""
    cache.write("beta", key, {**extra, "beta": beta})
