"""Built-in example LoRAs for the built-in tiny SDXL and tiny FLUX.1, so every command can run offline
out of the box.

They are random but shaped like real ones: a rank-4 "subject" LoRA that is stronger in the down
blocks (FLUX.1: the double blocks) and a rank-8, alpha 4 "style" LoRA that is stronger in the up
blocks (the single blocks), with a spread per projection, so a fusion plan has projections staying
with each LoRA and flipping at many steps. They are written in the layout diffusers' DreamBooth
scripts write (`save_lora_weights`). Refer to them as `example:subject` and `example:style` (tiny
FLUX.1: `example:flux-subject`, `example:flux-style`) wherever a LoRA path is accepted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..cache import cache_dir
from .tiny_flux import TINY_FLUX_VERSION
from .tiny_sdxl import TINY_MODEL_VERSION

EXAMPLES = {
    # name: (seed, rank, alpha, relative strength per stage: the module path's first word)
    "subject": (1, 4, 4.0, {"down": 1.6, "mid": 1.0, "up": 0.7}),
    "style": (2, 8, 4.0, {"down": 0.7, "mid": 1.0, "up": 1.6}),
    "flux-subject": (3, 4, 4.0, {"transformer": 1.6, "single": 0.7}),
    "flux-style": (4, 8, 4.0, {"transformer": 0.7, "single": 1.6}),
}
PREFIX = "example:"


def _leaf(module: str) -> str:
    """The name peft's `target_modules` gives a linear: its last part (`to_out.0`: its last two)."""
    head, _, last = module.rpartition(".")
    return f"{head.rpartition('.')[2]}.{last}" if last.isdigit() else last


def example_state_dict(name: str, shapes: dict[str, tuple[int, int]]) -> tuple[dict, dict]:
    """peft-named factors (no `unet.` prefix) and the adapter metadata for one example LoRA."""
    seed, rank, alpha, strength = EXAMPLES[name]
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for module, (out_features, in_features) in shapes.items():
        stage = module.split("_", 1)[0]
        down = torch.randn(rank, in_features, generator=generator) / in_features**0.5
        # A log-normal spread per projection, so that projections flip at different steps.
        spread = float(torch.exp(0.5 * torch.randn((), generator=generator)))
        up = torch.randn(out_features, rank, generator=generator) * 0.05 * strength[stage] * spread
        state[f"{module}.lora_A.weight"] = down
        state[f"{module}.lora_B.weight"] = up
    metadata = {"r": rank, "lora_alpha": alpha, "target_modules": list(dict.fromkeys(map(_leaf, shapes)))}
    return state, metadata


def write_example_lora(name: str, directory: str | os.PathLike) -> Path:
    """Write one example LoRA for the tiny model as `<directory>/<name>.safetensors`, atomically.

    Keys and adapter metadata as diffusers' `save_lora_weights` writes them, but with a single
    metadata entry: safetensors stores metadata as a hash map, so with two entries the header's
    order (and the file's sha256, which keys caches) would change from run to run.
    """
    from safetensors.torch import save_file

    from ..outputs import atomic_path

    family, denoiser = _tiny(name)
    shapes = family.linear_shapes(denoiser, family.default_route)
    state, config = example_state_dict(name, shapes)
    prefix = family.lora_prefix
    tensors = {f"{prefix}.{key}": value.contiguous() for key, value in state.items()}
    metadata = {"lora_adapter_metadata": json.dumps({f"{prefix}.{k}": v for k, v in config.items()}, sort_keys=True)}
    target = Path(directory) / f"{name}.safetensors"
    with atomic_path(target) as staging:
        save_file(tensors, str(staging), metadata=metadata)
    return target


def _tiny(name: str):
    """The family and the denoiser (built, random) an example LoRA is for."""
    if name.startswith("flux-"):
        from ..families.flux import Flux1
        from .tiny_flux import tiny_flux_transformer

        return Flux1(), tiny_flux_transformer()
    from ..families.sdxl import SDXL
    from .tiny_sdxl import tiny_unet

    return SDXL(), tiny_unet()


def example_lora_path(reference: str) -> Path:
    """Resolve `example:subject`, `example:flux-style`, ... to a file in the cache, written on first use."""
    name = reference.removeprefix(PREFIX)
    if name not in EXAMPLES:
        from ..errors import LoraNotFoundError

        raise LoraNotFoundError(reference, f"no such built-in example (choose from {', '.join(EXAMPLES)})")
    folder = cache_dir() / f"example-loras-v{TINY_MODEL_VERSION}.{TINY_FLUX_VERSION}"
    path = folder / f"{name}.safetensors"
    return path if path.is_file() else write_example_lora(name, folder)
