"""The built-in tiny SDXL: SDXL's real block layout, loadable by diffusers, seeded."""

from __future__ import annotations

import hashlib

import pytest
import torch

from conftest import attention_shapes
from estlora.cli import main
from estlora.families.sdxl import SDXL_UNET_CONFIG, unet_config
from estlora.testing.tiny_sdxl import write_tiny_sdxl


def folder_digest(folder):
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_same_module_paths_as_real_sdxl(tiny_dir):
    tiny = attention_shapes(unet_config(str(tiny_dir)))
    sdxl = attention_shapes(SDXL_UNET_CONFIG)
    assert len(tiny) == 560
    assert set(tiny) == set(sdxl)
    blocks = attention_shapes(unet_config(str(tiny_dir)), "blocks")  # + 11 proj_in/out pairs, 70 feed-forwards
    assert len(blocks) == 560 + 2 * 11 + 2 * 70 and set(blocks) == set(attention_shapes(SDXL_UNET_CONFIG, "blocks"))
    attention_modules = {
        name.rsplit(".", 2)[0] if name.endswith("to_out.0") else name.rsplit(".", 1)[0] for name in tiny
    }
    assert len(attention_modules) == 140


def test_real_sdxl_shapes():
    sdxl = attention_shapes(SDXL_UNET_CONFIG, "blocks")
    assert sdxl["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == (640, 640)
    assert sdxl["down_blocks.1.attentions.0.proj_in"] == (640, 640)
    assert sdxl["mid_block.attentions.0.transformer_blocks.9.ff.net.0.proj"] == (2 * 4 * 1280, 1280)  # GEGLU
    assert sdxl["up_blocks.0.attentions.2.transformer_blocks.9.ff.net.2"] == (1280, 4 * 1280)
    assert sdxl["down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k"] == (1280, 2048)
    assert sdxl["mid_block.attentions.0.transformer_blocks.0.attn2.to_v"] == (1280, 2048)
    assert sdxl["up_blocks.1.attentions.2.transformer_blocks.1.attn1.to_out.0"] == (640, 640)


def test_loads_with_diffusers_and_generates(tiny_dir):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        "a photo of a sks dog",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (1, 64, 64, 3)
    assert torch.isfinite(torch.from_numpy(images)).all()


def test_seeded_same_bytes(tmp_path, tiny_dir):
    again = write_tiny_sdxl(tmp_path / "again")
    assert folder_digest(again) == folder_digest(tiny_dir)
    other = write_tiny_sdxl(tmp_path / "other", seed=1)
    assert folder_digest(other) != folder_digest(tiny_dir)


def test_refuses_non_empty_folder(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    assert main(["tiny-model", str(tmp_path / "x")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_cli_writes_folder(tmp_path, capsys):
    assert main(["tiny-model", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model_index.json").is_file()
    assert (tmp_path / "m" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(tmp_path.glob(".m.*")), "staging folder left behind"


@pytest.mark.parametrize("name", ["subject", "style"])
def test_example_loras_fit_the_tiny_model(tiny_dir, name):
    from estlora.loading.lora import load_lora

    lora = load_lora(f"example:{name}", base_shapes=attention_shapes(unet_config(str(tiny_dir))))
    assert len(lora.projections) == 560
    assert lora.layout == "diffusers-peft"
    expected_rank, expected_alpha = {"subject": (4, 4.0), "style": (8, 4.0)}[name]
    assert set(lora.ranks) == {expected_rank}
    assert {f.scale for f in lora.projections.values()} == {expected_alpha / expected_rank}


def test_example_loras_are_byte_identical_when_rewritten(tmp_path):
    from estlora.testing.examples import write_example_lora

    for name in ("subject", "style"):
        first = write_example_lora(name, tmp_path / "a").read_bytes()
        assert write_example_lora(name, tmp_path / "b").read_bytes() == first  # the sha256 keys caches
