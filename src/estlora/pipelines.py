"""Loading the base SDXL pipeline on the right device and dtype (CPU and fp32 unless told otherwise)."""

from __future__ import annotations

import os
import warnings

import torch

from .base import (
    DEFAULT_BASE,
    check_local_path,
    check_no_config,
    header_shapes,
    is_single_file,
    is_unet_only,
    not_a_vae,
    read_single_file,
    resolve_base,
    single_file_path,
    single_file_sampling,
    with_unet_prefix,
)
from .errors import BaseModelError, first_line

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


TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")  # trailing: what SDXL-Lightning / Turbo models want


def set_scheduler(pipe, name: str = "default", timestep_spacing: str | None = None) -> None:
    """Sample with `name` (a key of SCHEDULERS) from now on, with the base's timestep spacing unless
    told; `default` with no spacing brings back the base's own scheduler object."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, not {name!r}")
    if timestep_spacing not in (None, *TIMESTEP_SPACINGS):
        raise ValueError(f"timestep spacing must be one of {', '.join(TIMESTEP_SPACINGS)}, not {timestep_spacing!r}")
    own = pipe.__dict__.setdefault("_estlora_own_scheduler", pipe.scheduler)
    if SCHEDULERS[name] is None and timestep_spacing is None:
        pipe.scheduler = own
        return
    class_name, overrides = SCHEDULERS[name] or (type(own).__name__, {})
    if timestep_spacing:
        overrides = {**overrides, "timestep_spacing": timestep_spacing}
    pipe.scheduler = getattr(diffusers, class_name).from_config(own.config, **overrides)


def resolve_device(device: str = "auto") -> torch.device:
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """fp16 on accelerators, fp32 on the CPU (CPU half precision is slow and lossy), unless told."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    names = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "fp16": torch.float16,
        "float16": torch.float16,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
    }
    if dtype not in names:
        raise ValueError(f"dtype must be auto, fp32, fp16 or bf16, not {dtype!r}")
    return names[dtype]


def load_pipeline(
    base: str | os.PathLike,
    device: str = "auto",
    dtype: str = "auto",
    cpu_offload: bool = False,
    config: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
):
    """A `StableDiffusionXLPipeline` from a folder, hub id or single-file checkpoint, placed on device
    (or offloaded). A single file takes its configs and tokenizers from `config` (a diffusers SDXL
    folder or hub id; SDXL base 1.0 by default), as diffusers' `from_single_file` does. `vae`
    replaces the base's VAE (e.g. `madebyollin/sdxl-vae-fp16-fix`, or a single-file VAE)."""
    base = resolve_base(base)
    check_local_path(base)
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    if is_single_file(base):
        pipe = _from_single_file(base, torch_dtype, config)
        _check_tokenizers(pipe, resolve_base(config or DEFAULT_BASE))
    else:
        check_no_config(base, config)
        pipe = _from_pretrained(base, torch_dtype)
        _check_tokenizers(pipe, base)
    if vae is not None:
        vae_config = resolve_base(config or (DEFAULT_BASE if is_single_file(base) else base))
        pipe.vae = load_vae(vae, torch_dtype, vae_config)
    if cpu_offload and target.type != "cpu":
        pipe.enable_model_cpu_offload(device=target)
    else:
        pipe.to(target)
    # The base's own VAE is not checked when --vae replaces it (a broken VAE is a reason to replace it).
    parts = ("unet", "text_encoder", "text_encoder_2") + (("vae",) if vae is None else ())
    check_finite(base, {name: getattr(pipe, name) for name in parts})
    return pipe


def check_finite(source: str | os.PathLike, components: dict) -> None:
    """Weights holding NaN or infinity (a merge that overflowed fp16, a broken conversion) render
    black or noise with no error: refused instead. One float32 sum per tensor where the model sits
    (a NaN or infinity anywhere makes it non-finite) and one device sync per component: about
    0.3 s for SDXL's UNet in fp32 on two CPU cores, milliseconds on a GPU."""
    for name, module in components.items():
        parameters = [] if module is None else list(module.parameters())
        if parameters and not torch.isfinite(torch.stack([p.sum(dtype=torch.float32) for p in parameters]).sum()):
            bad = next(n for n, p in module.named_parameters() if not torch.isfinite(p.sum(dtype=torch.float32)))
            raise BaseModelError(source, f"its {name} holds NaN or infinite weights ({bad})")


def _check_tokenizers(pipe, source: str) -> None:
    """transformers builds a CLIP tokenizer with no vocabulary, silently, from a folder that lacks its
    vocab files (a `tokenizer_2/` left out of a copied SDXL folder): every prompt would become
    unknown tokens. Refused instead, naming the folder the tokenizers came from."""
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is None or len(tokenizer) <= len(tokenizer.all_special_tokens):
            raise BaseModelError(source, f"its {name} has no vocabulary ({name}/vocab.json and merges.txt missing?)")


def load_vae(source: str | os.PathLike, torch_dtype: torch.dtype, config: str):
    """An SDXL VAE from a diffusers VAE folder or hub id, a pipeline folder's `vae/`, or one
    safetensors file (SGM names, with or without `first_stage_model.`, configured from `config`)."""
    from diffusers import AutoencoderKL

    source = str(source)
    check_local_path(source)
    if is_single_file(source):
        path = str(single_file_path(source))
        problem = not_a_vae(list(read_single_file(source)))
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
    for attempt in attempts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                vae = attempt()
            break
        except Exception as exc:  # not a VAE, offline hub, no configs: one answer to the user
            error = exc
    else:
        raise BaseModelError(source, f"cannot load it as a VAE ({first_line(error)})")
    check_finite(source, {"VAE": vae})
    return vae


def _from_pretrained(base: str, torch_dtype: torch.dtype):
    from diffusers import StableDiffusionXLPipeline

    attempts = [{"variant": "fp16"}, {}] if torch_dtype == torch.float16 and not os.path.isdir(base) else [{}]
    for extra in attempts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return StableDiffusionXLPipeline.from_pretrained(base, torch_dtype=torch_dtype, **extra)
        except Exception as exc:  # missing folder, offline hub, not a pipeline: one answer to the user
            error = exc
    raise BaseModelError(base, f"cannot load an SDXL pipeline ({first_line(error)})")


def _from_single_file(base: str, torch_dtype: torch.dtype, config: str | os.PathLike | None):
    header = read_single_file(base)
    header_shapes(base, header, config)  # a clear refusal before diffusers reads gigabytes
    path, config = str(single_file_path(base)), resolve_base(config or DEFAULT_BASE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = _read_single_file(path, is_unet_only(header), torch_dtype, config)
    except Exception as exc:
        where = (
            ""
            if os.path.isdir(config)
            else " (fetched from the hub; offline, give a local diffusers SDXL folder as --base-config)"
        )
        raise BaseModelError(base, f"cannot load it with the configs of {config}{where}: {first_line(exc)}") from None
    pipe.register_to_config(_name_or_path=path)  # diffusers leaves it empty; errors and caches name the base
    sampling = single_file_sampling(header)
    if sampling:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **sampling)
    return pipe


def _read_single_file(path: str, unet_only: bool, torch_dtype: torch.dtype, config: str):
    """diffusers' own single-file loading; a UNet alone is loaded so, and the rest comes from `config`."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from safetensors.torch import load_file

    if not unet_only:
        return StableDiffusionXLPipeline.from_single_file(path, torch_dtype=torch_dtype, config=config)
    state = with_unet_prefix(load_file(path))
    unet = UNet2DConditionModel.from_single_file(state, config=config, subfolder="unet", torch_dtype=torch_dtype)
    return StableDiffusionXLPipeline.from_pretrained(config, unet=unet, torch_dtype=torch_dtype)
