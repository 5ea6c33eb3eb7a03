"""Golden tests: one known LoRA written in every layout found in the wild loads to the same factors.

The writers below spell each layout's keys by hand (they are the golden part: key names as the
real trainers write them), independently of the loader. Where diffusers can load the layout, the
factors and scales are also compared with what diffusers' own loader puts into the UNet.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from estlora.families import family_named
from estlora.files.safetensors import read_safetensors
from estlora.loading.lora import load_lora

SDXL = family_named("sdxl")

# SDXL's SGM (kohya / original Stability) block names for the diffusers attention blocks.
SGM_BLOCKS = {
    "down_blocks.1.attentions.0": "input_blocks_4_1",
    "down_blocks.1.attentions.1": "input_blocks_5_1",
    "down_blocks.2.attentions.0": "input_blocks_7_1",
    "down_blocks.2.attentions.1": "input_blocks_8_1",
    "mid_block.attentions.0": "middle_block_1",
    "up_blocks.0.attentions.0": "output_blocks_0_1",
    "up_blocks.0.attentions.1": "output_blocks_1_1",
    "up_blocks.0.attentions.2": "output_blocks_2_1",
    "up_blocks.1.attentions.0": "output_blocks_3_1",
    "up_blocks.1.attentions.1": "output_blocks_4_1",
    "up_blocks.1.attentions.2": "output_blocks_5_1",
}


@pytest.fixture(scope="module")
def truth(tiny_shapes):
    """module -> (down, up, alpha): ranks 2..4 and alphas that differ from the rank."""
    generator = torch.Generator().manual_seed(123)
    out = {}
    for i, (module, (o, n)) in enumerate(sorted(tiny_shapes.items())):
        rank = 2 + i % 3
        alpha = float(rank * (1 + i % 2)) if i % 7 else 3.0
        out[module] = (torch.randn(rank, n, generator=generator), torch.randn(o, rank, generator=generator), alpha)
    return out


def attention(lora) -> set[str]:
    """The projections route `attention` covers (the default on SDXL)."""
    return {m for m in lora.projections if SDXL.in_route(m, "attention")}


def beside_attention(lora) -> dict[str, int]:
    """What route `attention` leaves to --other-weights, by kind: the file's other keys and its
    routable linears outside attention (proj_in/out, feed-forward), under the loader's names."""
    return SDXL.other_modules(lora.unrouted(attention(lora)))


def assert_loaded(lora, truth, with_alpha=True):
    assert set(lora.projections) == set(truth)
    for module, (down, up, alpha) in truth.items():
        got = lora.projections[module]
        assert torch.equal(got.down, down), module
        assert torch.equal(got.up, up), module
        expected_alpha = alpha if with_alpha else float(down.shape[0])
        assert got.alpha == expected_alpha, module
        assert got.scale == expected_alpha / down.shape[0], module


def split_block(module: str) -> tuple[str, str]:
    """'down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q' -> (attention block, the rest)."""
    block = re.match(r".*?attentions\.\d+", module).group(0)
    return block, module[len(block) + 1 :]


def kohya_name(module: str, sgm: bool) -> str:
    block, rest = split_block(module)
    head = SGM_BLOCKS[block] if sgm else block.replace(".", "_")
    return f"lora_unet_{head}_{rest.replace('.', '_')}"


def comfy_name(module: str) -> str:
    """ComfyUI's spelling: 'diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q'."""
    block, rest = split_block(module)
    sgm_block = re.sub(r"_(?=\d)", ".", SGM_BLOCKS[block])  # input_blocks_4_1 -> input_blocks.4.1
    return f"diffusion_model.{sgm_block}.{rest}"


def write(path, state, metadata=None):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


# ---------------------------------------------------------------- one writer per layout


def peft_file(path, truth, alpha_keys=False):
    state = {}
    for module, (down, up, alpha) in truth.items():
        state[f"unet.{module}.lora_A.weight"] = down
        state[f"unet.{module}.lora_B.weight"] = up
        if alpha_keys:
            state[f"unet.{module}.alpha"] = torch.tensor(alpha)
    return write(path, state)


def peft_metadata_file(path, truth):
    """As diffusers' `save_lora_weights(..., unet_lora_adapter_metadata=...)` writes it."""
    state, alpha_pattern, rank_pattern = {}, {}, {}
    for module, (down, up, alpha) in truth.items():
        state[f"unet.{module}.lora_A.weight"] = down
        state[f"unet.{module}.lora_B.weight"] = up
        if alpha != 4.0:
            alpha_pattern[module] = alpha
        if down.shape[0] != 4:
            rank_pattern[module] = down.shape[0]
    config = {
        "unet.r": 4,
        "unet.lora_alpha": 4.0,
        "unet.alpha_pattern": alpha_pattern,
        "unet.rank_pattern": rank_pattern,
        "unet.target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
    }
    return write(path, state, {"format": "pt", "lora_adapter_metadata": json.dumps(config)})


def legacy_file(path, truth, processor_names=False, metadata=None):
    state = {}
    for module, (down, up, _) in truth.items():
        if processor_names:  # the attention-processor era: attn1.processor.to_q_lora.down.weight
            attn, proj = re.match(r"(.*\.attn[12])\.(to_q|to_k|to_v|to_out)", module).groups()
            stem = f"unet.{attn}.processor.{proj}_lora"
        else:
            stem = f"unet.{module}.lora"
        state[f"{stem}.down.weight"] = down
        state[f"{stem}.up.weight"] = up
    return write(path, state, metadata)


def klora_file(path, truth):
    state = {}
    for module, (down, up, _) in truth.items():
        state[f"unet.unet.{module}.lora.down.weight"] = down
        state[f"unet.unet.{module}.lora.up.weight"] = up
    return write(path, state)


def kohya_file(path, truth, sgm=True, extras=False):
    state = {}
    for module, (down, up, alpha) in truth.items():
        name = kohya_name(module, sgm)
        state[f"{name}.lora_down.weight"] = down.half()  # kohya writes fp16
        state[f"{name}.lora_up.weight"] = up.half()
        state[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    if extras:
        for name in EXTRA_KOHYA_MODULES:
            state[f"{name}.lora_down.weight"] = torch.zeros(2, 8)
            state[f"{name}.lora_up.weight"] = torch.zeros(8, 2)
            state[f"{name}.alpha"] = torch.tensor(2.0)
    return write(path, state)


def comfy_file(path, truth, parts=("lora_down", "lora_up")):
    """As ComfyUI saves (and loads) SDXL LoRAs: `diffusion_model.` + the SGM module path, with dots."""
    state = {}
    for module, (down, up, alpha) in truth.items():
        name = comfy_name(module)
        state[f"{name}.{parts[0]}.weight"] = down
        state[f"{name}.{parts[1]}.weight"] = up
        state[f"{name}.alpha"] = torch.tensor(alpha)
    return write(path, state)


EXTRA_KOHYA_MODULES = [
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_te1_text_model_encoder_layers_0_mlp_fc1",
    "lora_te2_text_model_encoder_layers_0_self_attn_k_proj",
    "lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_0_proj",
    "lora_unet_output_blocks_3_1_transformer_blocks_1_ff_net_2",
    "lora_unet_input_blocks_4_1_proj_in",
    "lora_unet_input_blocks_1_0_in_layers_2",
]


def fp8_truth(truth):
    """The same LoRA rounded to fp8, as some trainers store it to halve the size."""
    return {m: (d.to(torch.float8_e4m3fn), u.to(torch.float8_e4m3fn), a) for m, (d, u, a) in truth.items()}


def half_truth(truth):
    """What survives kohya's fp16 storage (alphas here are exact in fp16)."""
    return {m: (d.half(), u.half(), a) for m, (d, u, a) in truth.items()}


# ---------------------------------------------------------------- tests


def test_peft_without_alpha_uses_rank(tmp_path, truth):
    lora = load_lora(peft_file(tmp_path / "peft.safetensors", truth))
    assert lora.layout == "diffusers-peft"
    assert_loaded(lora, truth, with_alpha=False)


def test_peft_with_alpha_keys(tmp_path, truth):
    lora = load_lora(peft_file(tmp_path / "peft_alpha.safetensors", truth, alpha_keys=True))
    assert lora.layout == "diffusers-peft"
    assert_loaded(lora, truth)


def test_peft_with_adapter_metadata(tmp_path, truth):
    lora = load_lora(peft_metadata_file(tmp_path / "pytorch_lora_weights.safetensors", truth))
    assert_loaded(lora, truth)


def test_folder_holding_diffusers_weight_name(tmp_path, truth):
    peft_metadata_file(tmp_path / "pytorch_lora_weights.safetensors", truth)
    lora = load_lora(tmp_path)
    assert lora.path.name == "pytorch_lora_weights.safetensors"
    assert_loaded(lora, truth)


@pytest.mark.parametrize("processor_names", [False, True])
def test_diffusers_legacy(tmp_path, truth, processor_names):
    lora = load_lora(legacy_file(tmp_path / "legacy.safetensors", truth, processor_names))
    assert lora.layout == "diffusers-legacy"
    assert_loaded(lora, truth, with_alpha=False)


def test_diffusers_legacy_with_adapter_metadata(tmp_path, truth):
    """diffusers' SDXL training scripts save legacy names (`convert_state_dict_to_diffusers`) and the
    adapter config beside them; diffusers takes the alphas from that config, so must we."""
    path = peft_metadata_file(tmp_path / "peft.safetensors", truth)
    metadata = {"format": "pt", "lora_adapter_metadata": read_safetensors(path)[1]["lora_adapter_metadata"]}
    lora = load_lora(legacy_file(tmp_path / "legacy.safetensors", truth, metadata=metadata))
    assert lora.layout == "diffusers-legacy"
    assert_loaded(lora, truth)


def test_klora_research_layout(tmp_path, truth):
    lora = load_lora(klora_file(tmp_path / "klora.safetensors", truth))
    assert lora.layout == "klora-research"
    assert_loaded(lora, truth, with_alpha=False)


@pytest.mark.parametrize("sgm", [True, False], ids=["sgm-block-names", "diffusers-block-names"])
def test_kohya(tmp_path, truth, sgm):
    lora = load_lora(kohya_file(tmp_path / "kohya.safetensors", truth, sgm=sgm))
    assert lora.layout == "kohya"
    assert_loaded(lora, half_truth(truth))
    assert lora.other == {}


def test_lycoris_library_names(tmp_path, truth):
    """The LyCORIS library's own saves (SimpleTuner's LyCORIS LoCon): kohya's parts, diffusers' module
    names with underscores, under `lycoris_`."""
    from safetensors.torch import load_file

    kohya = load_file(str(kohya_file(tmp_path / "kohya.safetensors", truth, sgm=False)))
    state = {k.replace("lora_unet_", "lycoris_", 1): v for k, v in kohya.items()}
    state["lycoris_down_blocks_1_attentions_0_proj_in.lora_down.weight"] = torch.zeros(2, 8)
    state["lycoris_down_blocks_1_attentions_0_proj_in.lora_up.weight"] = torch.zeros(8, 2)
    lora = load_lora(write(tmp_path / "lycoris.safetensors", state))
    assert lora.layout == "lycoris"
    proj_in = "down_blocks.1.attentions.0.proj_in"
    assert set(lora.projections) - attention(lora) == {proj_in}  # route blocks routes it
    lora.projections.pop(proj_in)
    assert_loaded(lora, half_truth(truth))
    assert lora.other == {}
    # kept in kohya's spelling, which diffusers' loader reads under route attention + --other-weights merge
    assert set(lora.unrouted(attention(lora))) == {
        "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight",
        "lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight",
    }


@pytest.mark.parametrize("parts", [("lora_down", "lora_up"), ("lora_A", "lora_B")], ids=["down-up", "A-B"])
def test_comfyui(tmp_path, truth, parts):
    lora = load_lora(comfy_file(tmp_path / "comfy.safetensors", truth, parts))
    assert lora.layout == "comfyui"
    assert_loaded(lora, truth)
    assert lora.other == {}


def test_comfyui_other_keys_take_kohya_names(tmp_path, truth):
    """So that diffusers' kohya converter can merge them under --other-weights merge."""
    from safetensors.torch import load_file

    state = load_file(str(comfy_file(tmp_path / "comfy.safetensors", truth)))
    state["diffusion_model.input_blocks.4.1.transformer_blocks.0.ff.net.2.lora_down.weight"] = torch.zeros(2, 8)
    state["diffusion_model.input_blocks.4.1.transformer_blocks.0.ff.net.2.lora_up.weight"] = torch.zeros(8, 2)
    lora = load_lora(write(tmp_path / "comfy_ff.safetensors", state))
    assert "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2" in lora.projections  # route blocks
    assert sorted(lora.unrouted(attention(lora))) == [
        "lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_2.lora_down.weight",
        "lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_2.lora_up.weight",
    ]
    assert beside_attention(lora) == {"UNet feed-forward": 1}


def test_fp8_factors_load_exactly(tmp_path, truth):
    """fp8 files load as the exact fp32 values."""
    fp8 = fp8_truth(truth)
    lora = load_lora(peft_file(tmp_path / "fp8.safetensors", fp8, alpha_keys=True))
    assert_loaded(lora, {m: (d.float(), u.float(), a) for m, (d, u, a) in fp8.items()})


def test_kohya_golden_key_names(tmp_path):
    """Real SDXL kohya key names map to the diffusers module paths a diffusers UNet has."""
    golden = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k": "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k",
        "lora_unet_middle_block_1_transformer_blocks_3_attn2_to_out_0": "mid_block.attentions.0.transformer_blocks.3.attn2.to_out.0",
        "lora_unet_output_blocks_2_1_transformer_blocks_7_attn1_to_v": "up_blocks.0.attentions.2.transformer_blocks.7.attn1.to_v",
        "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_q": "up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_q",
    }
    state = {}
    for i, name in enumerate(golden):
        state[f"{name}.lora_down.weight"] = torch.full((2, 16), float(i + 1))
        state[f"{name}.lora_up.weight"] = torch.ones(8, 2)
        state[f"{name}.alpha"] = torch.tensor(1.0)
    lora = load_lora(write(tmp_path / "k.safetensors", state))
    assert sorted(lora.projections) == sorted(golden.values())
    for i, module in enumerate(golden.values()):
        assert lora.projections[module].down[0, 0].item() == i + 1
        assert lora.projections[module].scale == 0.5


def test_kohya_other_keys_are_kept_and_counted(tmp_path, truth):
    lora = load_lora(kohya_file(tmp_path / "kohya_full.safetensors", truth, extras=True))
    assert len(attention(lora)) == len(truth)
    assert set(lora.projections) - attention(lora) == {  # route blocks routes them
        "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",
        "up_blocks.1.attentions.0.transformer_blocks.1.ff.net.2",
        "down_blocks.1.attentions.0.proj_in",
    }
    assert lora.projections["down_blocks.1.attentions.0.proj_in"].alpha == 2.0
    assert len(lora.other) == 3 * (len(EXTRA_KOHYA_MODULES) - 3)  # down, up, alpha each
    assert SDXL.other_modules(lora.other) == {
        "text encoder 1": 2,
        "text encoder 2": 1,
        "UNet conv/resnet/projection": 1,
    }
    assert len(lora.unrouted(attention(lora))) == 3 * len(EXTRA_KOHYA_MODULES)
    assert beside_attention(lora) == {
        "text encoder 1": 2,
        "text encoder 2": 1,
        "UNet feed-forward": 2,
        "UNet conv/resnet/projection": 2,
    }


def test_peft_text_encoder_keys_are_other(tmp_path, truth):
    path = peft_file(tmp_path / "p.safetensors", truth)
    from safetensors.torch import load_file

    state = load_file(str(path))
    state["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(2, 32)
    state["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(32, 2)
    state["text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(2, 32)
    state["text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(32, 2)
    lora = load_lora(write(tmp_path / "p2.safetensors", state))
    assert len(lora.projections) == len(truth)
    assert SDXL.other_modules(lora.other) == {"text encoder 1": 1, "text encoder 2": 1}


# ---------------------------------------------------------------- agreement with diffusers' own loader


@pytest.fixture(scope="module")
def tiny_pipe(tiny_dir):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_dir)


@pytest.mark.parametrize(
    "writer",
    [
        lambda p, t: peft_metadata_file(p, t),
        lambda p, t: peft_file(p, t),
        lambda p, t: legacy_file(p, t),
        # diffusers 0.42 applies the most common kohya alpha to every attention projection (its
        # alpha_pattern keys for the UNet match no module), so compare on a file with one alpha;
        # per-module alphas are checked against the written truth in test_kohya.
        lambda p, t: kohya_file(p, {m: (d, u, 8.0) for m, (d, u, _) in t.items()}, sgm=True),
        lambda p, t: peft_file(p, fp8_truth(t)),
    ],
    ids=["peft-metadata", "peft", "legacy", "kohya-sgm", "peft-fp8"],
)
def test_same_factors_and_scale_as_diffusers(tmp_path, tiny_pipe, truth, writer):
    path = writer(tmp_path / "lora.safetensors", truth)
    ours = load_lora(path)
    tiny_pipe.load_lora_weights(str(path), adapter_name="ref")
    try:
        for module, factors in ours.projections.items():
            layer = tiny_pipe.unet.get_submodule(module)
            assert torch.equal(layer.lora_A["ref"].weight, factors.down.float()), module
            assert torch.equal(layer.lora_B["ref"].weight, factors.up.float()), module
            assert layer.scaling["ref"] == pytest.approx(factors.scale, rel=1e-6), module
    finally:
        tiny_pipe.delete_adapters("ref")


def test_pattern_keys_match_as_peft_matches_them():
    """estlora's own `alpha_pattern` matching (peft's import costs seconds) equals peft's `get_pattern_key`."""
    from peft.utils.other import get_pattern_key

    from estlora.files.lora_keys import pattern_key

    patterns = ["attn1.to_q", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "to_out.0", r"to_v$", "q"]
    modules = [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
        "up_blocks.0.attentions.1.transformer_blocks.3.attn1.to_out.0",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
        "down_blocks.2.attentions.1.transformer_blocks.0.attn1.xto_q",
        "single_transformer_blocks.0.attn.to_k",
    ]
    for module in modules:
        theirs = get_pattern_key(patterns, module)
        assert pattern_key(patterns, module) == (theirs if theirs in patterns else None), module


def test_advanced_script_layout_equals_its_kohya_twin(tmp_path, truth):
    """diffusers' advanced SDXL script: `lora_unet_<name>_lora.down.weight`, no alphas (scale 1, as
    ComfyUI reads it): the very factors of the kohya file with alpha = rank."""
    from safetensors.torch import load_file

    kohya = load_file(str(kohya_file(tmp_path / "kohya.safetensors", truth, sgm=False)))
    state = {
        k.replace(".lora_down.weight", "_lora.down.weight").replace(".lora_up.weight", "_lora.up.weight"): v
        for k, v in kohya.items()
        if not k.endswith(".alpha")
    }
    lora = load_lora(write(tmp_path / "advanced.safetensors", state))
    assert lora.layout == "kohya"
    assert_loaded(lora, {m: (d, u, float(d.shape[0])) for m, (d, u, _) in half_truth(truth).items()})
    assert {f.scale for f in lora.projections.values()} == {1.0}


def test_comfyui_extracted_lora_with_diffs_routes_its_factors(tmp_path, truth, tiny_pipe):
    """ComfyUI's "Extract and Save Lora" and trainer nodes: LoRA factors plus `.diff` on 1-D weights and
    `.diff_b` on biases (every `to_out.0` too). The factors are routed, the diffs are other weights:
    ignored by default; `--other-weights merge` adds them to the weights they name, W + strength * diff,
    as ComfyUI does, and `remove()` puts the weights back."""
    from safetensors.torch import load_file

    import estlora

    state = load_file(str(comfy_file(tmp_path / "comfy.safetensors", truth)))
    block = "diffusion_model.input_blocks.4.1.transformer_blocks.0"
    generator = torch.Generator().manual_seed(8)
    diffs = {
        f"{block}.attn1.to_out.0.diff_b": ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.bias", 64),
        f"{block}.norm1.diff": ("down_blocks.1.attentions.0.transformer_blocks.0.norm1.weight", 64),
        "diffusion_model.input_blocks.1.0.in_layers.0.diff": ("down_blocks.0.resnets.0.norm1.weight", 32),
        "diffusion_model.output_blocks.2.2.conv.diff_b": ("up_blocks.0.upsamplers.0.conv.bias", 64),
    }
    for key, (_, rows) in diffs.items():
        state[key] = torch.randn(rows, generator=generator)
    lora = load_lora(write(tmp_path / "extracted.safetensors", state))
    assert lora.layout == "comfyui"
    assert_loaded(lora, truth)
    assert sorted(lora.other) == sorted(diffs)  # the file's own names
    unet = tiny_pipe.unet
    before = {name: unet.get_parameter(name).detach().clone() for name, _ in diffs.values()}
    with estlora.fuse(tiny_pipe, lora, lora, method="est", beta=0.5) as fusion:
        assert len(fusion.layers) == len(attention(lora))
        assert all(torch.equal(unet.get_parameter(name), before[name]) for name in before)  # ignored
    with estlora.fuse(tiny_pipe, lora, lora, method="subject", subject_scale=0.5, other_weights="merge"):
        for key, (name, _) in diffs.items():
            module, _, parameter = name.rpartition(".")
            linear = unet.get_submodule(module)
            got = getattr(getattr(linear, "base", linear), parameter)
            assert torch.equal(got, before[name] + 0.5 * state[key]), name
    assert all(torch.equal(unet.get_parameter(name), before[name]) for name in before)


def test_sgm_paths_of_every_unet_parameter_map_to_diffusers(tiny_dir):
    """`sgm_unet_module` inverts the SGM single-file layout (tests/sgm_checkpoint.py, which diffusers'
    `from_single_file` reads back exactly) for every parameter of the UNet, resnets and samplers too."""
    from diffusers import UNet2DConditionModel

    from estlora.families.sdxl import sgm_unet_module
    from sgm_checkpoint import unet_to_sgm

    unet = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet")
    names = {parameter.data_ptr(): name for name, parameter in unet.named_parameters()}
    sgm = unet_to_sgm(unet)
    assert len(sgm) == len(names)
    for key, value in sgm.items():
        module, _, parameter = key.removeprefix("model.diffusion_model.").rpartition(".")
        assert f"{sgm_unet_module(module)}.{parameter}" == names[value.data_ptr()], key
