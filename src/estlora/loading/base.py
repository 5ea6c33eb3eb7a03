"""The base model: what it is (read once, cheaply) and loading it (once, on the right device and dtype).

A base is a diffusers folder or hub id, a single-file checkpoint (`sd_xl_base_1.0.safetensors`, a
fine-tune shared as one file, its denoiser alone), or a registered name (`toy`). `describe_base`
reads only a config or a header (milliseconds, no weights: LoRAs are checked against its shapes
before the slow load) and returns one record, `BaseSource`; `load_pipeline` loads from that record,
through the family the base belongs to. CPU and fp32 unless told otherwise.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BaseModelError, BaseModelMismatchError, LoraError, SettingError, first_line
from ..families import FAMILIES, Checkpoint, ModelFamily, family_named, family_of_checkpoint
from ..files.gguf import GGUF_SUFFIX, is_gguf, read_gguf_header
from ..files.safetensors import PICKLE_SUFFIXES, read_header
from ..files.sources import download_from_hub
from ..registry import BasePreset, base_preset
from .lora import check_against_base

SINGLE_FILE_SUFFIXES = (".safetensors", ".sft", GGUF_SUFFIX, *PICKLE_SUFFIXES)


@dataclass(frozen=True)
class BaseSource:
    """A base model as given and as found: read once (a config or a header), then loaded from this record."""

    given: str  # as the user wrote it
    location: str  # a folder, a hub id, or the local path of a single file
    family: ModelFamily
    shapes: dict[str, tuple[int, int]]  # routable linear -> (out, in)
    label: str  # how messages name it
    config: str | None = None  # a single file's configs and tokenizers: a folder or hub id
    checkpoint: Checkpoint | None = None  # single files only
    preset: BasePreset | None = None  # a registered name's settings (`toy`)


def describe_base(
    base: str | os.PathLike, config: str | os.PathLike | None = None, family: ModelFamily | None = None
) -> BaseSource:
    """What `base` is, from its config or header alone. `config` is for single files (default: the
    family's standard base); `family` is the family expected (the LoRAs'), used where a file says
    too little to tell."""
    preset = base_preset(base)
    location = str(preset.path()) if preset else str(base)
    label = preset.label if preset else str(base)
    if is_single_file(location):
        path = single_file_path(location)
        header = read_single_file(location)
        found = family_of_checkpoint(list(header)) or family or FAMILIES[0]
        if is_gguf(path) and not found.reads_gguf:
            raise BaseModelError(base, f"a GGUF {found.label} file: GGUF bases are served for FLUX.1 only")
        configs = resolve_base(config or found.default_base)
        checkpoint = found.read_checkpoint(str(base), header, configs)
        return BaseSource(str(base), str(path), found, checkpoint.shapes, label, configs, checkpoint, preset)
    if config is not None:
        raise BaseModelError(base, "--base-config is for single-file bases; a folder or hub id has its own configs")
    check_local_path(location)
    found = family_of_folder(location, family)
    return BaseSource(str(base), location, found, found.config_shapes(location), label, preset=preset)


def check_fits(source: BaseSource, loras) -> None:
    """Raise BaseModelMismatchError unless every LoRA was made for the base's family and fits its shapes."""
    for lora in loras:
        if lora.family and lora.family != source.family.name:
            label = family_named(lora.family).label
            raise BaseModelMismatchError(lora.path, f"a {label} LoRA, but {source.label} is {source.family.label}")
        check_against_base(lora, source.shapes, source.label)


def resolve_base(base: str | os.PathLike) -> str:
    """A base as diffusers can load it: a registered name (`toy`) becomes its folder."""
    preset = base_preset(base)
    return str(preset.path()) if preset else str(base)


def family_of_folder(location: str, expected: ModelFamily | None = None) -> ModelFamily:
    """The family of a diffusers folder or hub id, from the pipeline class its `model_index.json` names.

    Offline with a hub id not in the cache, the expected family (the LoRAs') is taken, or the one whose
    standard base it is; its own config read then says whether the base is reachable at all.
    """
    from diffusers import DiffusionPipeline

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            class_name = DiffusionPipeline.load_config(location).get("_class_name", "")
    except Exception:  # offline, or not a pipeline folder: the family's own config read will say which
        by_default = next((f for f in FAMILIES if f.default_base == location), None)
        return expected or by_default or FAMILIES[0]
    found = next((f for f in FAMILIES if class_name in f.pipeline_classes), None)
    if found is None:
        served = ", ".join(f.label for f in FAMILIES)
        raise BaseModelError(
            location, f"a {class_name or 'pipeline of unknown class'}: not a model family estlora serves ({served})"
        )
    return found


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


def read_single_file(base: str | os.PathLike) -> dict[str, dict]:
    """A single file's header, checked whole (safetensors, not truncated; or GGUF); errors name the base."""
    path = single_file_path(base)
    try:
        return read_gguf_header(path) if is_gguf(path) else read_header(path)
    except LoraError as exc:  # the same file checks as for LoRAs; the message names the file
        raise BaseModelError(base, exc.problem) from None


# ---------------------------------------------------------------- loading


def resolve_device(device: str = "auto") -> torch.device:
    """`auto`: CUDA, else MPS, else the CPU. A device this machine lacks is a SettingError, not a
    traceback from deep inside torch once the model has loaded."""
    if device != "auto":
        try:
            target = torch.device(device)
        except RuntimeError:
            raise SettingError("device", f"must be auto, cpu, cuda, cuda:N or mps, not {device!r}") from None
        if target.type == "cuda" and (
            not torch.cuda.is_available() or (target.index or 0) >= torch.cuda.device_count()
        ):
            raise SettingError("device", f"{device} is not available on this machine")
        if target.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise SettingError("device", "mps is not available on this machine")
        return target
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """fp16 on accelerators, fp32 on the CPU (CPU half precision is slow and lossy), unless told."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if dtype not in DTYPES:
        raise SettingError("dtype", f"must be auto, fp32, fp16 or bf16, not {dtype!r}")
    return DTYPES[dtype]


def load_pipeline(
    base: str | os.PathLike | BaseSource,
    device: str = "auto",
    dtype: str = "auto",
    cpu_offload: bool = False,
    config: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
):
    """The base's diffusers pipeline, from a folder, hub id, single file or registered name, placed on
    device (or offloaded). A single file takes its configs and tokenizers from `config` (a diffusers
    folder or hub id; the family's standard base by default), as diffusers' `from_single_file` does.
    `vae` replaces the base's VAE (e.g. `madebyollin/sdxl-vae-fp16-fix`, or a single-file VAE)."""
    source = base if isinstance(base, BaseSource) else describe_base(base, config)
    family = source.family
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    if source.checkpoint is not None:
        pipe = _from_single_file(source, torch_dtype)
        family.check_pipeline(pipe, source.config)
    else:
        pipe = family.load_pretrained(source.location, torch_dtype)
        family.check_pipeline(pipe, source.location)
    if vae is not None:
        pipe.vae = load_vae(vae, torch_dtype, source.config or source.location, family)
    if cpu_offload and target.type != "cpu":
        pipe.enable_model_cpu_offload(device=target)
    else:
        pipe.to(target)
    parts = family.weight_components(vae_replaced=vae is not None)
    check_finite(source.given, {name: getattr(pipe, name, None) for name in parts})
    return pipe


def _from_single_file(source: BaseSource, torch_dtype: torch.dtype):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = source.family.load_single_file(source.location, source.checkpoint, torch_dtype, source.config)
    except Exception as exc:
        label = source.family.label
        offline = f" (fetched from the hub; offline, give a local diffusers {label} folder as --base-config)"
        where = "" if os.path.isdir(source.config) else offline
        problem = f"cannot load it with the configs of {source.config}{where}: {first_line(exc)}"
        raise BaseModelError(source.given, problem) from None
    pipe.register_to_config(_name_or_path=source.location)  # diffusers leaves it empty; errors and caches name it
    return pipe


def check_finite(source: str | os.PathLike, components: dict) -> None:
    """Weights holding NaN or infinity (a merge that overflowed fp16, a broken conversion) render
    black or noise with no error: refused instead. One float32 sum per tensor where the model sits
    (a NaN or infinity anywhere makes it non-finite) and one device sync per component: about
    0.3 s for SDXL's UNet in fp32 on two CPU cores, milliseconds on a GPU."""
    for name, module in components.items():
        parameters = [] if module is None else list(module.parameters())
        if parameters and not torch.isfinite(torch.stack([_weight_sum(p) for p in parameters]).sum()):
            bad = next(n for n, p in module.named_parameters() if not torch.isfinite(_weight_sum(p)))
            raise BaseModelError(source, f"its {name} holds NaN or infinite weights ({bad})")


def _weight_sum(parameter: torch.Tensor) -> torch.Tensor:
    """The float32 sum of a weight; of what a GGUF-quantized weight dequantizes to (its blocks' scales
    can be NaN too), one tensor at a time."""
    if hasattr(parameter, "quant_type"):
        from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

        parameter = dequantize_gguf_tensor(parameter)
    return parameter.sum(dtype=torch.float32)


def load_vae(source: str | os.PathLike, torch_dtype: torch.dtype, config: str, family: ModelFamily):
    """A VAE from a diffusers VAE folder or hub id, a pipeline folder's `vae/`, or one safetensors file
    (SGM names, with or without `first_stage_model.`, configured from `config`)."""
    from diffusers import AutoencoderKL

    source = str(source)
    check_local_path(source)
    if is_single_file(source):
        path = str(single_file_path(source))
        problem = family.not_a_vae(list(read_single_file(source)))
        if problem:
            raise BaseModelError(source, problem)
        attempts = [
            lambda: AutoencoderKL.from_single_file(path, config=config, subfolder="vae", torch_dtype=torch_dtype)
        ]
    else:
        attempts = [
            lambda: AutoencoderKL.from_pretrained(source, torch_dtype=torch_dtype),
            lambda: AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=torch_dtype),
        ]
    errors = []
    for attempt in attempts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                vae = attempt()
            break
        except Exception as exc:  # not a VAE, offline hub, no configs: one answer to the user
            errors.append(first_line(exc))
    else:
        raise BaseModelError(source, f"cannot load it as a VAE ({'; '.join(dict.fromkeys(errors))})")
    check_finite(source, {"VAE": vae})
    return vae
