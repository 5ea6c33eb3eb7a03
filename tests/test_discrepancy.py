"""The style-discrepancy score beta, on a tiny seeded DINO built in code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from estlora.discrepancy import (
    DEFAULT_DINO,
    DinoEmbedder,
    ImageEmbedderError,
    cached_beta,
    store_beta,
    style_discrepancy,
)
from estlora.errors import EstloraError
from estlora.testing.tiny_encoders import builtin_tiny_dino, write_tiny_dino


@pytest.fixture(scope="module")
def embedder(dino_dir):
    return DinoEmbedder(dino_dir)


def random_images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(n)]


def test_tiny_dino_loads_with_auto_classes(dino_dir, embedder):
    from transformers import AutoImageProcessor, AutoModel, ViTModel

    model = AutoModel.from_pretrained(dino_dir)
    processor = AutoImageProcessor.from_pretrained(dino_dir)
    assert isinstance(model, ViTModel)
    assert processor.size == {"height": 32, "width": 32}
    assert processor.do_normalize and processor.do_rescale
    assert (dino_dir / "model.safetensors").is_file()
    assert embedder.embed(random_images(1, 0)).shape == (1, 32)


def test_tiny_dino_is_seeded(tmp_path, dino_dir):
    same = load_file(write_tiny_dino(tmp_path / "same") / "model.safetensors")
    other = load_file(write_tiny_dino(tmp_path / "other", seed=1) / "model.safetensors")
    reference = load_file(dino_dir / "model.safetensors")
    assert same.keys() == reference.keys() == other.keys()
    assert all(torch.equal(same[name], reference[name]) for name in reference)
    assert not all(torch.equal(other[name], reference[name]) for name in reference)


def test_write_refuses_non_empty_folder(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(FileExistsError):
        write_tiny_dino(tmp_path / "taken")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no staging folder left behind


def test_embed_is_the_cls_token(dino_dir, embedder):
    from transformers import AutoImageProcessor, AutoModel

    images = random_images(3, seed=1)
    model = AutoModel.from_pretrained(dino_dir).eval()
    processor = AutoImageProcessor.from_pretrained(dino_dir)
    with torch.inference_mode():
        direct = model(**processor(images, return_tensors="pt")).last_hidden_state[:, 0]
    embedded = embedder.embed(images)
    assert embedded.dtype == torch.float32 and embedded.device.type == "cpu"
    assert torch.equal(embedded, direct)
    singles = torch.cat([embedder.embed([image]) for image in images])
    torch.testing.assert_close(embedded, singles, rtol=0, atol=1e-6)


def test_loading_is_cached(dino_dir, embedder):
    again = DinoEmbedder(str(dino_dir), device=torch.device("cpu"))
    assert again.model is embedder.model and again.processor is embedder.processor


def test_style_discrepancy(embedder):
    image, other = random_images(2, seed=2)
    assert style_discrepancy(image, image, embedder) == pytest.approx(0, abs=1e-6)
    beta = style_discrepancy(image, other, embedder)
    assert style_discrepancy(other, image, embedder) == pytest.approx(beta, abs=1e-6)
    a, b = embedder.embed([image, other]).double()
    assert beta == pytest.approx(float(1 - torch.nn.functional.cosine_similarity(a, b, dim=0)), abs=1e-9)
    black = Image.new("RGB", (48, 48))
    white = Image.new("RGB", (48, 48), (255, 255, 255))
    assert style_discrepancy(black, white, embedder) > 0.01


def test_missing_model_offline():
    model_id = "estlora-test/no-such-model"
    with pytest.raises(ImageEmbedderError) as caught:
        DinoEmbedder(model_id)
    message = str(caught.value)
    assert message.startswith(f"{model_id}: cannot load the image model (")
    assert message.endswith("; give a local folder")
    assert "\n" not in message
    assert isinstance(caught.value, EstloraError)


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ImageEmbedderError, match=str(tmp_path)) as caught:
        DinoEmbedder(tmp_path)
    assert "\n" not in str(caught.value)


def test_beta_cache_round_trip():
    key = {"base": "tiny", "loras": ["a" * 64, "b" * 64], "prompt": "a sks dog", "seed": 0, "steps": 2}
    assert cached_beta(key) is None
    store_beta(key, 0.25, {"embedder": DEFAULT_DINO})
    assert cached_beta(key) == 0.25
    assert cached_beta({**key, "seed": 1}) is None


def test_builtin_tiny_dino_written_once():
    folder = builtin_tiny_dino()
    weights = folder / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert builtin_tiny_dino() == folder
    assert weights.stat().st_mtime_ns == mtime
    assert DinoEmbedder(folder).embed(random_images(2, seed=3)).shape == (2, 32)
