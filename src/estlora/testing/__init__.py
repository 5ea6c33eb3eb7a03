"""Fixtures built in code for tests and offline runs: a tiny SDXL with SDXL's real block layout, tiny
DINO and CLIP stand-ins, and example LoRAs for the tiny model (`example:subject`, `example:style`,
registered on import)."""

from __future__ import annotations

from ..registry import register_lora_source


def _example(reference: str):
    from .examples import example_lora_path

    return example_lora_path(reference)


register_lora_source("example:", _example)
