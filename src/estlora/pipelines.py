"""Loading the base SDXL pipeline on the right device and dtype (CPU and fp32 unless told otherwise)."""

from __future__ import annotations

import os
import warnings

import torch

from .base import check_local_path, resolve_base
from .errors import BaseModelError


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


def load_pipeline(base: str | os.PathLike, device: str = "auto", dtype: str = "auto", cpu_offload: bool = False):
    """A `StableDiffusionXLPipeline` from a folder or hub id, placed on device (or offloaded)."""
    from diffusers import StableDiffusionXLPipeline

    base = resolve_base(base)
    check_local_path(base)
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    attempts = [{"variant": "fp16"}, {}] if torch_dtype == torch.float16 and not os.path.isdir(base) else [{}]
    error = None
    for extra in attempts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pipe = StableDiffusionXLPipeline.from_pretrained(str(base), torch_dtype=torch_dtype, **extra)
            break
        except Exception as exc:  # missing folder, offline hub, not a pipeline: one answer to the user
            error = exc
    else:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise BaseModelError(base, f"cannot load an SDXL pipeline ({first})")
    if cpu_offload and target.type != "cpu":
        pipe.enable_model_cpu_offload(device=target)
    else:
        pipe.to(target)
    return pipe
