"""EST-LoRA for diffusers: adaptive, training-free fusion of a subject LoRA and a style LoRA.

The names below load on first use (PEP 562), so that `import estlora` (and so `estlora --help`, and
every command's start) costs no torch, diffusers or transformers import until one is needed.
"""

from __future__ import annotations

import importlib

from . import testing, toy  # noqa: F401 (they register `toy:`, `example:` and the `toy` base)
from .config import FusionConfig, ModelConfig, SamplingConfig
from .version import __version__

# name -> the module that defines it
_LAZY = {
    "Fusion": "runtime.fusion",
    "Lora": "updates",
    "Plan": "plan",
    "Request": "session",
    "Session": "session",
    "family_of": "families",
    "fuse": "runtime.fusion",
    "load_lora": "loading.lora",
    "load_pipeline": "loading.base",
    "measure_beta": "beta",
}

__all__ = [
    "Fusion",
    "FusionConfig",
    "Lora",
    "ModelConfig",
    "Plan",
    "Request",
    "SamplingConfig",
    "Session",
    "__version__",
    "family_of",
    "fuse",
    "load_lora",
    "load_pipeline",
    "measure_beta",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'estlora' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return __all__
