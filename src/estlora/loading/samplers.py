"""Samplers by the names A1111 and ComfyUI users know, built from the base's own scheduler config.

Each family lists its samplers (`ModelFamily.schedulers`); building one from the base's own config
carries the training schedule over (betas, prediction type, timestep spacing, zero terminal SNR).
"""

from __future__ import annotations

from ..config import TIMESTEP_SPACINGS
from ..errors import SettingError
from ..families import ModelFamily


def make_scheduler(own, family: ModelFamily, name: str = "default", timestep_spacing: str | None = None):
    """The scheduler `name` of `family`, built from `own` (the base's scheduler); `own` itself for
    `default` with no spacing given."""
    import diffusers

    if name not in family.schedulers:
        raise SettingError(
            "scheduler", f"must be one of {', '.join(family.schedulers)} on {family.label}, not {name!r}"
        )
    if timestep_spacing not in (None, *TIMESTEP_SPACINGS):
        raise SettingError(
            "timestep-spacing", f"must be one of {', '.join(TIMESTEP_SPACINGS)}, not {timestep_spacing!r}"
        )
    if family.schedulers[name] is None and timestep_spacing is None:
        return own
    class_name, overrides = family.schedulers[name] or (type(own).__name__, {})
    if timestep_spacing:
        overrides = {**overrides, "timestep_spacing": timestep_spacing}
    return getattr(diffusers, class_name).from_config(own.config, **overrides)


def scheduler_settings(scheduler) -> dict:
    """The scheduler's config as plain JSON values (Karras sigmas or not, prediction type, ...)."""
    return {k: v for k, v in sorted(scheduler.config.items()) if not k.startswith("_")}
