"""The style-discrepancy score beta: how far apart the subject LoRA's and the style LoRA's images are.

EST-LoRA renders the prompt once with each LoRA alone (same seed) and compares the two images in
DINO's feature space; a large distance means the style LoRA pulls hard away from the subject, so
fusion should lean on it more. Measured betas are cached on disk because each costs two renders.
"""

from __future__ import annotations

import functools
import os

import torch
from PIL import Image

from . import cache
from .errors import EstloraError

DEFAULT_DINO = "facebook/dino-vits16"


class ImageEmbedderError(EstloraError, OSError):
    """The image model or its processor cannot be loaded (offline and not cached, or not a model)."""


@functools.lru_cache(maxsize=4)
def _load(model_id: str, device: torch.device):
    """Load once per (model, device): probes embed many image pairs and must not reload each time."""
    from transformers import AutoImageProcessor, AutoModel

    try:
        model = AutoModel.from_pretrained(model_id)  # first: its errors say more (offline, not a model)
        processor = AutoImageProcessor.from_pretrained(model_id)
    except (OSError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ImageEmbedderError(model_id, f"cannot load the image model ({reason}); give a local folder") from None
    return model.to(device=device, dtype=torch.float32).eval(), processor


class DinoEmbedder:
    """DINO's CLS embedding of images: the feature space in which EST-LoRA measures style distance."""

    def __init__(self, model_id: str | os.PathLike = DEFAULT_DINO, device: str | torch.device = "cpu"):
        self.model_id = str(model_id)
        self.device = torch.device(device)
        self.model, self.processor = _load(self.model_id, self.device)

    @torch.inference_mode()
    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        """(n, hidden) fp32 CLS vectors on the CPU, all images in one forward pass."""
        pixels = self.processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        pixel_values = pixels["pixel_values"].to(device=self.device, dtype=torch.float32)
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0].float().cpu()


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
