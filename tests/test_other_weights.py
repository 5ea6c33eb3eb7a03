"""LoRA weights outside the routed linears (feed-forward, conv, text encoders): ignore or merge.

With `other_weights="merge"` a one-LoRA method must give exactly what a plain diffusers run with
that whole file gives (bit for bit, tiny SDXL, fp32, CPU), whichever route routes the rest; with
"ignore" (the reference, default), exactly what diffusers gives for the file's attention
projections alone.
"""

from __future__ import annotations

import json
import re
import shlex

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file

import estlora
from estlora.errors import LoraFormatError
from estlora.loading.lora import load_lora
from test_lora_formats import attention, beside_attention, comfy_name, kohya_name
from test_routing import load_pipe, run

# kohya's names (SGM blocks) for non-attention modules, and the diffusers module each one is.
KOHYA_OTHER = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_0_proj": "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "lora_unet_output_blocks_3_1_transformer_blocks_1_ff_net_2": "up_blocks.1.attentions.0.transformer_blocks.1.ff.net.2",
    "lora_unet_input_blocks_4_1_proj_in": "down_blocks.1.attentions.0.proj_in",
    "lora_unet_input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
} | {  # kohya trains every linear layer of a text encoder (diffusers' converter needs out_proj among them)
    f"lora_te{i}_text_model_encoder_layers_0_{kohya}": f"{component}:{stem}encoder.layers.0.{module}"
    for i, component, stem in ((1, "text_encoder", ""), (2, "text_encoder_2", "text_model."))
    for kohya, module in (
        ("self_attn_q_proj", "self_attn.q_proj"),
        ("self_attn_k_proj", "self_attn.k_proj"),
        ("self_attn_v_proj", "self_attn.v_proj"),
        ("self_attn_out_proj", "self_attn.out_proj"),
        ("mlp_fc1", "mlp.fc1"),
        ("mlp_fc2", "mlp.fc2"),
    )
}


# ComfyUI's names for the UNet modules of KOHYA_OTHER (its files keep kohya's text-encoder names).
COMFY_OTHER = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_0_proj": "diffusion_model.input_blocks.4.1.transformer_blocks.0.ff.net.0.proj",
    "lora_unet_output_blocks_3_1_transformer_blocks_1_ff_net_2": "diffusion_model.output_blocks.3.1.transformer_blocks.1.ff.net.2",
    "lora_unet_input_blocks_4_1_proj_in": "diffusion_model.input_blocks.4.1.proj_in",
    "lora_unet_input_blocks_1_0_in_layers_2": "diffusion_model.input_blocks.1.0.in_layers.2",
}


def module_at(pipe, where: str):
    component, _, path = where.rpartition(":")
    return getattr(pipe, component or "unet").get_submodule(path)


def factors(module, rank: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A LoRA pair for a linear or conv module, as kohya stores it (LoCon for a conv)."""
    if isinstance(module, torch.nn.Conv2d):
        down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=generator) * 0.1
        up = torch.randn(module.out_channels, rank, 1, 1, generator=generator) * 0.1
    else:
        down = torch.randn(rank, module.in_features, generator=generator) * 0.1
        up = torch.randn(module.out_features, rank, generator=generator) * 0.1
    return down, up


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return load_pipe(tiny_dir)


@pytest.fixture(scope="module")
def kohya_path(tmp_path_factory, pipe, tiny_shapes):
    """A kohya file: every attention projection, plus feed-forward, proj_in, a conv and both text encoders.

    One alpha for all (diffusers 0.42 applies the most common kohya alpha everywhere, see test_lora_formats).
    """
    generator = torch.Generator().manual_seed(7)
    state = {}
    modules = {kohya_name(m, sgm=True): m for m in tiny_shapes} | KOHYA_OTHER
    for name, where in modules.items():
        down, up = factors(module_at(pipe, where), 4, generator)
        state |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(8.0)}
    path = tmp_path_factory.mktemp("loras") / "kohya.safetensors"
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def comfy_path(kohya_path, tiny_shapes):
    """The kohya file with its UNet keys spelt as ComfyUI spells them."""
    from safetensors.torch import load_file

    names = {kohya_name(m, sgm=True): comfy_name(m) for m in tiny_shapes} | COMFY_OTHER
    state = {}
    for key, value in load_file(str(kohya_path)).items():
        module, _, part = key.partition(".")
        state[f"{names.get(module, module)}.{part}"] = value
    path = kohya_path.with_name("comfy.safetensors")
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def peft_path(tmp_path_factory, pipe, tiny_shapes):
    """A diffusers file as `save_lora_weights` writes it with text-encoder training: metadata holds the alphas."""
    generator = torch.Generator().manual_seed(8)
    state = {}
    targets_ff = "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"
    targets = {f"unet.{m}": m for m in tiny_shapes} | {
        f"unet.{targets_ff}": targets_ff,
        "text_encoder.encoder.layers.0.self_attn.k_proj": "text_encoder:encoder.layers.0.self_attn.k_proj",
    }
    for prefix, where in targets.items():
        down, up = factors(module_at(pipe, where), 4, generator)
        state |= {f"{prefix}.lora_A.weight": down, f"{prefix}.lora_B.weight": up}
    config = {
        "unet.r": 4,
        "unet.lora_alpha": 6.0,
        "unet.target_modules": ["to_q", "to_k", "to_v", "to_out.0", targets_ff],
        "text_encoder.r": 4,
        "text_encoder.lora_alpha": 2.0,
        "text_encoder.target_modules": ["k_proj"],
    }
    path = tmp_path_factory.mktemp("loras") / "pytorch_lora_weights.safetensors"
    save_file(state, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    return path


def plain_diffusers(pipe, path, **kwargs):
    pipe.load_lora_weights(str(path), adapter_name="plain")
    try:
        return run(pipe, **kwargs)
    finally:
        pipe.unload_lora_weights()


@pytest.mark.parametrize("which", ["kohya_path", "peft_path", "comfy_path"])
def test_one_lora_with_merge_equals_a_plain_diffusers_run(pipe, tiny_dir, kohya_path, request, which):
    """diffusers cannot read ComfyUI's layout: its reference is the same LoRA in kohya's."""
    path = request.getfixturevalue(which)
    lora = load_lora(path)
    assert lora.unrouted(attention(lora)), "the file has weights outside the attention projections"
    assert lora.layout == {"kohya_path": "kohya", "peft_path": "diffusers-peft", "comfy_path": "comfyui"}[which]
    expected = plain_diffusers(load_pipe(tiny_dir), kohya_path if which == "comfy_path" else path)
    with estlora.fuse(pipe, lora, load_lora("example:style"), method="subject", other_weights="merge"):
        got = run(pipe)
    assert torch.equal(got, expected)
    with estlora.fuse(pipe, load_lora("example:subject"), lora, method="style") as fusion:
        fusion.set(other_weights="merge")  # loaded on first use, under the routing already in place
        assert torch.equal(run(pipe), expected)
    with estlora.fuse(pipe, lora, "example:style", method="subject", other_weights="merge", route="blocks") as fusion:
        assert fusion.routed > attention(lora)  # its feed-forward and proj_in are routed, not merged
        assert torch.equal(run(pipe), expected)


def test_ignore_equals_diffusers_on_the_attention_projections_alone(pipe, tiny_dir, kohya_path, tmp_path):
    from safetensors.torch import load_file

    attention_only = {
        k: v for k, v in load_file(str(kohya_path)).items() if k.startswith("lora_unet_") and "_attn" in k
    }
    save_file(attention_only, str(tmp_path / "attention.safetensors"))
    expected = plain_diffusers(load_pipe(tiny_dir), tmp_path / "attention.safetensors")
    with estlora.fuse(pipe, kohya_path, "example:style", method="subject") as fusion:
        assert fusion.config.other_weights == "ignore"
        assert not any(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())
        assert torch.equal(run(pipe), expected)


def layer_state(pipe, where: str):
    layer = module_at(pipe, where)
    return list(layer.active_adapters), {k: round(v, 9) for k, v in layer.scaling.items()}


def requires_grad(pipe) -> list[bool]:
    return [p.requires_grad for part in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2) for p in part.parameters()]


@pytest.mark.parametrize("load_later", [False, True], ids=["merge-from-the-start", "merge-set-later"])
def test_strengths_follow_the_method_and_remove_restores(pipe, kohya_path, peft_path, load_later):
    untouched, flags = run(pipe), requires_grad(pipe)
    ff = KOHYA_OTHER["lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_0_proj"]
    policy = "ignore" if load_later else "merge"
    fusion = estlora.fuse(
        pipe, kohya_path, peft_path, method="est", beta=0.5, other_weights=policy, subject_scale=0.5, style_scale=0.8
    )
    fusion.set(other_weights="merge")
    (subject,), (style,) = fusion.static.names["subject"], fusion.static.names["style"]
    assert layer_state(pipe, ff) == ([subject, style], {subject: 0.5 * 8 / 4})  # the style file has no such layer
    te_k = "text_encoder:encoder.layers.0.self_attn.k_proj"
    assert layer_state(pipe, te_k) == ([subject, style], {subject: 0.5 * 8 / 4, style: 0.8 * 2 / 4})
    with fusion.using(method="style"):
        assert layer_state(pipe, ff)[0] == [style]  # the subject's part is inactive: not computed at all
    assert layer_state(pipe, ff)[0] == [subject, style]
    fusion.set(other_weights="ignore")
    assert layer_state(pipe, ff)[0] == []
    fusion.remove()
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.text_encoder.modules())
    assert requires_grad(pipe) == flags and any(flags)
    assert torch.equal(run(pipe), untouched)


def test_the_users_own_adapters_stay_as_they_were(tiny_dir, kohya_path):
    pipe = load_pipe(tiny_dir)
    pipe.load_lora_weights(str(load_lora("example:subject").path), adapter_name="mine")
    pipe.set_adapters(["mine"], [0.3])
    q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.base_layer"
    ff = KOHYA_OTHER["lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_0_proj"]
    before, flags = run(pipe), requires_grad(pipe)
    mine = layer_state(pipe, q[: -len(".base_layer")])
    with estlora.fuse(pipe, kohya_path, "example:style", method="subject", other_weights="merge") as fusion:
        (name,) = fusion.static.names["subject"]
        assert layer_state(pipe, ff)[0] == ["mine", name]
    assert pipe.get_list_adapters() == {"unet": ["mine"]}
    assert layer_state(pipe, q[: -len(".base_layer")]) == mine
    assert requires_grad(pipe) == flags
    assert torch.equal(run(pipe), before)


def test_weights_diffusers_cannot_load_are_one_clear_error(pipe, kohya_path, tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(kohya_path))
    conv = state["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"]
    state["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"] = torch.zeros(4, 3, *conv.shape[2:])  # wrong width
    save_file(state, str(tmp_path / "bad.safetensors"))
    untouched = run(pipe)
    with pytest.raises(LoraFormatError) as error:
        estlora.fuse(pipe, tmp_path / "bad.safetensors", "example:style", other_weights="merge")
    message = str(error.value)
    assert "\n" not in message
    assert re.match(r".*bad\.safetensors: diffusers could not load its weights outside the routed linears", message)
    assert "size mismatch for down_blocks.0.resnets.0.conv1" in message
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())
    assert torch.equal(run(pipe), untouched)
    # A routable linear of the wrong width (any route may route it) is refused before diffusers sees it.
    state = load_file(str(kohya_path))
    state["lora_unet_input_blocks_4_1_proj_in.lora_down.weight"] = torch.zeros(4, 3)
    save_file(state, str(tmp_path / "bad-proj.safetensors"))
    with pytest.raises(estlora.errors.BaseModelMismatchError, match="proj_in is 3->64 in the LoRA but 64->64"):
        estlora.fuse(pipe, tmp_path / "bad-proj.safetensors", "example:style", other_weights="merge")
    assert torch.equal(run(pipe), untouched)


def test_cli_says_which_policy_applies_and_records_it(tiny_dir, kohya_path, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from estlora.cli import main
    from test_generate import gen_args

    def generate(out, *extra):
        args = gen_args(tiny_dir, out, "--beta", "0.6", *extra)
        assert main([a if a != "example:subject" else str(kohya_path) for a in args]) == 0
        (png,) = out.glob("*.png")
        return np.asarray(Image.open(png)), json.loads(png.with_suffix(".json").read_text())

    ignored, _ = generate(tmp_path / "ignore")
    assert "subject LoRA: 48 tensors outside the routed linears" in capsys.readouterr().out
    merged, meta = generate(tmp_path / "merge", "--other-weights", "merge")
    said = capsys.readouterr().out
    assert re.search(
        r"subject LoRA: 48 tensors outside the routed linears \(UNet conv/resnet/projection, "
        r"UNet feed-forward, text encoder 1, text encoder 2\): merged statically at strength 1\n",
        said,
    )
    assert "style LoRA" not in said  # the example style LoRA has attention projections only
    assert not np.array_equal(ignored, merged)
    assert meta["settings"]["other_weights"] == "merge" and "--other-weights merge" in meta["command"]
    assert main(shlex.split(meta["command"])[1:] + ["--out", str(tmp_path / "again")]) == 0
    (again,) = (tmp_path / "again").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(again)), merged)


def test_locon_on_every_unet_layer_equals_diffusers(pipe, tiny_dir, tmp_path):
    """A LyCORIS LoCon "full" file: a kohya LoRA on every linear and conv layer of the UNet (resnets,
    samplers, conv_in/out, time and label embeddings, proj_in/out, feed-forward), SGM names."""
    from sgm_checkpoint import unet_to_sgm

    sgm_names = {}  # diffusers module -> kohya's name, matched through the tensors unet_to_sgm renames
    by_tensor = {value.data_ptr(): key for key, value in pipe.unet.state_dict().items()}
    for key, value in unet_to_sgm(pipe.unet).items():
        module = by_tensor[value.data_ptr()].removesuffix(".weight")
        sgm_names[module] = "lora_unet_" + key.removeprefix("model.diffusion_model.").removesuffix(".weight")
    generator = torch.Generator().manual_seed(9)
    state = {}
    for module_name, module in pipe.unet.named_modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            name = sgm_names[module_name].replace(".", "_")
            down, up = factors(module, 2, generator)
            state |= {
                f"{name}.lora_down.weight": down,
                f"{name}.lora_up.weight": up,
                f"{name}.alpha": torch.tensor(2.0),
            }
    path = tmp_path / "locon.safetensors"
    save_file(state, str(path))
    lora = load_lora(path)
    assert len(attention(lora)) == 560 and len(lora.projections) == 560 + 140 + 22  # + feed-forward, proj_in/out
    assert sum(beside_attention(lora).values()) == len(state) // 3 - 560
    assert beside_attention(lora) == {
        "UNet feed-forward": 140,
        "UNet conv/resnet/projection": 89,
        "UNet time/size embedding": 4,
    }
    expected = plain_diffusers(load_pipe(tiny_dir), path)
    with estlora.fuse(pipe, lora, load_lora("example:style"), method="subject", other_weights="merge") as fusion:
        merged = run(pipe)
        fusion.set(route="blocks")  # feed-forward and proj_in/out routed now, the rest still merged
        assert len(fusion.layers) == 722
        blocks = run(pipe)
        fusion.set(other_weights="ignore")
        ignored = run(pipe)
    assert torch.equal(merged, expected) and torch.equal(blocks, expected) and not torch.equal(ignored, expected)


def test_lycoris_library_file_with_merge_equals_its_kohya_twin(pipe, tiny_dir, tiny_shapes, tmp_path):
    """diffusers cannot read the LyCORIS library's `lycoris_` names; the same LoRA under kohya's
    `lora_unet_` prefix (diffusers' module names) is the reference."""
    generator = torch.Generator().manual_seed(10)
    state = {}
    other = "down_blocks.1.attentions.0.proj_in"
    for module in [*tiny_shapes, other]:
        name = kohya_name(module, sgm=False)
        down, up = factors(module_at(pipe, module), 2, generator)
        state |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(1.0)}
    save_file(state, str(tmp_path / "kohya.safetensors"))
    lycoris = {k.replace("lora_unet_", "lycoris_", 1): v for k, v in state.items()}
    save_file(lycoris, str(tmp_path / "lycoris.safetensors"))
    expected = plain_diffusers(load_pipe(tiny_dir), tmp_path / "kohya.safetensors")
    lora = load_lora(tmp_path / "lycoris.safetensors")
    assert lora.layout == "lycoris" and beside_attention(lora) == {"UNet conv/resnet/projection": 1}
    with estlora.fuse(pipe, lora, load_lora("example:style"), method="subject", other_weights="merge"):
        assert torch.equal(run(pipe), expected)
