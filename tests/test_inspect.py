"""`estlora inspect`: the summary a user reads and the JSON a script reads."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from estlora.cli import main


def sdxl_kohya_file(path, metadata=None):
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
    save_file(state, str(path), metadata)
    return path


def test_summary(tmp_path, capsys):
    path = sdxl_kohya_file(tmp_path / "style.safetensors")
    assert main(["inspect", str(path), "--base", "stabilityai/stable-diffusion-xl-base-1.0"]) == 0
    out = capsys.readouterr().out
    assert "layout:      kohya" in out
    assert "base model:  SDXL (guessed from shapes; model family SDXL)" in out
    assert "attention projections: 3" in out
    assert "per route:   attention 3, blocks 3 (default attention)" in out
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
    assert (report["family"], report["base_model"]) == ("sdxl", "SDXL")
    assert report["attention_projections"] == 3 and report["routes"] == {"attention": 3, "blocks": 3}
    assert report["ranks"] == {"8": 3}
    assert report["other_modules"] == {"UNet conv/resnet/projection": 1, "text encoder 1": 1}
    to_k = report["projections"]["down_blocks.2.attentions.0.transformer_blocks.3.attn2.to_k"]
    assert to_k == {"kind": "lora", "rank": 8, "alpha": 4.0, "scale": 0.5, "in": 2048, "out": 1280}
    assert report["kinds"] == {"lora": 3} and report["units"] == {}


def test_builtin_example(capsys):
    assert main(["inspect", "example:style"]) == 0
    out = capsys.readouterr().out
    assert "attention projections: 560" in out
    assert "layout:      diffusers-peft" in out


KOHYA_METADATA = {
    "ss_output_name": "my_dog_v2",
    "ss_sd_model_name": "sd_xl_base_1.0.safetensors",
    "ss_base_model_version": "sdxl_base_v1-0",
    "ss_tag_frequency": json.dumps({"20_sks dog": {"sks dog": 20, "grass": 3}, "5_dog": {"dog": 5, "grass": 2}}),
}


def test_training_info_from_kohya_and_modelspec_metadata():
    from estlora.loading.inspect import training_info

    assert training_info(KOHYA_METADATA) == {
        "title": "my_dog_v2",
        "trained_on": "sd_xl_base_1.0.safetensors",
        "architecture": "sdxl_base_v1-0",
        "top_tags": "sks dog (20), dog (5), grass (5)",  # counts summed over datasets, ties by name
    }
    modelspec = {"modelspec.title": "My Dog", "modelspec.trigger_phrase": "sks dog", "ss_tag_frequency": "{oops"}
    assert training_info({**KOHYA_METADATA, **modelspec}) == {
        "title": "My Dog",
        "trained_on": "sd_xl_base_1.0.safetensors",
        "architecture": "sdxl_base_v1-0",
        "trigger": "sks dog",
    }
    assert training_info({}) == {} and training_info({"lora_adapter_metadata": "{}"}) == {}


def test_summary_and_json_say_what_the_trainer_wrote(tmp_path, capsys):
    path = sdxl_kohya_file(tmp_path / "dog.safetensors", KOHYA_METADATA)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "title:       my_dog_v2\n" in out and "trained on:  sd_xl_base_1.0.safetensors\n" in out
    assert "made for:    sdxl_base_v1-0\n" in out and "top tags:    sks dog (20), dog (5), grass (5)\n" in out
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["training"]["title"] == "my_dog_v2"


def test_inspect_counts_what_each_route_routes(tmp_path, capsys):
    """A kohya file's feed-forward and proj_in count for route blocks; route attention leaves them to
    --other-weights, so they are not among the other keys either way."""
    from safetensors.torch import load_file

    path = sdxl_kohya_file(tmp_path / "style.safetensors")
    state = load_file(str(path))
    for name, (out, inp) in {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_2": (640, 2560),
        "lora_unet_input_blocks_4_1_proj_in": (640, 640),
    }.items():
        state |= {f"{name}.lora_down.weight": torch.ones(8, inp), f"{name}.lora_up.weight": torch.ones(out, 8)}
    save_file(state, str(path))
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["routes"] == {"attention": 3, "blocks": 5} and report["other_tensors"] == 5
    assert "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2" in report["projections"]
    assert main(["inspect", str(path), "--base", "stabilityai/stable-diffusion-xl-base-1.0"]) == 0
    assert "per route:   attention 3, blocks 5 (default attention)" in capsys.readouterr().out
