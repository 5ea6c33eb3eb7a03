"""Stable Diffusion XL and its fine-tunes (Pony, Illustrious, NoobAI, ...): every SDXL fact estlora uses.

The denoiser is a `UNet2DConditionModel` with `text_time` conditioning under `pipe.unet`: 70
transformer blocks in 11 attention blocks. Route sets (shared/design/method.md): `attention`, the
`to_q/to_k/to_v/to_out.0` of `attn1`/`attn2` of every transformer block (560, the reference), and
`blocks`, which adds each attention block's `proj_in`/`proj_out` and each transformer block's
feed-forward `ff.net.0.proj`/`ff.net.2` (722).

LoRA layouts: diffusers/peft (`lora_A`/`lora_B`, alphas from `.alpha` keys or the adapter metadata),
diffusers legacy (`.lora.down`/`.lora.up`, and the older attention-processor names), the K-LoRA /
ZipLoRA research layout (`unet.unet.` prefix), kohya / A1111 / Civitai (`lora_unet_...`, with SGM
block names or diffusers block names), ComfyUI (`diffusion_model.` + SGM module paths, which is
kohya's spelling with dots) and the LyCORIS library's own saves (`lycoris_` + kohya's parts).
Renaming goes through diffusers' own converters.

Bases: diffusers folders and hub ids, and single-file checkpoints in Stability's SGM layout (the
UNet under `model.diffusion_model.`, the VAE under `first_stage_model.`, the two text encoders under
`conditioner.embedders.0/1.`), whole or the UNet alone (SGM or diffusers names).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

from ..config import SamplingConfig
from ..errors import BaseModelError, BaseModelMismatchError, LoraFormatError, first_line
from ..files import lycoris
from ..files.lora_keys import check_alpha, comfy_to_kohya, module_of
from ..lazy import torch
from .family import Checkpoint, LoraParts, ModelFamily, peft_parts, split_module

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

# Module paths inside the UNet (diffusers' names).
_BLOCK = r"(?:down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.\d+"
_ATTENTION = r"transformer_blocks\.\d+\.attn[12]\.(?:to_q|to_k|to_v|to_out\.0)"
ATTENTION = re.compile(rf"{_BLOCK}\.{_ATTENTION}")
BLOCKS = re.compile(rf"{_BLOCK}\.(?:proj_in|proj_out|{_ATTENTION}|transformer_blocks\.\d+\.ff\.net\.(?:0\.proj|2))")
# kohya spells the same module paths with underscores, with diffusers' or SGM's block names.
KOHYA_ROUTABLE = re.compile(
    r"^lora_unet_.*(?:transformer_blocks_\d+_(?:attn[12]_(?:to_q|to_k|to_v|to_out_0)|ff_net_0_proj|ff_net_2)"
    r"|(?:attentions_\d+|input_blocks_\d+_1|middle_block_1|output_blocks_\d+_1)_proj_(?:in|out))$"
)
# The parts of a kohya LoRA module (LyCORIS LoKr and LoHa parts: `estlora.files.lycoris`); anything else on
# a routable linear (`lora_mid`, `on_input`, ...) is an adapter kind estlora does not apply.
KOHYA_LORA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
DORA_PART = "dora_scale"  # LyCORIS' DoRA magnitude beside kohya's factors (`estlora.updates.DoraFactors`)
# Full-weight differences: ComfyUI's LoRA extraction and trainer add them beside the factors (on norms
# and biases); LyCORIS' `full` algorithm writes nothing else.
DIFF_PARTS = ("diff", "diff_b")
# Adapter kinds by their keys' parts, for messages (LyCORIS' algorithms and others estlora does not apply).
ADAPTER_KINDS = (
    (("hada_",), "LyCORIS LoHa weights (hada_*)"),
    (("lokr_",), "LyCORIS LoKr weights (lokr_*)"),
    (("lora_mid",), "a LyCORIS LoCon with a Tucker core (lora_mid)"),
    (("on_input", "weight"), "LyCORIS (IA)3 weights"),
    (("a1.", "a2.", "b1.", "b2."), "LyCORIS GLoRA weights"),
    (("oft_", "rescale"), "OFT / BOFT weights"),
    (("w_norm", "b_norm"), "LyCORIS norm weights"),
)
# ComfyUI: `diffusion_model.<SGM module path>.<part>`, with kohya's or peft's part names.
COMFY_KEY = re.compile(r"^diffusion_model\.(.+?)\.(lora_(?:up|down|A|B|mid)\.weight|alpha|\w+)$")
# Keys of LoRAs for transformer (DiT) models: diffusers/peft `transformer.`, kohya or ComfyUI Flux/SD3 blocks.
TRANSFORMER_MODEL_KEY = re.compile(
    r"^(transformer\.|lora_transformer_|base_model\.model\.(single_)?transformer_blocks\."
    r"|lora_unet_(double_blocks|single_blocks|joint_blocks)_)"
)
# Keys of a single-file model checkpoint: SGM's UNet (prefixed, or bare in UNet-only files), VAE, text encoders.
SINGLE_FILE_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "conditioner.", "input_blocks.")

# Single-file (Stability SGM) checkpoints.
SGM_UNET = "model.diffusion_model."
SGM_UNET_PARTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.")
SDXL_PARTS = {
    "first_stage_model.": "VAE",
    "conditioner.embedders.0.transformer.": "CLIP ViT-L text encoder",
    "conditioner.embedders.1.model.": "OpenCLIP ViT-bigG text encoder",
}
SGM_ROUTABLE = re.compile(
    r"^model\.diffusion_model\.(input_blocks\.\d+|middle_block|output_blocks\.\d+)\.1\."
    r"(proj_in|proj_out|transformer_blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2))"
    r"\.weight$"
)
TRANSFORMER_BLOCKS = ("joint_blocks.", "double_blocks.")  # SD3's MMDiT, Flux
LORA_KEY = re.compile(r"(^|[._])lora(_unet|_te\d?)?[._]|\.lora_[AB]\.|\.(hada|lokr)_")
BASE_BY_CROSS_DIM = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}

# Samplers by the names A1111 and ComfyUI users know: (diffusers scheduler class, config overrides).
# Each is built from the base's own scheduler config, so the training schedule (betas, prediction
# type, timestep spacing) carries over. `default` is the base's own scheduler (SDXL: Euler).
SCHEDULERS: dict[str, tuple[str, dict] | None] = {
    "default": None,
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm++2m-sde-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
}


class SDXL(ModelFamily):
    name = "sdxl"
    label = "SDXL"
    denoiser = "unet"
    denoiser_classes = ("UNet2DConditionModel",)
    pipeline_classes = (
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
    )
    lora_prefix = "unet"
    lora_components = ("unet", "text_encoder", "text_encoder_2")
    default_base = DEFAULT_BASE
    route_sets = {"attention": ATTENTION, "blocks": BLOCKS}
    default_route = "attention"
    foreign_bases = ("SD 1.x", "SD 2.x")
    default_steps = 30
    default_guidance = 5.0
    size_multiple = 8
    guidance_help = "classifier-free guidance scale (two denoiser calls per step)"
    refused_settings = dict.fromkeys(
        ("true_cfg", "max_sequence_length"), "is for models with a T5 encoder and embedded guidance, not SDXL"
    )
    schedulers = SCHEDULERS

    # ------------------------------------------------------------ pipelines and modules

    def serves_model(self, model) -> bool:
        """SDXL's UNet: `text_time` conditioning (SD 1.x/2.x UNets are the same class without it)."""
        model = getattr(model, "_orig_mod", model)
        config = getattr(model, "config", None)
        return super().serves_model(model) and getattr(config, "addition_embed_type", None) == "text_time"

    def order(self, module: str) -> tuple:
        """Down blocks, mid block, up blocks; numbers numerically."""
        stage = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}.get(module.split(".", 1)[0], 3)
        return (stage, [int(p) if p.isdigit() else p for p in re.split(r"[._]", module)])

    def block_of(self, module: str) -> str:
        """'up_blocks.0.attentions.1.transformer_blocks.3.attn2.to_q' -> 'up_blocks.0.attentions.1'."""
        parts = module.split(".")
        return ".".join(parts[:3] if parts[0] == "mid_block" else parts[:4])

    # ------------------------------------------------------------ LoRA files

    def claims_lora(self, keys: list[str]) -> bool:
        return detect_layout(keys) is not None

    def lora_parts(self, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> LoraParts:
        layout = detect_layout(list(tensors))
        if layout == "comfyui":
            return _from_kohya(path, layout, comfy_to_kohya(tensors, COMFY_KEY), tensors)
        if layout == "lycoris":
            return _from_kohya(path, layout, _lycoris_to_kohya(tensors), tensors)
        if layout == "kohya":
            return _from_kohya(path, layout, _advanced_script_to_kohya(tensors), tensors)
        return _from_peft_names(path, layout, tensors)

    def no_projections(self, path: Path, other: dict[str, torch.Tensor]) -> Exception:
        foreign = next((key for key in other if TRANSFORMER_MODEL_KEY.match(key)), None)
        if foreign:
            return BaseModelMismatchError(
                path, f"made for a transformer model such as Flux or SD3 ({foreign}), not an SDXL UNet"
            )
        if other and all(self.other_kind(module_of(key)).startswith("text encoder") for key in other):
            return LoraFormatError(
                path,
                f"holds only text-encoder weights ({len(other)} keys), no LoRA weights for UNet attention projections",
            )
        if other and all(key.endswith(tuple(f".{part}" for part in DIFF_PARTS)) for key in other):
            return LoraFormatError(
                path,
                f"holds only full-weight differences ({len(other)} .diff / .diff_b keys: LyCORIS 'full' or"
                " ComfyUI), no LoRA factors to route",
            )
        counted = f"({len(other)} other keys)" if other else ""
        return LoraFormatError(path, "holds no LoRA weights for UNet attention projections " + counted)

    def guess_base(self, shapes: dict[str, tuple[int, int]]) -> str:
        """SD 1.x, SD 2.x or SDXL, from module names and the cross-attention key/value input width."""
        cross = {n_in for name, (_, n_in) in shapes.items() if re.search(r"attn2\.to_[kv]$", name)}
        # SDXL stacks 2 or 10 transformer blocks per attention block; SD 1.x/2.x have one each, and have
        # attention in down_blocks.0 and up_blocks.2/3, which SDXL has not.
        sdxl_layout = any(re.search(r"\.transformer_blocks\.[1-9]", n) for n in shapes)
        sd1_layout = any(
            n.startswith(("down_blocks.0.attentions", "up_blocks.2.attentions", "up_blocks.3.attentions"))
            for n in shapes
        )
        if len(cross) == 1:
            width = next(iter(cross))
            base = BASE_BY_CROSS_DIM.get(width)
            if base == "SDXL" or (base and not sdxl_layout):
                return base
            layout = "SDXL layout" if sdxl_layout else "SD 1.x/2.x layout" if sd1_layout else "unknown layout"
            return f"{layout}, non-standard widths (cross-attention {width})"
        return "SDXL layout" if sdxl_layout else "SD 1.x/2.x layout" if sd1_layout else "unknown"

    def other_kind(self, module: str) -> str:
        if re.search(r"(^|\.|_)(te2|text_encoder_2|clip_g)([._]|$)", module):  # clip_g/clip_l: ComfyUI
            return "text encoder 2"
        if re.search(r"(^|\.|_)(te1?|text_encoders?|clip_l)([._]|$)", module):
            return "text encoder 1"
        if re.search(r"(^|[._])ff[._]", module):
            return "UNet feed-forward"
        if re.search(r"attn[12][._]", module):
            return "UNet attention (other)"
        if re.search(r"(time_embed|label_emb|add_embedding)", module):
            return "UNet time/size embedding"
        conv = (  # SGM's conv_in and conv_out are input_blocks.0.0 and out.2
            r"(conv|resnets|in_layers|out_layers|emb_layers|skip_connection|op$|proj_in|proj_out"
            r"|input_blocks[._]0[._]0$|(^|[._])out[._]2$)"
        )
        if re.search(conv, module):
            return "UNet conv/resnet/projection"
        return "other"

    def diff_target(self, key: str) -> tuple[str, str] | None:
        """ComfyUI's `diffusion_model.<SGM path>.diff` / `.diff_b` -> ("unet", diffusers parameter path);
        its text encoders' `text_encoders.clip_l|clip_g.transformer.<path>` -> that text encoder's."""
        stem, _, part = key.rpartition(".")
        if part not in DIFF_PARTS:
            return None
        parameter = "weight" if part == "diff" else "bias"
        for prefix, component in COMFY_TEXT_ENCODERS.items():
            if stem.startswith(prefix):
                return component, f"{stem.removeprefix(prefix)}.{parameter}"
        module = sgm_unet_module(stem.removeprefix("diffusion_model.")) if stem.startswith("diffusion_model.") else None
        return None if module is None else ("unet", f"{module}.{parameter}")

    def not_a_lora(self, keys: list[str]) -> str | None:
        """Why a file with no LoRA layout is one of this family's model files, or None."""
        if any(k.startswith(SINGLE_FILE_CHECKPOINT_PREFIXES) for k in keys):
            return "this is a model checkpoint, not a LoRA (a single-file SDXL is given as the base: --base FILE)"
        if "conv_in.weight" in keys:
            return (
                "this is a diffusers UNet's weights, not a LoRA (a fine-tuned UNet is given as the base: --base FILE)"
            )
        return None

    # ------------------------------------------------------------ bases

    def config_shapes(self, base: str) -> dict[str, tuple[int, int]]:
        return self.shapes_from_config(unet_config(base))

    def claims_checkpoint(self, keys: list[str]) -> bool:
        keys = list(with_unet_prefix(dict.fromkeys(keys)))
        return is_diffusers_unet(keys) or any(k.startswith(SGM_UNET) for k in keys)

    def read_checkpoint(self, base: str, header: dict, config: str) -> Checkpoint:
        """Check that a header is an SDXL base (all of it, or its UNet alone in SGM's or diffusers' names)
        whose UNet has the shapes of `config`'s UNet (SDXL base 1.0 by default)."""
        header = with_unet_prefix(header)
        problem = _not_an_sdxl_base(list(header))
        if problem:
            raise BaseModelError(base, problem)
        if is_diffusers_unet(header):
            shapes = {
                key.removesuffix(".weight"): tuple(entry["shape"])
                for key, entry in header.items()
                if self.routable(key.removesuffix(".weight")) and len(entry["shape"]) == 2
            }
            conv_in = "conv_in.weight"
        else:
            shapes = {
                sgm_module(key): tuple(entry["shape"])
                for key, entry in header.items()
                if SGM_ROUTABLE.match(key) and len(entry["shape"]) == 2
            }
            conv_in = SGM_UNET + "input_blocks.0.0.weight"
        unet = unet_config(config)
        in_channels = header.get(conv_in, {}).get("shape", [0, unet["in_channels"]])[1]
        if in_channels != unet["in_channels"]:
            problem = f"its UNet takes {in_channels} input channels, not {unet['in_channels']} (an inpainting model?)"
            raise BaseModelError(base, problem + "; estlora needs a text-to-image SDXL base")
        expected = self.shapes_from_config(unet)
        if shapes != expected:
            problem = f"its UNet does not have the shapes of {config}'s UNet"
            raise BaseModelError(base, f"{problem} ({_first_difference(shapes, expected)})")
        denoiser_only = not any(k.startswith(tuple(SDXL_PARTS)) for k in header)
        return Checkpoint(header, shapes, denoiser_only, single_file_sampling(header))

    def load_pretrained(self, location: str, torch_dtype: torch.dtype):
        from diffusers import StableDiffusionXLPipeline

        remote_fp16 = torch_dtype == torch.float16 and not os.path.isdir(location)
        attempts = [{"variant": "fp16"}, {}] if remote_fp16 else [{}]
        for extra in attempts:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return StableDiffusionXLPipeline.from_pretrained(location, torch_dtype=torch_dtype, **extra)
            except Exception as exc:  # missing folder, offline hub, not a pipeline: one answer to the user
                error = exc
        raise BaseModelError(location, f"cannot load an SDXL pipeline ({first_line(error)})")

    def load_single_file(self, path: str, checkpoint: Checkpoint, torch_dtype: torch.dtype, config: str):
        """diffusers' own single-file loading; a UNet alone is loaded so, and the rest comes from `config`."""
        from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
        from safetensors.torch import load_file

        if not checkpoint.denoiser_only:
            pipe = StableDiffusionXLPipeline.from_single_file(path, torch_dtype=torch_dtype, config=config)
        else:
            state = with_unet_prefix(load_file(path))
            unet = UNet2DConditionModel.from_single_file(
                state, config=config, subfolder="unet", torch_dtype=torch_dtype
            )
            pipe = StableDiffusionXLPipeline.from_pretrained(config, unet=unet, torch_dtype=torch_dtype)
        if checkpoint.sampling:
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **checkpoint.sampling)
        return pipe

    def check_pipeline(self, pipe, source: str) -> None:
        """transformers builds a CLIP tokenizer with no vocabulary, silently, from a folder that lacks its
        vocab files (a `tokenizer_2/` left out of a copied SDXL folder): every prompt would become
        unknown tokens. Refused instead, naming the folder the tokenizers came from."""
        for name in ("tokenizer", "tokenizer_2"):
            tokenizer = getattr(pipe, name, None)
            if tokenizer is None or len(tokenizer) <= len(tokenizer.all_special_tokens):
                raise BaseModelError(
                    source, f"its {name} has no vocabulary ({name}/vocab.json and merges.txt missing?)"
                )

    def weight_components(self, vae_replaced: bool) -> tuple[str, ...]:
        # The base's own VAE is not checked when --vae replaces it (a broken VAE is a reason to replace it).
        return ("unet", "text_encoder", "text_encoder_2") + (() if vae_replaced else ("vae",))

    def not_a_vae(self, keys: list[str]) -> str | None:
        if any(LORA_KEY.search(k) for k in keys):
            return "this is a LoRA, not a VAE"
        if not any(k.removeprefix("first_stage_model.").startswith(("encoder.", "decoder.")) for k in keys):
            return "not a VAE (no encoder.* / decoder.* weights)"
        return None

    # ------------------------------------------------------------ sampling

    def call_arguments(self, sampling: SamplingConfig, steps: int) -> dict:
        guidance = self.default_guidance if sampling.guidance is None else sampling.guidance
        kwargs = {"num_inference_steps": steps, "guidance_scale": guidance}
        if sampling.guidance_rescale:
            kwargs["guidance_rescale"] = sampling.guidance_rescale
        for name in ("negative_prompt", "width", "height"):
            if getattr(sampling, name) is not None:
                kwargs[name] = getattr(sampling, name)
        return kwargs


# ---------------------------------------------------------------- LoRA layouts


def detect_layout(keys: list[str]) -> str | None:
    if any(k.startswith("diffusion_model.") for k in keys):  # its text-encoder keys may be kohya's
        return "comfyui"
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return "kohya"
    if any(k.startswith("lycoris_") for k in keys):  # the LyCORIS library's own saves (SimpleTuner)
        return "lycoris"
    if any(k.startswith("unet.unet.") for k in keys):
        return "klora-research"
    if any(re.search(r"\.lora_[AB]\.", k) for k in keys):
        return "diffusers-peft"
    if any(re.search(r"(\.lora\.|_lora\.)(down|up)\.weight$", k) for k in keys):
        return "diffusers-legacy"
    return None


def _lycoris_to_kohya(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LyCORIS library's prefix (`LycorisNetwork.LORA_PREFIX`) for kohya's names of the UNet."""
    return {re.sub(r"^lycoris_", "lora_unet_", k): v for k, v in tensors.items()}


def _advanced_script_to_kohya(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' advanced SDXL script (with text-encoder training) writes kohya's prefix with its own
    suffix, `lora_unet_<name>_lora.down.weight`, and no alphas (ComfyUI reads them at scale 1, as a
    missing alpha means here too): kohya's spelling, `lora_unet_<name>.lora_down.weight`."""
    return {
        re.sub(r"^(lora_unet_\w+?)_lora\.(down|up)\.weight$", r"\1.lora_\2.weight", k): v for k, v in tensors.items()
    }


def _from_kohya(
    path: Path, layout: str, tensors: dict[str, torch.Tensor], original: dict[str, torch.Tensor]
) -> LoraParts:
    """Routable keys through diffusers' kohya converter (SGM block names included); the rest kept
    under kohya's names, which diffusers' loader reads. `original` is the file as read: messages name
    its keys, not their kohya spelling. ComfyUI's full-weight differences (`.diff`, `.diff_b`) are
    other weights, whatever module they belong to. LyCORIS' LoKr and LoHa parts, which the converter
    does not read, get their module's name from it through stand-in factors."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    file_key = {id(value): key for key, value in original.items()}
    routable, other = {}, {}
    for key, value in tensors.items():
        module, _, part = key.partition(".")
        if part in DIFF_PARTS:  # under the file's own name: `diff_target` reads it, diffusers' loader never does
            other[file_key.get(id(value), key)] = value
        elif not KOHYA_ROUTABLE.match(module):
            other[key] = value
        elif part in KOHYA_LORA_PARTS or part == DORA_PART or lycoris.part_name(part):
            if part == "alpha":
                check_alpha(path, file_key.get(id(value), key).removesuffix(".alpha"), value)
            routable[key] = value
        else:
            named = file_key.get(id(value), key)
            raise LoraFormatError(path, f"{named}: {_adapter_kind(part)}; only LoRA (down/up) files are supported")
    if not routable:
        return LoraParts(layout, {}, {}, other)
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in routable.items():
        by_module.setdefault(key.partition(".")[0], {})[key] = value
    factors = {key: value for key, value in routable.items() if key.partition(".")[2] in KOHYA_LORA_PARTS[:2]}
    stand_ins = {}
    for source, keys in by_module.items():
        if any(lycoris.part_name(key.partition(".")[2]) for key in keys):
            for part in KOHYA_LORA_PARTS[:2]:
                stand_ins[f"{source}.{part}"] = torch.zeros(1, 1)
    kohya_module = {id(value): key.partition(".")[0] for key, value in {**factors, **stand_ins}.items()}
    stand_in_ids = {id(value) for value in stand_ins.values()}
    # SGM block numbers depend only on layers_per_block, which is 2 for SDXL (and SD 1.x / 2.x).
    try:
        converted, _ = StableDiffusionXLPipeline.lora_state_dict(
            {**factors, **stand_ins}, unet_config=SimpleNamespace(layers_per_block=2)
        )
    except ValueError as exc:  # diffusers' converter names keys it cannot rename
        raise LoraFormatError(path, f"kohya keys diffusers cannot convert ({first_line(exc)})") from None
    parts: dict[str, dict[str, torch.Tensor]] = {}
    keys: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in convert_unet_state_dict_to_peft(converted).items():
        module, part = split_module(name, "unet")
        source = kohya_module[id(value)]  # diffusers moves the very tensors: the file's name for each
        keys[module] = by_module[source]
        if id(value) in stand_in_ids:
            parts[module] = {
                lycoris.part_name(key.partition(".")[2]): tensor
                for key, tensor in by_module[source].items()
                if lycoris.part_name(key.partition(".")[2])
            }
            # diffusers' loader reads no LyCORIS parts: the file's own names, for messages
            keys[module] = {file_key.get(id(tensor), key): tensor for key, tensor in by_module[source].items()}
        else:
            parts.setdefault(module, {})[part] = value
        for extra in ("alpha", DORA_PART):  # the converter reads neither (it drops kohya's dora_scale)
            if f"{source}.{extra}" in routable:
                parts[module][extra] = routable[f"{source}.{extra}"]
    return LoraParts(layout, parts, keys, other)


def _adapter_kind(part: str) -> str:
    """What a key's part says its adapter is, where it is not a LoRA factor."""
    for prefixes, kind in ADAPTER_KINDS:
        if part.startswith(prefixes):
            return f"{kind}, not LoRA factors"
    return f"'{part}' is not a LoRA factor (LyCORIS or another adapter type?)"


def _from_peft_names(path: Path, layout: str, tensors: dict[str, torch.Tensor]) -> LoraParts:
    """diffusers/peft names (legacy and research layouts renamed by diffusers' converter first). Other
    keys keep the names diffusers' loader reads: only the research layout's extra `unet.` is dropped.
    (diffusers is imported only for the layouts its converter renames: it costs seconds.)"""
    if layout == "klora-research":
        tensors = {k.removeprefix("unet."): v for k, v in tensors.items()}
    if layout not in ("klora-research", "diffusers-legacy"):
        return peft_parts(path, layout, tensors, "unet", BLOCKS)
    from diffusers.utils import convert_unet_state_dict_to_peft

    return peft_parts(
        path,
        layout,
        tensors,
        "unet",
        BLOCKS,
        lambda key, value: next(iter(convert_unet_state_dict_to_peft({key: value}))),
    )


# ---------------------------------------------------------------- bases


def unet_config(base: str) -> dict:
    """The UNet config of a diffusers pipeline folder or hub id (SDXL base 1.0's is known offline)."""
    from diffusers import UNet2DConditionModel

    try:
        with warnings.catch_warnings():  # diffusers 0.42 passes a deprecated argument to the hub client
            warnings.simplefilter("ignore")
            return dict(UNet2DConditionModel.load_config(str(base), subfolder="unet"))
    except Exception as exc:
        if str(base) in KNOWN_UNET_CONFIGS:  # offline, but we know its shapes
            return dict(KNOWN_UNET_CONFIGS[str(base)])
        raise BaseModelError(base, f"cannot read the base model's UNet config ({first_line(exc)})") from None


def with_unet_prefix(entries: dict) -> dict:
    """UNet-only files (as ComfyUI keeps them) may hold SGM's UNet names without the prefix."""
    if any(k.startswith(SGM_UNET) for k in entries) or not any(k.startswith("input_blocks.") for k in entries):
        return entries
    return {(SGM_UNET + k if k.startswith(SGM_UNET_PARTS) else k): v for k, v in entries.items()}


def is_diffusers_unet(keys) -> bool:
    """A UNet saved by diffusers (`unet/diffusion_pytorch_model.safetensors` of a fine-tune), given as
    one file: diffusers' own module names rather than SGM's."""
    return "conv_in.weight" in keys and any(k.startswith("down_blocks.") for k in keys)


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


def single_file_sampling(header: dict) -> dict:
    """Scheduler settings a single file declares with marker keys, read as ComfyUI reads them: `v_pred`
    (a v-prediction model, such as NoobAI-XL V-Pred) and `ztsnr` (trained to zero terminal SNR, so
    sampling starts from the last timestep). diffusers' `from_single_file` ignores both."""
    if "v_pred" not in header:
        return {}
    if "ztsnr" not in header:
        return {"prediction_type": "v_prediction"}
    return {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def sgm_module(key: str) -> str:
    """`model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight` ->
    `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`. SGM numbers a UNet level's layers
    and its down/up sampler in one list of 3 (layers_per_block + 1), as in every SDXL UNet."""
    block, inner = SGM_ROUTABLE.match(key).groups()
    kind, _, number = block.partition(".")
    if kind == "middle_block":
        return f"mid_block.attentions.0.{inner}"
    if kind == "input_blocks":
        level, layer = divmod(int(number) - 1, 3)
        return f"down_blocks.{level}.attentions.{layer}.{inner}"
    level, layer = divmod(int(number), 3)
    return f"up_blocks.{level}.attentions.{layer}.{inner}"


# SGM's UNet module paths outside the blocks, and a resnet's inner layers, as diffusers names them.
SGM_TOP_MODULES = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
SGM_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
COMFY_TEXT_ENCODERS = {
    "text_encoders.clip_l.transformer.": "text_encoder",
    "text_encoders.clip_g.transformer.": "text_encoder_2",
}


def sgm_unet_module(path: str) -> str | None:
    """Any module of SDXL's UNet from its SGM path (`input_blocks.1.0.in_layers.0` ->
    `down_blocks.0.resnets.0.norm1`), or None. A level's SGM list holds its two layers and then its
    sampler (3 per level); a layer is a resnet (part 0) and, on levels with attention, its attention
    block (part 1, whose inner names diffusers keeps); an up level's sampler follows its last layer."""
    if path in SGM_TOP_MODULES:
        return SGM_TOP_MODULES[path]
    match = re.fullmatch(r"(input_blocks|middle_block|output_blocks)\.(?:(\d+)\.)?(\d+)(?:\.(.+))?", path)
    if match is None:
        return None
    kind, number, part, inner = match.groups()
    part = int(part)
    if kind == "middle_block":
        head = ("mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1")[part] if part < 3 else None
        resnet = part != 1
    elif kind == "input_blocks":
        level, slot = divmod(int(number) - 1, 3)
        if slot == 2:
            return f"down_blocks.{level}.downsamplers.0.conv" if (part, inner) == (0, "op") else None
        head = f"down_blocks.{level}.{'resnets' if part == 0 else 'attentions'}.{slot}"
        resnet = part == 0
    else:
        level, slot = divmod(int(number), 3)
        if inner == "conv" and part > 0:  # the level's upsampler
            return f"up_blocks.{level}.upsamplers.0.conv"
        head = f"up_blocks.{level}.{'resnets' if part == 0 else 'attentions'}.{slot}"
        resnet = part == 0
    if head is None or inner is None:
        return None
    if resnet:
        return f"{head}.{SGM_RESNET[inner]}" if inner in SGM_RESNET else None
    return f"{head}.{inner}"


def _first_difference(found: dict, expected: dict) -> str:
    for name in sorted(set(found) | set(expected)):
        if found.get(name) != expected.get(name):
            return f"{name}: {found.get(name, 'missing')} in the file, {expected.get(name, 'none')} expected"
    return ""
