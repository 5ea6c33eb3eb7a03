"""`estlora inspect`: the summary a user reads and the JSON a script reads."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from estlora.cli import main


def sdxl_kohya_file(path):
    """A small kohya file with real SDXL widths: 3 attention projections, a text-encoder and a conv key."""
    modules = {  # kohya name -> (out, in)
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (640, 640),
        "lora_unet_input_blocks_7_1_transformer_blocks_3_attn2_to_k": (1280, 2048),
        "lora_unet_output_blocks_0_1_transformer_blocks_9_attn2_to_out_0": (1280, 1280),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
    }
    state = {}
    for name, (out, inp) in modules.items():
        state[f"{name}.lora_down.weight"] = torch.ones(8, inp, dtype=torch.float16)
        state[f"{name}.lora_up.weight"] = torch.ones(out, 8, dtype=torch.float16)
        state[f"{name}.alpha"] = torch.tensor(4.0)
    state["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"] = torch.ones(8, 320, 3, 3)
    state["lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight"] = torch.ones(320, 8, 1, 1)
    save_file(state, str(path))
    return path


def test_summary(tmp_path, capsys):
    path = sdxl_kohya_file(tmp_path / "style.safetensors")
    assert main(["inspect", str(path), "--base", "stabilityai/stable-diffusion-xl-base-1.0"]) == 0
    out = capsys.readouterr().out
    assert "layout:      kohya" in out
    assert "base model:  SDXL" in out
    assert "attention projections: 3" in out
    assert "ranks:       8 (3)" in out
    assert "alphas:      4 (3)" in out
    assert "scales:      0.5 (3)" in out
    assert "5 tensors kept" in out and "text encoder 1 (1)" in out and "UNet conv/resnet/projection (1)" in out
    assert "fits base" in out


def test_json(tmp_path, capsys):
    path = sdxl_kohya_file(tmp_path / "style.safetensors")
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layout"] == "kohya"
    assert report["family"] == "SDXL"
    assert report["attention_projections"] == 3
    assert report["ranks"] == {"8": 3}
    assert report["other_modules"] == {"UNet conv/resnet/projection": 1, "text encoder 1": 1}
    to_k = report["projections"]["down_blocks.2.attentions.0.transformer_blocks.3.attn2.to_k"]
    assert to_k == {"rank": 8, "alpha": 4.0, "scale": 0.5, "in": 2048, "out": 1280}


def test_builtin_example(capsys):
    assert main(["inspect", "example:style"]) == 0
    out = capsys.readouterr().out
    assert "attention projections: 560" in out
    assert "layout:      diffusers-peft" in out
