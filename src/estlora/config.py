"""Every setting estlora takes, declared once: name, type, default, range and help.

Three frozen groups, apart from the runtime they configure (as peft keeps `LoraConfig` apart from its
layers): what to fuse and how (`FusionConfig`), how to sample (`SamplingConfig`) and which model to
load where (`ModelConfig`). The command line's flags, the grid spec's keys, the UI's widgets, image
metadata and `--help` are all read from these declarations (`settings_of`), so a setting added here
appears everywhere at once. Checking a value is the declaration's job too: a bad one is a
`SettingError` naming the setting, before any model loads.

A setting whose default is None is filled in later from what it depends on: the model family
(`route`, `steps`, `guidance`), the base (`width`, `height`), or a measurement (`beta`).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import SettingError

METHODS = ("est", "klora", "merge", "switch", "composite", "subject", "style")
PATTERNS = ("s", "s*")
GAMMA_RULES = ("reference", "energy")
# What happens to LoRA weights outside the routed linears (feed-forward, convolutions, text encoders):
# left out, as the reference does, or applied statically at each LoRA's strength.
OTHER_WEIGHTS = ("ignore", "merge")
# Which linears of the denoiser are routed (shared/design/method.md, "Route sets"); each family says which
# modules each name covers.
ROUTES = ("attention", "blocks")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")  # trailing: what SDXL-Lightning / Turbo models want
DTYPES = ("auto", "fp32", "fp16", "bf16")
# An alpha of 0 in a LoRA file: kohya's training code reads it as alpha = rank (scale 1), diffusers and
# ComfyUI as scale 0 (the LoRA does nothing).
ZERO_ALPHA = ("rank", "zero")
# K-LoRA's hand-set betas; also est's beta until one is measured (by `generate`, beta auto).
DEFAULT_BETA = {"s": 0.5, "s*": 1.275}
DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # `estlora eval`'s text-image scorer
METRIC_SETS = ("auto", "clip-dino", "toy")  # what `estlora eval` scores with (commands.evaluation.metric_set)


def number(value: float) -> str:
    """A limit or a value as a person reads it: whole numbers in full (a seed's 9223372036854775807,
    not 9.22337e+18), others short (0.05)."""
    whole = isinstance(value, int) or (float(value).is_integer() and abs(value) < 1e21)
    return str(int(value)) if whole else f"{value:g}"


@dataclass(frozen=True)
class Setting:
    """One setting as every front end shows it."""

    name: str
    kind: type  # bool, int, float or str
    optional: bool  # None is a value (its meaning: `unset`)
    default: object
    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    unset: str = ""  # what None means, for --help and the UI: "auto", "the family's"...
    auto_word: str | None = None  # a word the command line takes for None ("auto")
    ui: tuple[float, float, float] | None = None  # slider (low, high, step) where a slider fits
    family_default: str = ""  # the `ModelFamily` attribute that gives the default (front ends list them)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: object) -> object:
        """`value` as this setting's type (an int where a float is asked is fine), or a SettingError."""
        if value is None:
            if self.optional:
                return None
            raise self._error("must be given")
        if self.kind is bool:
            if not isinstance(value, bool):
                raise self._error(f"must be true or false, not {value!r}")
            return value
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise self._error(f"must be a number, not {value!r}")
            if self.kind is int:
                if value != int(value):
                    raise self._error(f"must be a whole number, not {value!r}")
                value = int(value)
            value = self.kind(value)
            if not math.isfinite(value):
                raise self._error(f"must be a finite number, not {value}")
            if self.minimum is not None and value < self.minimum:
                raise self._error(f"must be at least {number(self.minimum)}, not {number(value)}")
            if self.maximum is not None and value > self.maximum:
                raise self._error(f"must be at most {number(self.maximum)}, not {number(value)}")
            return value
        if not isinstance(value, str):
            raise self._error(f"must be text, not {value!r}")
        if self.choices is not None and value not in self.choices:
            raise self._error(f"must be one of {', '.join(self.choices)}, not {value!r}")
        return value

    def parse(self, text: str) -> object:
        """A value as typed on the command line: converted to the setting's type, not yet checked
        (the config group checks it, so a value out of range is one line, from wherever it came)."""
        if self.auto_word is not None and text == self.auto_word:
            return None
        if self.kind in (int, float):
            try:
                return self.kind(text)
            except ValueError:
                words = f"a {'whole ' if self.kind is int else ''}number" + (
                    f" or {self.auto_word}" if self.auto_word else ""
                )
                raise self._error(f"must be {words}, not {text!r}") from None
        return text

    def describe_default(self) -> str:
        if self.default is None:
            return self.unset or "none"
        return f"{self.default:g}" if isinstance(self.default, float) else str(self.default)

    def _error(self, problem: str) -> SettingError:
        return SettingError(self.name.replace("_", "-"), problem)


def setting(default: object, help: str, **declared) -> dataclasses.Field:
    """A dataclass field that is also a `Setting` (its name and type come from the field)."""
    return dataclasses.field(default=default, metadata={"setting": {"help": help, **declared}})


def settings_of(group: type) -> tuple[Setting, ...]:
    """The settings a config group declares, in declaration order."""
    hints = typing.get_type_hints(group)
    found = []
    for item in dataclasses.fields(group):
        declared = item.metadata.get("setting")
        if declared is None:
            continue
        kinds = [t for t in typing.get_args(hints[item.name]) if t is not type(None)] or [hints[item.name]]
        optional = type(None) in typing.get_args(hints[item.name])
        found.append(Setting(item.name, kinds[0], optional, item.default, **declared))
    return tuple(found)


def all_settings() -> Iterator[tuple[type, Setting]]:
    for group in GROUPS:
        for item in settings_of(group):
            yield group, item


class Settings:
    """Checks every declared field on construction (and turns ints into floats where floats are asked)."""

    def __post_init__(self) -> None:
        for item in settings_of(type(self)):
            object.__setattr__(self, item.name, item.check(getattr(self, item.name)))

    @classmethod
    def from_mapping(cls, values: dict):
        """The group's settings out of a mapping that may hold others (unknown keys are the caller's)."""
        names = {item.name for item in settings_of(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass(frozen=True)
class FusionConfig(Settings):
    """What to fuse how. Frozen: a plan is a function of (LoRA pair, config, steps)."""

    method: str = setting(
        "est",
        "fusion method: est picks a LoRA per projection and step from energy, style discrepancy (beta) and time; "
        "klora is K-LoRA (beta set by hand); merge adds both, as a static merge; switch alternates them every "
        "few steps (LoRA Switch); composite runs the denoiser once per LoRA and averages the predictions (LoRA "
        "Composite: twice the denoiser's work); subject and style apply one LoRA alone",
        choices=METHODS,
    )
    route: str | None = setting(
        None,
        "which linears are routed: attention (the attention projections, as the paper) or blocks "
        "(every linear of the transformer blocks; FLUX.1's default)",
        choices=ROUTES,
        unset="the model family's",
        family_default="default_route",
    )
    alpha: float = setting(
        1.5,
        "time-scale slope alpha (scale = alpha * progress + beta): the larger, the sooner projections pass "
        "from the subject LoRA to the style LoRA as denoising goes on",
    )
    beta: float | None = setting(
        None,
        "time-scale offset beta, or auto: measured by style discrepancy for est, K-LoRA's default for klora",
        unset="auto",
        auto_word="auto",
    )
    pattern: str | None = setting(
        None,
        "time pattern: s, the scale rises with the step (each projection passes from subject to style once); "
        "s* wraps it at alpha, so projections return to the subject (K-LoRA's FLUX.1 code)",
        choices=PATTERNS,
        unset="s; for klora the model family's, as K-LoRA's code for it has it",
        family_default="klora_pattern",
    )
    gamma_rule: str = setting(
        "reference",
        "gamma, the balance of the two LoRAs' sizes: reference (ratio of L1 norms, outliers dropped, as the "
        "paper) or energy (sum E_subject / sum E_style)",
        choices=GAMMA_RULES,
    )
    subject_scale: float = setting(1.0, "strength of the subject LoRA", ui=(0, 2, 0.05))
    style_scale: float = setting(1.0, "strength of the style LoRA", ui=(0, 2, 0.05))
    raw_energy: bool = setting(False, "score B @ A without alpha/rank, as the research code does")
    switch_every: int = setting(5, "LoRA Switch period in steps", minimum=1)
    other_weights: str = setting(
        "ignore",
        "LoRA weights outside the routed linears (feed-forward, conv, text encoders): ignore them, as the "
        "reference does, or merge them statically at each LoRA's strength",
        choices=OTHER_WEIGHTS,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pattern == "s*" and self.alpha <= 0:
            raise SettingError("alpha", "pattern s* needs alpha > 0")

    @property
    def time_pattern(self) -> str:
        """The pattern in force: unset is `s` (a model family resolves klora's own, `ModelFamily.resolve_fusion`)."""
        return self.pattern or "s"

    @property
    def effective_beta(self) -> float:
        return DEFAULT_BETA[self.time_pattern] if self.beta is None else self.beta

    @property
    def gated(self) -> bool:
        return self.method in ("est", "klora")

    @property
    def separate_passes(self) -> bool:
        """Each LoRA in a denoiser pass of its own, the passes' outputs averaged (LoRA Composite)."""
        return self.method == "composite"

    @property
    def static_weights(self) -> tuple[float, float]:
        """(subject, style) strength of the weights outside the routed linears, for the whole run.

        Zero for a LoRA the method leaves out (the other one's reference render) or when they are ignored.
        """
        if self.other_weights == "ignore":
            return 0.0, 0.0
        return (
            0.0 if self.method == "style" else self.subject_scale,
            0.0 if self.method == "subject" else self.style_scale,
        )


@dataclass(frozen=True)
class SamplingConfig(Settings):
    """How each image is sampled; None is the base's or the family's own choice."""

    negative_prompt: str | None = setting(None, "what the image should not show")
    steps: int | None = setting(
        None,
        "denoising steps",
        minimum=1,
        maximum=1000,  # the schedulers' training timesteps: more steps than these fail inside diffusers
        unset="the model family's",
        ui=(1, 100, 1),
        family_default="default_steps",
    )
    scheduler: str = setting(
        "default",
        "sampler, built from the base's own scheduler config (default: the base's own); "
        "karras = Karras sigmas, -a = ancestral",
    )
    timestep_spacing: str | None = setting(
        None,
        "which timesteps the steps take (Lightning/Turbo: trailing)",
        choices=TIMESTEP_SPACINGS,
        unset="the base's own",
    )
    guidance: float | None = setting(
        None,
        "classifier-free guidance scale",
        minimum=0,
        unset="the model family's",
        ui=(1, 15, 0.5),
        family_default="default_guidance",
    )
    guidance_rescale: float = setting(
        0.0,
        "rescale the guided prediction toward the conditional one's spread (0 off; 0.7 for v-prediction models)",
        minimum=0,
        maximum=1,
        ui=(0, 1, 0.05),
    )
    width: int | None = setting(None, "image width", minimum=8, maximum=8192, unset="the base's own", ui=(32, 2048, 8))
    height: int | None = setting(
        None, "image height", minimum=8, maximum=8192, unset="the base's own", ui=(32, 2048, 8)
    )
    true_cfg: float | None = setting(
        None,
        "true classifier-free guidance with the negative prompt, for models whose guidance is embedded "
        "(FLUX.1; two denoiser calls per step; 1 = off)",
        minimum=1,
        unset="off",
    )
    max_sequence_length: int | None = setting(
        None, "prompt tokens the T5 text encoder reads (FLUX.1)", minimum=1, unset="the pipeline's (FLUX.1: 512)"
    )
    # torch's generators take seeds up to 2**64 - 1; an image k beyond the first adds k
    seed: int = setting(0, "seed of the first image; image k uses seed + k", minimum=0, maximum=2**63 - 1)
    num_images: int = setting(1, "images to render", minimum=1, maximum=1000, ui=(1, 8, 1))
    beta_probe_steps: int | None = setting(None, "steps of the beta probe renders", minimum=1, unset="--steps")
    dino_model: str | None = setting(
        None, "image model beta is measured with (hub id or folder)", unset=f"{DEFAULT_DINO} (toy base: its scorer)"
    )


@dataclass(frozen=True)
class ModelConfig(Settings):
    """Which base to load, and where."""

    base: str | None = setting(
        None,
        "the base model: a diffusers folder, hub id, single-file .safetensors, or toy",
        unset="the LoRAs' family's standard base",
        family_default="default_base",
    )
    base_config: str | None = setting(
        None,
        "for a single-file base: the diffusers folder or hub id whose configs and tokenizers it uses",
        unset="the family's standard base",
        family_default="default_base",
    )
    vae: str | None = setting(
        None,
        "replace the base's VAE: a diffusers VAE folder or hub id (e.g. madebyollin/sdxl-vae-fp16-fix), "
        "or a single .safetensors VAE",
    )
    device: str = setting("auto", "auto (cuda, mps, else cpu), cpu, cuda, cuda:1, ...")
    dtype: str = setting("auto", "weights' precision; auto: fp16 on GPU, fp32 on CPU", choices=DTYPES)
    cpu_offload: bool = setting(False, "keep only the running model on the GPU")
    merge_weights: bool = setting(
        False,
        "write each step's chosen LoRA into the routed weights where the plan changes (the base model's speed; "
        "rounding as diffusers' fuse_lora) instead of the exact unfused path; on a CPU keeps the merged weights "
        "(up to two per weight, while memory allows) and swaps them in, on a GPU keeps a copy of those weights",
    )
    zero_alpha: str = setting(
        "rank",
        "an alpha of 0 in a LoRA file: rank (as kohya's trainer read it: scale 1) or zero (as diffusers and"
        " ComfyUI apply it: the LoRA does nothing)",
        choices=ZERO_ALPHA,
    )


GROUPS = (ModelConfig, FusionConfig, SamplingConfig)
