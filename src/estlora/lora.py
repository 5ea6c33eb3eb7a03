"""Load one LoRA file, whatever its layout, into per-projection factors keyed by UNet module path.

Every layout found in the wild is normalised to the same thing: for each UNet attention projection
(`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`, ... `.to_out.0`) the down factor A
(rank x in), the up factor B (out x rank) and the scale that diffusers/peft apply, so that
delta W = scale * B @ A is exactly the update a plain diffusers run would add.

Layouts: diffusers/peft (`lora_A`/`lora_B`, alphas from `.alpha` keys or the adapter metadata),
diffusers legacy (`.lora.down`/`.lora.up`, and the older attention-processor names), the K-LoRA /
ZipLoRA research layout (`unet.unet.` prefix), kohya / A1111 / Civitai (`lora_unet_...`, with
SDXL's SGM block names or diffusers block names) and ComfyUI (`diffusion_model.` + SGM module paths,
which is kohya's spelling with dots). Renaming goes through diffusers' own converters; only the
`unet.unet.` and `diffusion_model.` prefixes and the per-module alphas of peft metadata are handled here.

Only safetensors is read; pickle checkpoints are refused without being opened.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from .errors import (
    BaseModelMismatchError,
    LoraFormatError,
    LoraNotFoundError,
    LoraShapeError,
    LoraValueError,
    PickleRefusedError,
    first_line,
)

PICKLE_SUFFIXES = {".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle"}
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# Keys of a single-file model checkpoint: SGM's UNet (prefixed, or bare in UNet-only files), VAE, text encoders.
SINGLE_FILE_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "conditioner.", "input_blocks.")
# A module path that names one of the four projections of an attention module in a transformer block.
ATTENTION_PROJECTION = re.compile(r"(^|\.)transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
# kohya spells the same module paths with underscores (and SDXL's SGM block names).
KOHYA_ATTENTION_PROJECTION = re.compile(r"^lora_unet_.*transformer_blocks_\d+_attn[12]_(to_q|to_k|to_v|to_out_0)$")
# The parts of a kohya LoRA module; anything else on an attention projection (LyCORIS `hada_w1_a`,
# `lokr_w1`, `diff`, ...) is another kind of adapter whose update is not scale * up @ down.
KOHYA_LORA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
# ComfyUI: `diffusion_model.<SGM module path>.<part>`, with kohya's or peft's part names.
COMFY_KEY = re.compile(r"^diffusion_model\.(.+?)\.(lora_(?:up|down|A|B|mid)\.weight|alpha|\w+)$")
COMFY_PARTS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
# Keys of LoRAs for transformer (DiT) models: diffusers/peft `transformer.`, kohya or ComfyUI Flux/SD3 blocks.
TRANSFORMER_MODEL_KEY = re.compile(
    r"^(transformer\.|lora_transformer_|base_model\.model\.(single_)?transformer_blocks\."
    r"|lora_unet_(double_blocks|single_blocks|joint_blocks)_)"
)


@dataclass(frozen=True)
class LoraFactors:
    """One projection's LoRA: delta W = scale * up @ down."""

    down: torch.Tensor  # A: (rank, in_features)
    up: torch.Tensor  # B: (out_features, rank)
    alpha: float
    rslora: bool = False  # rank-stabilised LoRA divides alpha by sqrt(rank)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def denominator(self) -> float:
        return math.sqrt(self.rank) if self.rslora else float(self.rank)

    def scale_at(self, weight: float = 1.0) -> float:
        """weight * alpha / denominator, computed in peft's order so that results match it bit for bit."""
        return weight * self.alpha / self.denominator

    @property
    def scale(self) -> float:
        return self.scale_at(1.0)

    @property
    def in_features(self) -> int:
        return self.down.shape[1]

    @property
    def out_features(self) -> int:
        return self.up.shape[0]


@dataclass
class Lora:
    """A loaded LoRA: attention-projection factors plus every other key, kept and counted.

    `other` holds the keys outside the attention projections under the names the file gives them,
    and `metadata` the file's header, so diffusers can load that part as it would the whole file.
    """

    source: str
    path: Path
    layout: str
    projections: dict[str, LoraFactors]
    other: dict[str, torch.Tensor] = field(default_factory=dict)
    sha256: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def ranks(self) -> Counter:
        return Counter(f.rank for f in self.projections.values())

    @property
    def alphas(self) -> Counter:
        return Counter(f.alpha for f in self.projections.values())

    def other_modules(self) -> Counter:
        """Non-attention modules by kind (text encoders, feed-forward, conv, ...), counted once each."""
        return Counter(_other_kind(name) for name in {module_of(key) for key in self.other})

    def family(self) -> str:
        return guess_family(self.projections)

    def training(self) -> dict[str, str]:
        return training_info(self.metadata)


TRAINING_LABELS = {
    "title": "title",
    "trained_on": "trained on",
    "architecture": "made for",
    "trigger": "trigger",
    "top_tags": "top tags",
}


def training_info(metadata: dict[str, str], tags: int = 5) -> dict[str, str]:
    """What the trainer wrote into the header (kohya `ss_*` keys, Stability's `modelspec.*`): the
    title, the base it was trained on, and the trigger words, the first thing a user of a
    downloaded LoRA needs to know. Trainers without a trigger phrase leave the training captions'
    most frequent tags, which for DreamBooth LoRAs is the instance prompt ("sks dog")."""
    info = {}
    for name, keys in (
        ("title", ("modelspec.title", "ss_output_name")),
        ("trained_on", ("ss_sd_model_name",)),
        ("architecture", ("modelspec.architecture", "ss_base_model_version")),
        ("trigger", ("modelspec.trigger_phrase",)),
    ):
        value = next((metadata[k].strip() for k in keys if metadata.get(k, "").strip()), None)
        if value:
            info[name] = value
    counts: Counter = Counter()
    try:
        for dataset in json.loads(metadata.get("ss_tag_frequency", "{}")).values():
            counts.update({str(tag).strip(): int(n) for tag, n in dataset.items()})
    except (ValueError, TypeError, AttributeError):  # written by hand or by another tool: not ours to refuse
        pass
    top = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:tags]
    if top:
        info["top_tags"] = ", ".join(f"{tag} ({n})" for tag, n in top if tag)
    return info


# ---------------------------------------------------------------- reading files safely


def resolve_lora_path(source: str | os.PathLike) -> Path:
    """A file, a folder holding one LoRA, a built-in `example:NAME` or `toy:NAME`, or (with network) a hub id."""
    if str(source).startswith("example:"):
        from .examples import example_lora_path

        return example_lora_path(str(source))
    if str(source).startswith("toy:"):
        from .toy_model import toy_lora_path

        return toy_lora_path(str(source))
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        return _lora_in_folder(path)
    text = str(source)
    if re.fullmatch(r"[\w.-]+/[\w.-]+(/[\w./-]+\.safetensors)?", text) and not text.startswith("."):
        return download_from_hub(text)
    raise LoraNotFoundError(source, "no such file or folder")


def _lora_in_folder(folder: Path) -> Path:
    preferred = folder / DIFFUSERS_WEIGHT_NAME
    if preferred.is_file():
        return preferred
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise LoraNotFoundError(folder, f"holds several .safetensors files ({names}); name one")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise PickleRefusedError(folder / pickles[0], _pickle_reason())
    raise LoraNotFoundError(folder, "folder holds no .safetensors file")


def download_from_hub(hub_id: str) -> Path:
    """`owner/repo` (its diffusers LoRA file) or `owner/repo/path/file.safetensors`, from the hub cache or the hub."""
    from huggingface_hub import hf_hub_download

    repo, _, filename = hub_id.partition("/")
    name, _, filename = filename.partition("/")
    try:
        return Path(hf_hub_download(f"{repo}/{name}", filename or DIFFUSERS_WEIGHT_NAME))
    except Exception as exc:  # offline, no such repo, no such file: all one answer to the user
        raise LoraNotFoundError(hub_id, f"not a local path, and the hub download failed: {first_line(exc)}") from None


def _pickle_reason() -> str:
    return "pickle checkpoints are refused (loading one can run arbitrary code); convert it to .safetensors"


def _looks_like_pickle(head: bytes) -> bool:
    # torch.save writes a zip archive (PK..) or a raw pickle (protocol byte 0x80, then version 2..5).
    return head.startswith(b"PK\x03\x04") or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5)


def read_header(path: Path) -> dict[str, dict]:
    """The safetensors header (tensor name -> dtype, shape, offsets), after checking the whole file is there.

    Reads only the header, so a 7 GB checkpoint is checked in milliseconds; pickles are refused unopened.
    """
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise PickleRefusedError(path, _pickle_reason())
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(16)
        if _looks_like_pickle(head):
            raise PickleRefusedError(path, "this is a pickle checkpoint, not safetensors; " + _pickle_reason())
        if size < 8:
            raise LoraFormatError(path, f"not a safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len > size - 8 or head[8:9] != b"{":
            kind = "truncated or corrupt safetensors file" if head[8:9] == b"{" else "not a safetensors file"
            raise LoraFormatError(path, f"{kind} (bad header)")
        handle.seek(8)
        try:
            header = json.loads(handle.read(header_len))
        except ValueError:
            raise LoraFormatError(path, "truncated or corrupt safetensors file (header is not JSON)") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise LoraFormatError(path, "truncated or corrupt safetensors file (bad tensor entries)") from None
    if 8 + header_len + end > size:
        raise LoraFormatError(path, f"truncated safetensors file ({size} of {8 + header_len + end} bytes)")
    return tensors


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the header metadata, after checking the file is a whole safetensors file."""
    from safetensors import safe_open

    read_header(path)
    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    except Exception as exc:
        raise LoraFormatError(path, f"truncated or corrupt safetensors file ({first_line(exc)})") from None
    return tensors, metadata


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- layouts -> one canonical dict


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


def _comfy_to_kohya(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_A.weight` ->
    `lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight`; other keys kept."""
    renamed = {}
    for key, value in tensors.items():
        match = COMFY_KEY.match(key)
        if match:
            module, part = match.groups()
            key = f"lora_unet_{module.replace('.', '_')}.{COMFY_PARTS.get(part, part)}"
        renamed[key] = value
    return renamed


def _kohya_to_peft(path: Path, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Attention keys through diffusers' kohya converter (SGM block names included); the rest kept."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    attention, other = {}, {}
    for key, value in tensors.items():
        module, _, part = key.partition(".")
        if not KOHYA_ATTENTION_PROJECTION.match(module):
            other[key] = value
        elif part in KOHYA_LORA_PARTS:
            if part == "alpha":
                _check_alpha(path, module, value)  # before diffusers' converter calls .item() on it
            attention[key] = value
        else:
            raise LoraFormatError(path, f"{key}: {_adapter_kind(part)}; only LoRA (down/up) files are supported")
    if not attention:
        return {}, other
    # SGM block numbers depend only on layers_per_block, which is 2 for SDXL (and SD 1.x / 2.x).
    try:
        converted, alphas = StableDiffusionXLPipeline.lora_state_dict(
            dict(attention), unet_config=SimpleNamespace(layers_per_block=2)
        )
    except ValueError as exc:  # diffusers' converter names keys it cannot rename
        raise LoraFormatError(path, f"kohya keys diffusers cannot convert ({first_line(exc)})") from None
    converted = convert_unet_state_dict_to_peft(converted)
    for key, alpha in convert_unet_state_dict_to_peft(alphas or {}).items():
        converted[key.removesuffix(".lora_A.weight.alpha") + ".alpha"] = torch.tensor(alpha)
    return converted, other


def _adapter_kind(part: str) -> str:
    if part.startswith(("hada_", "lokr_")):
        return "LyCORIS LoHa/LoKr weights are not LoRA factors"
    return f"'{part}' is not a LoRA factor (LyCORIS or another adapter type?)"


def _to_peft_names(path: Path, layout: str, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(attention keys renamed to `<prefix>.<module>.lora_A.weight` / `.lora_B.weight` / `.alpha`, other keys).

    Other keys keep the names diffusers' loader reads (see `other_weights`); only the research
    layout's extra `unet.` prefix is dropped from them, and ComfyUI's and LyCORIS's UNet keys take kohya's names.
    """
    from diffusers.utils import convert_unet_state_dict_to_peft

    if layout == "kohya":
        return _kohya_to_peft(path, tensors)
    if layout == "comfyui":
        return _kohya_to_peft(path, _comfy_to_kohya(tensors))
    if layout == "lycoris":  # kohya's names for the UNet under another prefix
        return _kohya_to_peft(path, {re.sub(r"^lycoris_", "lora_unet_", k): v for k, v in tensors.items()})
    if layout == "klora-research":
        tensors = {k.removeprefix("unet."): v for k, v in tensors.items()}
    convert = layout in ("klora-research", "diffusers-legacy")
    attention, other = {}, {}
    for key, value in tensors.items():
        name = next(iter(convert_unet_state_dict_to_peft({key: value}))) if convert else key
        if name.endswith(".lora_B.bias") and ATTENTION_PROJECTION.search(name.removesuffix(".lora_B.bias")):
            raise LoraFormatError(path, f"{key}: LoRA with a bias (peft lora_bias) is not supported")
        module, _ = _split_module(name)
        if module and ATTENTION_PROJECTION.search(module) and not name.startswith("text_encoder"):
            attention[name] = value
        else:
            other[key] = value
    return attention, other


def _split_module(key: str) -> tuple[str, str]:
    """'unet.a.b.lora_A.weight' -> ('a.b', 'A'); '.alpha' keys -> (module, 'alpha')."""
    match = re.match(r"^(?:base_model\.model\.)?(?:unet\.)?(.+?)\.(lora_A|lora_B)(?:\.default)?\.weight$", key)
    if match:
        return match.group(1), match.group(2)[-1]
    match = re.match(r"^(?:base_model\.model\.)?(?:unet\.)?(.+)\.alpha$", key)
    if match:
        return match.group(1), "alpha"
    return "", ""


def _metadata_alphas(metadata: dict[str, str]) -> tuple[float | None, dict[str, float], bool]:
    """lora_alpha, alpha_pattern and use_rslora from diffusers' adapter metadata for the UNet."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, {}, False
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        return None, {}, False
    # diffusers packs per-component configs as "unet.lora_alpha"; a bare peft config has no prefix.
    config = {k.removeprefix("unet."): v for k, v in config.items() if not k.startswith("text_encoder")}
    alpha = config.get("lora_alpha")
    return (
        (None if alpha is None else float(alpha)),
        dict(config.get("alpha_pattern") or {}),
        bool(config.get("use_rslora")),
    )


def normalise(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> tuple[str, dict[str, LoraFactors], dict[str, torch.Tensor]]:
    """(layout, attention projections, other keys) from a file's raw tensors."""
    from peft.utils.other import get_pattern_key

    if any("dora_scale" in k or "lora_magnitude_vector" in k for k in tensors):
        # DoRA rescales W + BA by a magnitude vector: its update is not s * B @ A, so energies would lie.
        raise LoraFormatError(path, "DoRA weights (dora_scale / lora_magnitude_vector) are not supported")
    layout = detect_layout(list(tensors))
    if layout is None:
        raise LoraFormatError(path, _no_lora_reason(tensors))
    attention, other = _to_peft_names(path, layout, tensors)

    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in attention.items():
        module, part = _split_module(key)
        parts.setdefault(module, {})[part] = value

    meta_alpha, alpha_pattern, rslora = _metadata_alphas(metadata)
    projections = {}
    for module in sorted(parts, key=unet_order):
        got = parts[module]
        if "A" not in got or "B" not in got:
            missing = "down (A)" if "A" not in got else "up (B)"
            raise LoraShapeError(path, f"{module}: {missing} factor missing")
        down, up = _as_matrix(path, module, got["A"]), _as_matrix(path, module, got["B"])
        if down.shape[0] != up.shape[1]:
            raise LoraShapeError(
                path,
                f"{module}: rank mismatch, down (A) is {tuple(down.shape)} but up (B) is {tuple(up.shape)}",
            )
        for name, tensor in (("down", down), ("up", up)):
            if not torch.isfinite(tensor).all():
                raise LoraValueError(path, f"{module}: {name} factor holds NaN or infinite values")
        rank = down.shape[0]
        if rank == 0:
            raise LoraShapeError(path, f"{module}: rank 0 (empty factors)")
        if "alpha" in got:
            alpha = float(_check_alpha(path, module, got["alpha"]).float().item())
        elif alpha_pattern and get_pattern_key(alpha_pattern, module) in alpha_pattern:
            alpha = float(alpha_pattern[get_pattern_key(alpha_pattern, module)])
        else:
            alpha = meta_alpha if meta_alpha is not None else float(rank)
        if not math.isfinite(alpha):
            raise LoraValueError(path, f"{module}: alpha is {alpha}")
        projections[module] = LoraFactors(down=down, up=up, alpha=alpha, rslora=rslora)

    if not projections:
        raise _no_projections_error(path, other)
    for key, tensor in other.items():  # not routed, but merged under --other-weights merge: a broken file either way
        if tensor.is_floating_point() and not torch.isfinite(_arithmetic(tensor)).all():
            raise LoraValueError(path, f"{key} holds NaN or infinite values")
    return layout, projections, other


def _as_matrix(path: Path, module: str, tensor: torch.Tensor) -> torch.Tensor:
    # Some trainers store linear factors as 1x1 convolutions: (r, in, 1, 1).
    if tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
        tensor = tensor[:, :, 0, 0]
    if tensor.ndim != 2:
        raise LoraShapeError(path, f"{module}: factor has shape {tuple(tensor.shape)}, expected a matrix")
    if not tensor.is_floating_point():
        dtype = str(tensor.dtype).removeprefix("torch.")
        raise LoraValueError(path, f"{module}: factor has dtype {dtype}, expected floats")
    return _arithmetic(tensor)


def _check_alpha(path: Path, module: str, alpha: torch.Tensor) -> torch.Tensor:
    if alpha.numel() != 1:
        raise LoraShapeError(path, f"{module}: alpha has shape {tuple(alpha.shape)}, expected one number")
    return alpha


def _arithmetic(tensor: torch.Tensor) -> torch.Tensor:
    """fp8 factors as fp32 (exact): torch has no arithmetic on 8-bit floats; peft upcasts them on load too."""
    return tensor.float() if tensor.is_floating_point() and tensor.element_size() == 1 else tensor


def _no_projections_error(path: Path, other: dict[str, torch.Tensor]) -> LoraFormatError | BaseModelMismatchError:
    foreign = next((key for key in other if TRANSFORMER_MODEL_KEY.match(key)), None)
    if foreign:
        return BaseModelMismatchError(
            path, f"made for a transformer model such as Flux or SD3 ({foreign}), not an SDXL UNet"
        )
    if other and all(_other_kind(module_of(key)).startswith("text encoder") for key in other):
        return LoraFormatError(
            path, f"holds only text-encoder weights ({len(other)} keys), no LoRA weights for UNet attention projections"
        )
    return LoraFormatError(path, "holds no LoRA weights for UNet attention projections " + _counted(other))


def _no_lora_reason(tensors: dict[str, torch.Tensor]) -> str:
    if not tensors:
        return "safetensors file holds no tensors"
    keys = list(tensors)
    if any(re.search(r"\.(hada_|lokr_)", k) for k in keys):
        return "LyCORIS LoHa/LoKr weights are not LoRA factors; only LoRA (down/up) files are supported"
    sample = ", ".join(keys[:2])
    if any("lora" in k.lower() for k in keys):
        return f"holds LoRA keys in a layout estlora does not know; first keys: {sample}"
    if any(k.startswith(SINGLE_FILE_CHECKPOINT_PREFIXES) for k in keys):
        return "this is a model checkpoint, not a LoRA (a single-file SDXL is given as the base: --base FILE)"
    if "conv_in.weight" in tensors:
        return "this is a diffusers UNet's weights, not a LoRA (a fine-tuned UNet is given as the base: --base FILE)"
    return f"holds no LoRA keys (is this a full model checkpoint?); first keys: {sample}"


def _counted(other: dict) -> str:
    return f"({len(other)} other keys)" if other else ""


def module_of(key: str) -> str:
    """The module a LoRA key belongs to, in whichever layout's spelling: 'x.lora_A.weight' -> 'x'."""
    for suffix in (
        ".lora_A.weight",
        ".lora_B.weight",
        ".lora_down.weight",
        ".lora_up.weight",
        ".lora.down.weight",
        ".lora.up.weight",
        ".alpha",
    ):
        if key.endswith(suffix):
            return key.removesuffix(suffix)
    return key.rsplit(".", 2)[0]


def _other_kind(module: str) -> str:
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


def unet_order(module: str) -> tuple:
    """Sort key that follows the UNet: down blocks, mid block, up blocks; numbers numerically."""
    stage = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}.get(module.split(".", 1)[0], 3)
    return (stage, [int(p) if p.isdigit() else p for p in re.split(r"[._]", module)])


# ---------------------------------------------------------------- base-model family and shape checks

FAMILY_BY_CROSS_DIM = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


def guess_family(projections: dict[str, LoraFactors]) -> str:
    """Guess the base model from module names and widths (cross-attention key/value input width)."""
    cross = {f.in_features for name, f in projections.items() if re.search(r"attn2\.to_[kv]$", name)}
    # SDXL stacks 2 or 10 transformer blocks per attention block; SD 1.x/2.x have one each, and have
    # attention in down_blocks.0 and up_blocks.2/3, which SDXL has not.
    sdxl_layout = any(re.search(r"\.transformer_blocks\.[1-9]", n) for n in projections)
    sd1_layout = any(
        n.startswith(("down_blocks.0.attentions", "up_blocks.2.attentions", "up_blocks.3.attentions"))
        for n in projections
    )
    if len(cross) == 1:
        width = next(iter(cross))
        family = FAMILY_BY_CROSS_DIM.get(width)
        if family == "SDXL" or (family and not sdxl_layout):
            return family
        layout = "SDXL layout" if sdxl_layout else "SD 1.x/2.x layout" if sd1_layout else "unknown layout"
        return f"{layout}, non-standard widths (cross-attention {width})"
    return "SDXL layout" if sdxl_layout else "SD 1.x/2.x layout" if sd1_layout else "unknown"


def check_against_base(lora: Lora, base_shapes: dict[str, tuple[int, int]], base_name: str) -> None:
    """Raise BaseModelMismatchError unless every projection exists in the base with the same widths.

    base_shapes maps UNet module path -> (out_features, in_features), as `base_projection_shapes` gives.
    """
    for module, factors in lora.projections.items():
        expected = base_shapes.get(module)
        if expected is None:
            raise BaseModelMismatchError(
                lora.path,
                f"made for another base model (looks like {lora.family()}): {base_name} has no module {module}",
            )
        got = (factors.out_features, factors.in_features)
        if got != expected:
            raise BaseModelMismatchError(
                lora.path,
                f"made for another base model (looks like {lora.family()}): {module} is {got[1]}->{got[0]} "
                f"in the LoRA but {expected[1]}->{expected[0]} in {base_name}",
            )


def check_pair(subject: Lora, style: Lora) -> None:
    """Raise BaseModelMismatchError if the two LoRAs disagree on a shared projection's shape."""
    for module in subject.projections.keys() & style.projections.keys():
        a, b = subject.projections[module], style.projections[module]
        if (a.out_features, a.in_features) != (b.out_features, b.in_features):
            raise BaseModelMismatchError(
                style.path,
                f"made for another base model than the subject LoRA {subject.path}: {module} is "
                f"{b.in_features}->{b.out_features} here but {a.in_features}->{a.out_features} there",
            )


# ---------------------------------------------------------------- the entry point


def load_lora(
    source: str | os.PathLike, base_shapes: dict[str, tuple[int, int]] | None = None, base_name: str = "the base model"
) -> Lora:
    """Load and validate one LoRA. Raises a `LoraError` subclass naming the file on bad input.

    With `base_shapes` (see `estlora.base.projection_shapes`), also checks it fits that base.
    """
    path = resolve_lora_path(source)
    tensors, metadata = read_safetensors(path)
    layout, projections, other = normalise(path, tensors, metadata)
    lora = Lora(
        source=str(source),
        path=path,
        layout=layout,
        projections=projections,
        other=other,
        sha256=file_sha256(path),
        metadata=metadata,
    )
    if base_shapes is not None:
        check_against_base(lora, base_shapes, base_name)
    return lora


def load_pair(
    subject: str | os.PathLike,
    style: str | os.PathLike,
    base_shapes: dict[str, tuple[int, int]] | None = None,
    base_name: str = "the base model",
) -> tuple[Lora, Lora]:
    """Subject and style LoRAs, each checked against the base (when given) and against each other."""
    pair = (load_lora(subject, base_shapes, base_name), load_lora(style, base_shapes, base_name))
    check_pair(*pair)
    return pair


def summary(lora: Lora) -> str:
    """The human-readable report `estlora inspect` prints."""

    def counted(counter: Counter) -> str:
        return ", ".join(f"{_fmt(k)} ({n})" for k, n in sorted(counter.items()))

    lines = [
        f"file:        {lora.path}",
        f"sha256:      {lora.sha256}",
        f"layout:      {lora.layout}",
        f"base model:  {lora.family()} (guessed from shapes)",
        f"attention projections: {len(lora.projections)}",
        f"ranks:       {counted(lora.ranks)}",
        f"alphas:      {counted(lora.alphas)}",
        f"scales:      {counted(Counter(round(f.scale, 6) for f in lora.projections.values()))}",
    ]
    by_block = Counter(_block_of(name) for name in lora.projections)
    lines.append(
        "per block:   " + ", ".join(f"{b} ({n})" for b, n in sorted(by_block.items(), key=lambda x: unet_order(x[0])))
    )
    lines += [f"{TRAINING_LABELS[k] + ':':<12} {v}" for k, v in lora.training().items()]
    others = lora.other_modules()
    kept = counted(others) if others else "none"
    lines.append(
        f"other keys:  {len(lora.other)} tensors kept, routed by no plan (--other-weights merge applies them "
        f"statically): {kept}"
    )
    return "\n".join(lines)


def _block_of(module: str) -> str:
    return ".".join(module.split(".")[:4]) if module.startswith(("down", "up")) else "mid_block"


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
