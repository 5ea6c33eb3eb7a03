"""Scorers for the toy world: a small CNN that says which shape, colour and texture an image shows.

Each head has a `none` class, trained on noise, smooth random fields and empty backgrounds, and a
prediction whose confidence is under `THRESHOLD` also counts as `none`: a failed generation must
not be read as a subject or a style.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .world import BACKGROUND, COLOURS, SHAPES, SIZE, TEXTURES, WHITE, Scene, random_scene, render

NONE = "none"
HEADS = {"shape": SHAPES + (NONE,), "colour": tuple(COLOURS) + (NONE,), "texture": TEXTURES + (NONE,)}
THRESHOLD = 0.5


class ToyScorer(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, stride=2, padding=1), nn.ReLU(),  # 16 x 16
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),  # 8 x 8
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.ReLU(),  # 4 x 4
            nn.Flatten(),
            nn.Linear(4 * w * 16, 128), nn.ReLU(),
        )  # fmt: skip
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(labels)) for name, labels in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: N x 3 x 32 x 32 in [-1, 1] -> logits per head."""
        h = self.features(images)
        return {name: head(h) for name, head in self.heads.items()}


@dataclass(frozen=True)
class Prediction:
    shape: str
    colour: str
    texture: str
    confidence: dict[str, float]


def load_scorer(path: str | Path | None = None) -> ToyScorer:
    from safetensors.torch import load_file

    from .model import ASSETS

    scorer = ToyScorer()
    scorer.load_state_dict(load_file(str(path or ASSETS / "scorer.safetensors")))
    return scorer.eval()


def images_to_tensor(images) -> torch.Tensor:
    """PIL images, or uint8 N x H x W x 3 arrays, -> N x 3 x 32 x 32 in [-1, 1]."""
    from PIL import Image

    if isinstance(images, np.ndarray):
        images = [Image.fromarray(a) for a in images]
    arrays = [np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.BOX)) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def probabilities(scorer: ToyScorer, images) -> dict[str, torch.Tensor]:
    """Per head, (N, classes): the scorer's probability of each label (`HEADS` order)."""
    return {head: values.softmax(-1) for head, values in scorer(images_to_tensor(images)).items()}


def predict(scorer: ToyScorer, images) -> list[Prediction]:
    """Each image's label per head: the likeliest, or `none` when it is under `THRESHOLD`."""
    labels: dict[str, list[str]] = {}
    confidence: dict[str, torch.Tensor] = {}
    for head, values in probabilities(scorer, images).items():
        p, index = values.max(-1)
        labels[head] = [
            HEADS[head][i] if c >= THRESHOLD else NONE for c, i in zip(p.tolist(), index.tolist(), strict=True)
        ]
        confidence[head] = p
    return [
        Prediction(
            labels["shape"][i],
            labels["colour"][i],
            labels["texture"][i],
            {h: float(c[i]) for h, c in confidence.items()},
        )
        for i in range(len(labels["shape"]))
    ]


class ToyEmbedder:
    """The scorer's penultimate features: the toy world's DINO, for measuring EST-LoRA's beta there."""

    def __init__(self, scorer: ToyScorer | None = None):
        self.scorer = scorer or load_scorer()

    @torch.no_grad()
    def embed(self, images) -> torch.Tensor:
        return self.scorer.features(images_to_tensor(images)).double()


# ---------------------------------------------------------------- training data


def noise_image(rng: np.random.Generator) -> np.ndarray:
    """Something that is no toy object: white noise, a smooth random field, or an empty background."""
    kind = rng.integers(3)
    if kind == 0:
        image = rng.normal(rng.uniform(40, 215), rng.uniform(20, 90), (SIZE, SIZE, 3))
    elif kind == 1:
        cells = int(rng.choice([2, 4, 8]))
        field = rng.uniform(0, 255, (cells, cells, 3))
        image = np.kron(field, np.ones((SIZE // cells, SIZE // cells, 1))) + rng.normal(
            0, rng.uniform(0, 40), (SIZE, SIZE, 3)
        )
    else:
        image = np.float64(BACKGROUND) + rng.normal(0, rng.uniform(0, 30), (SIZE, SIZE, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def smooth_field(rng: np.random.Generator, cells: int, channels: int = 1) -> np.ndarray:
    """A smooth random field in [0, 1], SIZE x SIZE x channels: a coarse random grid, upsampled."""
    grid = torch.from_numpy(rng.uniform(0, 1, (channels, 1, cells, cells)))
    up = F.interpolate(grid, size=(SIZE, SIZE), mode="bicubic", align_corners=False).clamp(0, 1)
    return up[:, 0].permute(1, 2, 0).numpy()


def generated_look(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What the toy model does to a fill when the prompt names no colour, or a LoRA only half takes:
    hues that drift across the object, wavy edges and stripes, patches where the fill did not take.

    With varied band widths (`scorer_batch`), which matter most, these let the scorer read generated
    diagonal stripes as a person does; trained on clean renders alone it called them `checker` or
    `solid` (benchmarks/RESULTS.md, tests/data/toy_generated_labelled.*).
    """
    x = image.astype(np.float64)
    coloured = np.clip((x.max(-1) - x.min(-1))[..., None] / 175, 0, 1)  # not background, white or dark
    if rng.random() < 0.7:
        other = np.array(COLOURS[str(rng.choice(list(COLOURS)))], np.float64)
        drift = smooth_field(rng, int(rng.choice([2, 3, 4]))) * rng.uniform(0.2, 0.6)
        x = x + coloured * drift * (other - x)
        x = x * (1 + coloured * (smooth_field(rng, 3, 3) - 0.5) * 0.5)
    if rng.random() < 0.4:  # stripes and checks thinner or thicker than drawn
        white = ((x.min(-1) > 235) & (coloured[..., 0] < 0.2))[..., None]
        paint = torch.from_numpy(coloured.transpose(2, 0, 1)[None])
        paint = F.avg_pool2d(paint, 3, stride=1, padding=1, count_include_pad=False)[0].permute(1, 2, 0).numpy()
        grown = paint > rng.uniform(0.35, 0.65)
        if coloured.sum() > 4:
            fill = (x * coloured).sum((0, 1)) / coloured.sum()
            x = np.where(white & grown, fill, x)
            x = np.where((coloured > 0.5) & ~grown, np.float64(WHITE), x)
    if rng.random() < 0.5:
        flow = (smooth_field(rng, 4, 2) - 0.5) * rng.uniform(1, 4.5) * 2 / SIZE  # up to ~2 pixels
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
        grid = torch.stack([xs, ys], -1)[None].double() + torch.from_numpy(flow)[None]
        warped = F.grid_sample(
            torch.from_numpy(x).permute(2, 0, 1)[None], grid, padding_mode="border", align_corners=True
        )
        x = warped[0].permute(1, 2, 0).numpy()
    if rng.random() < 0.35:
        patches = (smooth_field(rng, int(rng.choice([5, 6, 8]))) > rng.uniform(0.7, 0.9)) * coloured
        x = x + patches * (np.float64(WHITE) - x)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What generated images do to a clean render: blur, grain, a colour cast."""
    from PIL import Image, ImageFilter

    out = Image.fromarray(image)
    if rng.random() < 0.5:
        out = out.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.2, 0.9))))
    array = np.asarray(out, np.float64) + rng.normal(0, rng.uniform(0, 12), (SIZE, SIZE, 3)) + rng.normal(0, 10, 3)
    return np.clip(array, 0, 255).astype(np.uint8)


def scorer_batch(size: int, seed) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """Labelled images: every shape x colour x texture of the world (subjects in styles too), and none."""
    rng = np.random.default_rng(seed)
    images, labels = [], {head: [] for head in HEADS}
    for _ in range(size):
        if rng.random() < 0.15:
            images.append(noise_image(rng))
            for head, values in HEADS.items():
                labels[head].append(len(values) - 1)
            continue
        scene: Scene = random_scene(rng, SHAPES, TEXTURES)
        scene = Scene(
            scene.shape,
            scene.colour,
            scene.texture,
            scene.dx + int(rng.integers(-2, 3)),
            scene.dy,
            float(rng.uniform(0.8, 1.15)),
            float(rng.uniform(2.5, 5.0)) if rng.random() < 0.5 else 3.0,  # the model draws bands off-width
        )
        images.append(augment(generated_look(render(scene), rng), rng))
        for head in HEADS:
            labels[head].append(HEADS[head].index(getattr(scene, head)))
    return np.stack(images), {head: torch.tensor(v) for head, v in labels.items()}
