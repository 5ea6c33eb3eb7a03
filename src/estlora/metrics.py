"""The field's evaluation metrics for subject + style fusion, batched, on a chosen device.

- style similarity: CLIP image-image cosine to the style references (mean over references);
- subject similarity: DINO CLS cosine to the subject references (DreamBooth's DINO score), and
  CLIP image-image cosine to them;
- text alignment: CLIP text-image cosine with the prompt, its trigger tokens replaced by class
  words (`neutral_prompt`), since CLIP has never seen "sks".

References are embedded once (`Scorer.embed_refs`) and reused for every image of a grid.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from .config import DEFAULT_CLIP, DEFAULT_DINO
from .discrepancy import DinoEmbedder, ImageEmbedderError, PretrainedEmbedder
from .errors import EstloraError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Private-use marks around replaced text, so that only repeats the replacement created are collapsed.
_OPEN, _CLOSE = "\ue000", "\ue001"


class ClipEmbedder(PretrainedEmbedder):
    """CLIP's projected image and text embeddings, L2-normalised, so that a dot product is the cosine."""

    processor_class = "AutoProcessor"  # the tokenizer and the image processor together

    def __init__(
        self, model_id: str | os.PathLike = DEFAULT_CLIP, device: str | torch.device = "cpu", batch_size: int = 16
    ):
        super().__init__(model_id, device, batch_size)
        if not hasattr(self.model, "get_text_features"):
            raise ImageEmbedderError(self.model_id, f"not a CLIP model ({type(self.model).__name__})")

    def images(self, images: list[Image.Image]) -> torch.Tensor:
        """(n, projection_dim) unit vectors, fp32 on the CPU."""
        # transformers 5 returns an output object whose pooler_output is the projected embedding
        return self._batched(
            images,
            lambda batch: _unit(self.model.get_image_features(pixel_values=self._pixels(batch)).pooler_output),
        )

    def texts(self, texts: list[str]) -> torch.Tensor:
        """(n, projection_dim) unit vectors, fp32 on the CPU; texts beyond CLIP's 77 tokens are truncated."""
        return self._batched(texts, self._text_batch)

    def _text_batch(self, texts: list[str]) -> torch.Tensor:
        tokens = self.processor(text=texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        return _unit(self.model.get_text_features(**tokens).pooler_output)


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(vectors, dim=-1)


def mean_cosine_to_refs(generated: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """(n,) fp64: each generated vector's cosine to every reference, averaged over the references."""
    return (_unit(generated.double()) @ _unit(refs.double()).T).mean(dim=1)


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n,) fp64: the cosine of a[i] with b[i]."""
    if a.shape != b.shape:
        raise ValueError(f"paired vectors differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (_unit(a.double()) * _unit(b.double())).sum(dim=1)


def neutral_prompt(prompt: str, replacements: dict[str, str]) -> str:
    """The prompt with trigger tokens replaced by class words, as CLIP text scores are usually taken.

    Triggers match as whole words only. A word the replacement repeats is dropped ("a sks dog" with
    {"sks": "dog"} gives "a dog", not "a dog dog"), and runs of spaces become one.
    """
    if replacements:
        triggers = "|".join(re.escape(trigger) for trigger in sorted(replacements, key=len, reverse=True))
        prompt = re.sub(
            rf"(?<!\w)(?:{triggers})(?!\w)", lambda match: f"{_OPEN}{replacements[match[0]]}{_CLOSE}", prompt
        )
        prompt = re.sub(rf"(?<!\w)(\w+){_CLOSE}\s+\1(?!\w)", rf"\1{_CLOSE}", prompt, flags=re.IGNORECASE)
        prompt = re.sub(rf"(?<!\w)(\w+)\s+{_OPEN}\1(?!\w)", rf"{_OPEN}\1", prompt, flags=re.IGNORECASE)
    return " ".join(prompt.replace(_OPEN, "").replace(_CLOSE, "").split())


@dataclass(frozen=True)
class Refs:
    """Reference images embedded once by both models: (m, d) CLIP unit vectors and (m, d) DINO CLS vectors."""

    clip: torch.Tensor
    dino: torch.Tensor


class Scorer:
    """CLIP and DINO loaded once, scoring generated images against embedded references."""

    def __init__(
        self,
        clip_model: str | os.PathLike = DEFAULT_CLIP,
        dino_model: str | os.PathLike = DEFAULT_DINO,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
    ):
        self.clip = ClipEmbedder(clip_model, device, batch_size)
        self.dino = DinoEmbedder(dino_model, device, batch_size)

    def embed_refs(self, images: list[Image.Image]) -> Refs:
        """Embed reference images once, to score any number of generated images against them."""
        return Refs(clip=self.clip.images(images), dino=self.dino.embed(images))

    def score(
        self, images: list[Image.Image], prompts: list[str], subject: Refs, style: Refs
    ) -> dict[str, list[float]]:
        """Per image: style_clip, subject_dino, subject_clip and text_clip (against its already neutral prompt)."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        clip, dino = self.clip.images(images), self.dino.embed(images)
        return {
            "style_clip": mean_cosine_to_refs(clip, style.clip).tolist(),
            "subject_dino": mean_cosine_to_refs(dino, subject.dino).tolist(),
            "subject_clip": mean_cosine_to_refs(clip, subject.clip).tolist(),
            "text_clip": paired_cosine(clip, self.clip.texts(prompts)).tolist(),
        }


def load_reference_images(path: str | os.PathLike) -> list[Image.Image]:
    """A reference image file, or every image directly in a folder sorted by name, as RGB.

    A folder covers DreamBooth's dataset/<subject>/ layout, a file StyleDrop's one image per style.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(file for file in path.iterdir() if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise EstloraError(path, f"no reference images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    elif path.is_file():
        files = [path]
    else:
        raise EstloraError(path, "no such reference image or folder")
    return [_open_rgb(file) for file in files]


def _open_rgb(file: Path) -> Image.Image:
    try:
        with Image.open(file) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise EstloraError(file, f"cannot read the reference image ({error})") from None
