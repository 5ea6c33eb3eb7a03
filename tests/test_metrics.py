"""Evaluation metrics on tiny seeded CLIP and DINO models built in code, checked against direct computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from estlora.discrepancy import DinoEmbedder, ImageEmbedderError
from estlora.errors import EstloraError
from estlora.metrics import (
    ClipEmbedder,
    Refs,
    Scorer,
    load_reference_images,
    mean_cosine_to_refs,
    neutral_prompt,
    paired_cosine,
)
from estlora.testing.tiny_encoders import builtin_tiny_clip, write_tiny_clip

PROMPTS = ["a dog", "a dog in watercolor style", "a cat on a beach", "an oil painting of a dog", "x"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("encoders") / "tiny-clip")


@pytest.fixture(scope="module")
def clip(clip_dir):
    return ClipEmbedder(clip_dir)


@pytest.fixture(scope="module")
def scorer(clip_dir, dino_dir):
    return Scorer(clip_model=clip_dir, dino_model=dino_dir, device="cpu", batch_size=2)


@pytest.fixture(scope="module")
def direct_clip(clip_dir):
    """The tiny CLIP's normalised embeddings computed by hand with the auto classes."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(clip_dir).eval()
    processor = AutoProcessor.from_pretrained(clip_dir)

    @torch.inference_mode()
    def embed(images: list[Image.Image], texts: list[str]):
        output = model(**processor(text=texts, images=images, padding=True, return_tensors="pt"))
        return output.image_embeds, output.text_embeds  # CLIPModel normalises both

    return embed


@pytest.fixture(scope="module")
def direct_dino(dino_dir):
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(dino_dir).eval()
    processor = AutoImageProcessor.from_pretrained(dino_dir)

    @torch.inference_mode()
    def embed(images: list[Image.Image]) -> torch.Tensor:
        return model(**processor(images, return_tensors="pt")).last_hidden_state[:, 0]

    return embed


def random_images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


def cosine_by_hand(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a.double() @ b.double() / (a.double().norm() * b.double().norm()))


def test_tiny_clip_loads_with_auto_classes(clip_dir):
    from transformers import AutoModel, AutoProcessor, CLIPModel

    model = AutoModel.from_pretrained(clip_dir)
    processor = AutoProcessor.from_pretrained(clip_dir)
    assert isinstance(model, CLIPModel)
    assert model.config.projection_dim == 16 and model.config.text_config.vocab_size == 514
    assert processor.image_processor.crop_size == {"height": 32, "width": 32}
    assert processor.tokenizer("a").input_ids == [512, 320, 513]
    assert (clip_dir / "model.safetensors").is_file()


def test_clip_embeddings_match_direct_computation(clip, direct_clip):
    images = random_images(5, seed=0)
    image_direct, text_direct = direct_clip(images, PROMPTS)
    embedded_images, embedded_texts = clip.images(images), clip.texts(PROMPTS)
    assert embedded_images.shape == (5, 16) and embedded_texts.shape == (5, 16)
    assert embedded_images.dtype == torch.float32 and embedded_images.device.type == "cpu"
    assert torch.allclose(embedded_images, image_direct, atol=1e-6)
    assert torch.allclose(embedded_texts, text_direct, atol=1e-6)
    assert torch.allclose(embedded_images.norm(dim=1), torch.ones(5), atol=1e-6)


def test_batching_does_not_change_embeddings(clip_dir, dino_dir, clip):
    images = random_images(5, seed=1)
    small_clip = ClipEmbedder(clip_dir, device="cpu", batch_size=2)
    assert torch.allclose(small_clip.images(images), clip.images(images), atol=1e-6)
    assert torch.allclose(small_clip.texts(PROMPTS), clip.texts(PROMPTS), atol=1e-6)
    small_dino = DinoEmbedder(dino_dir, batch_size=2)
    assert torch.allclose(small_dino.embed(images), DinoEmbedder(dino_dir, batch_size=5).embed(images), atol=1e-6)


def test_cosine_functions_by_hand():
    generator = torch.Generator().manual_seed(0)
    generated, refs, other = (torch.randn(shape, generator=generator) for shape in ((4, 8), (3, 8), (4, 8)))
    expected_mean = torch.tensor([[cosine_by_hand(g, r) for r in refs] for g in generated], dtype=torch.float64)
    assert torch.allclose(mean_cosine_to_refs(generated, refs), expected_mean.mean(dim=1), atol=1e-12)
    expected_paired = torch.tensor([cosine_by_hand(a, b) for a, b in zip(generated, other, strict=True)])
    assert torch.allclose(paired_cosine(generated, other), expected_paired.double(), atol=1e-12)
    assert torch.allclose(paired_cosine(other, generated), paired_cosine(generated, other), atol=1e-15)
    assert torch.allclose(mean_cosine_to_refs(generated * 3, refs / 2), mean_cosine_to_refs(generated, refs))
    assert torch.allclose(mean_cosine_to_refs(refs[:1], refs[:1] * 5), torch.ones(1, dtype=torch.float64))
    assert torch.allclose(paired_cosine(generated, -generated), -torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="differ in shape"):
        paired_cosine(generated, refs)


def test_score_matches_direct_computation(scorer, direct_clip, direct_dino):
    images, subject_images, style_images = random_images(5, seed=2), random_images(3, seed=3), random_images(2, seed=4)
    subject, style = scorer.embed_refs(subject_images), scorer.embed_refs(style_images)
    scores = scorer.score(images, PROMPTS, subject=subject, style=style)
    assert set(scores) == {"style_clip", "subject_dino", "subject_clip", "text_clip"}
    assert all(len(values) == 5 and all(isinstance(v, float) for v in values) for values in scores.values())

    image_clip, text_clip = direct_clip(images, PROMPTS)
    subject_clip, _ = direct_clip(subject_images, ["x"])
    style_clip, _ = direct_clip(style_images, ["x"])
    image_dino, subject_dino = direct_dino(images), direct_dino(subject_images)
    expected = {
        "style_clip": [np.mean([cosine_by_hand(i, s) for s in style_clip]) for i in image_clip],
        "subject_dino": [np.mean([cosine_by_hand(i, s) for s in subject_dino]) for i in image_dino],
        "subject_clip": [np.mean([cosine_by_hand(i, s) for s in subject_clip]) for i in image_clip],
        "text_clip": [cosine_by_hand(i, t) for i, t in zip(image_clip, text_clip, strict=True)],
    }
    for name, values in expected.items():
        got, want = (torch.tensor(v, dtype=torch.float64) for v in (scores[name], values))
        assert torch.allclose(got, want, atol=1e-6), name


def test_identical_image_scores_one(scorer):
    image, other = random_images(2, seed=5)
    refs = scorer.embed_refs([image, image])
    scores = scorer.score([image, other], ["a dog", "a dog"], subject=refs, style=refs)
    for name in ("style_clip", "subject_dino", "subject_clip"):
        assert scores[name][0] == pytest.approx(1.0, abs=1e-6)
        assert scores[name][1] < 1 - 1e-4


def test_scores_are_symmetric(scorer):
    a, b = random_images(2, seed=6)
    refs_a, refs_b = scorer.embed_refs([a]), scorer.embed_refs([b])
    a_to_b = scorer.score([a], ["a dog"], subject=refs_b, style=refs_b)
    b_to_a = scorer.score([b], ["a dog"], subject=refs_a, style=refs_a)
    for name in ("style_clip", "subject_dino", "subject_clip"):
        assert a_to_b[name] == pytest.approx(b_to_a[name], abs=1e-6)
    swapped = scorer.score([a], ["a dog"], subject=refs_b, style=refs_a)
    assert swapped["subject_clip"] == a_to_b["style_clip"]
    assert swapped["style_clip"][0] == pytest.approx(1.0, abs=1e-6)


def test_refs_are_reused(scorer):
    refs = scorer.embed_refs(random_images(3, seed=7))
    assert isinstance(refs, Refs) and refs.clip.shape == (3, 16) and refs.dino.shape == (3, 32)
    images = random_images(4, seed=8)
    whole = scorer.score(images, PROMPTS[:4], subject=refs, style=refs)
    parts = [
        scorer.score([image], [prompt], subject=refs, style=refs)
        for image, prompt in zip(images, PROMPTS[:4], strict=True)
    ]
    for name, values in whole.items():
        assert values == pytest.approx([part[name][0] for part in parts], abs=1e-6)


def test_score_rejects_mismatched_prompts(scorer):
    refs = scorer.embed_refs(random_images(1, seed=9))
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer.score(random_images(2, seed=9), ["a dog"], subject=refs, style=refs)


def test_clip_option_must_be_a_clip_model(dino_dir):
    with pytest.raises(ImageEmbedderError, match="not a CLIP model"):
        ClipEmbedder(dino_dir)
    with pytest.raises(ImageEmbedderError, match="cannot load the image model"):
        ClipEmbedder("estlora-test/no-such-clip")


def test_batch_size_must_be_positive(clip_dir):
    with pytest.raises(ValueError, match="batch_size"):
        ClipEmbedder(clip_dir, batch_size=0)


def test_device_argument(clip_dir, dino_dir):
    scorer = Scorer(clip_model=clip_dir, dino_model=dino_dir, device=torch.device("cpu"))
    assert scorer.clip.device == scorer.dino.device == torch.device("cpu")
    assert next(scorer.clip.model.parameters()).device.type == "cpu"
    assert next(scorer.clip.model.parameters()).dtype == torch.float32


@pytest.mark.parametrize(
    ("prompt", "replacements", "expected"),
    [
        ("a sks dog in szn style", {"sks": "dog", "szn": "watercolor"}, "a dog in watercolor style"),
        ("a photo of sks", {"sks": "dog"}, "a photo of dog"),
        ("a dog sks", {"sks": "dog"}, "a dog"),
        ("a sksdog and sks_x near sks", {"sks": "cat"}, "a sksdog and sks_x near cat"),
        ("a <sks> toy, szn painting", {"<sks>": "toy", "szn": "oil painting"}, "a toy, oil painting"),
        ("a hotdog sks dog", {"sks": "dog"}, "a hotdog dog"),
        ("a  sks   dog ", {"sks": ""}, "a dog"),
        ("a very very big dog", {"sks": "dog"}, "a very very big dog"),
        ("a sks szn", {"sks": "szn", "szn": "x"}, "a szn x"),
        ("no triggers  here", {}, "no triggers here"),
    ],
)
def test_neutral_prompt(prompt, replacements, expected):
    assert neutral_prompt(prompt, replacements) == expected


def test_load_reference_folder_sorted_by_name(tmp_path):
    colours = {"b.jpg": (0, 255, 0), "c.webp": (0, 0, 255), "a.png": (255, 0, 0)}
    for name, colour in colours.items():
        Image.new("RGB", (8, 8), colour).save(tmp_path / name, quality=100, lossless=True)
    Image.new("L", (8, 8), 128).save(tmp_path / "d.PNG")  # grey and upper case: still read, as RGB
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "nested").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "nested" / "0.png")  # not recursive
    images = load_reference_images(tmp_path)
    assert [image.mode for image in images] == ["RGB"] * 4
    pixels = np.array([image.getpixel((4, 4)) for image in images])
    assert np.abs(pixels - [(255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128)]).max() <= 2  # JPEG is lossy


def test_load_single_reference_file(tmp_path):
    Image.new("RGBA", (10, 6), (1, 2, 3, 4)).save(tmp_path / "style.png")
    [image] = load_reference_images(str(tmp_path / "style.png"))
    assert image.mode == "RGB" and image.size == (10, 6) and image.getpixel((0, 0)) == (1, 2, 3)


def test_reference_errors(tmp_path):
    with pytest.raises(EstloraError, match="no such reference image or folder") as caught:
        load_reference_images(tmp_path / "missing")
    assert caught.value.path == str(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(EstloraError, match="no reference images") as caught:
        load_reference_images(tmp_path / "empty")
    assert caught.value.path == str(tmp_path / "empty")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(EstloraError, match="cannot read the reference image") as caught:
        load_reference_images(tmp_path / "broken.png")
    assert "\n" not in str(caught.value)


def test_builtin_tiny_clip_written_once(clip_dir):
    folder = builtin_tiny_clip()
    assert folder.name == "tiny-clip-v1"
    weights = folder / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert builtin_tiny_clip() == folder
    assert weights.stat().st_mtime_ns == mtime
    assert (folder / "model.safetensors").read_bytes() == (clip_dir / "model.safetensors").read_bytes()
