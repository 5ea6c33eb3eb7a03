"""The base model a LoRA is used with: where it is, and the shapes of its UNet's attention projections.

A base is a diffusers folder or hub id, or one single-file checkpoint (`sd_xl_base_1.0.safetensors`,
or a fine-tuned SDXL shared as one file). Shapes come from the UNet's config alone (the model is
built on the meta device), or from a single file's header, so checking a LoRA against SDXL costs a
config or header read, not a 7 GB load.
"""

from __future__ import annotations

import os
import re
import warnings
from functools import lru_cache
from pathlib import Path

from .errors import BaseModelError, LoraError, first_line
from .lora import ATTENTION_PROJECTION, PICKLE_SUFFIXES, download_from_hub, read_header

DEFAULT_BASE = "stabilityai/stable-diffusion-xl-base-1.0"

# The UNet config of SDXL base 1.0 (as published with the model). It lets LoRAs be checked against
# the default base, and benchmarks use SDXL's real shapes, with no network and no weights.
SDXL_UNET_CONFIG = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
KNOWN_UNET_CONFIGS = {DEFAULT_BASE: SDXL_UNET_CONFIG}
# SDXL base 1.0's default sampler settings.
SDXL_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


TOY_BASE = "toy"  # the shipped toy SDXL (estlora.toy_model)
SINGLE_FILE_SUFFIXES = (".safetensors", ".sft", *PICKLE_SUFFIXES)

# Single-file (Stability SGM) checkpoints: the UNet under `model.diffusion_model.`, the VAE under
# `first_stage_model.`, SDXL's two text encoders under `conditioner.embedders.0/1.`.
SGM_UNET = "model.diffusion_model."
SGM_UNET_PARTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.")
SDXL_PARTS = {
    "first_stage_model.": "VAE",
    "conditioner.embedders.0.transformer.": "CLIP ViT-L text encoder",
    "conditioner.embedders.1.model.": "OpenCLIP ViT-bigG text encoder",
}
SGM_ATTENTION = re.compile(
    r"^model\.diffusion_model\.(input_blocks\.\d+|middle_block|output_blocks\.\d+)\.1\."
    r"(transformer_blocks\.\d+\.attn[12]\.(?:to_q|to_k|to_v|to_out\.0))\.weight$"
)
TRANSFORMER_BLOCKS = ("joint_blocks.", "double_blocks.")  # SD3's MMDiT, Flux
LORA_KEY = re.compile(r"(^|[._])lora(_unet|_te\d?)?[._]|\.lora_[AB]\.|\.(hada|lokr)_")


def resolve_base(base: str | os.PathLike) -> str:
    """A base as diffusers can load it: `toy` names the shipped toy model's folder."""
    if str(base) == TOY_BASE:
        from .toy_model import toy_model_path

        return str(toy_model_path())
    return str(base)


def is_single_file(base: str | os.PathLike) -> bool:
    """A checkpoint file (by its name or because it is a file), as opposed to a folder or hub id."""
    text = str(base)
    return text.lower().endswith(SINGLE_FILE_SUFFIXES) or os.path.isfile(os.path.expanduser(text))


def check_local_path(base: str | os.PathLike) -> None:
    """A folder spelled as a path must exist (else the hub client reports a confusing repo-id error)."""
    text = str(base)
    if text.startswith(("/", ".", "~")) and not is_single_file(base) and not os.path.isdir(os.path.expanduser(text)):
        raise BaseModelError(base, "no such folder")


def single_file_path(base: str | os.PathLike) -> Path:
    """A single-file base on this machine: as given, or from the hub (`owner/repo/sd_xl_base_1.0.safetensors`)."""
    text = str(base)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+/[\w./-]+", text) and not text.startswith(("/", ".", "~")):
        try:
            return download_from_hub(text)
        except LoraError as exc:
            raise BaseModelError(base, exc.problem) from None
    raise BaseModelError(base, "no such file")


def base_projection_shapes(base: str | os.PathLike, config: str | os.PathLike | None = None) -> dict:
    """Projection shapes of a base: from its UNet config, or from a single file's header (checked
    against `config`, the diffusers folder or hub id whose configs the file is loaded with)."""
    if is_single_file(base):
        return single_file_shapes(base, config)
    check_no_config(base, config)
    return projection_shapes(unet_config(base))


def check_no_config(base: str | os.PathLike, config: str | os.PathLike | None) -> None:
    """A folder or hub id brings its own configs: a config given with one is a mistake, not a no-op."""
    if config is not None:
        raise BaseModelError(base, "--base-config is for single-file bases; a folder or hub id has its own configs")


def unet_config(base: str | os.PathLike) -> dict:
    """The UNet config of a diffusers pipeline folder or hub id."""
    from diffusers import UNet2DConditionModel

    base = resolve_base(base)
    check_local_path(base)
    try:
        with warnings.catch_warnings():  # diffusers 0.42 passes a deprecated argument to the hub client
            warnings.simplefilter("ignore")
            return dict(UNet2DConditionModel.load_config(str(base), subfolder="unet"))
    except Exception as exc:
        if str(base) in KNOWN_UNET_CONFIGS:  # offline, but we know its shapes
            return dict(KNOWN_UNET_CONFIGS[str(base)])
        raise BaseModelError(base, f"cannot read the base model's UNet config ({first_line(exc)})") from None


@lru_cache(maxsize=8)
def _shapes_from_config(config_items: tuple) -> dict[str, tuple[int, int]]:
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(config_items))
    return {
        name: (module.out_features, module.in_features)
        for name, module in unet.named_modules()
        if isinstance(module, torch.nn.Linear) and ATTENTION_PROJECTION.search(name)
    }


def projection_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """UNet module path -> (out_features, in_features) for every attention projection."""
    hashable = tuple(sorted((k, _freeze(v)) for k, v in config.items() if not k.startswith("_")))
    return dict(_shapes_from_config(hashable))


def _freeze(value):
    return tuple(_freeze(v) for v in value) if isinstance(value, list | tuple) else value


# ---------------------------------------------------------------- single-file checkpoints


def read_single_file(base: str | os.PathLike) -> dict[str, dict]:
    """A single file's header (checked whole, safetensors), its UNet keys under `model.diffusion_model.`."""
    try:
        return with_unet_prefix(read_header(single_file_path(base)))
    except LoraError as exc:  # the same file checks as for LoRAs; the message names the file
        raise BaseModelError(base, exc.problem) from None


def with_unet_prefix(entries: dict) -> dict:
    """UNet-only files (as ComfyUI keeps them) may hold SGM's UNet names without the prefix."""
    if any(k.startswith(SGM_UNET) for k in entries) or not any(k.startswith("input_blocks.") for k in entries):
        return entries
    return {(SGM_UNET + k if k.startswith(SGM_UNET_PARTS) else k): v for k, v in entries.items()}


def is_diffusers_unet(keys) -> bool:
    """A UNet saved by diffusers (`unet/diffusion_pytorch_model.safetensors` of a fine-tune), given as
    one file: diffusers' own module names rather than SGM's."""
    return "conv_in.weight" in keys and any(k.startswith("down_blocks.") for k in keys)


def is_unet_only(header: dict) -> bool:
    """A file with the UNet alone: the VAE, text encoders and tokenizers then come from the config."""
    return not any(k.startswith(tuple(SDXL_PARTS)) for k in header)


def single_file_shapes(base: str | os.PathLike, config: str | os.PathLike | None = None) -> dict:
    """Projection shapes read from a single-file SDXL checkpoint's header, after checking that it is
    one (whole, safetensors, an SDXL base: all of it, or its UNet alone in SGM's or diffusers' names)
    and that its UNet has the shapes of `config`'s UNet (SDXL base 1.0 by default)."""
    return header_shapes(base, read_single_file(base), config)


def header_shapes(base: str | os.PathLike, header: dict, config: str | os.PathLike | None = None) -> dict:
    """`single_file_shapes` on a header already read."""
    problem = _not_an_sdxl_base(list(header))
    if problem:
        raise BaseModelError(base, problem)
    if is_diffusers_unet(header):
        shapes = {
            key.removesuffix(".weight"): tuple(entry["shape"])
            for key, entry in header.items()
            if ATTENTION_PROJECTION.search(key.removesuffix(".weight")) and len(entry["shape"]) == 2
        }
        conv_in = "conv_in.weight"
    else:
        shapes = {
            sgm_attention_module(key): tuple(entry["shape"])
            for key, entry in header.items()
            if SGM_ATTENTION.match(key) and len(entry["shape"]) == 2
        }
        conv_in = SGM_UNET + "input_blocks.0.0.weight"
    reference = resolve_base(config or DEFAULT_BASE)
    unet = unet_config(reference)
    in_channels = header.get(conv_in, {}).get("shape", [0, unet["in_channels"]])[1]
    if in_channels != unet["in_channels"]:
        problem = f"its UNet takes {in_channels} input channels, not {unet['in_channels']} (an inpainting model?)"
        raise BaseModelError(base, problem + "; estlora needs a text-to-image SDXL base")
    expected = projection_shapes(unet)
    if shapes != expected:
        problem = f"its UNet does not have the shapes of {reference}'s UNet"
        raise BaseModelError(base, f"{problem} ({_first_difference(shapes, expected)})")
    return shapes


def _not_an_sdxl_base(keys: list[str]) -> str | None:
    if any(LORA_KEY.search(k) for k in keys):
        return "this is a LoRA, not a base model checkpoint (give it as the subject or style)"
    if any(k.removeprefix(SGM_UNET).startswith(TRANSFORMER_BLOCKS) for k in keys):
        return "a transformer model checkpoint (SD3 or Flux), not SDXL"
    if is_diffusers_unet(keys):
        return None
    if not any(k.startswith(SGM_UNET) for k in keys):
        return "not a single-file Stable Diffusion checkpoint (no model.diffusion_model.* UNet weights)"
    if any(k.startswith(("edm_vpred.", "edm_mean")) for k in keys):
        return "an EDM model (CosXL or Playground v2.5), which needs EDM sampling; use its diffusers folder"
    if any(k.startswith("cond_stage_model.") for k in keys):
        return "a Stable Diffusion 1.x / 2.x checkpoint, not SDXL"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        return "an SDXL refiner checkpoint; EST-LoRA fuses LoRAs on the SDXL base"
    missing = [name for prefix, name in SDXL_PARTS.items() if not any(k.startswith(prefix) for k in keys)]
    if missing and len(missing) < len(SDXL_PARTS):
        return f"holds no {' or '.join(missing)} weights; a single file holds a whole SDXL or its UNet alone"
    return None


def not_a_vae(keys: list[str]) -> str | None:
    """Why a single file given as the VAE is not one, or None."""
    if any(LORA_KEY.search(k) for k in keys):
        return "this is a LoRA, not a VAE"
    if not any(k.removeprefix("first_stage_model.").startswith(("encoder.", "decoder.")) for k in keys):
        return "not a VAE (no encoder.* / decoder.* weights)"
    return None


def single_file_sampling(header: dict) -> dict:
    """Scheduler settings a single file declares with marker keys, read as ComfyUI reads them: `v_pred`
    (a v-prediction model, such as NoobAI-XL V-Pred) and `ztsnr` (trained to zero terminal SNR, so
    sampling starts from the last timestep). diffusers' `from_single_file` ignores both."""
    if "v_pred" not in header:
        return {}
    if "ztsnr" not in header:
        return {"prediction_type": "v_prediction"}
    return {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def sgm_attention_module(key: str) -> str:
    """`model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight` ->
    `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`. SGM numbers a UNet level's layers
    and its down/up sampler in one list of 3 (layers_per_block + 1), as in every SDXL UNet."""
    block, projection = SGM_ATTENTION.match(key).groups()
    kind, _, number = block.partition(".")
    if kind == "middle_block":
        return f"mid_block.attentions.0.{projection}"
    if kind == "input_blocks":
        level, layer = divmod(int(number) - 1, 3)
        return f"down_blocks.{level}.attentions.{layer}.{projection}"
    level, layer = divmod(int(number), 3)
    return f"up_blocks.{level}.attentions.{layer}.{projection}"


def _first_difference(found: dict, expected: dict) -> str:
    for name in sorted(set(found) | set(expected)):
        if found.get(name) != expected.get(name):
            return f"{name}: {found.get(name, 'missing')} in the file, {expected.get(name, 'none')} expected"
    return ""
