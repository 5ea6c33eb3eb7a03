"""EST-LoRA for diffusers: adaptive, training-free fusion of a subject LoRA and a style LoRA."""

from . import testing, toy  # noqa: F401 (they register `toy:`, `example:` and the `toy` base)
from .beta import measure_beta
from .config import FusionConfig, ModelConfig, SamplingConfig
from .families import family_of
from .loading.base import load_pipeline
from .loading.lora import load_lora
from .plan import Plan
from .runtime.fusion import Fusion, fuse
from .session import Request, Session
from .updates import Lora
from .version import __version__

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
