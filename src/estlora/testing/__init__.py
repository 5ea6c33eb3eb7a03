"""Fixtures built in code for tests and offline runs: a tiny SDXL with SDXL's real block layout and a
tiny FLUX.1 with FLUX.1's (the `tiny-sdxl` and `tiny-flux` bases), tiny DINO and CLIP stand-ins, and
example LoRAs for them (`example:subject`, `example:flux-style`, ...), registered on import."""

from __future__ import annotations

from pathlib import Path

from ..registry import BasePreset, register_base, register_embedder, register_lora_source


def _example(reference: str):
    from .examples import example_lora_path

    return example_lora_path(reference)


register_lora_source("example:", _example)


def _tiny_dino(device):
    from ..discrepancy import DinoEmbedder
    from .tiny_encoders import builtin_tiny_dino

    return DinoEmbedder(str(builtin_tiny_dino()), device=device)


def _tiny_flux() -> Path:
    from .tiny_flux import builtin_tiny_flux

    return builtin_tiny_flux()


def _tiny_sdxl() -> Path:
    from .tiny_sdxl import builtin_tiny_sdxl

    return builtin_tiny_sdxl()


# Random weights: they show that every path runs (in the UI too), not what fusion looks like (the toy does).
TINY = "random weights built in code, with random example LoRAs: every path runs offline, the images are noise"
register_embedder("tiny-dino", _tiny_dino)
register_base(
    BasePreset(
        "tiny-sdxl",
        _tiny_sdxl,
        "the tiny SDXL",
        TINY,
        "tiny-dino",
        loras={"subject": ("example:subject",), "style": ("example:style",)},
    )
)
register_base(
    BasePreset(
        "tiny-flux",
        _tiny_flux,
        "the tiny FLUX.1",
        TINY,
        "tiny-dino",
        sampling={"width": 64, "height": 64},  # its VAE's default size is FLUX.1's 1024: seconds a step here
        loras={"subject": ("example:flux-subject",), "style": ("example:flux-style",)},
    )
)
