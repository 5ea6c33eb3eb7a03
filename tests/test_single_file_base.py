"""Single-file SDXL checkpoints as the base (`--base model.safetensors`), as A1111 / ComfyUI users have them.

The files are made offline from a tiny SDXL (tests/sgm_checkpoint.py) and checked against the
diffusers folder they came from (every tensor, exactly) and against diffusers' own single-file
loading (a render, pixel for pixel).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import attention_shapes
from estlora.cli import main
from estlora.errors import BaseModelError
from estlora.families.sdxl import DEFAULT_BASE, SGM_ROUTABLE, SGM_UNET, sgm_module
from estlora.loading.base import describe_base, load_pipeline
from estlora.runtime.fusion import weights_fingerprint
from estlora.testing.examples import example_state_dict
from sgm_checkpoint import tiny_sdxl_with_distinct_encoders, vae_to_sgm, write_single_file

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(single file, the diffusers folder with its configs, two LoRAs that fit it)."""
    root = tmp_path_factory.mktemp("single-file")
    pipe = tiny_sdxl_with_distinct_encoders()
    pipe.save_pretrained(root / "folder")
    write_single_file(pipe, root / "tiny-sdxl.safetensors")
    shapes = attention_shapes(dict(pipe.unet.config))
    for name in ("subject", "style"):
        state, config = example_state_dict(name, shapes)
        metadata = {"lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in config.items()})}
        save_file({f"unet.{k}": v.contiguous() for k, v in state.items()}, str(root / f"{name}.safetensors"), metadata)
    return root / "tiny-sdxl.safetensors", root / "folder", root


def test_loads_every_tensor_exactly_as_its_folder(checkpoint):
    single, folder, _ = checkpoint
    from_file, from_folder = load_pipeline(single, config=folder), load_pipeline(folder)
    for name in COMPONENTS:
        mine, theirs = getattr(from_file, name).state_dict(), getattr(from_folder, name).state_dict()
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), name
    assert dict(from_file.scheduler.config) == dict(from_folder.scheduler.config)


def test_header_names_map_to_the_modules_diffusers_loads_them_into(checkpoint):
    single, folder, _ = checkpoint
    unet = load_pipeline(single, config=folder).unet
    modules = dict(unet.named_modules())
    state = load_file(single)
    routable = {k: v for k, v in state.items() if SGM_ROUTABLE.match(k)}
    assert len(routable) == 722  # route blocks: attention, proj_in/out, feed-forward
    for key, tensor in routable.items():
        assert torch.equal(modules[sgm_module(key)].weight, tensor), key


def test_shapes_come_from_the_header_and_match_the_config(checkpoint):
    single, folder, _ = checkpoint
    shapes = describe_base(single, folder).shapes
    assert shapes == describe_base(folder).shapes
    assert len(shapes) == 722 and shapes["mid_block.attentions.0.transformer_blocks.9.attn2.to_k"] == (64, 80)


def test_generate_from_the_file_equals_a_plain_diffusers_run(checkpoint, tmp_path):
    """The reference is diffusers' own `from_single_file` with the LoRA loaded by `load_lora_weights`.

    (The same render from the diffusers folder differs in the last bits on CPUs: weights memory-mapped
    from the folder's files sit at other memory alignments, which changes the matmul kernels' sums.)
    """
    from diffusers import StableDiffusionXLPipeline

    single, folder, root = checkpoint
    subject = str(root / "subject.safetensors")
    args = ["generate", "--subject", subject, "--style", str(root / "style.safetensors"), "--method", "subject"]
    args += ["--prompt", "a dog", "--steps", "3", "--seed", "3", "--base", str(single), "--base-config", str(folder)]
    assert main([*args, "--out", str(tmp_path)]) == 0
    (png,) = tmp_path.glob("*.png")
    plain = StableDiffusionXLPipeline.from_single_file(str(single), config=str(folder))
    fingerprint = weights_fingerprint(plain.unet)  # the base's weights, before any LoRA
    plain.load_lora_weights(subject)
    expected = plain("a dog", num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(3))
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(expected.images[0]))
    meta = json.loads(png.with_suffix(".json").read_text())
    assert meta["base_fingerprint"] == fingerprint
    assert meta["settings"]["base_config"] == str(folder)
    assert f"--base {single} --base-config {folder}" in meta["command"]


def test_inspect_checks_a_lora_against_the_file(checkpoint, capsys):
    single, folder, root = checkpoint
    assert (
        main(["inspect", str(root / "subject.safetensors"), "--base", str(single), "--base-config", str(folder)]) == 0
    )
    assert f"fits base:   {single}" in capsys.readouterr().out


def sgm_file(path, keys: dict[str, tuple]):
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path))
    return path


def reshaped(checkpoint, path, key, shape):
    state = load_file(checkpoint[0])
    state[key] = torch.zeros(shape)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


UNET = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
BAD_FILES = {
    "missing": (BaseModelError, "no such file", lambda c, p: p / "nowhere.safetensors"),
    "hub-offline": (
        BaseModelError,
        "not a local path, and the hub download failed",
        lambda c, p: "someone/sdxl-finetune/model.safetensors",
    ),
    "pickle": (BaseModelError, "pickle checkpoints are refused", lambda c, p: _pickle(p / "model.ckpt")),
    "truncated": (BaseModelError, "truncated safetensors file", lambda c, p: _cut(c[0], p / "cut.safetensors")),
    "lora": (BaseModelError, "this is a LoRA, not a base model", lambda c, p: c[2] / "subject.safetensors"),
    "not-a-checkpoint": (
        BaseModelError,
        "no model.diffusion_model.* UNet weights",
        lambda c, p: sgm_file(p / "unet.safetensors", {"down_blocks.0.resnets.0.conv1.weight": (2, 2)}),
    ),
    "sd15": (
        BaseModelError,
        "a Stable Diffusion 1.x / 2.x checkpoint, not SDXL",
        lambda c, p: sgm_file(p / "v1.safetensors", {UNET: (4, 4), "cond_stage_model.transformer.x": (1,)}),
    ),
    "refiner": (
        BaseModelError,
        "an SDXL refiner checkpoint",
        lambda c, p: sgm_file(p / "refiner.safetensors", {UNET: (4, 4), "conditioner.embedders.0.model.x": (1,)}),
    ),
    "flux": (
        BaseModelError,
        "not a FLUX.1 transformer (its double blocks have no img_mod: FLUX.2's layout?)",
        lambda c, p: sgm_file(p / "flux.safetensors", {"model.diffusion_model.double_blocks.0.x": (1,)}),
    ),
    "sd3": (
        BaseModelError,
        "(SD3 or Flux), not SDXL",
        lambda c, p: sgm_file(p / "sd3.safetensors", {"model.diffusion_model.joint_blocks.0.x": (1,)}),
    ),
    "edm": (
        BaseModelError,
        "an EDM model (CosXL or Playground v2.5)",
        lambda c, p: sgm_file(p / "cosxl.safetensors", {UNET: (4, 4), "edm_vpred.sigma_max": (1,)}),
    ),
    "unet-and-vae-only": (
        BaseModelError,
        "holds no CLIP ViT-L text encoder or OpenCLIP ViT-bigG text encoder weights; a single file holds a whole"
        " SDXL or its UNet alone",
        lambda c, p: sgm_file(p / "partial.safetensors", {UNET: (4, 4), "first_stage_model.x": (1,)}),
    ),
    "inpainting": (
        BaseModelError,
        "its UNet takes 9 input channels, not 4 (an inpainting model?)",
        lambda c, p: reshaped(
            c, p / "inpaint.safetensors", "model.diffusion_model.input_blocks.0.0.weight", (32, 9, 3, 3)
        ),
    ),
    "other-shapes": (
        BaseModelError,
        "its UNet does not have the shapes of",
        lambda c, p: reshaped(c, p / "wide.safetensors", UNET, (64, 128)),
    ),
}


def _pickle(path):
    torch.save({"state_dict": {}}, path)
    return path


def _cut(source, path):
    data = source.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    return path


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_single_files_are_refused_in_one_line(case, checkpoint, tmp_path):
    error, words, build = BAD_FILES[case]
    path = build(checkpoint, tmp_path)
    with pytest.raises(error) as info:
        describe_base(path, checkpoint[1])
    message = str(info.value)
    assert message.startswith(f"{path}: ") and words in message and "\n" not in message


def test_cli_refuses_a_bad_base_before_loading_and_writes_nothing(checkpoint, tmp_path, capsys):
    _, folder, root = checkpoint
    out = tmp_path / "out"
    lora = str(root / "subject.safetensors")
    args = ["generate", "--subject", lora, "--style", lora, "--prompt", "x", "--base", lora, "--out", str(out)]
    assert main([*args, "--base-config", str(folder)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert (
        line == f"estlora: error: {lora}: this is a LoRA, not a base model checkpoint (give it as the subject or style)"
    )
    assert not out.exists()


def test_without_a_config_the_file_must_have_sdxl_shapes(checkpoint):
    single, _, _ = checkpoint
    with pytest.raises(BaseModelError) as info:
        describe_base(single)
    assert f"its UNet does not have the shapes of {DEFAULT_BASE}'s UNet" in str(info.value)
    assert "(down_blocks.1.attentions.0.proj_in: (64, 64) in the file, (640, 640) expected)" in str(info.value)


def test_configs_that_cannot_build_the_pipeline_are_one_line(checkpoint, tmp_path):
    single, folder, _ = checkpoint
    partial = shutil.copytree(folder, tmp_path / "partial")
    (partial / "text_encoder_2" / "config.json").unlink()
    with pytest.raises(BaseModelError) as info:
        load_pipeline(single, config=partial)
    message = str(info.value)
    assert message.startswith(f"{single}: cannot load it with the configs of {partial}: ") and "\n" not in message


@pytest.mark.parametrize("tokenizer", ["tokenizer", "tokenizer_2"])
@pytest.mark.parametrize("single_file", [True, False])
def test_a_config_folder_without_a_tokenizer_is_refused(checkpoint, tmp_path, tokenizer, single_file):
    """transformers would build an empty tokenizer from the missing folder, silently, and every
    prompt would become unknown tokens."""
    single, folder, _ = checkpoint
    partial = shutil.copytree(folder, tmp_path / "partial")
    shutil.rmtree(partial / tokenizer)
    with pytest.raises(BaseModelError) as info:
        load_pipeline(single, config=partial) if single_file else load_pipeline(partial)
    expected = f"{partial}: its {tokenizer} has no vocabulary ({tokenizer}/vocab.json and merges.txt missing?)"
    assert str(info.value) == expected


def test_offline_without_cached_sdxl_configs_says_what_to_do(checkpoint, monkeypatch):
    """Real SDXL-size files cannot be made here, so the header check (tested above) is skipped."""
    from estlora.families import Checkpoint
    from estlora.families.sdxl import SDXL

    single, _, _ = checkpoint
    monkeypatch.setattr(SDXL, "read_checkpoint", lambda self, base, header, config: Checkpoint(header, {}, False, {}))
    with pytest.raises(BaseModelError) as info:
        load_pipeline(single)
    message = str(info.value)
    assert message.startswith(f"{single}: cannot load it with the configs of {DEFAULT_BASE} (fetched from the hub;")
    assert "give a local diffusers SDXL folder as --base-config" in message and "\n" not in message


def test_grid_spec_names_the_file_and_its_configs_relative_to_itself(checkpoint, tmp_path):
    single, folder, root = checkpoint
    spec = {
        "base": single.name,
        "base_config": folder.name,
        "subjects": [{"name": "s", "lora": "subject.safetensors"}],
        "styles": [{"name": "t", "lora": "style.safetensors"}],
        "methods": ["subject"],
        "steps": 2,
        "beta": 0.5,
    }
    (root / "spec.json").write_text(json.dumps(spec))
    assert main(["grid", str(root / "spec.json"), "--out", str(tmp_path / "run")]) == 0
    (png,) = (tmp_path / "run").rglob("*.png")
    settings = json.loads(png.with_suffix(".json").read_text())["settings"]
    assert (settings["base"], settings["base_config"]) == (str(single), str(folder))


@pytest.mark.parametrize("markers", [(), ("v_pred",), ("v_pred", "ztsnr")])
def test_v_prediction_markers_set_the_scheduler_as_comfyui_reads_them(checkpoint, tmp_path, markers):
    single, folder, _ = checkpoint
    state = load_file(single)
    state.update({marker: torch.zeros(0) for marker in markers})
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    scheduler = load_pipeline(path, config=folder).scheduler.config
    assert scheduler.prediction_type == ("v_prediction" if markers else "epsilon")
    assert scheduler.rescale_betas_zero_snr == ("ztsnr" in markers)
    assert scheduler.timestep_spacing == ("trailing" if "ztsnr" in markers else "leading")


def test_cached_betas_are_keyed_by_the_weights_not_only_the_name(checkpoint):
    """Fine-tunes share configs, and `from_single_file` pipelines had no name: the UNet's weights decide."""
    single, folder, _ = checkpoint
    from_file, from_folder = load_pipeline(single, config=folder), load_pipeline(folder)
    assert from_file.name_or_path == str(single)
    assert weights_fingerprint(from_file.unet) == weights_fingerprint(from_folder.unet)
    with torch.no_grad():
        from_file.unet.conv_out.weight[1, 2, 1, 1] += 1e-3
    assert weights_fingerprint(from_file.unet) != weights_fingerprint(from_folder.unet)


def test_a_config_with_a_folder_base_is_refused_not_ignored(checkpoint, capsys):
    _, folder, root = checkpoint
    lora = str(root / "subject.safetensors")
    args = ["generate", "--subject", lora, "--style", lora, "--prompt", "x", "--base", str(folder)]
    assert main([*args, "--base-config", str(folder)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert (
        line
        == f"estlora: error: {folder}: --base-config is for single-file bases; a folder or hub id has its own configs"
    )
    with pytest.raises(BaseModelError, match="--base-config is for single-file bases"):
        load_pipeline(folder, config=folder)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_half_and_fp8_checkpoints_load_as_their_exact_values(checkpoint, tmp_path, dtype):
    """Shared checkpoints are mostly fp16; some are bf16 or fp8. On the CPU they run in fp32."""
    single, folder, _ = checkpoint
    state = {k: v.to(dtype).contiguous() for k, v in load_file(single).items()}
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    unet = load_pipeline(path, config=folder).unet
    modules = dict(unet.named_modules())
    for key, tensor in state.items():
        if SGM_ROUTABLE.match(key):
            weight = modules[sgm_module(key)].weight
            assert weight.dtype == torch.float32 and torch.equal(weight, tensor.float()), key


def test_the_ui_works_on_a_single_file_base(checkpoint, tmp_path):
    pytest.importorskip("gradio")
    from estlora.ui import Studio

    single, folder, _ = checkpoint
    studio = Studio(str(single), tmp_path, base_config=str(folder))
    assert (studio.base, studio.launched.base_config, studio.pipe.name_or_path) == (str(single), str(folder), str(single))
    assert studio.shapes == describe_base(single, folder).shapes


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "", "diffusers"])
def test_a_unet_alone_takes_the_rest_from_the_config(checkpoint, tmp_path, prefix):
    """UNet-only files: ComfyUI's `models/unet` (SGM's names, prefixed or bare), or a diffusers
    fine-tune's `unet/diffusion_pytorch_model.safetensors` given on its own."""
    single, folder, _ = checkpoint
    path = tmp_path / "unet.safetensors"
    if prefix == "diffusers":
        shutil.copy(folder / "unet" / "diffusion_pytorch_model.safetensors", path)
    else:
        unet_keys = {k: v for k, v in load_file(single).items() if k.startswith(SGM_UNET)}
        save_file({prefix + k.removeprefix(SGM_UNET): v.contiguous() for k, v in unet_keys.items()}, str(path))
    assert describe_base(path, folder).shapes == describe_base(folder).shapes
    from_unet, from_folder = load_pipeline(path, config=folder), load_pipeline(folder)
    assert from_unet.name_or_path == str(path)
    for name in COMPONENTS:
        mine, theirs = getattr(from_unet, name).state_dict(), getattr(from_folder, name).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), name


@pytest.fixture(scope="module")
def other_vae(checkpoint):
    """Another VAE for the tiny SDXL (as sdxl-vae-fp16-fix is for SDXL): a folder and two single files."""
    from diffusers import AutoencoderKL

    _, folder, root = checkpoint
    torch.manual_seed(7)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    vae.save_pretrained(root / "other-vae")
    state = {k: v.contiguous() for k, v in vae_to_sgm(vae).items()}
    save_file(state, str(root / "other-vae.safetensors"))
    save_file({k.removeprefix("first_stage_model."): v for k, v in state.items()}, str(root / "bare-vae.safetensors"))
    return vae.state_dict(), root


@pytest.mark.parametrize("source", ["other-vae", "other-vae.safetensors", "bare-vae.safetensors"])
def test_vae_replaces_the_bases_own(checkpoint, other_vae, source):
    single, folder, _ = checkpoint
    expected, root = other_vae
    for base, config in ((folder, None), (single, folder)):
        loaded = load_pipeline(base, config=config, vae=root / source).vae.state_dict()
        assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in loaded)


def test_generate_with_a_vae_equals_a_plain_diffusers_run(checkpoint, other_vae, tmp_path):
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    _, folder, root = checkpoint
    subject = str(root / "subject.safetensors")
    args = ["generate", "--subject", subject, "--style", str(root / "style.safetensors"), "--method", "subject"]
    args += ["--prompt", "a dog", "--steps", "2", "--base", str(folder), "--vae", str(root / "other-vae")]
    assert main([*args, "--out", str(tmp_path)]) == 0
    (png,) = tmp_path.glob("*.png")
    plain = StableDiffusionXLPipeline.from_pretrained(
        str(folder), vae=AutoencoderKL.from_pretrained(root / "other-vae")
    )
    plain.load_lora_weights(subject)
    expected = plain("a dog", num_inference_steps=2, guidance_scale=5.0, generator=torch.Generator().manual_seed(0))
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(expected.images[0]))
    assert f"--vae {root / 'other-vae'}" in json.loads(png.with_suffix(".json").read_text())["command"]


@pytest.mark.parametrize(
    "name, words",
    [("subject.safetensors", "this is a LoRA, not a VAE"), ("unet.safetensors", "not a VAE (no encoder.* / decoder.*")],
)
def test_what_is_not_a_vae_is_refused_in_one_line(checkpoint, name, words):
    _, folder, root = checkpoint
    if name == "unet.safetensors":
        sgm_file(root / name, {SGM_UNET + "input_blocks.0.0.weight": (4, 4)})
    with pytest.raises(BaseModelError) as info:
        load_pipeline(folder, vae=root / name)
    message = str(info.value)
    assert message.startswith(f"{root / name}: {words}") and "\n" not in message


def _with_nan(source, target, key):
    state = load_file(str(source))
    state[key] = state[key].clone()
    state[key].view(-1)[3] = float("nan")
    save_file(state, str(target))


@pytest.mark.parametrize("where", ["folder", "single file"])
def test_a_base_with_nan_weights_is_refused(checkpoint, tmp_path, where):
    """An fp16 merge that overflowed would render black with no error."""
    single, folder, _ = checkpoint
    if where == "folder":
        base = shutil.copytree(folder, tmp_path / "nan-base")
        weights = base / "unet" / "diffusion_pytorch_model.safetensors"
        _with_nan(weights, weights, "down_blocks.1.attentions.0.proj_in.weight")
        kwargs = {}
    else:
        base, kwargs = tmp_path / "nan.safetensors", {"config": folder}
        _with_nan(single, base, SGM_UNET + "input_blocks.4.1.proj_in.weight")
    with pytest.raises(BaseModelError) as info:
        load_pipeline(base, **kwargs)
    assert (
        str(info.value) == f"{base}: its unet holds NaN or infinite weights (down_blocks.1.attentions.0.proj_in.weight)"
    )


def test_a_nan_vae_is_refused_and_can_be_replaced(checkpoint, other_vae, tmp_path):
    single, folder, root = checkpoint
    nan_vae = tmp_path / "nan-vae.safetensors"
    _with_nan(root / "other-vae.safetensors", nan_vae, "first_stage_model.decoder.conv_out.weight")
    with pytest.raises(BaseModelError) as info:
        load_pipeline(single, config=folder, vae=nan_vae)
    assert str(info.value) == f"{nan_vae}: its VAE holds NaN or infinite weights (decoder.conv_out.weight)"
    base = tmp_path / "nan-vae-base.safetensors"
    _with_nan(single, base, "first_stage_model.decoder.conv_out.weight")
    with pytest.raises(BaseModelError, match="its vae holds NaN or infinite weights"):
        load_pipeline(base, config=folder)
    assert load_pipeline(base, config=folder, vae=root / "other-vae").vae.state_dict().keys() == other_vae[0].keys()
