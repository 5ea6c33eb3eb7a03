"""The model families estlora serves, one module each, and how a pipeline, a LoRA or a checkpoint finds its own.

`family_of(pipe)` keys on the denoiser's class; `family_of_lora(keys)` and `family_of_checkpoint(keys)`
on a file's tensor names. Everything else in estlora asks the family it gets (`estlora.families.family`).
"""

from __future__ import annotations

from ..errors import UnsupportedModelError
from .family import Checkpoint, LoraParts, ModelFamily
from .flux import Flux1
from .sdxl import SDXL

_SDXL, _FLUX1 = SDXL(), Flux1()
FAMILIES: tuple[ModelFamily, ...] = (_SDXL, _FLUX1)  # the first is the default where nothing says otherwise
# The order a LoRA's or a checkpoint's keys are offered in: FLUX.1's block names are its own, while
# SDXL's layouts claim any kohya `lora_unet_` file.
CLAIM_ORDER = (_FLUX1, _SDXL)

__all__ = ["FAMILIES", "Checkpoint", "LoraParts", "ModelFamily", "family_named", "family_of", "family_of_lora"]


def family_named(name: str) -> ModelFamily:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise UnsupportedModelError(None, f"no model family {name!r} (estlora serves {served()})")


def served() -> str:
    return ", ".join(family.label for family in FAMILIES)


def family_of(pipe) -> ModelFamily:
    """The family of a diffusers pipeline (or of a bare denoiser), from its denoiser's class."""
    for family in FAMILIES:
        if family.serves(pipe) or family.serves_model(pipe):
            return family
    model = next((getattr(pipe, f.denoiser) for f in FAMILIES if getattr(pipe, f.denoiser, None) is not None), pipe)
    raise UnsupportedModelError(
        getattr(pipe, "name_or_path", None) or None,
        f"a {type(pipe).__name__} whose denoiser is a {type(getattr(model, '_orig_mod', model)).__name__}: "
        f"not a model family estlora serves ({served()})",
    )


def family_of_lora(keys: list[str]) -> ModelFamily | None:
    """The family whose LoRA layouts these keys follow, or None."""
    return next((family for family in CLAIM_ORDER if family.claims_lora(keys)), None)


def family_of_checkpoint(keys: list[str]) -> ModelFamily | None:
    """The family a single-file checkpoint with these keys belongs to, or None."""
    return next((family for family in CLAIM_ORDER if family.claims_checkpoint(keys)), None)


def scheduler_names() -> tuple[str, ...]:
    """Every sampler name some family offers (each family checks its own)."""
    return tuple(dict.fromkeys(name for family in FAMILIES for name in family.schedulers))
