"""FLUX.1 on the built-in tiny FLUX.1 (FLUX.1's real block layout: 19 double and 38 single blocks,
tiny widths), fp32 on the CPU: routing equals diffusers' own LoRA paths bit for bit, the step comes
from the flow-matching scheduler's progress, BFL's fused layouts split exactly, the commands run."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import estlora
from estlora.cli import main
from estlora.errors import BaseModelMismatchError, SettingError
from estlora.families import family_named, family_of
from estlora.loading.lora import load_lora
from estlora.runtime import fusion as fusion_module
from estlora.runtime.routing import RoutedLinear

PROMPT = "a photo of sks dog in szn style"
FLUX = family_named("flux1")


def load_pipe(folder):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, steps=3, seed=0, **kwargs):
    kwargs.setdefault("max_sequence_length", 16)
    out = pipe(
        PROMPT,
        num_inference_steps=steps,
        height=32,
        width=32,
        output_type="latent",
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
    return out.images


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    from estlora.testing.tiny_flux import write_tiny_flux

    return write_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux")


@pytest.fixture(scope="module")
def pipe(flux_dir):
    return load_pipe(flux_dir)


def peft_lora(pipe, folder, seed: int, rank: int, alpha: float, targets: list[str]):
    """A LoRA as diffusers' FLUX trainers save it (peft names under `transformer.`, adapter metadata)."""
    from diffusers import FluxPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    model = copy.deepcopy(pipe.transformer)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    metadata = {"r": rank, "lora_alpha": alpha, "target_modules": targets}
    FluxPipeline.save_lora_weights(
        folder,
        transformer_lora_layers=get_peft_model_state_dict(model),
        transformer_lora_adapter_metadata=metadata,
    )
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def lora_paths(pipe, tmp_path_factory):
    """A subject LoRA on every linear of the blocks (rank 4, alpha 2) and a style LoRA (rank 8, alpha 8)."""
    root = tmp_path_factory.mktemp("flux-loras")
    every = list(FLUX.linear_shapes(pipe.transformer))
    return (
        peft_lora(pipe, root / "subject", 1, 4, 2.0, every),
        peft_lora(pipe, root / "style", 2, 8, 8.0, every),
    )


@pytest.fixture(scope="module")
def loras(lora_paths):
    return tuple(load_lora(path) for path in lora_paths)


@pytest.fixture(scope="module")
def ref_pipe(flux_dir, lora_paths):
    """A second copy of the same model, for diffusers' own LoRA path."""
    pipe = load_pipe(flux_dir)
    for name, path in zip(("subject", "style"), lora_paths, strict=True):
        pipe.load_lora_weights(str(path), adapter_name=name)
    return pipe


def test_the_family_and_its_route_sets(pipe, loras):
    assert family_of(pipe) is FLUX
    assert len(FLUX.linear_shapes(pipe.transformer)) == 14 * 19 + 6 * 38 == 494
    assert len(FLUX.linear_shapes(pipe.transformer, "attention")) == 8 * 19 + 4 * 38 == 304
    layers = FLUX.routed(FLUX.linear_shapes(pipe.transformer), "blocks")
    assert layers[0].startswith("transformer_blocks.0.") and layers[-1].startswith("single_transformer_blocks.37.")
    assert [int(n.split(".")[1]) for n in layers[: 14 * 19 : 14]] == list(range(19))  # numeric, not lexical
    subject, _ = loras
    assert (subject.family, subject.layout, len(subject.projections)) == ("flux1", "diffusers-peft", 494)
    assert {f.alpha for f in subject.projections.values()} == {2.0}  # from the adapter metadata


def test_subject_plan_equals_diffusers_subject_adapter(pipe, ref_pipe, loras):
    ref_pipe.set_adapters(["subject"], [1.0])
    expected = run(ref_pipe)
    with estlora.fuse(pipe, *loras, method="subject") as fusion:
        assert fusion.config.route == "blocks" and len(fusion.layers) == 494
        got = run(pipe)
    assert torch.equal(got, expected)


def test_merge_plan_equals_set_adapters(pipe, ref_pipe, loras):
    ref_pipe.set_adapters(["subject", "style"], [0.7, 0.45])
    expected = run(ref_pipe)
    with estlora.fuse(pipe, *loras, method="merge", subject_scale=0.7, style_scale=0.45):
        assert torch.equal(run(pipe), expected)


def test_switch_plan_equals_the_per_step_recipe(pipe, ref_pipe, loras):
    """diffusers' documented per-step schedule: callback_on_step_end sets the adapters for the next step."""
    steps, every = 5, 2

    def adapter_for(step):
        return "subject" if (step // every) % 2 == 0 else "style"

    def callback(p, step, timestep, callback_kwargs):
        if step + 1 < steps:
            p.set_adapters([adapter_for(step + 1)], [1.0])
        return callback_kwargs

    ref_pipe.set_adapters([adapter_for(0)], [1.0])
    expected = run(ref_pipe, steps=steps, callback_on_step_end=callback)
    with estlora.fuse(pipe, *loras, method="switch", switch_every=every):
        assert torch.equal(run(pipe, steps=steps), expected)


def test_est_routes_every_linear_of_the_blocks_per_step(pipe, loras, monkeypatch):
    """A spy on all 494 routed linears: at step i each applies exactly the plan's row i."""
    seen = {}
    original = RoutedLinear.forward

    def spy(self, x, *args, **kwargs):
        seen.setdefault(self.router.step, {})[self.index] = self.router.row[self.index]
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(RoutedLinear, "forward", spy)
    with estlora.fuse(pipe, *loras, method="est", beta=0.3) as fusion:
        run(pipe, steps=6)
        plan = fusion.plan_for(6)
    assert sorted(seen) == list(range(6))
    for step, applied in seen.items():
        expected = [
            (w_c * c.alpha / c.rank if w_c else 0.0, w_s * s.alpha / s.rank if w_s else 0.0)
            for (w_c, w_s), c, s in (
                (weights, loras[0].projections[name], loras[1].projections[name])
                for name, weights in zip(plan.layers, plan.weights[step].tolist(), strict=True)
            )
        ]
        assert [applied[i] for i in range(494)] == expected
    assert sum(f is not None for f in plan.flip_steps()) > 50, "the pair should make many linears flip"


def test_remove_restores_the_pipeline(pipe, loras):
    before = run(pipe)
    originals = dict(pipe.transformer.named_modules())
    fusion = estlora.fuse(pipe, *loras, method="est", beta=0.5)
    fused = run(pipe)
    fusion.remove()
    assert not torch.equal(fused, before) and torch.equal(run(pipe), before)
    assert dict(pipe.transformer.named_modules()) == originals and not pipe.transformer._forward_pre_hooks


@pytest.mark.parametrize(
    "scheduler, kwargs, calls",
    [
        ("default", {}, [0, 1, 2, 3]),
        ("euler-karras", {}, [0, 1, 2, 3]),
        ("lcm", {}, [0, 1, 2, 3]),
        ("default", {"true_cfg_scale": 2.0, "negative_prompt": "blurry"}, [0, 0, 1, 1, 2, 2, 3, 3]),
        ("default", {"strength": 0.5}, [2, 3]),
    ],
    ids=["flow-match-euler", "karras-sigmas", "lcm", "true-cfg-two-calls-per-step", "img2img-strength-0.5"],
)
def test_step_comes_from_the_flow_matching_schedulers_progress(flux_dir, loras, monkeypatch, scheduler, kwargs, calls):
    """FLUX calls its transformer with keywords and t / 1000: the step still comes from the scheduler."""
    import diffusers

    from estlora.loading.samplers import make_scheduler

    seen = []
    real = fusion_module.denoising_step

    def spy(sched, timestep):
        result = real(sched, timestep)
        seen.append(result)
        return result

    monkeypatch.setattr(fusion_module, "denoising_step", spy)
    pipe = load_pipe(flux_dir)
    pipe.scheduler = make_scheduler(pipe.scheduler, FLUX, scheduler)
    if "strength" in kwargs:
        pipe = diffusers.FluxImg2ImgPipeline(**pipe.components)
        pipe.set_progress_bar_config(disable=True)
        kwargs = {**kwargs, "image": torch.rand(1, 3, 32, 32)}
    with estlora.fuse(pipe, *loras, method="est", beta=0.5):
        for _ in range(2):  # repeated calls carry no state
            seen.clear()
            run(pipe, steps=4, **kwargs)
            assert [step for step, _ in seen] == calls
            assert {n for _, n in seen} == {4}


def test_bf16_equals_diffusers_bf16(flux_dir, lora_paths, loras):
    from diffusers import FluxPipeline

    ours, ref = (FluxPipeline.from_pretrained(flux_dir, torch_dtype=torch.bfloat16) for _ in range(2))
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    for name, path in zip(("subject", "style"), lora_paths, strict=True):
        ref.load_lora_weights(str(path), adapter_name=name)
    ref.set_adapters(["subject", "style"], [1.0, 0.6])
    with estlora.fuse(ours, *loras, method="merge", style_scale=0.6):
        assert torch.equal(run(ours, steps=2), run(ref, steps=2))


def test_route_attention_with_merge_equals_diffusers(pipe, flux_dir, lora_paths, loras):
    """Route `attention` routes 304 linears; the other 190 of the LoRA are merged by diffusers' loader."""
    plain = load_pipe(flux_dir)
    plain.load_lora_weights(str(lora_paths[0]), adapter_name="plain")
    expected = run(plain)
    with estlora.fuse(pipe, *loras, method="subject", route="attention", other_weights="merge") as fusion:
        assert len(fusion.layers) == 304
        assert torch.equal(run(pipe), expected)


def test_loras_of_the_other_family_are_refused(pipe, tiny_dir, loras):
    with pytest.raises(BaseModelMismatchError, match="a SDXL LoRA, but the base is FLUX.1"):
        estlora.fuse(pipe, "example:subject", loras[1])
    from diffusers import StableDiffusionXLPipeline

    with pytest.raises(BaseModelMismatchError, match="a FLUX.1 LoRA, but the pipeline is SDXL"):
        estlora.fuse(StableDiffusionXLPipeline.from_pretrained(tiny_dir), loras[0], "example:style")
    assert not any(isinstance(m, RoutedLinear) for m in pipe.transformer.modules())


def test_flux_settings_are_checked_against_the_family():
    from estlora.config import SamplingConfig

    with pytest.raises(SettingError, match="width: must be a multiple of 16 on FLUX.1"):
        FLUX.check_sampling(SamplingConfig(width=40))
    with pytest.raises(SettingError, match="guidance-rescale: is for classifier-free guidance on UNets"):
        FLUX.check_sampling(SamplingConfig(guidance_rescale=0.7))
    with pytest.raises(SettingError, match="true-cfg: needs a --negative-prompt"):
        FLUX.check_sampling(SamplingConfig(true_cfg=2.0))
    with pytest.raises(SettingError, match="true-cfg: is for models with a T5 encoder"):
        family_named("sdxl").check_sampling(SamplingConfig(true_cfg=2.0))
    with pytest.raises(SettingError, match="scheduler: must be one of default, euler, euler-karras"):
        FLUX.check_sampling(SamplingConfig(scheduler="dpm++2m"))
    assert FLUX.call_arguments(SamplingConfig(true_cfg=3.0, negative_prompt="x", max_sequence_length=77), 28) == {
        "num_inference_steps": 28,
        "guidance_scale": 3.5,
        "negative_prompt": "x",
        "true_cfg_scale": 3.0,
        "max_sequence_length": 77,
    }


# ---------------------------------------------------------------- BFL's layouts: kohya, ComfyUI


def bfl_truth(shapes: dict, seed: int = 5) -> dict:
    """BFL module (kohya's spelling) -> (down, up, alpha) for a few fused and plain modules."""
    generator = torch.Generator().manual_seed(seed)
    width = shapes["transformer_blocks.0.attn.to_q"][1]
    mlp = shapes["single_transformer_blocks.0.proj_mlp"][0]
    modules = {
        "double_blocks_0_img_attn_qkv": (3 * width, width),
        "double_blocks_0_txt_attn_qkv": (3 * width, width),
        "double_blocks_0_img_attn_proj": (width, width),
        "double_blocks_3_img_mlp_0": shapes["transformer_blocks.3.ff.net.0.proj"],
        "double_blocks_3_txt_mod_lin": shapes["transformer_blocks.3.norm1_context.linear"],
        "single_blocks_7_linear1": (3 * width + mlp, width),
        "single_blocks_7_linear2": shapes["single_transformer_blocks.7.proj_out"],
        "single_blocks_7_modulation_lin": shapes["single_transformer_blocks.7.norm.linear"],
    }
    return {
        name: (torch.randn(2 + i % 2, n, generator=generator), torch.randn(o, 2 + i % 2, generator=generator), 1.0 + i)
        for i, (name, (o, n)) in enumerate(modules.items())
    }


def kohya_flux_file(path, truth, comfy=False):
    state = {}
    for name, (down, up, alpha) in truth.items():
        if comfy:  # ComfyUI: `diffusion_model.` + BFL's module path with dots (img_attn.qkv, img_mlp.0, linear1)
            kind, number, part = re.fullmatch(r"(double|single)_blocks_(\d+)_(\w+)", name).groups()
            stem, dot, last = part.rpartition("_")
            head = (
                f"diffusion_model.{kind}_blocks.{number}.{stem}.{last}"
                if dot
                else f"diffusion_model.{kind}_blocks.{number}.{part}"
            )
            state |= {f"{head}.lora_A.weight": down, f"{head}.lora_B.weight": up, f"{head}.alpha": torch.tensor(alpha)}
        else:
            key = f"lora_unet_{name}"
            state |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)}
    state["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(2, 32)
    state["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(32, 2)
    save_file(state, str(path))
    return path


@pytest.mark.parametrize("comfy", [False, True], ids=["kohya", "comfyui"])
def test_bfl_fused_updates_split_exactly(pipe, tmp_path, comfy):
    """delta W of each slice is scale * B[rows] @ A: q, k, v get a third of qkv's rows each; a single
    block's linear1 gives q, k, v (h rows each) and proj_mlp (4 h), at the tiny model's own widths."""
    shapes = FLUX.linear_shapes(pipe.transformer)
    truth = bfl_truth(shapes)
    lora = load_lora(kohya_flux_file(tmp_path / "bfl.safetensors", truth, comfy), shapes, "tiny FLUX.1")
    assert (lora.family, lora.layout) == ("flux1", "comfyui" if comfy else "kohya")
    width = shapes["transformer_blocks.0.attn.to_q"][1]
    expected = {}
    for name, (down, up, alpha) in truth.items():
        kind, number, part = re.fullmatch(r"(double|single)_blocks_(\d+)_(\w+)", name).groups()
        block = f"{'transformer_blocks' if kind == 'double' else 'single_transformer_blocks'}.{number}"
        targets = {
            "img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
            "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
            "img_attn_proj": ["attn.to_out.0"],
            "img_mlp_0": ["ff.net.0.proj"],
            "txt_mod_lin": ["norm1_context.linear"],
            "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
            "linear2": ["proj_out"],
            "modulation_lin": ["norm.linear"],
        }[part]
        starts = [0, width, 2 * width, 3 * width, up.shape[0]] if len(targets) == 4 else None
        for i, target in enumerate(targets):
            rows = slice(starts[i], starts[i + 1]) if starts else slice(i * width, (i + 1) * width)
            expected[f"{block}.{target}"] = (down, up[rows] if len(targets) > 1 else up, alpha)
    assert set(lora.projections) == set(expected)
    for module, (down, up, alpha) in expected.items():
        got = lora.projections[module]
        assert torch.equal(got.down, down) and torch.equal(got.up, up) and got.alpha == alpha, module
        assert (got.out_features, got.in_features) == shapes[module], module
    assert set(lora.other) == {k for k in lora.other if k.startswith("lora_te1_")} and len(lora.other) == 2


def test_bfl_file_with_an_unsplittable_fused_update_is_one_clear_error(pipe, tmp_path):
    from estlora.errors import LoraShapeError

    truth = bfl_truth(FLUX.linear_shapes(pipe.transformer))
    down, up, alpha = truth["single_blocks_7_linear1"]
    truth["single_blocks_7_linear1"] = (down, up[:-1], alpha)  # one row short of 7 h
    with pytest.raises(
        LoraShapeError, match="lora_unet_single_blocks_7_linear1: 111 rows cannot be split into 4 fused"
    ):
        load_lora(kohya_flux_file(tmp_path / "bad.safetensors", truth))
    # A ComfyUI file's message names its own key, not the kohya spelling it is read through.
    with pytest.raises(LoraShapeError, match=r"diffusion_model\.single_blocks\.7\.linear1: 111 rows cannot be split"):
        load_lora(kohya_flux_file(tmp_path / "bad-comfy.safetensors", truth, comfy=True))


# ---------------------------------------------------------------- the commands


def test_generate_inspect_and_plan_on_flux(flux_dir, lora_paths, tmp_path, capsys):
    from estlora.testing.tiny_encoders import builtin_tiny_dino

    subject, style = (str(p) for p in lora_paths)
    args = ["generate", "--base", str(flux_dir), "--subject", subject, "--style", style, "--prompt", PROMPT]
    args += ["--steps", "3", "--width", "32", "--height", "32", "--max-sequence-length", "16"]
    args += ["--dino-model", str(builtin_tiny_dino()), "--beta-probe-steps", "2"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "beta = " in capsys.readouterr().out
    (png,) = (tmp_path / "a").glob("*.png")
    meta = json.loads(png.with_suffix(".json").read_text())
    assert (meta["family"], meta["beta_source"], meta["settings"]["route"]) == ("flux1", "measured", "blocks")
    assert (meta["settings"]["guidance"], meta["scheduler"]) == (3.5, "FlowMatchEulerDiscreteScheduler")
    assert main([*shlex.split(meta["command"])[1:], "--out", str(tmp_path / "again")]) == 0
    (again,) = (tmp_path / "again").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(again)))

    assert main(["inspect", subject, "--base", str(flux_dir)]) == 0
    out = capsys.readouterr().out
    assert "base model:  FLUX.1 layout, non-standard widths (16) (guessed from shapes; model family FLUX.1)" in out
    assert "per route:   attention 304, blocks 494 (default blocks)" in out and "fits base" in out
    assert main(["plan", subject, style, "--json", "--beta", "0.5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["family"], report["route"], report["steps"], len(report["layers"])) == ("flux1", "blocks", 28, 494)


def test_tiny_model_command_writes_either_family(tmp_path, capsys):
    assert main(["tiny-model", str(tmp_path / "f"), "--family", "flux1"]) == 0
    assert json.loads((tmp_path / "f" / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    assert "FLUX.1" in capsys.readouterr().out


def test_klora_takes_k_loras_flux_settings(pipe, loras):
    """K-LoRA's FLUX code wraps its time scale (pattern s*, beta 0.85 alpha = 1.275); est keeps the paper's."""
    with estlora.fuse(pipe, *loras, method="klora") as fusion:
        assert (fusion.config.pattern, fusion.plan_for(4).beta) == ("s*", 1.275)
        fusion.set(method="est", beta=0.4)
        assert (fusion.config.pattern, fusion.plan_for(4).beta) == ("s", 0.4)
        fusion.set(method="klora", pattern="s", beta=None)  # asked for: kept
        assert (fusion.config.pattern, fusion.plan_for(4).beta) == ("s", 0.5)
    assert family_named("sdxl").resolve_fusion(estlora.FusionConfig(method="klora")).pattern == "s"


def test_model_cpu_offload_equals_diffusers_under_offload(flux_dir, lora_paths, loras):
    """Under diffusers' model CPU offload (hooks that move each model to the execution device when it
    runs; here the CPU itself) fusion equals diffusers' own LoRA path under the same offload, bit for
    bit: the LoRA factors are buffers of the routed transformer and move with it. (Offload alone
    changes the last bits against a pipeline without it, fused or not.)"""
    ours, ref = load_pipe(flux_dir), load_pipe(flux_dir)
    for name, path in zip(("subject", "style"), lora_paths, strict=True):
        ref.load_lora_weights(str(path), adapter_name=name)
    ref.set_adapters(["subject", "style"], [1.0, 0.6])
    for p in (ours, ref):
        p.enable_model_cpu_offload(device="cpu")
    with estlora.fuse(ours, *loras, method="merge", style_scale=0.6):
        assert torch.equal(run(ours), run(ref))


def test_the_ui_serves_a_flux_base(flux_dir, lora_paths, tmp_path):
    """The page's Studio on a FLUX.1 folder: FLUX.1's defaults in the widgets, its samplers, klora's own pattern."""
    import dataclasses

    pytest.importorskip("gradio")
    from estlora.ui import Studio

    studio = Studio(str(flux_dir), tmp_path)
    sampling = studio.defaults.sampling
    assert (sampling.steps, sampling.guidance, studio.session.family.name) == (28, 3.5, "flux1")
    page = {**dataclasses.asdict(studio.defaults.fusion), **dataclasses.asdict(sampling)}
    page |= {"subject_choice": "upload", "subject_file": str(lora_paths[0]), "style_choice": "upload"}
    page |= {"style_file": str(lora_paths[1]), "prompt": PROMPT, "beta_mode": "auto", "beta": 0.5}
    page |= {"steps": 2, "width": 32, "height": 32, "max_sequence_length": 16}
    images, notes, *_ = studio.run(page, ["klora"], 1, lambda *args, **kwargs: None)
    ((png, _),) = images
    meta = json.loads(Path(png).with_suffix(".json").read_text())
    assert "beta = 1.275 (K-LoRA's default" in notes and meta["settings"]["pattern"] == "s*"
    assert meta["family"] == "flux1" and meta["settings"]["route"] == "blocks"


def test_xlabs_layout_splits_like_bfl(pipe, tmp_path):
    """XLabs' processor LoRAs: qkv_lora1 / qkv_lora2 are the image and text streams' fused q, k, v,
    proj_lora1 / 2 their output projections, a single block's qkv_lora linear1's q, k, v rows; no alphas."""
    shapes = FLUX.linear_shapes(pipe.transformer)
    width = shapes["transformer_blocks.0.attn.to_q"][1]
    generator = torch.Generator().manual_seed(9)
    parts = {"double_blocks.2.processor.qkv_lora2": 3 * width, "double_blocks.2.processor.proj_lora1": width}
    parts["single_blocks.5.processor.qkv_lora"] = 3 * width
    state = {}
    for name, rows in parts.items():
        state |= {f"{name}.down.weight": torch.randn(4, width, generator=generator)}
        state |= {f"{name}.up.weight": torch.randn(rows, 4, generator=generator)}
    save_file(state, str(tmp_path / "xlabs.safetensors"))
    lora = load_lora(tmp_path / "xlabs.safetensors", shapes, "tiny FLUX.1")
    assert lora.layout == "xlabs" and {f.alpha for f in lora.projections.values()} == {4.0}  # alpha = rank
    up = state["double_blocks.2.processor.qkv_lora2.up.weight"]
    assert torch.equal(lora.projections["transformer_blocks.2.attn.add_k_proj"].up, up[width : 2 * width])
    assert torch.equal(
        lora.projections["transformer_blocks.2.attn.to_out.0"].up,
        state["double_blocks.2.processor.proj_lora1.up.weight"],
    )
    single = state["single_blocks.5.processor.qkv_lora.up.weight"]
    assert torch.equal(lora.projections["single_transformer_blocks.5.attn.to_v"].up, single[2 * width :])
    assert len(lora.projections) == 3 + 1 + 3 and not lora.other


def test_a_flux_checkpoint_given_as_a_lora_is_named(tmp_path):
    from estlora.errors import LoraFormatError

    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 1)}, str(tmp_path / "flux1-dev.safetensors"))
    with pytest.raises(LoraFormatError, match="this is a FLUX.1 model checkpoint, not a LoRA"):
        load_lora(tmp_path / "flux1-dev.safetensors")


def test_onetrainer_layout_equals_its_diffusers_twin(pipe, lora_paths, tmp_path):
    """OneTrainer's names (`lora_transformer_` + diffusers' paths with underscores, kohya's parts and
    alphas) load to the very factors of the same LoRA in diffusers' layout."""
    twin = load_lora(lora_paths[0])
    state = {}
    for module, factors in twin.projections.items():
        blocks, number, rest = re.fullmatch(r"((?:single_)?transformer_blocks)\.(\d+)\.(.+)", module).groups()
        name = f"lora_transformer_{blocks}_{number}_{rest.replace('.', '_')}"
        state |= {f"{name}.lora_down.weight": factors.down, f"{name}.lora_up.weight": factors.up}
        state[f"{name}.alpha"] = torch.tensor(factors.alpha)
    save_file(state, str(tmp_path / "onetrainer.safetensors"))
    lora = load_lora(tmp_path / "onetrainer.safetensors", FLUX.linear_shapes(pipe.transformer), "tiny FLUX.1")
    assert (lora.family, lora.layout, set(lora.projections)) == ("flux1", "onetrainer", set(twin.projections))
    for module, factors in twin.projections.items():
        got = lora.projections[module]
        assert torch.equal(got.down, factors.down) and torch.equal(got.up, factors.up) and got.alpha == factors.alpha


def test_a_flux_grid_cell_regenerates_bit_for_bit(flux_dir, lora_paths, tmp_path):
    """`estlora grid` on a FLUX.1 base: klora takes its FLUX settings, and the command a cell's PNG
    carries renders the very pixels again."""
    args = ["grid", "--out", str(tmp_path / "grid"), "--subjects", str(lora_paths[0]), "--styles", str(lora_paths[1])]
    args += ["--prompts", PROMPT, "--seeds", "3", "--methods", "est", "klora", "--base", str(flux_dir)]
    args += ["--steps", "2", "--width", "32", "--height", "32", "--beta", "0.4", "--max-sequence-length", "16"]
    assert main(args) == 0
    cells = [json.loads(line) for line in (tmp_path / "grid" / "manifest.jsonl").read_text().splitlines()]
    assert [cell["method"] for cell in cells] == ["est", "klora"]
    png = tmp_path / "grid" / cells[1]["path"]
    meta = json.loads(Image.open(png).text["estlora"])
    assert (meta["family"], meta["settings"]["pattern"], meta["settings"]["route"]) == ("flux1", "s*", "blocks")
    assert main([*shlex.split(meta["command"])[1:], "--out", str(tmp_path / "again")]) == 0
    (again,) = (tmp_path / "again").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(png)))


@pytest.mark.parametrize("name", ["FluxInpaintPipeline", "FluxKontextPipeline"])
def test_inpaint_and_kontext_pipelines_equal_diffusers(pipe, ref_pipe, loras, name):
    """The same routing under FLUX.1's other pipelines (inpainting with strength 0.6; Kontext, whose
    transformer sees the reference image's tokens beside the latents): a switch plan equals diffusers'
    per-step callback recipe, bit for bit."""
    import diffusers

    cls = getattr(diffusers, name)
    ours, ref = cls(**pipe.components), cls(**ref_pipe.components)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    kwargs = {"image": image, "mask_image": torch.ones(1, 1, 32, 32), "strength": 0.6} if "Inpaint" in name else {}
    if "Kontext" in name:
        kwargs = {"image": image, "_auto_resize": False, "max_area": 32 * 32}
    steps, every = 5, 2

    def adapter_for(step):
        return "subject" if (step // every) % 2 == 0 else "style"

    first = steps - int(steps * 0.6) if "Inpaint" in name else 0
    ref.set_adapters([adapter_for(first)], [1.0])

    def callback(p, step, timestep, tensors):  # `step` counts the loop, which inpainting starts at `first`
        p.set_adapters([adapter_for(first + step + 1)], [1.0])
        return tensors

    def render(p, **extra):
        p.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)
        common = dict(prompt=PROMPT, num_inference_steps=steps, height=32, width=32, max_sequence_length=16)
        return p(**common, output_type="latent", generator=generator, **kwargs, **extra).images

    expected = render(ref, callback_on_step_end=callback)
    with estlora.fuse(ours, *loras, method="switch", switch_every=every):
        got = render(ours)
    assert torch.equal(got, expected)


def test_comfyui_diffs_on_flux_are_ignored_or_refused_in_one_line(pipe, tmp_path):
    """ComfyUI's `.diff_b` beside FLUX.1 factors: kept as other weights (ignored by default); merging
    them is refused by name, as estlora cannot place them on BFL's fused modules yet."""
    from safetensors.torch import load_file

    from estlora.errors import LoraFormatError

    shapes = FLUX.linear_shapes(pipe.transformer)
    path = kohya_flux_file(tmp_path / "comfy.safetensors", bfl_truth(shapes), comfy=True)
    state = load_file(str(path)) | {"diffusion_model.double_blocks.0.img_attn.qkv.diff_b": torch.zeros(48)}
    save_file(state, str(path))
    lora = load_lora(path)
    assert "diffusion_model.double_blocks.0.img_attn.qkv.diff_b" in lora.other
    with estlora.fuse(pipe, lora, lora, method="subject"):
        pass
    with pytest.raises(LoraFormatError, match=r"qkv.diff_b: a full-weight difference estlora does not place on FLUX.1"):
        estlora.fuse(pipe, lora, lora, method="subject", other_weights="merge")
    assert not any(isinstance(m, RoutedLinear) for m in pipe.transformer.modules())
