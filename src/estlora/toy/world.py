"""The toy world: procedurally drawn 32 x 32 images of coloured shapes, with captions.

Small enough that a text-to-image model learns it on two CPU cores, rich enough that a fusion can
be seen and scored: three base shapes in four colours, solid or with horizontal stripes, on a light
grey background. Three *subjects* (new shapes, "a sks shape") and three *styles* (new textures of the
object, "in szn style") are never shown to the base model; each one is taught by its own LoRA.

Everything here is numpy and PIL; a batch depends only on its seed, so training is reproducible and
resumable from any step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 32
SUPERSAMPLE = 4  # drawn at 128 x 128, then box-downsampled: smooth edges
BASE_SHAPES = ("circle", "square", "triangle")
SUBJECTS = ("heart", "diamond", "cross")
SHAPES = BASE_SHAPES + SUBJECTS
COLOURS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 215), "yellow": (230, 195, 30)}
BASE_TEXTURES = ("solid", "stripes")
STYLES = ("diagonal", "checker", "outline")
TEXTURES = BASE_TEXTURES + STYLES
BACKGROUND = (210, 210, 210)
WHITE = (250, 250, 250)
DARK = (25, 25, 25)
RADIUS = 0.34  # of the canvas
JITTER = 2  # pixels at 32 x 32
SUBJECT_TOKEN, STYLE_TOKEN = "sks", "szn"
WORDS = ("a", *COLOURS, *BASE_SHAPES, "with", "stripes", SUBJECT_TOKEN, "shape", "in", STYLE_TOKEN, "style")
MAX_TOKENS = 16


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    texture: str
    dx: int = 0  # centre offset in pixels at 32 x 32
    dy: int = 0
    scale: float = 1.0  # the scorer's training sees sizes the generator draws a little off
    band: float = 3.0  # pattern band width in pixels at 32 x 32; the scorer's training also sees others


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon vertices of a shape (None for the circle, drawn as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        s = 0.86 * r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - 1.05 * r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if shape == "diamond":
        return [(cx, cy - 1.15 * r), (cx + 1.0 * r, cy), (cx, cy + 1.15 * r), (cx - 1.0 * r, cy)]
    if shape == "cross":
        a, w = 1.05 * r, 0.36 * r
        return [
            (cx - w, cy - a), (cx + w, cy - a), (cx + w, cy - w), (cx + a, cy - w), (cx + a, cy + w), (cx + w, cy + w),
            (cx + w, cy + a), (cx - w, cy + a), (cx - w, cy + w), (cx - a, cy + w), (cx - a, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    if shape == "heart":  # the classic parametric heart, scaled to the radius
        ts = np.linspace(0, 2 * math.pi, 96, endpoint=False)
        x = 16 * np.sin(ts) ** 3
        y = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
        k = 1.1 * r / 16
        return [(cx + k * a, cy + k * (b + 2.5)) for a, b in zip(x, y, strict=True)]
    raise ValueError(f"unknown shape {shape!r}")


def shape_mask(shape: str, dx: int = 0, dy: int = 0, scale: float = 1.0) -> Image.Image:
    """The shape's silhouette at the supersampled size (mode L, 255 inside)."""
    n = SIZE * SUPERSAMPLE
    cx, cy, r = n / 2 + dx * SUPERSAMPLE, n / 2 + dy * SUPERSAMPLE, RADIUS * n * scale
    mask = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(mask)
    points = _outline(shape, cx, cy, r)
    if points is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(points, fill=255)
    return mask


def _texture(texture: str, colour: tuple[int, int, int], mask: Image.Image, band: float = 3.0) -> np.ndarray:
    """The object's fill (n x n x 3) before masking: a colour, a pattern of it, or a dark-rimmed fill."""
    n = SIZE * SUPERSAMPLE
    y, x = np.mgrid[0:n, 0:n]
    band = band * SUPERSAMPLE
    fill = np.empty((n, n, 3), np.float32)
    fill[:] = colour
    if texture == "solid":
        return fill
    if texture == "stripes":
        light = (y // band) % 2 == 1
    elif texture == "diagonal":
        light = ((x + y) // band) % 2 == 1
    elif texture == "checker":
        light = ((x // band) + (y // band)) % 2 == 1
    elif texture == "outline":
        inner = np.asarray(mask.filter(ImageFilter.MinFilter(4 * SUPERSAMPLE + 1))) > 127
        fill[~inner] = DARK
        return fill
    else:
        raise ValueError(f"unknown texture {texture!r}")
    fill[light] = WHITE
    return fill


def render(scene: Scene) -> np.ndarray:
    """One scene as a 32 x 32 x 3 uint8 image."""
    mask = shape_mask(scene.shape, scene.dx, scene.dy, scene.scale)
    alpha = np.asarray(mask, np.float32)[..., None] / 255
    fill = _texture(scene.texture, COLOURS[scene.colour], mask, scene.band)
    image = alpha * fill + (1 - alpha) * np.float32(BACKGROUND)
    small = Image.fromarray(np.round(image).astype(np.uint8)).resize((SIZE, SIZE), Image.BOX)
    return np.asarray(small)


def caption(scene: Scene, say_colour: bool = True) -> str:
    """The caption the base model, a subject LoRA or a style LoRA is trained with."""
    colour = f"{scene.colour} " if say_colour else ""
    if scene.shape in SUBJECTS:
        text = f"a {colour}{SUBJECT_TOKEN} shape"
    else:
        text = f"a {colour}{scene.shape}"
    if scene.texture == "stripes":
        text += " with stripes"
    elif scene.texture in STYLES:
        text += f" in {STYLE_TOKEN} style"
    return text


def random_scene(rng: np.random.Generator, shapes=BASE_SHAPES, textures=BASE_TEXTURES) -> Scene:
    return Scene(
        shape=str(rng.choice(shapes)),
        colour=str(rng.choice(list(COLOURS))),
        texture=str(rng.choice(textures)),
        dx=int(rng.integers(-JITTER, JITTER + 1)),
        dy=int(rng.integers(-JITTER, JITTER + 1)),
    )


def concept_scenes(concept: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(shapes, textures) of a concept's training images: `base`, a subject or a style name."""
    if concept == "base":
        return BASE_SHAPES, BASE_TEXTURES
    if concept in SUBJECTS:
        return (concept,), ("solid",)
    if concept in STYLES:
        return BASE_SHAPES, (concept,)
    raise ValueError(f"unknown concept {concept!r} (base, {', '.join(SUBJECTS + STYLES)})")


def batch(
    concept: str, size: int, seed: int | list[int], prior: float = 0.0, drop_colour: float = 0.0
) -> tuple[np.ndarray, list[str], list[Scene]]:
    """`size` images (N x 32 x 32 x 3 uint8) of a concept with captions and scenes.

    `prior` is the share of base-world images mixed in (prior preservation for LoRAs); `drop_colour`
    the share of captions that leave the colour out, so "a sks shape" alone also works.
    """
    rng = np.random.default_rng(seed)
    scenes, captions = [], []
    for _ in range(size):
        use_prior = concept != "base" and rng.random() < prior
        shapes, textures = concept_scenes("base" if use_prior else concept)
        scene = random_scene(rng, shapes, textures)
        scenes.append(scene)
        captions.append(caption(scene, say_colour=rng.random() >= drop_colour))
    return np.stack([render(s) for s in scenes]), captions, scenes


def to_tensor(images: np.ndarray):
    """uint8 N x H x W x 3 -> float N x 3 x H x W in [-1, 1], as diffusers' VAEs expect."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def toy_tokenizer():
    """A word-level CLIP tokenizer for the toy vocabulary, built offline.

    CLIP's BPE needs a merge chain for every whole word (`r`+`e`, `re`+`d</w>`); single characters
    stay in the vocabulary so any text still tokenizes. Both text encoders share it.
    """
    from transformers import CLIPTokenizer

    from ..tokenizers import bytes_to_unicode

    chars = bytes_to_unicode()
    chains = {}
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        chains[word] = [(pieces[0] + "".join(pieces[1:k]), pieces[k]) for k in range(1, len(pieces))]
    order = list(WORDS)
    for _ in range(len(WORDS)):  # a word whose chain is cut by another word's merge moves to the front
        merges = list(dict.fromkeys(m for word in order for m in chains[word]))
        tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
        tokens += ["<|startoftext|>", "<|endoftext|>"]
        vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
        tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)
        broken = [w for w in order if len(tokenizer.tokenize(w)) != 1]
        if not broken:
            return tokenizer
        order = broken + [w for w in order if w not in broken]
    raise RuntimeError(f"no merge order keeps these words whole: {broken}")
