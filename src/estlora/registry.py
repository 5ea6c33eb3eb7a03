"""Names that packages above the loader give meaning to: `toy:heart`, `example:subject`, the `toy` base.

The loader, the beta probe and the shells look a name up here and never import the packages that
fill it (the toy world, the test fixtures): those packages register on import (`estlora/__init__.py`
imports them), so the arrows run one way, from the toy world down to the loader.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# "toy:" -> resolver("toy:heart") -> the file
LORA_SOURCES: dict[str, Callable[[str], Path]] = {}
# "toy" -> what a base named so is
BASES: dict[str, BasePreset] = {}
# "toy" -> factory(device) of an image embedder standing in for DINO
EMBEDDERS: dict[str, Callable[[object], object]] = {}


@dataclass(frozen=True)
class BasePreset:
    """A base model known by a short name, with the settings it is meant to be sampled with."""

    name: str
    path: Callable[[], Path]  # its diffusers folder
    label: str  # how messages name it ("the toy SDXL")
    description: str = ""  # one sentence for the UI
    embedder: str | None = None  # the image embedder beta is measured with, when not DINO
    sampling: dict = field(default_factory=dict)  # SamplingConfig defaults it was trained for
    prompt: str = ""
    loras: dict[str, tuple[str, ...]] = field(default_factory=dict)  # built-in LoRAs per role, default first


def register_lora_source(prefix: str, resolve: Callable[[str], Path]) -> None:
    LORA_SOURCES[prefix] = resolve


def register_base(preset: BasePreset) -> None:
    BASES[preset.name] = preset


def register_embedder(name: str, factory: Callable[[object], object]) -> None:
    EMBEDDERS[name] = factory


def lora_source(reference: str) -> Callable[[str], Path] | None:
    """The resolver of a registered name (`toy:heart`), or None for a path or hub id."""
    return next((resolve for prefix, resolve in LORA_SOURCES.items() if reference.startswith(prefix)), None)


def base_preset(name: object) -> BasePreset | None:
    return BASES.get(str(name))
