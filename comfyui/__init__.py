"""EST-LoRA for ComfyUI: a subject LoRA in a style LoRA, decided per projection and per step inside
ComfyUI's own samplers. Drop this folder into `ComfyUI/custom_nodes` (with estlora installed in
ComfyUI's Python: `pip install estlora`)."""

from .nodes_estlora import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
