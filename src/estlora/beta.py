"""EST-LoRA's S factor in a pipeline: beta from the style discrepancy of two reference renders.

Render the prompt with the subject LoRA alone and with the style LoRA alone (seed 0, the final
run's pipeline settings, its sampler included), embed both (DINO), beta = 1 - cosine
(shared/design/method.md, "S"). Two renders per (pair, prompt, settings): the result is cached on
disk under everything the two renders depend on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import discrepancy
from .config import DEFAULT_DINO
from .loading.samplers import scheduler_settings
from .runtime.fusion import Fusion

BETA_KEY_VERSION = 3  # 3: the denoiser's weights fingerprint, the route and both strengths in the key
# What the reference renders depend on in the fusion's config (the gate's own settings do not matter).
REFERENCE_SETTINGS = ("route", "other_weights", "subject_scale", "style_scale")


@dataclass
class BetaProbe:
    """A measured beta, whether it came from the cache, and the two reference renders if made now."""

    beta: float
    cached: bool
    images: dict | None
    key: dict


def probe_key(fusion: Fusion, prompt: str, seed: int, dino_model: str, pipe_kwargs: dict) -> dict:
    """The cache key of a probe: base and weights, sampler, precision, both LoRAs, prompt, settings, embedder."""
    pipe, model = fusion.pipe, fusion.family.denoiser_of(fusion.pipe)
    return {
        "v": BETA_KEY_VERSION,
        "family": fusion.family.name,
        "base": str(getattr(pipe, "name_or_path", "")),
        "weights": fusion.fingerprint,
        "scheduler": {"class": type(pipe.scheduler).__name__, **scheduler_settings(pipe.scheduler)},
        "dtype": str(model.dtype),
        "subject": fusion.subject.sha256,
        "style": fusion.style.sha256,
        "prompt": prompt,
        "seed": seed,
        "settings": {k: v for k, v in sorted(pipe_kwargs.items()) if isinstance(v, str | int | float | None)},
        "dino": dino_model,
        "references": {name: getattr(fusion.config, name) for name in REFERENCE_SETTINGS},
    }


def measure_beta(
    fusion: Fusion,
    prompt: str,
    *,
    seed: int = 0,
    dino_model: str | None = None,
    use_cache: bool = True,
    **pipe_kwargs,
) -> BetaProbe:
    """Measure beta for `prompt` and make it the fusion's beta (source "measured").

    `pipe_kwargs` are the final run's pipeline settings (num_inference_steps, guidance_scale, width,
    height, negative_prompt...; callbacks pass through); give fewer steps for a cheaper probe. Set the
    pipeline's scheduler to the run's before calling: the probe renders with it.
    """
    dino_model = dino_model or DEFAULT_DINO
    key = probe_key(fusion, prompt, seed, dino_model, pipe_kwargs)
    beta = discrepancy.cached_beta(key) if use_cache else None
    images = None
    if beta is None:
        images = {}
        for method in ("subject", "style"):
            with fusion.using(method=method):
                generator = torch.Generator("cpu").manual_seed(seed)
                images[method] = fusion.pipe(prompt, generator=generator, **pipe_kwargs).images[0]
        device = fusion.family.denoiser_of(fusion.pipe).device
        embedder = discrepancy.image_embedder(dino_model, device=device)
        beta = discrepancy.style_discrepancy(images["subject"], images["style"], embedder)
        discrepancy.store_beta(key, beta, {"prompt": prompt})
    fusion.set(beta=beta, beta_source="measured")
    return BetaProbe(beta=beta, cached=images is None, images=images, key=key)
