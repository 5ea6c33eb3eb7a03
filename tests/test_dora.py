"""DoRA: peft's `lora_magnitude_vector` (diffusers' saves) and LyCORIS' `dora_scale` (kohya's names),
applied as DoRA against the loaded base, bit for bit peft's DoRA path and to rounding LyCORIS' own.

diffusers drops kohya's `dora_scale` and runs such a file as a plain LoRA; estlora does not.
"""

from __future__ import annotations

import copy

import pytest
import torch
from lycoris.wrapper import create_lycoris_from_weights
from safetensors.torch import save_file

import estlora
from conftest import latents as render
from conftest import load_pipeline
from estlora import cli
from estlora import scores as S
from estlora.errors import FusionError, LoraFormatError, LoraShapeError
from estlora.loading.lora import load_lora
from estlora.updates import DoraFactors


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_dir):
    return load_pipeline(tiny_dir)


@pytest.fixture
def reference(tiny_dir):
    """A second copy of the same model, loaded as the first (a deep copy's weights sit at other
    addresses, and CPU kernels round by alignment: the last bits would differ before any LoRA)."""
    return load_pipeline(tiny_dir)


def dora_adapter(model, targets: list[str], rank: int, alpha: float, seed: int):
    """A trained-looking peft DoRA on a copy of `model`: its state dict and the adapter metadata."""
    from peft import LoraConfig, get_peft_model_state_dict

    model = copy.deepcopy(model)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, use_dora=True, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
            elif "lora_magnitude_vector" in name:  # away from ||W0 + sBA||, as training moves it
                parameter.mul_(1 + 0.3 * torch.rand(parameter.shape, generator=generator))
    metadata = {"r": rank, "lora_alpha": alpha, "use_dora": True, "target_modules": targets}
    return get_peft_model_state_dict(model), metadata


def saved_peft_dora(unet, folder, rank: int, alpha: float, seed: int):
    """A DoRA as diffusers' trainers save it: peft names under `unet.`, magnitudes (out,), adapter metadata."""
    from diffusers import StableDiffusionXLPipeline

    state, metadata = dora_adapter(unet, ["to_q", "to_k", "to_v", "to_out.0"], rank, alpha, seed)
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=state, unet_lora_adapter_metadata=metadata)
    return folder / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def peft_dora(sdxl_pipe, tmp_path_factory):
    return saved_peft_dora(sdxl_pipe.unet, tmp_path_factory.mktemp("dora"), 4, 2, 4)


@pytest.fixture(scope="module")
def other_peft_dora(sdxl_pipe, tmp_path_factory):
    return saved_peft_dora(sdxl_pipe.unet, tmp_path_factory.mktemp("other-dora"), 8, 8, 9)


@pytest.fixture(scope="module")
def lycoris_dora(sdxl_pipe, tmp_path_factory):
    """A LyCORIS LoRA with DoRA (`dora_scale`, (out, 1)) on every attention projection, LyCORIS' own names."""
    generator = torch.Generator().manual_seed(5)
    state = {}
    for name, module in sdxl_pipe.unet.named_modules():
        if isinstance(module, torch.nn.Linear) and ".attn" in name and name.rsplit(".", 1)[-1] in ("to_q", "to_v"):
            key = "lycoris_" + name.replace(".", "_")
            out, n = module.weight.shape
            state[f"{key}.lora_down.weight"] = torch.randn(2, n, generator=generator) * 0.3
            state[f"{key}.lora_up.weight"] = torch.randn(out, 2, generator=generator) * 0.3
            state[f"{key}.alpha"] = torch.tensor(1.0)
            norms = module.weight.detach().norm(dim=1, keepdim=True)
            state[f"{key}.dora_scale"] = norms * (1 + 0.3 * torch.rand(out, 1, generator=generator))
    path = tmp_path_factory.mktemp("lycoris-dora") / "dora.safetensors"
    save_file(state, str(path))
    return path


def test_peft_dora_loads_as_dora(peft_dora):
    lora = load_lora(peft_dora)
    assert lora.kinds == {"dora": 560}
    update = next(iter(lora.projections.values()))
    assert isinstance(update, DoraFactors) and update.convention == "peft" and update.magnitude.shape == (64,)


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_subject_method_equals_peft_dora_bit_for_bit(sdxl_pipe, reference, peft_dora, strength):
    """`method="subject"` at any strength is peft's DoRA path (diffusers' loader, `set_adapters`)."""
    reference.load_lora_weights(str(peft_dora), adapter_name="dora")
    reference.set_adapters(["dora"], [strength])
    expected = render(reference)
    with estlora.fuse(sdxl_pipe, peft_dora, peft_dora, method="subject", subject_scale=strength):
        got = render(sdxl_pipe)
    assert (expected - render(sdxl_pipe)).abs().max() > 1e-3
    assert torch.equal(got, expected)
    # merged routing writes W' at that strength into the weights: the same, within the weights' rounding
    with estlora.fuse(sdxl_pipe, peft_dora, peft_dora, method="subject", subject_scale=strength, merged=True):
        torch.testing.assert_close(render(sdxl_pipe), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("where", ["host", "accelerator"])
def test_merged_est_between_two_doras_is_the_unfused_plan(sdxl_pipe, peft_dora, other_peft_dora, where, monkeypatch):
    """est moves projections from one DoRA to the other mid-run: merged, each weight is then the other
    DoRA's W' of W0, not renormalised against a weight that still holds the first's (its base is the
    kept W0), whether the merged weights are kept (host) or formed each time (accelerator)."""
    if where == "accelerator":
        monkeypatch.setattr("estlora.runtime.fusion.swaps_weights", lambda model, weights: False)
    with estlora.fuse(sdxl_pipe, peft_dora, other_peft_dora, method="est", beta=0.5) as exact:
        expected = render(sdxl_pipe, steps=4)
        choices = exact.plan_for(4).weights
        assert ((choices[1:] > 0) != (choices[:-1] > 0)).any()  # some projection changes LoRA
    with estlora.fuse(sdxl_pipe, peft_dora, other_peft_dora, method="est", beta=0.5, merged=True) as merged:
        assert merged.weights.swaps == (where == "host")
        torch.testing.assert_close(render(sdxl_pipe, steps=4), expected, rtol=1e-4, atol=1e-5)


def test_lycoris_dora_scale_equals_lycoris_applied(sdxl_pipe, reference, lycoris_dora):
    """kohya / LyCORIS `dora_scale` is applied as LyCORIS applies it (fp32 rounding apart), not dropped."""
    network, _ = create_lycoris_from_weights(1.0, str(lycoris_dora), reference.unet)
    network.apply_to()
    assert len(network.loras) == 280 and all(module.wd for module in network.loras)
    expected = render(reference)
    with estlora.fuse(sdxl_pipe, lycoris_dora, lycoris_dora, method="subject"):
        got = render(sdxl_pipe)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    with estlora.fuse(sdxl_pipe, lycoris_dora, lycoris_dora, method="subject", merged=True):
        torch.testing.assert_close(render(sdxl_pipe), expected, rtol=1e-4, atol=1e-5)
    plain = load_lora(lycoris_dora)
    plain.projections = {
        name: type(update).__mro__[1](down=update.down, up=update.up, alpha=update.alpha)
        for name, update in plain.projections.items()
    }
    with estlora.fuse(sdxl_pipe, plain, plain, method="subject"):  # what diffusers' loader would run
        as_plain_lora = render(sdxl_pipe)
    assert (as_plain_lora - expected).abs().max() > 1e-3


def test_energy_is_of_the_update_applied_to_the_loaded_base(sdxl_pipe, peft_dora):
    """E of a DoRA projection is ||W' - W0||_F^2 with W' = m (W0 + s B A) / ||W0 + s B A||_row."""
    with estlora.fuse(sdxl_pipe, peft_dora, peft_dora, method="est", beta=0.5) as fusion:
        plan = fusion.plan_for(4)
        name = fusion.layers[7]
        update = fusion.subject.projections[name]
        base = update.base.double()
        merged = base + update.scale * update.up.double() @ update.down.double()
        applied = update.magnitude.double()[:, None] * merged / merged.norm(dim=1, keepdim=True) - base
        assert plan.energy_subject[7] == pytest.approx(float(applied.square().sum()), rel=1e-5)
        assert S.l1_of(update, update.scale) == pytest.approx(float(applied.abs().sum()), rel=1e-5)
        torch.testing.assert_close((S.dense_of(update) * update.scale).double(), applied, rtol=1e-4, atol=1e-6)


def test_plan_without_a_model_refuses_dora_in_one_line(peft_dora, capsys):
    assert cli.main(["plan", str(peft_dora), str(peft_dora)]) != 0
    err = capsys.readouterr().err
    assert str(peft_dora) in err and "DoRA" in err and "base weights" in err and len(err.strip().splitlines()) == 1


def test_dora_magnitudes_outside_the_route_are_not_merged_as_plain_lora(sdxl_pipe, tmp_path):
    key = "lora_unet_input_blocks_4_1_proj_in"
    proj_in = sdxl_pipe.unet.down_blocks[1].attentions[0].proj_in
    out, n = proj_in.weight.shape
    state = {
        f"{key}.lora_down.weight": torch.ones(2, n),
        f"{key}.lora_up.weight": torch.ones(out, 2),
        f"{key}.dora_scale": torch.ones(out, 1),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.ones(2, 64),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.ones(64, 2),
    }
    path = tmp_path / "dora.safetensors"
    save_file(state, str(path))
    with pytest.raises(LoraFormatError, match="DoRA magnitudes outside the routed linears"):
        estlora.fuse(sdxl_pipe, path, path, method="subject", other_weights="merge")
    with estlora.fuse(sdxl_pipe, path, path, method="subject", route="blocks", other_weights="merge") as fusion:
        assert "down_blocks.1.attentions.0.proj_in" in fusion.layers


@pytest.mark.parametrize(
    ("magnitude", "error", "words"),
    [
        (torch.ones(1, 64), LoraFormatError, "magnitude on the input axis"),
        (torch.ones(32, 1), LoraShapeError, "DoRA magnitude has shape (32, 1), expected 64 rows"),
        (torch.full((64, 1), float("nan")), Exception, "NaN"),
    ],
    ids=["input-axis", "wrong-shape", "nan"],
)
def test_bad_dora_magnitudes_are_one_clear_error(tmp_path, magnitude, error, words):
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    path = tmp_path / "bad.safetensors"
    state = {
        f"{key}.lora_down.weight": torch.ones(2, 64),
        f"{key}.lora_up.weight": torch.ones(64, 2),
        f"{key}.dora_scale": magnitude,
    }
    save_file(state, str(path))
    with pytest.raises(error) as info:
        load_lora(path)
    assert str(path) in str(info.value) and key in str(info.value) and words in str(info.value)


def test_a_quantized_base_is_refused_for_dora(peft_dora, sdxl_pipe):
    from estlora.runtime.fusion import _with_bases

    lora = load_lora(peft_dora)
    unet = copy.deepcopy(sdxl_pipe.unet)
    name = next(iter(lora.projections))
    unet.get_submodule(name).weight = torch.nn.Parameter(torch.zeros(64, 64, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(FusionError, match="DoRA rescales the base weight"):
        _with_bases(lora, unet)


def test_flux_peft_dora_equals_peft_bit_for_bit(tmp_path):
    """FLUX.1's diffusers DoRA files (`transformer.` + `lora_magnitude_vector`): peft's DoRA path exactly."""
    from diffusers import FluxPipeline

    from estlora.testing.tiny_flux import write_tiny_flux

    folder = write_tiny_flux(tmp_path / "tiny-flux")
    pipe, reference = load_pipeline(folder), load_pipeline(folder)
    state, metadata = dora_adapter(pipe.transformer, ["to_q", "to_v", "proj_mlp", "ff.net.2"], 2, 4, 6)
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    assert "dora" in load_lora(path).kinds
    reference.load_lora_weights(str(path), adapter_name="dora")
    expected = render(reference)
    with estlora.fuse(pipe, path, path, method="subject"):
        got = render(pipe)
    assert (expected - render(pipe)).abs().max() > 1e-3
    assert torch.equal(got, expected)


def test_inspect_names_dora(peft_dora, capsys):
    assert cli.main(["inspect", str(peft_dora)]) == 0
    assert "kinds:       DoRA (560)" in capsys.readouterr().out
