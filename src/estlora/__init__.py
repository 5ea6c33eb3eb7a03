"""EST-LoRA for diffusers: adaptive, training-free fusion of a subject LoRA and a style LoRA."""

from .fusion import Fusion, fuse
from .lora import Lora, load_lora
from .plan import FusionConfig, Plan

__all__ = ["Fusion", "FusionConfig", "Lora", "Plan", "fuse", "load_lora"]
__version__ = "0.1.0"
