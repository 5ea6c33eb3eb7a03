"""What estlora must know about a family of base models, as one class per family (diffusers keeps its
per-family knowledge the same way, on `StableDiffusionXLLoraLoaderMixin`, `FluxLoraLoaderMixin`, ...).

Everything outside `estlora.families` asks a family instead of naming a model: which pipeline
attribute holds the denoiser, which of its linears each route set covers, how the LoRA files made for
it are laid out, how its modules are ordered and grouped, its samplers and call arguments, and how
its single-file checkpoints are recognised and loaded. A family module says these things once.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from ..config import FusionConfig, SamplingConfig, settings_of
from ..errors import LoraFormatError, SettingError
from ..files.lora_keys import module_of
from ..lazy import torch


@dataclass
class LoraParts:
    """A LoRA file as its family reads it, before any value is checked: per routable linear, the raw
    parts (`A` down, `B` up, optional `alpha`) and the same tensors under the names diffusers' loader
    reads; every other tensor under those names too."""

    layout: str
    parts: dict[str, dict[str, torch.Tensor]]
    keys: dict[str, dict[str, torch.Tensor]]
    other: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class Checkpoint:
    """What a single-file checkpoint's header says, read once (`ModelFamily.read_checkpoint`)."""

    header: dict
    shapes: dict[str, tuple[int, int]]  # routable linear -> (out, in)
    denoiser_only: bool  # the rest (VAE, text encoders, tokenizers) comes from the config
    sampling: dict  # scheduler settings the file declares with marker keys


SAMPLING_DEFAULTS = {item.name: item.default for item in settings_of(SamplingConfig)}


class ModelFamily:
    """One family of base models (SDXL and its fine-tunes; FLUX.1; ...). Subclasses fill in every part."""

    name: str  # "sdxl": in metadata, caches and the plan JSON
    label: str  # "SDXL": in messages
    denoiser: str  # the pipeline attribute holding the routed model ("unet", "transformer")
    denoiser_classes: tuple[str, ...]  # diffusers classes of that model
    pipeline_classes: tuple[str, ...]  # the pipelines a folder's model_index.json may name
    lora_prefix: str  # diffusers' key prefix for the denoiser in LoRA files and adapter metadata
    lora_components: tuple[str, ...]  # pipeline attributes diffusers loads LoRA weights into
    default_base: str
    route_sets: dict[str, re.Pattern]  # route name -> module paths it covers (full match)
    default_route: str
    default_steps: int
    default_guidance: float
    size_multiple: int  # width and height must be multiples of this
    guidance_help: str = "classifier-free guidance scale"  # what `guidance` means on this family
    # sampling settings this family cannot take, and why: refused unless left at their default, and
    # left out of the UI's page for this family
    refused_settings: dict[str, str] = {}
    timestep_argument: str = "timestep"  # the denoiser's keyword for the timestep
    reads_gguf: bool = False  # quantized single files (GGUF) as the base
    # Bases `guess_base` can name whose LoRAs share this family's key layout but that estlora does not serve.
    foreign_bases: tuple[str, ...] = ()
    klora_pattern: str = "s"  # K-LoRA's time pattern for this family (its FLUX code wraps: s*)
    # sampler name -> (diffusers scheduler class, config overrides); None: the base's own
    schedulers: dict[str, tuple[str, dict] | None]

    # ------------------------------------------------------------ pipelines and modules

    def serves(self, pipe) -> bool:
        """A pipeline whose denoiser is one of this family's models."""
        return self.serves_model(getattr(pipe, self.denoiser, None))

    def serves_model(self, model) -> bool:
        model = getattr(model, "_orig_mod", model)
        return type(model).__name__ in self.denoiser_classes

    def denoiser_of(self, pipe):
        """The pipeline's denoiser itself, also when `torch.compile` wrapped it: routing swaps its
        submodules by name, and the wrapper's names carry an `_orig_mod.` prefix."""
        model = getattr(pipe, self.denoiser)
        return getattr(model, "_orig_mod", model)

    def resolve_fusion(self, config: FusionConfig) -> FusionConfig:
        """`config` with this family's defaults where it leaves them unset (route, klora's pattern); a
        route the family lacks is a SettingError."""
        route = config.route or self.default_route
        self.route_pattern(route)
        pattern = config.pattern or (self.klora_pattern if config.method == "klora" else "s")
        return replace(config, route=route, pattern=pattern)

    def route_pattern(self, route: str) -> re.Pattern:
        if route not in self.route_sets:
            raise SettingError("route", f"must be one of {', '.join(self.route_sets)} on {self.label}, not {route!r}")
        return self.route_sets[route]

    def in_route(self, module: str, route: str) -> bool:
        return bool(self.route_pattern(route).fullmatch(module))

    def routable(self, module: str) -> bool:
        """In some route set: a LoRA's update of it becomes a projection, not an 'other' weight."""
        return any(pattern.fullmatch(module) for pattern in self.route_sets.values())

    def linear_shapes(self, model, route: str | None = None) -> dict[str, tuple[int, int]]:
        """(out, in) of every routable linear of a live (or meta-device) denoiser, routed or not;
        with `route`, those that route covers."""
        covers = self.routable if route is None else (lambda name: self.in_route(name, route))
        return {
            name: (module.out_features, module.in_features)
            for name, module in model.named_modules()
            if hasattr(module, "in_features") and hasattr(module, "out_features") and covers(name)
        }

    def order(self, module: str) -> tuple:
        """Sort key of module paths in the model's own order (plans, summaries, heatmaps follow it)."""
        raise NotImplementedError

    def ordered(self, modules) -> list[str]:
        return sorted(modules, key=self.order)

    def routed(self, modules, route: str) -> list[str]:
        """The modules `route` covers, in the model's order: a plan's rows and the router's indices follow it."""
        return self.ordered(m for m in set(modules) if self.in_route(m, route))

    def block_of(self, module: str) -> str:
        """The block a module belongs to, as summaries and heatmaps group them."""
        raise NotImplementedError

    # ------------------------------------------------------------ LoRA files

    def claims_lora(self, keys: list[str]) -> bool:
        """Whether a LoRA file with these keys was made for this family (its layouts, its names)."""
        raise NotImplementedError

    def lora_parts(self, path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> LoraParts:
        """The file's layout, renamed to the denoiser's module paths (fused updates split)."""
        raise NotImplementedError

    def no_projections(self, path: Path, other: dict[str, torch.Tensor]) -> Exception:
        """The error for a file of this family's layout that updates no routable linear."""
        raise NotImplementedError

    def adapter_groups(self, tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """A LoRA's tensors that a route leaves out, in groups diffusers' loader reads one at a time (one
        layout each); empty groups dropped."""
        return [tensors] if tensors else []

    def guess_base(self, shapes: dict[str, tuple[int, int]]) -> str:
        """Which base a LoRA was made for, guessed from its projections' (out, in) shapes (for messages)."""
        return self.label

    def other_kind(self, module: str) -> str:
        """What a module outside the routed linears is, for `inspect` ("text encoder 1", ...)."""
        return "other"

    def diff_target(self, key: str) -> tuple[str, str] | None:
        """Where a full-weight difference (ComfyUI's `.diff` / `.diff_b`) goes: (pipeline component,
        parameter path), or None where this family does not know its key."""
        return None

    def other_modules(self, tensors: dict[str, torch.Tensor]) -> dict[str, int]:
        """Modules outside the routed linears by kind, each counted once (keys in any layout's spelling)."""
        kinds = Counter(self.other_kind(module) for module in {module_of(key) for key in tensors})
        return dict(sorted(kinds.items()))

    # ------------------------------------------------------------ bases

    def config_shapes(self, base: str) -> dict[str, tuple[int, int]]:
        """Routable linear shapes of a diffusers folder or hub id, from its denoiser's config alone."""
        raise NotImplementedError

    def shapes_from_config(self, config: dict) -> dict[str, tuple[int, int]]:
        """(out, in) of every routable linear of a denoiser config: the model built on the meta device
        (no weights, milliseconds after the first build of a config)."""
        hashable = tuple(sorted((k, _freeze(v)) for k, v in config.items() if not k.startswith("_")))
        linears = _meta_linears(self.denoiser_classes[0], hashable)
        return {name: shape for name, shape in linears.items() if self.routable(name)}

    def claims_checkpoint(self, keys: list[str]) -> bool:
        """Whether a single-file checkpoint with these keys is one of this family's (whole or denoiser only)."""
        raise NotImplementedError

    def read_checkpoint(self, base: str, header: dict, config: str) -> Checkpoint:
        """Check a single file's header (a BaseModelError if it is not a usable checkpoint) against
        `config`, the folder or hub id its configs come from."""
        raise NotImplementedError

    def load_pretrained(self, location: str, torch_dtype: torch.dtype):
        raise NotImplementedError

    def load_single_file(self, path: str, checkpoint: Checkpoint, torch_dtype: torch.dtype, config: str):
        raise NotImplementedError

    def check_pipeline(self, pipe, source: str) -> None:
        """Refuse a loaded pipeline that would render nonsense silently (a tokenizer without vocabulary)."""

    def weight_components(self, vae_replaced: bool) -> tuple[str, ...]:
        """The components whose weights are checked for NaN or infinity after loading."""
        raise NotImplementedError

    def not_a_vae(self, keys: list[str]) -> str | None:
        """Why a single file given as the VAE is not one of this family's VAEs, or None."""
        raise NotImplementedError

    # ------------------------------------------------------------ sampling

    def default_size(self, pipe) -> int:
        """The image side the pipeline renders when not told (its sample size in pixels)."""
        return pipe.default_sample_size * pipe.vae_scale_factor

    def call_arguments(self, sampling: SamplingConfig, steps: int) -> dict:
        """The pipeline call's keyword arguments for these settings (steps given: the probe may use fewer)."""
        raise NotImplementedError

    def check_sampling(self, sampling: SamplingConfig) -> None:
        """Settings this family cannot take, refused before the model loads (a SettingError)."""
        for name, why in self.refused_settings.items():
            if getattr(sampling, name) != SAMPLING_DEFAULTS[name]:
                raise SettingError(name.replace("_", "-"), why)
        if sampling.scheduler not in self.schedulers:
            raise SettingError("scheduler", f"must be one of {', '.join(self.schedulers)} on {self.label}")
        for name in ("width", "height"):
            value = getattr(sampling, name)
            if value is not None and value % self.size_multiple:
                raise SettingError(
                    name, f"must be a multiple of {self.size_multiple} on {self.label} (the VAE's scale), not {value}"
                )


@lru_cache(maxsize=16)
def _meta_linears(class_name: str, config_items: tuple) -> dict[str, tuple[int, int]]:
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, class_name).from_config(dict(config_items))
    return {
        name: (module.out_features, module.in_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def _freeze(value):
    return tuple(_freeze(v) for v in value) if isinstance(value, list | tuple) else value


# ---------------------------------------------------------------- diffusers/peft key names, any family


def split_module(key: str, prefix: str) -> tuple[str, str]:
    """'<prefix>.a.b.lora_A.weight' -> ('a.b', 'A'); '.alpha' keys -> (module, 'alpha'); peft's DoRA
    '.lora_magnitude_vector' -> (module, 'magnitude'); else ('', '')."""
    head = rf"^(?:base_model\.model\.)?(?:{re.escape(prefix)}\.)?"
    match = re.match(head + r"(.+?)\.(lora_A|lora_B)(?:\.default)?\.weight$", key)
    if match:
        return match.group(1), match.group(2)[-1]
    match = re.match(head + r"(.+)\.alpha$", key)
    if match:
        return match.group(1), "alpha"
    match = re.match(head + r"(.+)\.lora_magnitude_vector(?:\.default)?(?:\.weight)?$", key)  # peft's DoRA
    if match:
        return match.group(1), "magnitude"
    return "", ""


def peft_parts(path, layout: str, tensors: dict, prefix: str, routable: re.Pattern, name_of=None) -> LoraParts:
    """A diffusers/peft file's routable linears (`<prefix>.<module>.lora_A.weight`, `.lora_B.weight`,
    `.alpha`) and its other keys, under the names the file gives them (diffusers' loader reads them).
    `name_of(key, tensor)` renames a key to peft's spelling first (legacy layouts)."""
    parts: dict[str, dict] = {}
    keys: dict[str, dict] = {}
    other = {}
    for key, value in tensors.items():
        name = name_of(key, value) if name_of else key
        module, part = split_module(name.replace(".lora_B.bias", ".lora_B.weight"), prefix)
        if name.endswith(".lora_B.bias") and routable.fullmatch(module):
            raise LoraFormatError(path, f"{key}: LoRA with a bias (peft lora_bias) is not supported")
        if module and routable.fullmatch(module) and not name.startswith("text_encoder"):
            parts.setdefault(module, {})[part] = value
            keys.setdefault(module, {})[key] = value
        else:
            other[key] = value
    return LoraParts(layout, parts, keys, other)
