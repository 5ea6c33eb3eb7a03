"""`estlora.fuse`: EST-LoRA (or a baseline) inside a diffusers pipeline the user already has.

    fusion = estlora.fuse(pipe, subject="dog.safetensors", style="watercolor.safetensors", beta=0.6)
    image = pipe("a sks dog in szn style", num_inference_steps=30).images[0]
    fusion.set(method="merge")          # re-plans; the LoRAs are not reloaded
    fusion.remove()                     # the pipeline is exactly as before

Both LoRAs are loaded and checked against the pipeline's UNet once. The plan for a step count is
built (from cached scores) the first time the pipeline runs with that many steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from .lora import Lora, check_against_base, check_pair, load_lora, unet_order
from .other_weights import StaticAdapters
from .plan import FusionConfig, Plan, build_plan, cached_pair_scores
from .routing import RoutedLinear, Router, denoising_step

LoraSource = str | os.PathLike | Lora


def unet_projection_shapes(unet) -> dict[str, tuple[int, int]]:
    """(out, in) of every attention projection of a live UNet (routed or not)."""
    from .lora import ATTENTION_PROJECTION

    return {
        name: (module.out_features, module.in_features)
        for name, module in unet.named_modules()
        if ATTENTION_PROJECTION.search(name) and hasattr(module, "in_features")
    }


def plain_unet(pipe):
    """The pipeline's UNet module itself, also when `torch.compile(pipe.unet)` wrapped it: routing
    swaps its submodules by name, and the wrapper's names carry an `_orig_mod.` prefix."""
    return getattr(pipe.unet, "_orig_mod", pipe.unet)


def unet_fingerprint(unet) -> str:
    """A UNet's identity for cached results: a hash of its first and last convolutions, so two
    checkpoints never share a cached beta, even loaded from one path or with no path at all
    (`from_single_file` pipelines have none)."""
    digest = hashlib.sha256()
    for weight in (unet.conv_in.weight, unet.conv_out.weight):
        digest.update(weight.detach().to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]


def scheduler_settings(scheduler) -> dict:
    """The scheduler's config as plain JSON values (Karras sigmas or not, prediction type, ...)."""
    return {k: v for k, v in sorted(scheduler.config.items()) if not k.startswith("_")}


@dataclass
class BetaProbe:
    """A measured beta, whether it came from the cache, and the two reference renders if made now."""

    beta: float
    cached: bool
    images: dict | None
    key: dict


class Fusion:
    """Two LoRAs routed into one pipeline's UNet by a fusion plan."""

    def __init__(self, pipe, subject: Lora, style: Lora, config: FusionConfig, beta_source: str | None = None):
        if any(isinstance(m, RoutedLinear) for m in plain_unet(pipe).modules()):
            raise ValueError("this pipeline already has an estlora fusion; remove() it (or use Fusion.set) first")
        shapes = unet_projection_shapes(plain_unet(pipe))
        base_name = getattr(pipe, "name_or_path", None) or "the pipeline's UNet"
        for lora in (subject, style):
            check_against_base(lora, shapes, base_name)
        check_pair(subject, style)
        self.pipe, self.subject, self.style = pipe, subject, style
        self.config, self.beta_source = config, beta_source
        self._plans: dict[int, Plan] = {}
        self._scores = None
        self.static: StaticAdapters | None = None  # the LoRAs' weights outside attention, when merged
        self._apply_other_weights(config)
        self.layers = sorted(set(subject.projections) | set(style.projections), key=unet_order)  # = the plan's
        self.router = Router(len(self.layers))
        self._install()

    # ------------------------------------------------------------ plans

    @property
    def scores(self):
        if self._scores is None or not _scores_cover(self._scores, self.config):
            self._scores = cached_pair_scores(self.subject, self.style, self.config)
        return self._scores

    def plan_for(self, steps: int) -> Plan:
        """The plan for a run of `steps` denoising steps (built once per step count and config)."""
        if steps not in self._plans:
            hashes = (self.subject.sha256, self.style.sha256)
            self._plans[steps] = build_plan(self.scores, self.config, steps, hashes, self.beta_source)
        return self._plans[steps]

    def set(self, beta_source: str | None = None, **changes) -> Fusion:
        """Change method, beta, alpha, pattern, strengths...: re-plans, never reloads the LoRAs."""
        config = replace(self.config, **changes)
        self._apply_other_weights(config)
        self.config = config
        if "beta" in changes:
            self.beta_source = beta_source or ("given" if changes["beta"] is not None else None)
        self._reset()
        return self

    def _reset(self) -> None:
        self._plans.clear()
        self.router.set_rows([])

    @contextlib.contextmanager
    def using(self, **changes) -> Iterator[Fusion]:
        """Temporarily another config (e.g. method="subject" for a reference render)."""
        saved = (self.config, self.beta_source)
        self.set(**changes)
        try:
            yield self
        finally:
            self.config, self.beta_source = saved
            self._apply_other_weights(self.config)
            self._reset()

    def _apply_other_weights(self, config: FusionConfig) -> None:
        """Weights outside the attention projections at the config's static strengths (loaded on first use)."""
        subject, style = config.static_weights
        if self.static is None and (subject or style) and (self.subject.other or self.style.other):
            self.static = StaticAdapters(self.pipe, {"subject": self.subject, "style": self.style})
        if self.static is not None:
            self.static.set_weights({"subject": subject, "style": style})

    # ------------------------------------------------------------ beta from style discrepancy

    def measure_beta(
        self, prompt: str, *, seed: int = 0, dino_model: str | None = None, use_cache: bool = True, **pipe_kwargs
    ) -> BetaProbe:
        """EST-LoRA's S: render subject-only and style-only (seed 0, the run's settings), beta = 1 - DINO cos.

        `pipe_kwargs` are the final run's pipeline settings (num_inference_steps, guidance_scale,
        width, height, negative_prompt...); give fewer steps for a cheaper probe. The result is
        cached on disk under (base, both LoRA hashes, prompt, settings, DINO model) and becomes this
        fusion's beta.
        """
        from . import discrepancy

        dino_model = dino_model or discrepancy.DEFAULT_DINO
        key = {
            "v": 2,
            "base": str(getattr(self.pipe, "name_or_path", "")),
            "unet": unet_fingerprint(self.pipe.unet),
            "scheduler": {"class": type(self.pipe.scheduler).__name__, **scheduler_settings(self.pipe.scheduler)},
            "dtype": str(self.pipe.unet.dtype),
            "subject": self.subject.sha256,
            "style": self.style.sha256,
            "prompt": prompt,
            "seed": seed,
            "settings": {k: v for k, v in sorted(pipe_kwargs.items()) if isinstance(v, str | int | float | None)},
            "dino": dino_model,
            "other_weights": self.config.other_weights,
        }
        beta = discrepancy.cached_beta(key) if use_cache else None
        images = None
        if beta is None:
            images = {}
            for method in ("subject", "style"):
                with self.using(method=method):
                    generator = torch.Generator("cpu").manual_seed(seed)
                    images[method] = self.pipe(prompt, generator=generator, **pipe_kwargs).images[0]
            embedder = discrepancy.image_embedder(dino_model, device=self.pipe.unet.device)
            beta = discrepancy.style_discrepancy(images["subject"], images["style"], embedder)
            discrepancy.store_beta(key, beta, {"prompt": prompt})
        self.set(beta=beta, beta_source="measured")
        return BetaProbe(beta=beta, cached=images is None, images=images, key=key)

    # ------------------------------------------------------------ the pipeline side

    def _install(self) -> None:
        unet = plain_unet(self.pipe)
        # Frozen as peft freezes a UNet it loads adapters into (every parameter but its `lora_` ones):
        # on the CPU torch picks another matmul kernel for weights that require grad, so otherwise a
        # fused run could differ from a diffusers LoRA run in the last bits. remove() unfreezes them.
        self._frozen = [p for n, p in unet.named_parameters() if p.requires_grad and "lora_" not in n]
        for parameter in self._frozen:
            parameter.requires_grad_(False)
        self._originals = {}
        for index, name in enumerate(self.layers):
            parent_name, _, child = name.rpartition(".")
            parent = unet.get_submodule(parent_name)
            original = getattr(parent, child)
            self._originals[name] = original
            routed = RoutedLinear(
                original, index, self.router, self.subject.projections.get(name), self.style.projections.get(name)
            )
            setattr(parent, child, routed)
        # Runs as Python even in a compiled UNet: a new step is new data, not a new graph. (Wrapped
        # here, not decorated: the decorator would import torch._dynamo, 0.9 s, with `import estlora`.)
        hook = torch.compiler.disable(self._on_unet_call)
        self._hook = unet.register_forward_pre_hook(hook, with_kwargs=True)

    def _on_unet_call(self, module, args, kwargs) -> None:
        scheduler = self.pipe.scheduler
        sample = kwargs["sample"] if "sample" in kwargs else args[0]
        step = None  # outside a sampling loop: the base model alone
        if getattr(scheduler, "num_inference_steps", None) is not None:
            timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
            step, steps = denoising_step(scheduler, timestep)
            if len(self.router.rows) != steps:
                self.router.set_rows(self.scale_rows(self.plan_for(steps)))
        if step != self.router.step or self.router.scales.device != sample.device:
            self.router.go_to(step, sample.device)

    def scale_rows(self, plan: Plan) -> list[list[tuple[float, float]]]:
        """Per step and projection, (w_c * alpha_c / r_c, w_s * alpha_s / r_s): what each LoRA is multiplied by.

        Worked out in peft's order of operations (`LoraFactors.scale_at`), so results match it bit for bit.
        """
        factors = [(self.subject.projections.get(n), self.style.projections.get(n)) for n in self.layers]
        return [
            [
                (c.scale_at(w_c) if c and w_c else 0.0, s.scale_at(w_s) if s and w_s else 0.0)
                for (w_c, w_s), (c, s) in zip(row, factors, strict=True)
            ]
            for row in plan.weights.tolist()
        ]

    def remove(self) -> None:
        """Put the original projections back and drop the hook: the pipeline is as it was."""
        if self._hook is None:
            return
        self._hook.remove()
        self._hook = None
        unet = plain_unet(self.pipe)
        for name, original in self._originals.items():
            parent_name, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent_name), child, original)
        self._originals = {}
        if self.static is not None:  # first: it puts back the flags it found, some frozen by _install
            self.static.remove()
            self.static = None
        for parameter in self._frozen:
            parameter.requires_grad_(True)
        self._frozen = []

    def __enter__(self) -> Fusion:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _scores_cover(scores, config: FusionConfig) -> bool:
    from .plan import needs

    need = needs(config)
    return (
        scores.raw == config.raw_energy
        and (scores.l1 is not None or not need["need_l1"])
        and (scores.topk is not None or not need["need_topk"])
    )


def fuse(
    pipe, subject: LoraSource, style: LoraSource, method: str = "est", beta: float | None = None, **options
) -> Fusion:
    """Route a subject and a style LoRA into `pipe` (a diffusers SDXL pipeline) by a fusion plan.

    `subject`/`style`: a .safetensors file, a folder holding one, a hub id, or an already loaded
    `estlora.lora.Lora`. `method`: est (default), klora, merge, switch, subject, style. `beta`: the
    time offset; for est, measure it with `estlora.discrepancy` (CLI: `--beta auto`), else K-LoRA's
    0.5 is used. Other options are `FusionConfig` fields (alpha, pattern, gamma_rule, subject_scale,
    style_scale, raw_energy, switch_every, other_weights: "ignore" the LoRAs' weights outside the
    attention projections, as the reference does, or "merge" them statically).
    """
    loras = [s if isinstance(s, Lora) else load_lora(s) for s in (subject, style)]
    config = FusionConfig(method=method, beta=beta, **options)
    return Fusion(pipe, *loras, config, beta_source="given" if beta is not None else None)
