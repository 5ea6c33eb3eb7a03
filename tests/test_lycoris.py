"""LyCORIS LoKr and LoHa: read, scored and applied exactly as the `lycoris-lora` package (the reference,
independent of estlora) applies them, on SDXL and FLUX.1.

Files are written the way LyCORIS saves them: its own parts under its own prefix (`lycoris_` + the
diffusers module path with underscores, what SimpleTuner writes), under kohya's SGM names
(`lora_unet_input_blocks_4_1_...`) and ComfyUI's (`diffusion_model.input_blocks.4.1....`); factor
shapes come from LyCORIS' own `weight_gen`, so every LoKr form occurs: both matrices full (applied at
scale 1), W2 decomposed, W1 decomposed, both decomposed.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from lycoris.functional.lokr import weight_gen
from lycoris.modules import get_module, make_module
from lycoris.wrapper import create_lycoris_from_weights
from safetensors.torch import load_file, save_file

import estlora
from conftest import latents as render
from conftest import load_pipeline
from estlora import scores as S
from estlora.config import FusionConfig
from estlora.errors import LoraFormatError, LoraShapeError
from estlora.families import family_named
from estlora.loading.inspect import report, summary
from estlora.loading.lora import load_lora
from estlora.plan import build_plan, pair_scores
from estlora.runtime.deltas import KronDelta
from estlora.updates import LohaFactors, LokrFactors
from test_lora_formats import comfy_name, kohya_name

SDXL = family_named("sdxl")
FLUX = family_named("flux1")
# LoKr forms by (factor, rank, decompose_both), as LyCORIS' weight_gen shapes them for a 64 x 64 linear.
LOKR_FORMS = {
    "full-full": (-1, 4, False),  # W1 (8, 8), W2 (8, 8): scale 1 whatever alpha is
    "w2-decomposed": (4, 2, False),  # W1 (4, 4), W2 (16, 2) @ (2, 16)
    "w1-decomposed": (16, 2, True),  # W1 (16, 2) @ (2, 16), W2 (4, 4)
    "both-decomposed": (8, 1, True),  # W1 (8, 1) @ (1, 8), W2 (8, 1) @ (1, 8)
}


def lokr_parts(out: int, n: int, form: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    factor, rank, both = LOKR_FORMS[form]
    names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    shapes = weight_gen(torch.empty(out, n), rank, tucker=False, factor=factor, decompose_both=both)
    return {
        name: torch.randn(t.shape, generator=generator) * 0.3 for name, t in zip(names, shapes, strict=True) if t is not None
    }


def loha_parts(out: int, n: int, rank: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    shapes = {"hada_w1_a": (out, rank), "hada_w1_b": (rank, n), "hada_w2_a": (out, rank), "hada_w2_b": (rank, n)}
    return {name: torch.randn(shape, generator=generator) * 0.3 for name, shape in shapes.items()}


def lycoris_name(module: str) -> str:
    """LyCORIS' own prefix and spelling: `lycoris_down_blocks_1_attentions_0_..._to_q`."""
    return "lycoris_" + module.replace(".", "_")


def sdxl_lycoris_state(shapes: dict, kind: str, seed: int, name_of=lycoris_name) -> dict[str, torch.Tensor]:
    """LyCORIS' own save of an SDXL UNet network: `lycoris_<diffusers path with underscores>.<part>`,
    LoKr forms and alphas varying from module to module (alpha 0 included: LyCORIS reads it as dim)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for i, (module, (out, n)) in enumerate(sorted(shapes.items())):
        if kind == "lokr":
            parts = lokr_parts(out, n, list(LOKR_FORMS)[i % 4], generator)
        else:
            parts = loha_parts(out, n, 2 + i % 3, generator)
        name = name_of(module)
        state |= {f"{name}.{part}": value for part, value in parts.items()}
        state[f"{name}.alpha"] = torch.tensor(float((0, 1, 3, 8)[(i // 4 + i) % 4]))
    return state


def lycoris_delta(kind: str, params, name: str, module: torch.nn.Module) -> torch.Tensor:
    """LyCORIS' delta W as its modules' forward applies it (`get_weight`, scale included once; 4.1.3's
    `get_diff_weight`, which its `merge_to` uses, multiplies by the scale a second time)."""
    lycoris_module = make_module(kind, params, name, module)
    return lycoris_module.get_weight(lycoris_module.shape).detach()


def reference_diffs(state: dict, model: torch.nn.Module, prefix: str = "lycoris") -> dict[str, torch.Tensor]:
    """module path -> LyCORIS' own delta W (scale included) for every module its state names."""
    out = {}
    for path, module in model.named_modules():
        name = f"{prefix}_{path}".replace(".", "_")
        if any(key.startswith(f"{name}.") for key in state):
            kind, params = get_module(state, name)
            out[path] = lycoris_delta(kind, params, name, module)
    return out


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_dir):
    return load_pipeline(tiny_dir)


@pytest.fixture(scope="module")
def sdxl_files(tiny_shapes, tmp_path_factory):
    root = tmp_path_factory.mktemp("lycoris")
    files = {}
    for kind, seed in (("lokr", 1), ("loha", 2)):
        files[kind] = root / f"{kind}.safetensors"
        save_file(sdxl_lycoris_state(tiny_shapes, kind, seed), str(files[kind]))
    return files


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_every_update_is_the_one_lycoris_applies(sdxl_pipe, sdxl_files, kind):
    """scale * delta W of each projection equals LyCORIS' own diff weight, for every form and alpha."""
    lora = load_lora(sdxl_files[kind])
    reference = reference_diffs(load_file(str(sdxl_files[kind])), sdxl_pipe.unet)
    assert set(lora.projections) == set(reference) and len(reference) == 560
    assert lora.kinds == {kind: 560} and lora.layout == "lycoris"
    for module, update in lora.projections.items():
        ours = S.dense_of(update) * update.scale
        torch.testing.assert_close(ours, reference[module], rtol=1e-6, atol=1e-7, msg=module)
    if kind == "lokr":  # both matrices full: scale 1 whatever alpha says, as LyCORIS applies it
        full = [u for u in lora.projections.values() if not u.decomposed]
        assert full and all(u.scale == 1.0 for u in full) and {u.alpha for u in full} != {1.0}


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_subject_method_equals_lycoris_applied_to_the_unet(sdxl_pipe, sdxl_files, kind):
    """A whole run with the LoKr (or LoHa) as the subject equals LyCORIS' network applied to a copy of the
    UNet (LyCORIS merges delta W into the weight each call; estlora adds delta W x: fp32 rounding apart)."""
    from diffusers import StableDiffusionXLPipeline

    reference = StableDiffusionXLPipeline(**{**sdxl_pipe.components, "unet": copy.deepcopy(sdxl_pipe.unet)})
    reference.set_progress_bar_config(disable=True)
    network, _ = create_lycoris_from_weights(1.0, str(sdxl_files[kind]), reference.unet)
    network.apply_to()
    assert len(network.loras) == 560
    expected = render(reference)
    base = render(sdxl_pipe)
    other = sdxl_files["loha" if kind == "lokr" else "lokr"]
    with estlora.fuse(sdxl_pipe, sdxl_files[kind], other, method="subject"):
        got = render(sdxl_pipe)
    assert (expected - base).abs().max() > 1e-2  # the update is visible
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    with estlora.fuse(sdxl_pipe, sdxl_files[kind], other, method="subject", merged=True):  # as LyCORIS merges
        torch.testing.assert_close(render(sdxl_pipe), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["kohya-sgm", "kohya-diffusers", "comfyui"])
def test_kohya_and_comfyui_names_read_the_same_updates(tmp_path, sdxl_files, tiny_shapes, layout):
    """The same LoKr under kohya's names (SGM or diffusers blocks) and ComfyUI's dotted SGM paths loads to
    the very tensors of LyCORIS' own save; messages and `inspect` name the file's own modules."""
    name_of = {
        "kohya-sgm": lambda m: kohya_name(m, sgm=True),
        "kohya-diffusers": lambda m: kohya_name(m, sgm=False),
        "comfyui": comfy_name,
    }[layout]
    state = sdxl_lycoris_state(tiny_shapes, "lokr", 1, name_of)  # the seed of sdxl_files' LoKr
    path = tmp_path / "lokr.safetensors"
    save_file(state, str(path))
    theirs, ours = load_lora(sdxl_files["lokr"]), load_lora(path)
    assert ours.projections.keys() == theirs.projections.keys()
    for module, update in theirs.projections.items():
        other = ours.projections[module]
        assert (other.alpha, other.dim) == (update.alpha, update.dim)
        assert all(torch.equal(a, b) for a, b in zip((*other.w1, *other.w2), (*update.w1, *update.w2), strict=True))
    some = next(iter(ours.projection_keys.values()))
    assert all(key in state for key in some)  # the file's own key names


def test_scores_are_exact_and_never_form_the_product(sdxl_files):
    """E, L1 and top-k of every LoKr / LoHa equal those of the dense delta W (fp64), and the closed forms
    do not build it: E and L1 of a LoKr from W1 and W2 alone, LoHa's E from its Khatri-Rao Grams."""
    for kind in ("lokr", "loha"):
        lora = load_lora(sdxl_files[kind])
        for update in list(lora.projections.values())[:12]:
            dense = (S.dense_of(update).double() * update.scale).abs()
            assert S.energy_of(update, update.scale) == pytest.approx(float(dense.square().sum()), rel=1e-5)
            assert S.l1_of(update, update.scale) == pytest.approx(float(dense.sum()), rel=1e-5)
            k = update.rank * 3
            expected = float(dense.flatten().topk(k).values.sum())
            assert S.topk_of([update], [update.scale], k) == pytest.approx(expected, rel=1e-5)
    w1, w2 = torch.randn(3, 5, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    kron = torch.kron(w1, w2)
    assert S.lokr_energy(w1, w2, 0.5) == pytest.approx(0.25 * float(kron.square().sum()), rel=1e-12)
    assert S.lokr_energy(w1, w2, 0.5, slice(3, 9)) == pytest.approx(0.25 * float(kron[3:9].square().sum()), rel=1e-12)
    assert S.lokr_l1(w1, w2, -2.0, slice(5, 12)) == pytest.approx(2 * float(kron[5:12].abs().sum()), rel=1e-12)
    chunks = list(S._kron_chunks(w1, w2, 1.0, slice(5, 11)))
    torch.testing.assert_close(torch.cat(chunks).double(), kron[5:11].abs(), rtol=1e-6, atol=1e-7)


def test_kronecker_routing_equals_the_dense_product():
    """kron(W1, W2) x as W1 X W2^T, on any batch shape, for a whole update and a member's rows."""
    generator = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(4, 3, generator=generator), torch.randn(6, 5, generator=generator)
    x = torch.randn(2, 7, 15, generator=generator)
    whole = LokrFactors(alpha=1.0, dim=1, w1=(w1,), w2=(w2,))
    expected = x @ torch.kron(w1, w2).T
    torch.testing.assert_close(KronDelta(whole, torch.device("cpu"), torch.float32).delta(x), expected)
    member = LokrFactors(alpha=1.0, dim=1, w1=(w1,), w2=(w2,), rows=slice(8, 20), unit="qkv")
    torch.testing.assert_close(KronDelta(member, torch.device("cpu"), torch.float32).delta(x), expected[..., 8:20])
    assert member.out_features == 12 and member.in_features == 15


def test_inspect_names_the_kinds(sdxl_files):
    lora = load_lora(sdxl_files["lokr"])
    text = summary(lora)
    assert "kinds:       LyCORIS LoKr (560)" in text and "bound on delta W's rank" in text
    data = report(lora)
    assert data["kinds"] == {"lokr": 560} and data["units"] == {}
    assert {p["kind"] for p in data["projections"].values()} == {"lokr"}


def test_lycoris_updates_outside_the_route_are_merged_as_lycoris_merges_them(sdxl_pipe, tiny_shapes, tmp_path):
    """Under --other-weights merge, a LoKr on a linear the route leaves out (proj_in, under route
    attention) is added to its weight, W + strength * delta W, as LyCORIS merges it, and taken out by
    remove(); one on a convolution, which estlora does not merge, is refused in one line before anything
    changes."""
    generator = torch.Generator().manual_seed(3)
    state = sdxl_lycoris_state(tiny_shapes, "lokr", 4)
    name = "lycoris_down_blocks_1_attentions_0_proj_in"
    state |= {f"{name}.{k}": v for k, v in lokr_parts(64, 64, "w2-decomposed", generator).items()}
    state[f"{name}.alpha"] = torch.tensor(1.0)
    path = tmp_path / "lokr-blocks.safetensors"
    save_file(state, str(path))
    lora = load_lora(path)
    module = "down_blocks.1.attentions.0.proj_in"
    kind, params = get_module(state, name)
    delta = lycoris_delta(kind, params, name, sdxl_pipe.unet.get_submodule(module))
    weight = sdxl_pipe.unet.get_submodule(module).weight
    before = weight.detach().clone()
    with estlora.fuse(sdxl_pipe, lora, lora, method="subject", subject_scale=0.5, other_weights="merge") as fusion:
        assert module not in fusion.layers
        torch.testing.assert_close(weight, before + 0.5 * delta, rtol=1e-6, atol=1e-7)
    assert torch.equal(weight, before)
    conv = "lycoris_down_blocks_0_resnets_0_conv1"
    state |= {f"{conv}.lokr_w1": torch.ones(4, 4), f"{conv}.lokr_w2": torch.ones(8, 8, 3, 3)}
    save_file(state, str(path))
    before = {name: type(m) for name, m in sdxl_pipe.unet.named_modules()}
    with pytest.raises(LoraFormatError, match=r"LyCORIS LoKr / LoHa tensors outside the denoiser's linears"):
        estlora.fuse(sdxl_pipe, path, path, method="subject", other_weights="merge")
    assert {name: type(m) for name, m in sdxl_pipe.unet.named_modules()} == before


@pytest.mark.parametrize(
    ("parts", "words"),
    [
        ({"lokr_w1": (4, 4), "lokr_w2": (16, 16), "lokr_t2": (2, 2, 1, 1)}, "a Tucker core"),
        ({"lokr_w1": (4, 4), "lokr_w2_a": (16, 2), "lokr_w2_b": (3, 16)}, "rank mismatch, lokr_w2_a is (16, 2)"),
        ({"hada_w1_a": (64, 2), "hada_w1_b": (2, 64), "hada_w2_a": (64, 2), "hada_w2_b": (2, 32)}, "differ in shape"),
    ],
    ids=["tucker-on-linear", "lokr-rank-mismatch", "loha-shapes"],
)
def test_broken_lycoris_parts_are_one_clear_error(tmp_path, parts, words):
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    path = tmp_path / "bad.safetensors"
    save_file({f"{name}.{part}": torch.ones(shape) for part, shape in parts.items()}, str(path))
    with pytest.raises(LoraShapeError) as info:
        load_lora(path)
    assert str(path) in str(info.value) and name in str(info.value) and words in str(info.value)


def test_nan_in_a_lokr_is_refused(tmp_path):
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    path = tmp_path / "nan.safetensors"
    save_file({f"{name}.lokr_w1": torch.full((4, 4), float("nan")), f"{name}.lokr_w2": torch.ones(16, 16)}, str(path))
    with pytest.raises(Exception, match="NaN"):
        load_lora(path)


# ---------------------------------------------------------------- FLUX.1: fused projections


def lycoris_lokr(out: int, n: int, factor: int, rank: int, both: bool, generator) -> dict[str, torch.Tensor]:
    """LoKr parts in the shapes LyCORIS' `weight_gen` gives an (out, n) linear."""
    names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    shapes = weight_gen(torch.empty(out, n), rank, tucker=False, factor=factor, decompose_both=both)
    return {
        name: torch.randn(t.shape, generator=generator) * 0.3 for name, t in zip(names, shapes, strict=True) if t is not None
    }


def flux_lycoris_state(pipe, prefix: str, seed: int) -> dict[str, torch.Tensor]:
    """A LyCORIS network on FLUX.1's BFL modules (kohya's `lora_unet_` spelling, or ComfyUI's): LoKr on
    fused projections whose W2 height splits them (16 of qkv's 48 rows) and does not (12 of 48, both
    factors decomposed; 14 of linear1's 112), LoHa on another linear1, a LoKr on a single linear."""
    generator = torch.Generator().manual_seed(seed)
    width = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    mlp = pipe.transformer.single_transformer_blocks[0].proj_mlp.out_features
    modules = {
        "double_blocks_0_img_attn_qkv": lycoris_lokr(3 * width, width, 16, 1, False, generator),
        "double_blocks_0_txt_attn_qkv": lycoris_lokr(3 * width, width, 4, 1, True, generator),
        "single_blocks_1_linear1": lycoris_lokr(3 * width + mlp, width, -1, 1, False, generator),
        "single_blocks_2_linear1": loha_parts(3 * width + mlp, width, 2, generator),
        "double_blocks_1_img_attn_proj": lycoris_lokr(width, width, 4, 1, False, generator),
    }
    comfy = {"img_attn_qkv": "img_attn.qkv", "txt_attn_qkv": "txt_attn.qkv", "img_attn_proj": "img_attn.proj"}
    state = {}
    for module, parts in modules.items():
        if prefix == "comfyui":
            kind, number, part = re.fullmatch(r"(double|single)_blocks_(\d+)_(\w+)", module).groups()
            name = f"diffusion_model.{kind}_blocks.{number}.{comfy.get(part, part)}"
        else:
            name = f"lora_unet_{module}"
        state |= {f"{name}.{part}": value for part, value in parts.items()}
        state[f"{name}.alpha"] = torch.tensor(2.0)
    return state


@pytest.fixture(scope="module")
def flux_pipe(tmp_path_factory):
    from estlora.testing.tiny_flux import write_tiny_flux

    return load_pipeline(write_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux"))


FLUX_TARGETS = {
    "double_blocks_0_img_attn_qkv": ("transformer_blocks.0", ("attn.to_q", "attn.to_k", "attn.to_v")),
    "double_blocks_0_txt_attn_qkv": ("transformer_blocks.0", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    "single_blocks_1_linear1": ("single_transformer_blocks.1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    "single_blocks_2_linear1": ("single_transformer_blocks.2", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    "double_blocks_1_img_attn_proj": ("transformer_blocks.1", ("attn.to_out.0",)),
}


def flux_reference(state: dict, pipe) -> dict[str, torch.Tensor]:
    """diffusers module -> LyCORIS' delta W: its module built on the fused BFL linear, rows split by hand."""
    out = {}
    for module, (block, targets) in FLUX_TARGETS.items():
        name = f"lora_unet_{module}"
        kind, params = get_module(state, name)
        width = pipe.transformer.get_submodule(f"{block}.{targets[0]}").in_features
        rows = sum(pipe.transformer.get_submodule(f"{block}.{t}").out_features for t in targets)
        diff = lycoris_delta(kind, params, name, torch.nn.Linear(width, rows, bias=False))
        start = 0
        for target in targets:
            height = pipe.transformer.get_submodule(f"{block}.{target}").out_features
            out[f"{block}.{target}"] = diff[start : start + height]
            start += height
    return out


@pytest.mark.parametrize("prefix", ["kohya", "comfyui"])
def test_flux_fused_lycoris_updates_are_lycoris_own(flux_pipe, tmp_path, prefix):
    """Every diffusers linear of a fused BFL module gets its rows of LyCORIS' delta W; a LoKr whose W2
    height divides the slices splits into LoKrs of its own, one that does not is a unit, said in inspect."""
    state = flux_lycoris_state(flux_pipe, prefix, 7)
    path = tmp_path / "flux-lokr.safetensors"
    save_file(state, str(path))
    lora = load_lora(path)
    reference = flux_reference(flux_lycoris_state(flux_pipe, "kohya", 7), flux_pipe)
    assert lora.projections.keys() == reference.keys() and lora.family == "flux1"
    for module, update in lora.projections.items():
        torch.testing.assert_close(S.dense_of(update) * update.scale, reference[module], rtol=1e-6, atol=1e-7)
    img = lora.projections["transformer_blocks.0.attn.to_q"]
    assert isinstance(img, LokrFactors) and img.unit == "" and img.shape1 == (1, 1)  # W1's first row
    assert isinstance(lora.projections["single_transformer_blocks.2.proj_mlp"], LohaFactors)
    units = lora.units()
    assert sorted(len(m) for m in units.values()) == [3, 4]
    txt = "lora_unet_double_blocks_0_txt_attn_qkv" if prefix == "kohya" else "diffusion_model.double_blocks.0.txt_attn.qkv"
    assert units[txt] == ["transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.add_v_proj"]
    assert f"unit:        {txt} does not split into its linears (add_q_proj, add_k_proj, add_v_proj)" in summary(lora)


@pytest.mark.parametrize("route", ["blocks", "attention"])
def test_flux_subject_run_applies_lycoris_updates(flux_pipe, tmp_path, route):
    """A run with the LyCORIS file as the subject equals the base with LyCORIS' delta W added to each
    linear's weight by hand (fp32 rounding apart), units included; under route attention with
    --other-weights merge, the linears outside it (proj_mlp, a unit's member) are merged instead."""
    state = flux_lycoris_state(flux_pipe, "kohya", 8)
    path = tmp_path / "flux-lokr.safetensors"
    save_file(state, str(path))
    reference = flux_reference(state, flux_pipe)

    with estlora.fuse(flux_pipe, path, path, method="subject", route=route, other_weights="merge") as fusion:
        assert ("single_transformer_blocks.1.proj_mlp" in fusion.layers) == (route == "blocks")
        got = render(flux_pipe)
    base = render(flux_pipe)
    merged = copy.deepcopy(flux_pipe.transformer)
    with torch.no_grad():
        for module, diff in reference.items():
            merged.get_submodule(module).weight += diff
    from diffusers import FluxPipeline

    expected = render(FluxPipeline(**{**flux_pipe.components, "transformer": merged}))
    assert (expected - base).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a_unit_is_gated_as_one(flux_pipe, tmp_path):
    """est on a LoKr unit against a plain split: the members of a unit take the same LoRA at every step,
    decided on the sums of their energies (the fused update's), which is what E of the whole is."""
    state = flux_lycoris_state(flux_pipe, "kohya", 9)
    path = tmp_path / "flux-lokr.safetensors"
    save_file(state, str(path))
    subject = load_lora(path)
    generator = torch.Generator().manual_seed(1)
    style = copy.copy(subject)
    style.projections = {
        name: type(u)(**{**u.__dict__, "w1": tuple(torch.randn(t.shape, generator=generator) for t in u.w1)})
        for name, u in subject.projections.items()
    }
    layers = FLUX.routed(subject.projections, "blocks")
    scores = pair_scores(subject, style, layers)
    assert len(scores.units) == 2
    plan = build_plan(scores, FusionConfig(method="est", beta=0.3, route="blocks"), steps=8)
    for members in scores.units:
        assert all(torch.equal(plan.weights[:, members[0]], plan.weights[:, m]) for m in members)
        whole = [S.energy_of(subject.projections[layers[m]], subject.projections[layers[m]].scale) for m in members]
        assert sum(whole) == pytest.approx(float(scores.by_unit(scores.energy)[members[0], 0]))
        fused = subject.projections[layers[members[0]]]
        assert sum(whole) == pytest.approx(S.lokr_energy(*fused.matrices(), fused.scale), rel=1e-9)
    assert plan.weights[:, :, 0].any() and plan.weights[:, :, 1].any()  # the gate does choose
    assert plan.units == [[layers[m] for m in members] for members in scores.units]
    assert plan.to_dict()["units"] == plan.units
    from estlora.commands.plan_view import summary as plan_summary

    text = plan_summary(plan, FLUX)
    assert all(f"gated as one unit (a fused update that does not split): {', '.join(m)}" in text for m in plan.units)


@pytest.mark.parametrize("prefix", ["transformer.", "lycoris_"])
def test_flux_lycoris_under_diffusers_paths(flux_pipe, tmp_path, prefix):
    """LyCORIS parts under diffusers' module paths (`transformer.<path>.lokr_w1`, or LyCORIS' own save,
    `lycoris_<path with underscores>`) read as the same update as their kohya (BFL) twin."""
    state = flux_lycoris_state(flux_pipe, "kohya", 11)
    kohya = tmp_path / "kohya.safetensors"
    save_file(state, str(kohya))
    source = "lora_unet_double_blocks_1_img_attn_proj"
    module = "transformer_blocks.1.attn.to_out.0"
    name = f"transformer.{module}" if prefix == "transformer." else "lycoris_" + module.replace(".", "_")
    path = tmp_path / "peft.safetensors"
    save_file({k.replace(source, name): v for k, v in state.items() if k.startswith(source)}, str(path))
    ours, twin = load_lora(path), load_lora(kohya)
    assert ours.family == "flux1" and list(ours.projections) == [module]
    torch.testing.assert_close(S.dense_of(ours.projections[module]), S.dense_of(twin.projections[module]))
    assert ours.projections[module].scale == twin.projections[module].scale


def test_loha_routes_as_the_lora_of_its_khatri_rao_factors():
    """(W1a W1b) * (W2a W2b) x through the rank r1 r2 factors U (V x) where they are smaller than the
    dense matrix, else through the dense matrix: the same update either way."""
    from estlora.runtime.deltas import DenseDelta, LoraDelta, delta_module

    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 24, generator=generator, dtype=torch.float64)
    for rank, kind in ((2, LoraDelta), (6, DenseDelta)):  # 4 x 48 < 24 x 24; 36 x 48 > 576
        parts = {name: t.double() for name, t in loha_parts(24, 24, rank, generator).items()}
        update = LohaFactors(alpha=1.0, dim=rank, w1=(parts["hada_w1_a"], parts["hada_w1_b"]), w2=(parts["hada_w2_a"], parts["hada_w2_b"]))
        delta = delta_module(update, torch.device("cpu"), torch.float64, torch.nn.Linear(24, 24))
        assert type(delta) is kind
        expected = x @ ((parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"])).T
        torch.testing.assert_close(delta.delta(x), expected, rtol=1e-10, atol=1e-12)
