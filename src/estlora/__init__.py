"""EST-LoRA for diffusers: adaptive, training-free fusion of a subject LoRA and a style LoRA."""

from .fusion import Fusion, fuse
from .lora import Lora, load_lora
from .pipelines import load_pipeline
from .plan import FusionConfig, Plan

__all__ = ["Fusion", "FusionConfig", "Lora", "Plan", "fuse", "load_lora", "load_pipeline"]
__version__ = "0.1.0"
