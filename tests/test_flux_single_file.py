"""Single-file FLUX.1 bases as people share them: BFL's `flux1-dev.safetensors` (the transformer alone,
the rest from `--base-config`), ComfyUI's all-in-one files (`model.diffusion_model.` + CLIP-L, T5 and
the VAE), fp8 and ComfyUI's scaled fp8. The files are written from the tiny FLUX.1 by an inverse
conversion written here, independently of estlora's; loading them back must give every tensor of the
folder exactly. At FLUX.1's real widths estlora's conversion equals diffusers' own converter.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from estlora.cli import main
from estlora.errors import BaseModelError
from estlora.loading.base import describe_base, load_pipeline
from sgm_checkpoint import vae_to_sgm

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae")
OUTSIDE = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
}
DOUBLE = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
SINGLE = {
    "proj_out": "linear2",
    "norm.linear": "modulation.lin",
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
}


def transformer_to_bfl(transformer) -> dict[str, torch.Tensor]:
    """BFL's names for a diffusers FLUX.1 transformer: q, k, v (and a single block's MLP input) fused
    back, norms' `weight` as `scale`, the output norm's halves in BFL's (shift, scale) order."""
    state = transformer.state_dict()
    out = {}
    for kind in ("weight", "bias"):
        for name, bfl in OUTSIDE.items():
            if f"{name}.{kind}" in state:
                out[f"{bfl}.{kind}"] = state[f"{name}.{kind}"]
        scale, shift = state[f"norm_out.linear.{kind}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{kind}"] = torch.cat([shift, scale])
        for i in range(transformer.config.num_layers):
            block = f"transformer_blocks.{i}"
            for stream, names in (
                ("img", ("to_q", "to_k", "to_v")),
                ("txt", ("add_q_proj", "add_k_proj", "add_v_proj")),
            ):
                out[f"double_blocks.{i}.{stream}_attn.qkv.{kind}"] = torch.cat(
                    [state[f"{block}.attn.{n}.{kind}"] for n in names]
                )
        for i in range(transformer.config.num_single_layers):
            names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
            out[f"single_blocks.{i}.linear1.{kind}"] = torch.cat(
                [state[f"single_transformer_blocks.{i}.{n}.{kind}"] for n in names]
            )
    for key, value in state.items():
        for prefix, bfl_prefix, table in (
            ("transformer_blocks.", "double_blocks.", DOUBLE),
            ("single_transformer_blocks.", "single_blocks.", SINGLE),
        ):
            if key.startswith(prefix):
                number, rest = key[len(prefix) :].split(".", 1)
                module, kind = rest.rsplit(".", 1)
                if module in table:
                    kind = "scale" if "norm.query_norm" in table[module] or "key_norm" in table[module] else kind
                    out[f"{bfl_prefix}{number}.{table[module]}.{kind}"] = value
    return {k: v.contiguous() for k, v in out.items()}


def all_in_one(pipe) -> dict[str, torch.Tensor]:
    """ComfyUI's all-in-one layout: the transformer under `model.diffusion_model.`, CLIP-L and T5 in
    transformers' names under `text_encoders.`, the VAE in LDM names under `vae.`."""
    out = {"model.diffusion_model." + k: v for k, v in transformer_to_bfl(pipe.transformer).items()}
    out |= {"text_encoders.clip_l.transformer." + k: v for k, v in pipe.text_encoder.state_dict().items()}
    t5 = pipe.text_encoder_2.state_dict()
    out |= {"text_encoders.t5xxl.transformer." + k: v for k, v in t5.items() if k != "encoder.embed_tokens.weight"}
    out |= {"vae." + k.removeprefix("first_stage_model."): v for k, v in vae_to_sgm(pipe.vae).items()}
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(the tiny FLUX.1's folder, its pipeline, a second tiny FLUX.1 with other weights, a work folder)."""
    from estlora.testing.tiny_flux import build_tiny_flux, write_tiny_flux

    root = tmp_path_factory.mktemp("flux-single")
    folder = write_tiny_flux(root / "tiny-flux")
    return folder, load_pipeline(folder), build_tiny_flux(seed=5), root


@pytest.fixture(scope="module")
def lora_paths(folders):
    """A subject and a style LoRA in diffusers' layout (rank 2, every block linear) that fit the tiny FLUX.1."""
    folder, _, _, root = folders
    paths = []
    for seed, name in enumerate(("subject", "style")):
        generator, state = torch.Generator().manual_seed(seed), {}
        for module, (n_out, n_in) in describe_base(folder).shapes.items():
            state[f"transformer.{module}.lora_A.weight"] = torch.randn(2, n_in, generator=generator) * 0.1
            state[f"transformer.{module}.lora_B.weight"] = torch.randn(n_out, 2, generator=generator) * 0.1
        paths.append(root / f"{name}.safetensors")
        save_file(state, str(paths[-1]))
    return paths


def assert_same(pipe, reference, components=COMPONENTS):
    for name in components:
        mine, theirs = getattr(pipe, name).state_dict(), getattr(reference, name).state_dict()
        assert mine.keys() == theirs.keys(), name
        bad = [k for k in mine if not torch.equal(mine[k], theirs[k])]
        assert not bad, f"{name}: {bad[:3]}"


def test_a_bfl_transformer_file_loads_exactly_as_its_folder(folders):
    folder, reference, _, root = folders
    save_file(transformer_to_bfl(reference.transformer), str(root / "flux1-tiny.safetensors"))
    source = describe_base(root / "flux1-tiny.safetensors", folder)
    assert (source.family.name, source.checkpoint.denoiser_only) == ("flux1", True)
    assert source.shapes == describe_base(folder).shapes and len(source.shapes) == 494
    assert_same(load_pipeline(source), reference)


def test_a_comfyui_all_in_one_file_brings_its_own_encoders_and_vae(folders):
    """Every component comes from the file (a pipeline with other weights), the configs from the folder."""
    folder, reference, other, root = folders
    save_file(all_in_one(other), str(root / "flux1-aio.safetensors"))
    source = describe_base(root / "flux1-aio.safetensors", folder)
    assert not source.checkpoint.denoiser_only
    pipe = load_pipeline(source)
    assert_same(pipe, other)
    assert dict(pipe.scheduler.config) == dict(reference.scheduler.config)


def test_fp8_and_comfyui_scaled_fp8_weights_are_dequantized(folders):
    folder, reference, _, root = folders
    state = transformer_to_bfl(reference.transformer)
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in state.items()}
    save_file(fp8, str(root / "flux1-fp8.safetensors"))
    loaded = load_pipeline(root / "flux1-fp8.safetensors", config=folder).transformer
    weight = loaded.single_transformer_blocks[3].attn.to_q.weight
    assert weight.dtype == torch.float32
    assert torch.equal(weight, fp8["single_blocks.3.linear1.weight"][:16].to(torch.float32))
    scaled = {"model.diffusion_model.scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for key, value in state.items():
        if value.ndim == 2:
            scale = value.abs().max() / 448
            scaled[f"model.diffusion_model.{key}"] = (value / scale).to(torch.float8_e4m3fn)
            scaled[f"model.diffusion_model.{key.removesuffix('.weight')}.scale_weight"] = scale.reshape(1)
        else:
            scaled[f"model.diffusion_model.{key}"] = value
    save_file(scaled, str(root / "flux1-scaled.safetensors"))
    loaded = load_pipeline(root / "flux1-scaled.safetensors", config=folder).transformer
    key = "model.diffusion_model.double_blocks.2.img_attn.proj"
    expected = scaled[key + ".weight"].to(torch.float32) * scaled[key + ".scale_weight"]
    assert torch.equal(loaded.transformer_blocks[2].attn.to_out[0].weight, expected)
    assert loaded.transformer_blocks[2].attn.to_out[0].weight.abs().max() > 0


def test_a_file_without_guidance_embedder_is_schnell_shaped(folders):
    folder, reference, _, root = folders
    state = {k: v for k, v in transformer_to_bfl(reference.transformer).items() if not k.startswith("guidance_in.")}
    save_file(state, str(root / "flux1-schnell-tiny.safetensors"))
    transformer = load_pipeline(root / "flux1-schnell-tiny.safetensors", config=folder).transformer
    assert transformer.config.guidance_embeds is False
    assert torch.equal(transformer.x_embedder.weight, reference.transformer.x_embedder.weight)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: {k: v for k, v in s.items() if "_mod." not in k}, "no img_mod: FLUX.2's layout"),
        (lambda s: {k: v for k, v in s.items() if not k.startswith("single_blocks.37.")}, "tensors missing"),
        (lambda s: s | {"double_blocks.0.img_attn.lora.weight": torch.zeros(2, 2)}, "has no place in it"),
        (lambda s: s | {"single_blocks.0.linear1.weight": torch.zeros(50, 16)}, "cannot be split"),
        (lambda s: s | {"img_in.weight": torch.zeros(16, 64)}, "x_embedder.weight is [16, 64], not [16, 16]"),
    ],
    ids=["flux2", "truncated", "unknown", "linear1", "width"],
)
def test_a_file_that_is_not_this_flux1_transformer_is_refused_in_one_line(folders, lora_paths, change, message, capsys):
    folder, reference, _, root = folders
    save_file(change(transformer_to_bfl(reference.transformer)), str(root / "bad.safetensors"))
    with pytest.raises(BaseModelError, match=re.escape(message)):
        describe_base(root / "bad.safetensors", folder)
    args = ["inspect", str(lora_paths[0]), "--base", str(root / "bad.safetensors"), "--base-config", str(folder)]
    assert main(args) != 0
    err = capsys.readouterr().err.strip()
    assert "bad.safetensors" in err and message in err and len(err.splitlines()) == 1


def test_conversion_equals_diffusers_converter_at_flux1_widths():
    """diffusers' converter hard-codes FLUX.1's width (3072); at that width the two agree tensor for
    tensor (one double and one single block; bytes left uninitialised: only the views are compared)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from estlora.families.flux import _converted

    width, mlp = 3072, 12288
    shapes = {
        "img_in": (width, 64),
        "txt_in": (width, 4096),
        "time_in.in_layer": (width, 256),
        "time_in.out_layer": (width, width),
        "vector_in.in_layer": (width, 768),
        "vector_in.out_layer": (width, width),
        "guidance_in.in_layer": (width, 256),
        "guidance_in.out_layer": (width, width),
        "final_layer.linear": (64, width),
        "final_layer.adaLN_modulation.1": (2 * width, width),
        "single_blocks.0.linear1": (3 * width + mlp, width),
        "single_blocks.0.linear2": (width, width + mlp),
        "single_blocks.0.modulation.lin": (3 * width, width),
    }
    for stream in ("img", "txt"):
        shapes |= {
            f"double_blocks.0.{stream}_attn.qkv": (3 * width, width),
            f"double_blocks.0.{stream}_attn.proj": (width, width),
            f"double_blocks.0.{stream}_mlp.0": (mlp, width),
            f"double_blocks.0.{stream}_mlp.2": (width, mlp),
            f"double_blocks.0.{stream}_mod.lin": (6 * width, width),
        }
    state = {}
    for name, shape in shapes.items():
        state[f"{name}.weight"] = torch.empty(shape, dtype=torch.uint8)
        state[f"{name}.bias"] = torch.arange(shape[0], dtype=torch.int32)
    for where in ("double_blocks.0.img_attn", "double_blocks.0.txt_attn", "single_blocks.0"):
        for norm in ("query_norm", "key_norm"):
            state[f"{where}.norm.{norm}.scale"] = torch.empty(128, dtype=torch.uint8)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(state))
    mine = _converted("real-width", dict(state))
    assert mine.keys() == theirs.keys()
    for key in theirs:
        same_view = (mine[key].data_ptr(), mine[key].shape, mine[key].stride()) == (
            theirs[key].data_ptr(),
            theirs[key].shape,
            theirs[key].stride(),
        )
        assert same_view or torch.equal(mine[key], theirs[key]), key


def test_generate_on_a_bfl_file_with_its_base_config(folders, lora_paths, tmp_path):
    """The command line: `--base flux1-dev.safetensors --base-config DIR`, with FLUX.1 LoRAs."""
    folder, reference, _, root = folders
    save_file(transformer_to_bfl(reference.transformer), str(root / "flux1-gen.safetensors"))
    paths = lora_paths
    args = ["generate", "--base", str(root / "flux1-gen.safetensors"), "--base-config", str(folder)]
    args += ["--subject", str(paths[0]), "--style", str(paths[1]), "--prompt", "a dog", "--beta", "0.5"]
    args += ["--steps", "2", "--width", "32", "--height", "32", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


def write_gguf(state: dict[str, torch.Tensor], path) -> int:
    """A GGUF file as city96's converter writes FLUX.1 (BFL's names): weights whose rows fit Q8_0's
    32-wide blocks quantized, the rest F16 (weights) or F32 (biases, norms). Returns how many were quantized."""
    import gguf
    import numpy as np

    writer, quantized = gguf.GGUFWriter(str(path), "flux"), 0
    for key, value in state.items():
        array = value.float().numpy()
        if array.ndim == 2 and array.shape[1] % 32 == 0:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(key, gguf.quants.quantize(array, q8), raw_dtype=q8)
            quantized += 1
        else:
            writer.add_tensor(key, array.astype(np.float16 if array.ndim == 2 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return quantized


def test_a_gguf_transformer_stays_quantized_and_routes_as_diffusers(folders, lora_paths):
    """diffusers' GGUF linears under the routing: `--method subject` equals diffusers' own LoRA loading
    on the same quantized transformer, and est runs every routed linear over its quantized weight."""
    from diffusers.quantizers.gguf.utils import GGUFLinear

    import estlora
    from estlora.runtime.routing import RoutedLinear

    folder, reference, _, root = folders
    assert write_gguf(transformer_to_bfl(reference.transformer), root / "flux1-tiny-Q8_0.gguf") == 42
    source = describe_base(root / "flux1-tiny-Q8_0.gguf", folder)
    assert source.shapes == describe_base(folder).shapes
    pipe, theirs = load_pipeline(source), load_pipeline(source)
    quantized = [n for n, m in pipe.transformer.named_modules() if isinstance(m, GGUFLinear)]
    assert len(quantized) == 42 and "transformer_blocks.0.ff.net.2" in quantized
    theirs.load_lora_weights(str(lora_paths[0]), adapter_name="subject")

    def render(p):
        return p(
            "a dog",
            num_inference_steps=2,
            height=32,
            width=32,
            max_sequence_length=16,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).images

    expected = render(theirs)
    with estlora.fuse(pipe, *lora_paths, method="subject") as fusion:
        routed = dict(pipe.transformer.named_modules())["transformer_blocks.0.ff.net.2"]
        assert isinstance(routed, RoutedLinear) and isinstance(routed.base, GGUFLinear)
        assert routed.subject.down.dtype == torch.float32
        got = render(pipe)
        assert len(fusion.layers) == 494
    assert torch.equal(got, expected)


def test_a_broken_gguf_file_is_refused_in_one_line(folders, lora_paths, capsys):
    folder, _, _, root = folders
    (root / "garbage.gguf").write_bytes(b"not a gguf at all")
    good = (root / "flux1-tiny-Q8_0.gguf").read_bytes() if (root / "flux1-tiny-Q8_0.gguf").exists() else None
    cases = {root / "garbage.gguf": "not a GGUF file"}
    if good:
        (root / "cut.gguf").write_bytes(good[: len(good) // 2])
        cases[root / "cut.gguf"] = "truncated or corrupt GGUF file"
    for path, message in cases.items():
        with pytest.raises(BaseModelError, match=message):
            describe_base(path, folder)
        assert main(["inspect", str(lora_paths[0]), "--base", str(path), "--base-config", str(folder)]) != 0
        err = capsys.readouterr().err.strip()
        assert path.name in err and message in err and len(err.splitlines()) == 1
