"""FLUX.1 (dev, schnell and their fine-tunes): every FLUX.1 fact estlora uses.

The denoiser is a `FluxTransformer2DModel` under `pipe.transformer`: 19 double-stream blocks
(`transformer_blocks.N`, an image and a text stream) and 38 single-stream blocks
(`single_transformer_blocks.N`). Route sets (shared/design/method.md, "On DiT models"):
`attention`, the image stream's `attn.to_q/to_k/to_v/to_out.0` and the text stream's
`attn.add_q_proj/add_k_proj/add_v_proj/to_add_out` of each double block and `attn.to_q/to_k/to_v`
and `proj_out` of each single block (8 x 19 + 4 x 38 = 304); `blocks`, every linear inside the
blocks, adding `ff`, `ff_context`, `norm1`, `norm1_context` (double) and `proj_mlp`, `norm` (single):
14 x 19 + 6 x 38 = 494, the default (the seeds' FLUX code means to route these; K-LoRA's misses
four of them, a bug its author confirmed).

LoRA layouts: diffusers/peft (`transformer.<module>.lora_A.weight`, with or without `.alpha` keys
or adapter metadata; ai-toolkit and SimpleTuner write it), kohya sd-scripts with BFL's module
names (`lora_unet_double_blocks_0_img_attn_qkv`, ...), ComfyUI (`diffusion_model.` + BFL's names
with dots), OneTrainer (`lora_transformer_` + diffusers' paths with underscores) and XLabs
(`double_blocks.0.processor.qkv_lora1.down.weight`, no alphas). BFL's fused
projections are split exactly (shared/design/method.md, "Fused projections"): for `img_attn.qkv`
(q, k, v), `txt_attn.qkv` (add_q, add_k, add_v) and a single block's `linear1` (q, k, v, proj_mlp,
rows h, h, h, 4h), the slice of the update is scale * B[rows] @ A, so each slice becomes its own
projection with the shared A, gated on its own.
The widths come from the factors (a third, or a seventh, of the rows), not from FLUX.1's 3072.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

from ..config import SamplingConfig
from ..errors import BaseModelError, LoraFormatError, LoraShapeError, SettingError, first_line
from ..files import lycoris
from ..files.lora_keys import check_alpha, comfy_to_kohya, module_of
from ..lazy import torch
from .family import Checkpoint, LoraParts, ModelFamily, peft_parts

DEFAULT_BASE = "black-forest-labs/FLUX.1-dev"
# FLUX.1-dev's transformer config as published; schnell's differs in guidance_embeds only.
FLUX_DEV_TRANSFORMER_CONFIG = {
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}
# FLUX.1-dev's scheduler config as published (schnell's: shift 1, no dynamic shifting).
FLUX_DEV_SCHEDULER_CONFIG = {
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
KNOWN_TRANSFORMER_CONFIGS = {
    DEFAULT_BASE: FLUX_DEV_TRANSFORMER_CONFIG,
    "black-forest-labs/FLUX.1-schnell": {**FLUX_DEV_TRANSFORMER_CONFIG, "guidance_embeds": False},
}

_DOUBLE = r"transformer_blocks\.\d+"
_SINGLE = r"single_transformer_blocks\.\d+"
_ATTENTION = (
    rf"{_DOUBLE}\.attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    rf"|{_SINGLE}\.(?:attn\.(?:to_q|to_k|to_v)|proj_out)"
)
ATTENTION = re.compile(_ATTENTION)
BLOCKS = re.compile(
    _ATTENTION
    + rf"|{_DOUBLE}\.(?:ff\.net\.(?:0\.proj|2)|ff_context\.net\.(?:0\.proj|2)|norm1\.linear|norm1_context\.linear)"
    + rf"|{_SINGLE}\.(?:proj_mlp|norm\.linear)"
)

# BFL's names (kohya spells them with underscores) -> the diffusers modules they hold, in row order.
DOUBLE_PARTS = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "txt_mod_lin": ("norm1_context.linear",),
}
SINGLE_PARTS = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),  # XLabs: a LoRA on linear1's attention rows alone
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
# Every linear a block holds, in its path below the block, keyed by that path with underscores.
BLOCK_LINEARS = {
    name.replace(".", "_"): name
    for name in (
        *(t for targets in DOUBLE_PARTS.values() for t in targets),
        *(t for targets in SINGLE_PARTS.values() for t in targets),
    )
}
# Row shares of a fused update: q, k, v of width h; a single block's MLP of width 4 h (FLUX.1's mlp_ratio).
ROW_SHARES = {3: (1, 1, 1), 4: (1, 1, 1, 4)}
# A module's parts: kohya's LoRA factors and alpha, or LyCORIS' LoKr and LoHa parts (`estlora.files.lycoris`).
_PART = rf"lora_down\.weight|lora_up\.weight|alpha|dora_scale|{'|'.join(lycoris.PARTS)}"
KOHYA_BLOCK = re.compile(rf"^lora_unet_(double|single)_blocks_(\d+)_(\w+?)\.({_PART})$")
COMFY_KEY = re.compile(
    rf"^diffusion_model\.((?:double|single)_blocks\.\d+\.[\w.]+?)\.(lora_(?:up|down|A|B)\.weight|alpha|dora_scale"
    rf"|{'|'.join(lycoris.PARTS)})$"
)
BFL_BLOCK_KEY = re.compile(r"^(?:lora_unet_|diffusion_model\.)(?:double|single)_blocks[._]\d+")
# XLabs: `double_blocks.0.processor.qkv_lora1.down.weight` (1: the image stream, 2: the text stream).
XLABS_KEY = re.compile(
    r"^(?:diffusion_model\.)?(double|single)_blocks\.(\d+)\.processor\.(qkv|proj)_lora(\d?)\.(down|up)\.weight$"
)
XLABS_PARTS = {
    ("double", "qkv", "1"): "img_attn_qkv",
    ("double", "qkv", "2"): "txt_attn_qkv",
    ("double", "proj", "1"): "img_attn_proj",
    ("double", "proj", "2"): "txt_attn_proj",
    ("single", "qkv", ""): "attn_qkv",
    ("single", "proj", ""): "linear2",
}
PEFT_BLOCK_KEY = re.compile(
    r"^(?:base_model\.model\.|transformer\.)?(?:single_)?transformer_blocks\.\d+\..*lora_[AB]\."
)
# OneTrainer (`lora_transformer_`) and the LyCORIS library's own saves (`lycoris_`, SimpleTuner's LoKr):
# diffusers' module paths with underscores, kohya's or LyCORIS' parts.
ONETRAINER_KEY = re.compile(rf"^(?:lora_transformer|lycoris)_((?:single_)?transformer_blocks)_(\d+)_(\w+?)\.({_PART})$")
# LyCORIS parts under diffusers' module paths (`transformer.transformer_blocks.0.attn.to_q.lokr_w1`).
LYCORIS_PEFT_KEY = re.compile(
    rf"^(?:transformer\.)?((?:single_)?transformer_blocks\.\d+\.[\w.]+?)\.({'|'.join(lycoris.PARTS)}|alpha)(?:\.weight)?$"
)
PEFT_PART = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}
# A single file: FLUX.1's transformer in BFL's names, bare (BFL's own files) or under ComfyUI's prefix.
BFL_TRANSFORMER = ("double_blocks.", "single_blocks.")
COMFY_UNET = "model.diffusion_model."
BFL_TENSOR = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")
BLOCK_PATHS = {"double_blocks": "transformer_blocks", "single_blocks": "single_transformer_blocks"}
# BFL's modules outside the blocks -> diffusers'.
BFL_OUTSIDE = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
BFL_TOP = BFL_TRANSFORMER + tuple(f"{module}." for module in BFL_OUTSIDE)
# The RMS norms on queries and keys, below a block.
BFL_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    "norm.query_norm.scale": "attn.norm_q.weight",
    "norm.key_norm.scale": "attn.norm_k.weight",
}
# ComfyUI's scaled fp8 files: per-weight scales beside the fp8 weights.
FP8_SCALES = (".scale_weight", ".scale_input")
# A ComfyUI all-in-one file's other parts -> the pipeline component they load into.
AIO_PARTS = {
    "text_encoder": "text_encoders.clip_l.transformer.",
    "text_encoder_2": "text_encoders.t5xxl.transformer.",
    "vae": "vae.",
}

# Flow-matching samplers FluxPipeline can drive (it passes its own sigmas and the resolution shift mu).
SCHEDULERS: dict[str, tuple[str, dict] | None] = {
    "default": None,
    "euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "euler-karras": ("FlowMatchEulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler-exponential": ("FlowMatchEulerDiscreteScheduler", {"use_exponential_sigmas": True}),
    "lcm": ("FlowMatchLCMScheduler", {}),
}


class Flux1(ModelFamily):
    name = "flux1"
    label = "FLUX.1"
    denoiser = "transformer"
    denoiser_classes = ("FluxTransformer2DModel",)
    pipeline_classes = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")
    lora_prefix = "transformer"
    lora_components = ("transformer", "text_encoder")
    default_base = DEFAULT_BASE
    route_sets = {"attention": ATTENTION, "blocks": BLOCKS}
    default_route = "blocks"
    klora_pattern = "s*"  # K-LoRA's FLUX script: s*, beta 0.85 alpha = 1.275
    reads_gguf = True
    foreign_bases = ("SD3",)
    default_steps = 28
    default_guidance = 3.5  # FLUX.1-dev's embedded guidance
    size_multiple = 16  # the VAE's 8, then 2 x 2 patches
    guidance_help = (
        "FLUX.1's embedded (distilled) guidance, one denoiser call per step (schnell ignores it); "
        "true cfg is the classic kind"
    )
    refused_settings = {"guidance_rescale": "is for classifier-free guidance on UNets; FLUX.1 has none"}
    schedulers = SCHEDULERS

    def serves_model(self, model) -> bool:
        """FLUX.1's transformer: the class diffusers gives it, with single-stream blocks (FLUX.2's is another class)."""
        model = getattr(model, "_orig_mod", model)
        return super().serves_model(model) and hasattr(model, "single_transformer_blocks")

    # ------------------------------------------------------------ modules

    def order(self, module: str) -> tuple:
        """Double blocks, then single blocks; numbers numerically."""
        stage = 1 if module.startswith("single_transformer_blocks.") else 0
        return (stage, [int(p) if p.isdigit() else p for p in re.split(r"[._]", module)])

    def block_of(self, module: str) -> str:
        """'single_transformer_blocks.7.attn.to_q' -> 'single_transformer_blocks.7'."""
        return ".".join(module.split(".")[:2])

    # ------------------------------------------------------------ LoRA files

    def claims_lora(self, keys: list[str]) -> bool:
        patterns = (BFL_BLOCK_KEY, PEFT_BLOCK_KEY, XLABS_KEY, ONETRAINER_KEY)
        if any(pattern.match(k) for k in keys for pattern in patterns):
            return True
        return any(LYCORIS_PEFT_KEY.match(k) and lycoris.part_name(LYCORIS_PEFT_KEY.match(k).group(2)) for k in keys)

    def lora_parts(self, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> LoraParts:
        if any(XLABS_KEY.match(k) for k in tensors):
            return _from_bfl(path, "xlabs", _xlabs_to_kohya(tensors), tensors)
        if any(k.startswith("diffusion_model.") for k in tensors):
            return _from_bfl(path, "comfyui", comfy_to_kohya(tensors, COMFY_KEY), tensors)
        if any(k.startswith("lora_unet_") for k in tensors):
            return _from_bfl(path, "kohya", tensors, tensors)
        if any(ONETRAINER_KEY.match(k) for k in tensors):
            layout = "lycoris" if any(k.startswith("lycoris_") for k in tensors) else "onetrainer"
            return _with_lycoris_parts(path, layout, _onetrainer_to_peft(tensors))
        return _with_lycoris_parts(path, "diffusers-peft", tensors)

    def adapter_groups(self, tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """BFL layouts leave two kinds: the file's own keys (text encoder, embeddings: kohya's names) and
        slices of fused updates (diffusers' peft names, `_from_bfl`); diffusers reads each kind alone."""
        sliced = {k: v for k, v in tensors.items() if k.startswith("transformer.")}
        rest = {k: v for k, v in tensors.items() if k not in sliced}
        if not any(k.startswith("lora_unet_") or k.startswith("lora_te") for k in rest):
            return super().adapter_groups(tensors)  # one layout throughout
        return [group for group in (rest, sliced) if group]

    def no_projections(self, path: Path, other: dict[str, torch.Tensor]) -> Exception:
        counted = f"({len(other)} other keys)" if other else ""
        return LoraFormatError(path, "holds no LoRA weights for FLUX.1's transformer blocks " + counted)

    def guess_base(self, shapes: dict[str, tuple[int, int]]) -> str:
        widths = {n_in for name, (_, n_in) in shapes.items() if name.endswith("attn.to_q")}
        if widths == {3072} and any(name.startswith("single_transformer_blocks.") for name in shapes):
            return "FLUX.1"
        if widths <= {1536, 2432} and widths and not any("single_transformer_blocks" in n for n in shapes):
            return "SD3"  # MMDiT blocks with FLUX's double-block names, SD3's widths
        return f"FLUX.1 layout, non-standard widths ({', '.join(map(str, sorted(widths))) or 'no to_q'})"

    def other_kind(self, module: str) -> str:
        if re.search(r"(^|\.|_)(te1?|text_encoders?|clip_l)([._]|$)", module):
            return "text encoder (CLIP)"
        if re.search(r"(^|\.|_)(te2|text_encoder_2|t5)([._]|$)", module):
            return "text encoder (T5)"
        if re.search(
            r"(x_embedder|img_in|context_embedder|txt_in|time|guidance|vector_in|norm_out|final_layer)", module
        ):
            return "transformer embeddings and output"
        return "other"

    def not_a_lora(self, keys: list[str]) -> str | None:
        if any(k.startswith(BFL_TRANSFORMER) or k.startswith(COMFY_UNET + "double_blocks.") for k in keys):
            return "this is a FLUX.1 model checkpoint, not a LoRA (give it as --base, the rest from --base-config)"
        return None

    # ------------------------------------------------------------ bases

    def config_shapes(self, base: str) -> dict[str, tuple[int, int]]:
        return self.shapes_from_config(transformer_config(base))

    def claims_checkpoint(self, keys: list[str]) -> bool:
        return any(k.removeprefix(COMFY_UNET).startswith(BFL_TRANSFORMER) for k in keys)

    def read_checkpoint(self, base: str, header: dict, config: str) -> Checkpoint:
        """Check that a header is FLUX.1's transformer in BFL's names (bare, or ComfyUI's all-in-one file)
        whose converted tensors are exactly those of `config`'s transformer (dev's, or schnell's where
        the file has no guidance embedder)."""
        keys = [k for k in header if k != "__metadata__"]
        if not any(k.removeprefix(COMFY_UNET).startswith("double_blocks.0.img_mod.") for k in keys):
            raise BaseModelError(base, "not a FLUX.1 transformer (its double blocks have no img_mod: FLUX.2's layout?)")
        meta = {key: torch.empty(header[key]["shape"], device="meta") for key in _transformer_keys(keys)}
        converted = _converted(base, meta)
        expected = _transformer_config(config, converted)
        wanted = {name: tuple(t.shape) for name, t in _meta_transformer(expected).state_dict().items()}
        found = {name: tuple(t.shape) for name, t in converted.items()}
        if found != wanted:
            problem = f"its transformer does not have the shapes of {config}'s transformer"
            raise BaseModelError(base, f"{problem} ({_first_difference(found, wanted)})")
        shapes = {name.removesuffix(".weight"): shape for name, shape in found.items() if len(shape) == 2}
        shapes = {name: shape for name, shape in shapes.items() if self.routable(name)}
        denoiser_only = not any(k.startswith(tuple(AIO_PARTS.values())) for k in keys)
        return Checkpoint(header, shapes, denoiser_only, {})

    def load_pretrained(self, location: str, torch_dtype: torch.dtype):
        from diffusers import FluxPipeline

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return FluxPipeline.from_pretrained(location, torch_dtype=torch_dtype)
        except Exception as exc:  # missing folder, offline hub, not a pipeline: one answer to the user
            raise BaseModelError(location, f"cannot load a FLUX.1 pipeline ({first_line(exc)})") from None

    def load_single_file(self, path: str, checkpoint: Checkpoint, torch_dtype: torch.dtype, config: str):
        """The transformer converted from BFL's names (any width; diffusers' own converter assumes
        FLUX.1's 3072); an all-in-one file's CLIP-L, T5 and VAE from the file too; tokenizers, the
        scheduler and whatever the file lacks from `config`. A GGUF file stays quantized (diffusers'
        GGUF linears, computing in `torch_dtype`)."""
        from diffusers import FluxPipeline
        from safetensors.torch import load_file

        if path.lower().endswith(".gguf"):
            return FluxPipeline.from_pretrained(
                config, transformer=_gguf_transformer(path, config, torch_dtype), torch_dtype=torch_dtype
            )
        state = _dequantized(load_file(path), torch_dtype)
        converted = _converted(path, {k: state[k] for k in _transformer_keys(state)})
        config_of = _transformer_config(config, converted)
        components = {"transformer": _assigned(_meta_transformer(config_of), converted, torch_dtype)}
        for name, prefix in AIO_PARTS.items():
            part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            if part:
                components[name] = _aio_component(name, part, config, torch_dtype)
        return FluxPipeline.from_pretrained(config, torch_dtype=torch_dtype, **components)

    def check_pipeline(self, pipe, source: str) -> None:
        """A tokenizer without its vocabulary (a folder copied without it) would make every prompt unknown tokens."""
        for name in ("tokenizer", "tokenizer_2"):
            tokenizer = getattr(pipe, name, None)
            if tokenizer is None or len(tokenizer) <= len(tokenizer.all_special_tokens):
                raise BaseModelError(source, f"its {name} has no vocabulary (its {name}/ files are missing?)")

    def weight_components(self, vae_replaced: bool) -> tuple[str, ...]:
        return ("transformer", "text_encoder", "text_encoder_2") + (() if vae_replaced else ("vae",))

    def not_a_vae(self, keys: list[str]) -> str | None:
        if not any(k.removeprefix("vae.").startswith(("encoder.", "decoder.")) for k in keys):
            return "not a VAE (no encoder.* / decoder.* weights)"
        return None

    # ------------------------------------------------------------ sampling

    def call_arguments(self, sampling: SamplingConfig, steps: int) -> dict:
        guidance = self.default_guidance if sampling.guidance is None else sampling.guidance
        kwargs = {"num_inference_steps": steps, "guidance_scale": guidance}
        for name in ("negative_prompt", "width", "height"):
            if getattr(sampling, name) is not None:
                kwargs[name] = getattr(sampling, name)
        if sampling.true_cfg is not None:
            kwargs["true_cfg_scale"] = sampling.true_cfg
        if sampling.max_sequence_length is not None:
            kwargs["max_sequence_length"] = sampling.max_sequence_length
        return kwargs

    def check_sampling(self, sampling: SamplingConfig) -> None:
        super().check_sampling(sampling)
        if sampling.true_cfg is not None and sampling.true_cfg > 1 and not sampling.negative_prompt:
            raise SettingError("true-cfg", "needs a --negative-prompt (FLUX.1's true CFG contrasts the two)")


# ---------------------------------------------------------------- LoRA layouts


def _onetrainer_to_peft(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`lora_transformer_transformer_blocks_0_attn_to_out_0.lora_down.weight` ->
    `transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight` (the underscores are resolved
    against the block linears FLUX.1 has, so `ff_context_net_0_proj` is `ff_context.net.0.proj`);
    other keys kept."""
    renamed = {}
    for key, value in tensors.items():
        match = ONETRAINER_KEY.match(key)
        linear = match and BLOCK_LINEARS.get(match.group(3))
        if linear:
            blocks, number, _, part = match.groups()
            key = f"transformer.{blocks}.{number}.{linear}.{PEFT_PART.get(part, part)}"
        renamed[key] = value
    return renamed


def _with_lycoris_parts(path: Path, layout: str, tensors: dict[str, torch.Tensor]) -> LoraParts:
    """diffusers' names: LoRA factors through `peft_parts`, LyCORIS parts (`<module>.lokr_w1`) read
    here, with the module's `.alpha`."""
    lycoris_modules = {
        match.group(1)
        for match in map(LYCORIS_PEFT_KEY.match, tensors)
        if match and lycoris.part_name(match.group(2)) and BLOCKS.fullmatch(match.group(1))
    }
    mine = {k for k in tensors if (m := LYCORIS_PEFT_KEY.match(k)) and m.group(1) in lycoris_modules}
    found = peft_parts(path, layout, {k: v for k, v in tensors.items() if k not in mine}, "transformer", BLOCKS)
    for key in mine:
        module, part = LYCORIS_PEFT_KEY.match(key).groups()
        found.parts.setdefault(module, {})[lycoris.part_name(part) or part] = tensors[key]
        found.keys.setdefault(module, {})[key] = tensors[key]
    return found


def _xlabs_to_kohya(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """XLabs' processor LoRAs in kohya's spelling (its single blocks' `qkv_lora` covers linear1's q, k, v
    rows only); other keys kept."""
    renamed = {}
    for key, value in tensors.items():
        match = XLABS_KEY.match(key)
        if match:
            kind, number, what, stream, piece = match.groups()
            part = XLABS_PARTS.get((kind, what, stream))
            if part is not None:
                key = f"lora_unet_{kind}_blocks_{number}_{part}.lora_{piece}.weight"
        renamed[key] = value
    return renamed


def _from_bfl(
    path: Path, layout: str, tensors: dict[str, torch.Tensor], original: dict[str, torch.Tensor]
) -> LoraParts:
    """kohya's spelling of BFL's block modules, fused updates split into their diffusers linears.

    A split linear's own tensors are its slice in diffusers' peft names (`transformer.<module>.lora_A.weight`,
    `.lora_B.weight`, `.alpha`), which diffusers' loader reads; every other key keeps the file's name.
    `original` is the file as read: messages name its modules, not their kohya spelling.
    """
    file_module = {id(value): module_of(key) for key, value in original.items()}
    fused: dict[tuple[str, int, str], dict[str, torch.Tensor]] = {}
    other = {}
    for key, value in tensors.items():
        match = KOHYA_BLOCK.match(key)
        table = None if match is None else (DOUBLE_PARTS if match.group(1) == "double" else SINGLE_PARTS)
        if match is None or match.group(3) not in table:
            other[key] = value
            continue
        kind, number, part, piece = match.groups()
        fused.setdefault((kind, int(number), part), {})[piece] = value
    parts: dict[str, dict[str, torch.Tensor]] = {}
    keys: dict[str, dict[str, torch.Tensor]] = {}
    for (kind, number, part), got in fused.items():
        name = file_module.get(id(next(iter(got.values()))), f"lora_unet_{kind}_blocks_{number}_{part}")
        block = f"{'transformer_blocks' if kind == 'double' else 'single_transformer_blocks'}.{number}"
        targets = (DOUBLE_PARTS if kind == "double" else SINGLE_PARTS)[part]
        if lycoris.kind_of(got) != "lora":
            _split_lycoris(path, name, block, targets, got, parts, keys)
            continue
        if "lora_down.weight" not in got or "lora_up.weight" not in got:
            missing = "down" if "lora_down.weight" not in got else "up"
            raise LoraShapeError(path, f"{name}: {missing} factor missing")
        down, up = got["lora_down.weight"], got["lora_up.weight"]
        alpha = check_alpha(path, name, got["alpha"]) if "alpha" in got else None
        dora = got.get("dora_scale")  # per output row: DoRA's norms split with the rows
        for target, rows in zip(targets, _row_slices(path, name, up.shape[0], len(targets)), strict=True):
            module = f"{block}.{target}"
            parts[module] = {"A": down, "B": up[rows]} | ({"alpha": alpha} if alpha is not None else {})
            keys[module] = {
                f"transformer.{module}.lora_A.weight": down,
                f"transformer.{module}.lora_B.weight": up[rows],
            }
            if alpha is not None:
                keys[module][f"transformer.{module}.alpha"] = alpha
            if dora is not None:
                parts[module]["dora_scale"] = dora if dora.shape[0] != up.shape[0] else dora[rows]
                keys[module][f"transformer.{module}.dora_scale"] = parts[module]["dora_scale"]
    return LoraParts(layout, parts, keys, other)


def _split_lycoris(path: Path, name: str, block: str, targets: tuple[str, ...], got: dict, parts: dict, keys: dict):
    """A LoKr or LoHa on a BFL module, as its diffusers linears' parts (`lycoris.rows_of`: LoHa's split
    exactly; LoKr's where the rows allow, else gated as one unit). Their tensors stay the file's own:
    diffusers' loader reads no LyCORIS weights, so no other names would serve it."""
    got = {lycoris.part_name(p) or p: v for p, v in got.items()}
    file_keys = {f"{name}.{p}": v for p, v in got.items()}
    try:
        count = lycoris.rows_count(got)
    except KeyError as exc:
        raise LoraShapeError(path, f"{name}: {exc.args[0]} missing") from None
    for target, rows in zip(targets, _row_slices(path, name, count, len(targets)), strict=True):
        module = f"{block}.{target}"
        parts[module] = lycoris.rows_of(got, rows, name) if len(targets) > 1 else got
        keys[module] = file_keys


def _row_slices(path: Path, name: str, rows: int, count: int) -> list[slice]:
    """The row ranges of `count` fused linears in an update of `rows` rows (FLUX.1's shares, any width)."""
    if count == 1:
        return [slice(0, rows)]
    shares = ROW_SHARES[count]
    if rows % sum(shares):
        raise LoraShapeError(path, f"{name}: {rows} rows cannot be split into {count} fused projections")
    unit, start, slices = rows // sum(shares), 0, []
    for share in shares:
        slices.append(slice(start, start + share * unit))
        start += share * unit
    return slices


# ---------------------------------------------------------------- single files in BFL's names


def _transformer_keys(keys) -> list[str]:
    """The transformer's keys of a single file: bare BFL names, or under ComfyUI's prefix."""
    return [k for k in keys if k.removeprefix(COMFY_UNET).startswith(BFL_TOP) and not k.endswith(FP8_SCALES)]


def _dequantized(state: dict[str, torch.Tensor], torch_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """fp8 weights in `torch_dtype`; ComfyUI's scaled fp8 (a `scaled_fp8` marker, `<weight>.scale_weight`)
    times its scale, as ComfyUI computes it. Other tensors as they are (cast once the model is built)."""
    out = {}
    for key, value in state.items():
        if key.endswith(("scaled_fp8", *FP8_SCALES)):
            continue
        scale = state.get(key.removesuffix(".weight") + ".scale_weight")
        if value.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) or scale is not None:
            value = value.to(torch.float32) * (1 if scale is None else scale.to(torch.float32))
            value = value.to(torch_dtype)
        out[key] = value
    return out


def _converted(source, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FLUX.1's transformer from BFL's names to diffusers', at any width (the fused qkv and linear1
    split by FLUX.1's row shares, as LoRA updates are; the output norm's shift and scale halves swapped,
    as diffusers' AdaLayerNormContinuous orders them). Tensors are views, not copies."""
    state = {k.removeprefix(COMFY_UNET): v for k, v in state.items()}
    out = {}
    for key, value in state.items():
        module, _, kind = key.rpartition(".")
        match = BFL_TENSOR.match(key)
        if module in BFL_OUTSIDE:
            if module == "final_layer.adaLN_modulation.1":
                shift, scale = value.chunk(2, dim=0)
                value = torch.cat([scale, shift], dim=0)
            out[f"{BFL_OUTSIDE[module]}.{kind}"] = value
        elif match and match.group(3) in BFL_NORMS:
            blocks, number, below = match.groups()
            out[f"{BLOCK_PATHS[blocks]}.{number}.{BFL_NORMS[below]}"] = value
        elif match and kind in ("weight", "bias"):
            blocks, number, below = match.groups()
            table = DOUBLE_PARTS if blocks == "double_blocks" else SINGLE_PARTS
            targets = table.get(below.rpartition(".")[0].replace(".", "_"))
            if targets is None:
                raise BaseModelError(source, f"not a FLUX.1 transformer: {key} has no place in it")
            try:
                slices = _row_slices(Path(str(source)), key, value.shape[0], len(targets))
            except LoraShapeError as exc:
                raise BaseModelError(source, exc.problem) from None
            for target, rows in zip(targets, slices, strict=True):
                out[f"{BLOCK_PATHS[blocks]}.{number}.{target}.{kind}"] = value[rows]
        else:
            raise BaseModelError(source, f"not a FLUX.1 transformer: {key} has no place in it")
    return out


def _first_difference(found: dict, wanted: dict) -> str:
    missing = sorted(set(wanted) - set(found))
    extra = sorted(set(found) - set(wanted))
    if missing:
        return f"{len(missing)} tensors missing, e.g. {missing[0]}"
    if extra:
        return f"{len(extra)} tensors it should not have, e.g. {extra[0]}"
    name = next(n for n in sorted(found) if found[n] != wanted[n])
    return f"{name} is {list(found[name])}, not {list(wanted[name])}"


def _transformer_config(config: str, converted: dict[str, torch.Tensor]) -> dict:
    """`config`'s transformer config, with or without the guidance embedder as the file has it (dev or schnell)."""
    guidance = "time_text_embed.guidance_embedder.linear_1.weight" in converted
    return {**transformer_config(config), "guidance_embeds": guidance}


def _meta_transformer(config: dict):
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        return FluxTransformer2DModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def _assigned(model, state: dict[str, torch.Tensor], torch_dtype: torch.dtype):
    """A model built with its parameters on the meta device (buffers real) given the file's tensors (no
    second copy in memory), in `torch_dtype`."""
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(torch_dtype).eval()


def _gguf_transformer(path: str, config: str, torch_dtype: torch.dtype):
    """A GGUF transformer through diffusers' GGUF quantizer, its tensors converted by estlora (row
    slices of quantized weights are whole quantization blocks: GGUF quantizes along the input)."""
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig
    from diffusers.models.model_loading_utils import load_gguf_checkpoint

    converted = _converted(path, load_gguf_checkpoint(path))
    return FluxTransformer2DModel.from_single_file(
        converted,
        config=config,
        subfolder="transformer",
        guidance_embeds=_transformer_config(config, converted)["guidance_embeds"],
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch_dtype),
        torch_dtype=torch_dtype,
    )


def _aio_component(name: str, state: dict[str, torch.Tensor], config: str, torch_dtype: torch.dtype):
    """CLIP-L, T5 or the VAE of a ComfyUI all-in-one file, configured from `config`'s folder."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from transformers import AutoConfig, CLIPTextModel, T5EncoderModel

    if name == "vae":  # LDM names: diffusers' own single-file conversion
        return AutoencoderKL.from_single_file(state, config=config, subfolder="vae", torch_dtype=torch_dtype)
    model_class = CLIPTextModel if name == "text_encoder" else T5EncoderModel
    with init_empty_weights():
        model = model_class(AutoConfig.from_pretrained(config, subfolder=name))
    if name == "text_encoder_2" and "shared.weight" in state:  # T5's token embedding, stored once
        state.setdefault("encoder.embed_tokens.weight", state["shared.weight"])
    elif name == "text_encoder_2":
        state.setdefault("shared.weight", state["encoder.embed_tokens.weight"])
    return _assigned(model, state, torch_dtype)


# ---------------------------------------------------------------- bases


def transformer_config(base: str) -> dict:
    """The transformer config of a diffusers FLUX.1 folder or hub id (FLUX.1-dev's and schnell's known offline)."""
    from diffusers import FluxTransformer2DModel

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(FluxTransformer2DModel.load_config(str(base), subfolder="transformer"))
    except Exception as exc:
        if str(base) in KNOWN_TRANSFORMER_CONFIGS:
            return dict(KNOWN_TRANSFORMER_CONFIGS[str(base)])
        where = "" if os.path.isdir(str(base)) else " (offline? give a local folder)"
        raise BaseModelError(
            base, f"cannot read the base model's transformer config{where} ({first_line(exc)})"
        ) from None
