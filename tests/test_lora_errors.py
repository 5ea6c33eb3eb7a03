"""Bad input: one clear line naming the file and the problem, exit code 2 from the CLI (no traceback),
and a typed exception from the Python API. Every bad file here is made by hand, in the diffusers/peft
key layout (`unet.<module>.lora_A.weight` (rank, in) and `.lora_B.weight` (out, rank)).
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import save_file

from conftest import attention_shapes as projection_shapes
from estlora import cli
from estlora.errors import (
    BaseModelMismatchError,
    LoraFormatError,
    LoraNotFoundError,
    LoraShapeError,
    LoraValueError,
    PickleRefusedError,
)
from estlora.families.sdxl import SDXL_UNET_CONFIG
from estlora.loading.lora import base_guess, load_lora

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SD15_UNET_CONFIG = {  # SD 1.5's UNet shapes: four blocks, cross-attention from CLIP-L (768)
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "layers_per_block": 2,
    "sample_size": 64,
}
Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
K2 = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
MODULES = (Q, K2, "up_blocks.1.attentions.2.transformer_blocks.1.attn1.to_out.0")
SD15_LORA = {  # module -> (out, in), as an SD 1.5 LoRA has them
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (320, 768),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v": (320, 768),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (320, 320),
}
SDXL_WIDE_LORA = {"down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k": (1280, 2048)}
MARKER = "UNPICKLED"  # created in tmp_path if any test file is ever unpickled


class _Trap:
    """Unpickling this creates the marker file: proof of whether a checkpoint was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------- writers


KOHYA_Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
KOHYA_K = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k"


def kohya_lora(module, out, inp, rank=2):
    return {
        f"{module}.lora_down.weight": torch.ones(rank, inp),
        f"{module}.lora_up.weight": torch.ones(out, rank),
        f"{module}.alpha": torch.tensor(float(rank)),
    }


def flux_lora(rank=2):
    """diffusers' key names for a Flux transformer LoRA."""
    module = "transformer.single_transformer_blocks.0.attn.to_q"
    return {f"{module}.lora_A.weight": torch.ones(rank, 64), f"{module}.lora_B.weight": torch.ones(64, rank)}


def lora_state(shapes, rank=2):
    generator = torch.Generator().manual_seed(0)
    state = {}
    for module, (out, inp) in shapes.items():
        state[f"unet.{module}.lora_A.weight"] = torch.randn(rank, inp, generator=generator)
        state[f"unet.{module}.lora_B.weight"] = torch.randn(out, rank, generator=generator)
    return state


def write(path, state):
    save_file(state, str(path))
    return path


def good(tmp, shapes, name="lora.safetensors"):
    return write(tmp / name, lora_state({m: shapes[m] for m in MODULES}))


def edited(tmp, shapes, edit):
    state = lora_state({m: shapes[m] for m in MODULES}, rank=4)
    edit(state)
    return write(tmp / "lora.safetensors", state)


def raw(tmp, data, name="lora.safetensors"):
    (tmp / name).write_bytes(data)
    return tmp / name


def torch_pickle(tmp, name, where=None, legacy=False):
    """A real torch.save checkpoint of a LoRA-like dict that also carries the trap (marker in tmp).

    legacy: torch's old format, a raw pickle stream instead of a zip archive.
    """
    where = where or tmp
    state = {**lora_state({Q: (64, 64)}), "trap": _Trap(tmp / MARKER)}
    torch.save(state, where / name, _use_new_zipfile_serialization=not legacy)
    return where / name


def folder(tmp, shapes, *files):
    (tmp / "lora").mkdir()
    for name in files:
        torch_pickle(tmp, name, tmp / "lora") if name.endswith(".bin") else good(tmp / "lora", shapes, name)
    return tmp / "lora"


def patched(tmp, shapes, transform):
    return raw(tmp, transform(good(tmp, shapes, "whole.safetensors").read_bytes()))


def reoffset(change):
    """A whole file whose header's tensor offsets `change` rewrites (same header length, padded)."""

    def transform(data: bytes) -> bytes:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        change({k: v for k, v in header.items() if k != "__metadata__"})
        text = json.dumps(header, separators=(",", ":")).encode().ljust(length)
        assert len(text) == length
        return data[:8] + text + data[8 + length :]

    return transform


def _overlap(entries):
    first, second = sorted(entries.values(), key=lambda v: v["data_offsets"][0])[:2]
    second["data_offsets"] = [second["data_offsets"][0] - 4, second["data_offsets"][1] - 4]


def _duplicate(entries):
    first, second = sorted(entries.values(), key=lambda v: v["data_offsets"][0])[:2]
    if first["data_offsets"][1] - first["data_offsets"][0] == second["data_offsets"][1] - second["data_offsets"][0]:
        second["data_offsets"] = list(first["data_offsets"])
    else:
        raise AssertionError("the first two tensors differ in size")


def put(key, value):
    return lambda state: state.__setitem__(key, value)


def poison(part, value):
    return lambda state: state[f"unet.{Q}.lora_{part}.weight"].view(-1)[0:1].fill_(value)


def pickle_as_safetensors(tmp, protocol):
    return raw(tmp, pickle.dumps({"trap": _Trap(tmp / MARKER)}, protocol=protocol))


NAN, INF = float("nan"), float("inf")
A_KEY, B_KEY = f"unet.{Q}.alpha", f"unet.{Q}.lora_B.weight"
# (exception class, words the message must hold), shared by several cases
NOT_ST = (LoraFormatError, "not a safetensors")
CUT = (LoraFormatError, "truncated or corrupt")
PKL = (PickleRefusedError, "pickle")
# id -> (exception class, words the message must hold, builder(tmp_path, tiny_shapes) -> source)
CASES = {
    "missing-file": (LoraNotFoundError, "no such file", lambda t, s: t / "nope.safetensors"),
    "missing-hub-id": (LoraNotFoundError, "hub download failed", lambda t, s: "no-such-user/no-such-lora"),
    "text-renamed": (*NOT_ST, lambda t, s: raw(t, b"just some notes, not weights\n" * 4)),
    "png-renamed": (*NOT_ST, lambda t, s: raw(t, b"\x89PNG\r\n\x1a\n" + bytes(64))),
    "three-bytes": (*NOT_ST, lambda t, s: raw(t, b"abc")),
    "pickle-bin": (*PKL, lambda t, s: torch_pickle(t, "lora.bin")),
    "pickle-ckpt": (*PKL, lambda t, s: torch_pickle(t, "lora.ckpt")),
    "pickle-pt": (*PKL, lambda t, s: torch_pickle(t, "lora.pt")),
    "pickle-as-safetensors": (*PKL, lambda t, s: torch_pickle(t, "lora.safetensors")),
    "legacy-pickle-as-safetensors": (*PKL, lambda t, s: torch_pickle(t, "lora.safetensors", legacy=True)),
    "raw-pickle-as-safetensors": (*PKL, lambda t, s: pickle_as_safetensors(t, 4)),
    # Protocol 0 has no 0x80 opcode, so it is not recognised as pickle; it is still refused, unread.
    "protocol-0-pickle-as-safetensors": (*NOT_ST, lambda t, s: pickle_as_safetensors(t, 0)),
    "folder-with-only-bin": (*PKL, lambda t, s: folder(t, s, "model.bin")),
    "overlapping-offsets": (
        LoraFormatError,
        "corrupt safetensors file (tensors",
        lambda t, s: patched(t, s, reoffset(_overlap)),
    ),
    "duplicate-offsets": (
        LoraFormatError,
        "share the same bytes)",
        lambda t, s: patched(t, s, reoffset(_duplicate)),
    ),
    "truncated": (
        LoraFormatError,
        "truncated safetensors file (1956 of 3912 bytes)",
        lambda t, s: patched(t, s, lambda b: b[: len(b) // 2]),
    ),
    "header-too-long": (*CUT, lambda t, s: patched(t, s, lambda b: struct.pack("<Q", len(b)) + b[8:])),
    "garbled-header": (*CUT, lambda t, s: patched(t, s, lambda b: b[:9] + b"\xff\x00junk" + b[15:])),
    "no-lora-keys": (
        LoraFormatError,
        "no LoRA keys",
        lambda t, s: write(t / "model.safetensors", {"conv.weight": torch.ones(4, 4, 3, 3)}),
    ),
    "empty-safetensors": (LoraFormatError, "no tensors", lambda t, s: write(t / "empty.safetensors", {})),
    "sdxl-checkpoint": (
        LoraFormatError,
        "this is a model checkpoint, not a LoRA (a single-file SDXL is given as the base: --base FILE)",
        lambda t, s: write(
            t / "sd_xl_base_1.0.safetensors",
            {"model.diffusion_model.input_blocks.0.0.weight": torch.ones(4, 4), "first_stage_model.x": torch.ones(1)},
        ),
    ),
    "diffusers-unet": (
        LoraFormatError,
        "this is a diffusers UNet's weights, not a LoRA (a fine-tuned UNet is given as the base: --base FILE)",
        lambda t, s: write(t / "diffusion_pytorch_model.safetensors", {"conv_in.weight": torch.ones(4, 4, 3, 3)}),
    ),
    "text-encoder-only": (
        LoraFormatError,
        "no LoRA weights for UNet attention",
        lambda t, s: write(t / "te.safetensors", {"text_encoder.q_proj.lora_A.weight": torch.ones(2, 8)}),
    ),
    "sd3-kohya": (
        BaseModelMismatchError,
        "transformer model such as Flux or SD3",
        lambda t, s: write(t / "sd3.safetensors", kohya_lora("lora_unet_joint_blocks_0_x_block_attn_qkv", 64, 64)),
    ),
    "lycoris-loha-incomplete": (
        LoraShapeError,
        f"{KOHYA_Q}: hada_w1_b missing",
        lambda t, s: write(t / "loha.safetensors", {f"{KOHYA_Q}.hada_w1_a": torch.ones(64, 2)}),
    ),
    "lycoris-lokr-incomplete-beside-lora": (
        LoraShapeError,
        f"{KOHYA_Q}: lokr_w2 (or lokr_w2_a and lokr_w2_b) missing",
        lambda t, s: write(
            t / "lokr.safetensors", {**kohya_lora(KOHYA_K, 64, 64), f"{KOHYA_Q}.lokr_w1": torch.ones(8, 8)}
        ),
    ),
    "lycoris-full": (
        LoraFormatError,
        "holds only full-weight differences (2 .diff / .diff_b keys: LyCORIS 'full' or ComfyUI), no LoRA factors",
        lambda t, s: write(
            t / "full.safetensors", {f"{KOHYA_Q}.diff": torch.ones(64, 64), f"{KOHYA_Q}.diff_b": torch.ones(64)}
        ),
    ),
    "unknown-part-on-projection": (
        LoraFormatError,
        "'scale_x' is not a LoRA factor",
        lambda t, s: write(t / "odd.safetensors", {**kohya_lora(KOHYA_K, 64, 64), f"{KOHYA_Q}.scale_x": torch.ones(1)}),
    ),
    "lycoris-ia3": (
        LoraFormatError,
        f"{KOHYA_Q}.on_input: LyCORIS (IA)3 weights, not LoRA factors",
        lambda t, s: write(
            t / "ia3.safetensors", {f"{KOHYA_Q}.on_input": torch.tensor(True), f"{KOHYA_Q}.weight": torch.ones(64)}
        ),
    ),
    "comfyui-key-named-as-in-the-file": (
        LoraShapeError,
        "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q: hada_w1_b missing",
        lambda t, s: write(
            t / "comfy.safetensors",
            {"diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.hada_w1_a": torch.ones(64, 2)},
        ),
    ),
    "lora-bias": (
        LoraFormatError,
        "LoRA with a bias",
        lambda t, s: edited(t, s, put(f"unet.{Q}.lora_B.bias", torch.ones(64))),
    ),
    "alpha-not-scalar": (LoraShapeError, "alpha has shape (3,)", lambda t, s: edited(t, s, put(A_KEY, torch.ones(3)))),
    "kohya-alpha-not-scalar": (
        LoraShapeError,
        f"{KOHYA_K}: alpha has shape (2,)",
        lambda t, s: write(t / "k.safetensors", {**kohya_lora(KOHYA_K, 64, 64), f"{KOHYA_K}.alpha": torch.ones(2)}),
    ),
    "rank-zero": (
        LoraShapeError,
        "rank 0",
        lambda t, s: edited(
            t, s, lambda d: d.update({B_KEY: torch.ones(64, 0), f"unet.{Q}.lora_A.weight": torch.ones(0, 64)})
        ),
    ),
    "integer-factors": (
        LoraValueError,
        "factor has dtype int8, expected floats",
        lambda t, s: edited(t, s, put(B_KEY, torch.ones(64, 4, dtype=torch.int8))),
    ),
    "nan-down": (LoraValueError, "NaN", lambda t, s: edited(t, s, poison("A", NAN))),
    "inf-down": (LoraValueError, "infinite", lambda t, s: edited(t, s, poison("A", INF))),
    "nan-up": (LoraValueError, "NaN", lambda t, s: edited(t, s, poison("B", NAN))),
    "inf-up": (LoraValueError, "infinite", lambda t, s: edited(t, s, poison("B", -INF))),
    "nan-alpha": (LoraValueError, "alpha is nan", lambda t, s: edited(t, s, put(A_KEY, torch.tensor(NAN)))),
    "nan-text-encoder": (
        LoraValueError,
        "text_encoder.q_proj.lora_A.weight holds NaN",
        lambda t, s: edited(t, s, put("text_encoder.q_proj.lora_A.weight", torch.full((2, 8), NAN))),
    ),
    "rank-mismatch": (
        LoraShapeError,
        "rank mismatch",
        lambda t, s: edited(t, s, put(B_KEY, torch.ones(64, 3))),
    ),
    "up-factor-missing": (
        LoraShapeError,
        "up (B) factor missing",
        lambda t, s: edited(t, s, lambda d: d.pop(B_KEY)),
    ),
    "two-safetensors-in-folder": (
        LoraNotFoundError,
        "several .safetensors",
        lambda t, s: folder(t, s, "a.safetensors", "b.safetensors"),
    ),
    "empty-folder": (LoraNotFoundError, "no .safetensors", lambda t, s: folder(t, s)),
}


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the loader tried to unpickle a file")

    for owner, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(owner, name, refuse)


def assert_clear(message, source, words):
    assert str(source) in message
    assert words in message
    assert "\n" not in message and "Traceback" not in message


@pytest.mark.parametrize("case", list(CASES))
def test_api_raises_typed_error_naming_file_and_problem(case, tmp_path, tiny_shapes, no_unpickling):
    error, words, build = CASES[case]
    source = build(tmp_path, tiny_shapes)
    with pytest.raises(error) as info:
        load_lora(source)
    assert_clear(str(info.value), source, words)
    assert info.value.path is not None and str(source) in info.value.path
    assert not (tmp_path / MARKER).exists(), "the checkpoint was unpickled"


def test_trap_fires_when_unpickled(tmp_path):
    """The pickles above are live: unpickling one runs code, so their refusal means something."""
    for path, unsafe_load in (
        (torch_pickle(tmp_path, "a.pt"), torch.load),
        (pickle_as_safetensors(tmp_path, 0), None),
    ):
        (tmp_path / MARKER).unlink(missing_ok=True)
        with open(path, "rb") as handle:
            unsafe_load(handle, weights_only=False) if unsafe_load else pickle.load(handle)
        assert (tmp_path / MARKER).exists()


# ---------------------------------------------------------------- another base model


@pytest.mark.parametrize(("family", "width"), [("SD 1.x", 768), ("SD 2.x", 1024)])
def test_a_lora_for_a_base_we_do_not_serve_is_refused_naming_it(tmp_path, capsys, family, width):
    """SD 1.x / 2.x LoRAs share SDXL's diffusers names; their shapes say which base they are for, and
    they are refused with or without --base (a plan over them would route nothing real)."""
    shapes = {
        name: (out, width if "attn2.to_" in name and "to_q" not in name else n_in)
        for name, (out, n_in) in SD15_LORA.items()
    }
    path = write(tmp_path / "sd.safetensors", lora_state(shapes))
    words = f"a LoRA for {family}, which estlora does not serve (SDXL and FLUX.1)"
    with pytest.raises(BaseModelMismatchError) as info:
        load_lora(path)
    assert_clear(str(info.value), path, words)
    assert cli.main(["plan", str(path), str(path)]) == 2
    assert_cli_error(2, *capsys.readouterr(), path, words)


def test_shape_mismatch_on_a_module_both_bases_have(tmp_path):
    wide = "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"  # SDXL's layout, another width
    path = write(tmp_path / "odd.safetensors", lora_state({wide: (640, 768)}))
    with pytest.raises(BaseModelMismatchError) as info:
        load_lora(path, base_shapes=projection_shapes(SDXL_UNET_CONFIG), base_name=SDXL_BASE)
    assert_clear(str(info.value), path, "768->640 in the LoRA but 2048->640")


def test_sdxl_lora_fits_sdxl(tmp_path):
    shapes = projection_shapes(SDXL_UNET_CONFIG)
    path = write(tmp_path / "sdxl.safetensors", lora_state(shapes, rank=1))
    lora = load_lora(path, base_shapes=shapes, base_name=SDXL_BASE)
    assert len(lora.projections) == len(shapes) == 560
    assert base_guess(lora) == "SDXL" and lora.family == "sdxl"


def test_full_sd15_lora_is_refused_as_sd1(tmp_path):
    """All 128 SD 1.5 projections, down_blocks.2 included: still recognised as SD 1.x, and refused."""
    path = write(tmp_path / "sd15.safetensors", lora_state(projection_shapes(SD15_UNET_CONFIG), rank=1))
    with pytest.raises(BaseModelMismatchError, match="a LoRA for SD 1.x"):
        load_lora(path)


# ---------------------------------------------------------------- the CLI: one line on stderr, exit 2


def assert_cli_error(code, out, err, source, words):
    assert code == 2
    assert out == ""
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("estlora: error: ")
    assert_clear(lines[0], source, words)


CLI_CASES = (
    "missing-file text-renamed pickle-bin pickle-as-safetensors truncated no-lora-keys nan-up rank-mismatch "
    "two-safetensors-in-folder empty-folder"
).split()


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_in_process(case, tmp_path, tiny_shapes, capsys, no_unpickling):
    _, words, build = CASES[case]
    source = build(tmp_path, tiny_shapes)
    code = cli.main(["inspect", str(source)])
    assert_cli_error(code, *capsys.readouterr(), source, words)


def mismatch_source(tmp, which, tiny_dir):
    """(LoRA file, --base): SD 1.5 LoRA vs the SDXL hub id, or SDXL-wide LoRA vs the tiny model."""
    lora, base = (SD15_LORA, SDXL_BASE) if which == "sd15-vs-sdxl-id" else (SDXL_WIDE_LORA, str(tiny_dir))
    return write(tmp / "lora.safetensors", lora_state(lora)), base


@pytest.mark.parametrize(
    "name, state",
    [
        ("peft", lambda: flux_lora()),
        ("kohya", lambda: kohya_lora("lora_unet_double_blocks_0_img_attn_proj", 64, 64)),
    ],
)
def test_a_flux_lora_against_an_sdxl_base_is_a_mismatch(tmp_path, tiny_dir, capsys, name, state):
    """FLUX.1 LoRAs load as such (their family is served); given an SDXL base, they are refused in one line."""
    from estlora.families import family_named

    path = write(tmp_path / f"flux-{name}.safetensors", state())
    assert load_lora(path).family == "flux1"
    with pytest.raises(BaseModelMismatchError, match="a FLUX.1 LoRA, but the base is SDXL"):
        load_lora(path, family=family_named("sdxl"))
    code = cli.main(["inspect", str(path), "--base", str(tiny_dir)])
    assert_cli_error(code, *capsys.readouterr(), path, f"a FLUX.1 LoRA, but {tiny_dir} is SDXL")


@pytest.mark.parametrize("which", ["sd15-vs-sdxl-id", "sdxl-vs-tiny-folder"])
def test_cli_base_mismatch_in_process(which, tmp_path, tiny_dir, capsys):
    path, base = mismatch_source(tmp_path, which, tiny_dir)
    code = cli.main(["inspect", str(path), "--base", base])
    words = "which estlora does not serve" if which.startswith("sd15") else "another base model"
    assert_cli_error(code, *capsys.readouterr(), path, words)


def test_cli_base_hub_id_prints_no_warning(tmp_path, tiny_dir):
    """diffusers' load_config warns about a deprecated hub argument; the user must not see it."""
    path, base = mismatch_source(tmp_path, "sd15-vs-sdxl-id", tiny_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(["inspect", str(path), "--base", base]) == 2
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("case", ["pickle-as-safetensors", "truncated", "sdxl-vs-tiny-folder"])
def test_cli_subprocess(case, tmp_path, tiny_shapes, tiny_dir):
    """The real command: no traceback and no stray warnings, only the error line."""
    if case in CASES:
        (_, words, build), extra = CASES[case], []
        source = build(tmp_path, tiny_shapes)
    else:
        source, base = mismatch_source(tmp_path, case, tiny_dir)
        words, extra = "another base model", ["--base", base]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "estlora.cli", "inspect", str(source), *extra]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert_cli_error(done.returncode, done.stdout, done.stderr, source, words)
    assert not (tmp_path / MARKER).exists()


def test_a_header_length_that_starts_like_a_pickle_is_still_safetensors(tmp_path):
    """The first 8 bytes are the header's length: 640 bytes is 80 02 00 ..., a pickle's protocol-2
    opening. The JSON after it tells them apart (such files were refused as pickles before)."""
    base = {f"unet.{Q}.lora_A.weight": torch.ones(2, 640), f"unet.{Q}.lora_B.weight": torch.ones(640, 2)}
    path = tmp_path / "lora.safetensors"
    for pad in range(400):
        save_file(base, str(path), metadata={"pad": "x" * pad})
        header_len = int.from_bytes(path.read_bytes()[:8], "little")
        if header_len & 0xFF == 0x80 and 2 <= header_len >> 8 <= 5:
            break
    else:
        pytest.fail("no padding gave such a header length")
    assert path.read_bytes()[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
    assert set(load_lora(path).projections) == {Q}


def test_adapter_metadata_that_is_not_json_is_refused(tmp_path, tiny_shapes, capsys):
    """Read as absent, every alpha would fall back to the rank (scales silently wrong); diffusers refuses it."""
    state = lora_state({m: tiny_shapes[m] for m in MODULES})
    for bad, words in (('{"r": 4, "lora_alpha": 1', "is not valid JSON"), ("[4, 1]", "is JSON but not an object")):
        path = tmp_path / "meta.safetensors"
        save_file(state, str(path), {"lora_adapter_metadata": bad})
        with pytest.raises(LoraFormatError) as info:
            load_lora(path)
        assert_clear(str(info.value), path, f"its lora_adapter_metadata {words}")
        assert_cli_error(cli.main(["inspect", str(path)]), *capsys.readouterr(), path, words)


def test_alpha_zero_is_read_as_rank_by_default_and_as_zero_when_asked(tmp_path, capsys):
    """kohya's trainer reads alpha 0 as alpha = rank; diffusers and ComfyUI apply scale 0. The default
    is the trainer's reading, said in a warning that offers the other."""
    module = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q"
    state = kohya_lora(module, 640, 640, rank=4) | kohya_lora(module.replace("to_q", "to_k"), 640, 640, rank=4)
    state[f"{module}.alpha"] = torch.tensor(0.0)
    path = write(tmp_path / "zero.safetensors", state)
    name = "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q"
    lora = load_lora(path)
    assert (lora.projections[name].alpha, lora.projections[name].scale) == (4.0, 1.0)
    assert lora.notes == (
        "warning: alpha is 0 in 1 of 2 projections: read as alpha = rank (scale 1), as kohya's trainer did;"
        " --zero-alpha zero applies it as diffusers and ComfyUI do (scale 0: no effect)",
    )
    assert torch.equal(next(v for k, v in lora.projection_keys[name].items() if k.endswith("alpha")), torch.tensor(4.0))
    zero = load_lora(path, zero_alpha="zero")
    assert zero.projections[name].scale == 0 and "--zero-alpha rank reads it" in zero.notes[0]
    assert cli.main(["inspect", str(path), "--zero-alpha", "zero"]) == 0
    out = capsys.readouterr().out
    assert "alphas:      0 (1), 4 (1)" in out and "--zero-alpha rank reads it" in out
