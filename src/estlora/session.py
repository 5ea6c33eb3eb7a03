"""One session behind every command: load the base once, check and fuse the LoRAs, measure beta under
the render's own settings, render, save with metadata.

`estlora generate`, `grid`, `demo` and the web UI are shells over this one object, so they agree: the
same settings give the same beta and the same pixels whichever front end asked.

    session = Session.open(ModelConfig(base="toy"))
    request = Request("toy:heart", "toy:outline", "a sks shape in szn style", sampling=SamplingConfig(steps=20))
    prepared = session.configure(request)     # sampler, fusion, beta (measured with that sampler)
    image = session.render(prepared, seed=0)
    session.save(prepared, image, Path("out/heart.png"), seed=0)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .beta import BetaProbe, measure_beta
from .config import DEFAULT_DINO, FusionConfig, ModelConfig, SamplingConfig
from .families import FAMILIES, ModelFamily, family_named, family_of
from .files.sources import resolve_lora_path
from .images import regenerate_command, save_image, slug
from .loading.base import BaseSource, check_fits, describe_base, load_pipeline
from .loading.lora import check_pair, load_lora, load_pair
from .loading.samplers import make_scheduler
from .plan import Plan
from .runtime.fusion import Fusion, weights_fingerprint
from .runtime.other_weights import describe
from .updates import Lora
from .version import __version__

KEPT_LORAS = 4  # loaded LoRAs a session keeps in memory; SDXL ones weigh hundreds of MB each


@dataclass(frozen=True)
class Request:
    """Everything that determines a set of images on a loaded base: the pair, the prompt, the settings."""

    subject: str
    style: str
    prompt: str
    fusion: FusionConfig = field(default_factory=FusionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class Prepared:
    """A request ready to render: its settings with every default filled in, its fusion, and how beta was set."""

    request: Request
    fusion: Fusion
    probe: BetaProbe | None

    @property
    def steps(self) -> int:
        return self.request.sampling.steps

    @property
    def plan(self) -> Plan:
        return self.fusion.plan_for(self.steps)


def file_key(path: Path) -> tuple:
    """A file's identity without reading it: an upload that reuses a name with new bytes is a new file
    (its size or modification time differ), and hashing a 200 MB LoRA at every request would cost seconds."""
    stat = Path(path).stat()
    return str(path), stat.st_size, stat.st_mtime_ns


class Session:
    """A loaded base and the work every command does on it."""

    def __init__(self, pipe, source: BaseSource | None = None, model: ModelConfig | None = None, report=print):
        self.pipe = pipe
        self.family: ModelFamily = family_of(pipe)
        self.source = source
        self.model = model or ModelConfig(base=getattr(pipe, "name_or_path", None) or None)
        self.report: Callable[[str], object] = report
        self.own_scheduler = pipe.scheduler  # samplers are built from the base's own
        self.shapes = self.family.linear_shapes(self.family.denoiser_of(pipe))
        self.fingerprint = weights_fingerprint(self.family.denoiser_of(pipe))  # which weights, whatever the path
        self.label = source.label if source else (self.model.base or f"the pipeline's {self.family.denoiser}")
        self.loras: dict[tuple, Lora] = {}  # by file_key
        self.fusion: Fusion | None = None
        self._console_progress = True

    @property
    def console_progress(self) -> bool:
        """Whether the pipeline draws its tqdm bar on the console (renders and beta probes); a page
        that shows its own progress turns it off."""
        return self._console_progress

    @console_progress.setter
    def console_progress(self, shown: bool) -> None:
        self._console_progress = shown
        self.pipe.set_progress_bar_config(disable=not shown)

    @classmethod
    def open(cls, model: ModelConfig, check: Request | None = None, report=print) -> Session:
        """Load the base once. The LoRAs and settings of `check` are checked against the base's config or
        header first, so bad input fails in a second, before the slow load; a base left unset is the
        LoRAs' family's standard one."""
        loras = list(load_pair(check.subject, check.style, zero_alpha=model.zero_alpha)) if check else []
        family = family_named(loras[0].family) if loras else None
        if family is not None:
            family.check_sampling(check.sampling)
        base = model.base or (family or FAMILIES[0]).default_base
        source = describe_base(base, model.base_config, family)
        check_fits(source, loras)
        if check is not None and source.family is not family:
            source.family.check_sampling(check.sampling)
        pipe = load_pipeline(source, model.device, model.dtype, model.cpu_offload, vae=model.vae)
        session = cls(pipe, source, replace(model, base=base), report)
        for lora in loras:
            session.loras[file_key(lora.path)] = lora
        scheduler = pipe.scheduler.config
        if scheduler.get("prediction_type", "epsilon") != "epsilon":
            zero_snr = " trained to zero terminal SNR" if scheduler.get("rescale_betas_zero_snr") else ""
            report(
                f"base: a {scheduler.prediction_type} model{zero_snr}; {type(pipe.scheduler).__name__} is set for it"
            )
        return session

    # ------------------------------------------------------------ LoRAs and the fusion

    def lora(self, source: str | os.PathLike) -> Lora:
        """A LoRA, loaded once per file content and checked against this base."""
        path = resolve_lora_path(source)
        key = file_key(path)
        if key not in self.loras:
            lora = load_lora(path, self.shapes, self.label, self.family, self.model.zero_alpha)
            if len(self.loras) >= KEPT_LORAS:
                self.loras.pop(next(iter(self.loras)))
            self.loras[key] = lora
        return self.loras[key]

    def fusion_for(self, subject: Lora, style: Lora, config: FusionConfig) -> Fusion:
        """The pair's fusion with `config`, created once; another pair takes its place (one at a time)."""
        if self.fusion is not None and self.fusion.subject is subject and self.fusion.style is style:
            return self.fusion.set(**{item.name: getattr(config, item.name) for item in dataclasses.fields(config)})
        if self.fusion is not None:
            self.fusion.remove()
            self.fusion = None
        check_pair(subject, style)
        source = "given" if config.beta is not None else None
        self.fusion = Fusion(
            self.pipe, subject, style, config, source, self.family, self.fingerprint, merged=self.model.merge_weights
        )
        if self.fusion.note:
            self.report(self.fusion.note)
        return self.fusion

    def close(self) -> None:
        """Take the fusion out of the pipeline: it is the base alone again."""
        if self.fusion is not None:
            self.fusion.remove()
            self.fusion = None

    # ------------------------------------------------------------ a request

    def resolve(self, request: Request) -> Request:
        """The request with every default filled in from the base and its family, as it will run and be recorded."""
        sampling = request.sampling
        preset = self.source.preset if self.source else None
        size = self.family.default_size(self.pipe)
        defaults = {
            "steps": self.family.default_steps,
            "guidance": self.family.default_guidance,
            "width": size,
            "height": size,
            "dino_model": (preset.embedder if preset else None) or DEFAULT_DINO,
            **(preset.sampling if preset else {}),
        }
        filled = {name: value for name, value in defaults.items() if getattr(sampling, name) is None}
        fusion = self.family.resolve_fusion(request.fusion)
        return replace(request, fusion=fusion, sampling=replace(sampling, **filled))

    def configure(self, request: Request, callback=None, use_cache: bool = True) -> Prepared:
        """Everything before the first image: the sampler (set once, here), the pair's fusion with the
        request's settings, and beta, measured for est on auto under that very sampler and settings
        (fewer steps if asked; cached). `callback` sees the probe's denoising steps."""
        request = self.resolve(request)
        sampling = request.sampling
        self.family.check_sampling(sampling)
        self.pipe.scheduler = make_scheduler(
            self.own_scheduler, self.family, sampling.scheduler, sampling.timestep_spacing
        )
        fusion = self.fusion_for(self.lora(request.subject), self.lora(request.style), request.fusion)
        probe = None
        if fusion.config.method == "est" and request.fusion.beta is None:
            kwargs = self.family.call_arguments(sampling, sampling.beta_probe_steps or sampling.steps)
            if callback is not None:
                kwargs["callback_on_step_end"] = callback
            probe = measure_beta(
                fusion, request.prompt, seed=0, dino_model=sampling.dino_model, use_cache=use_cache, **kwargs
            )
        return Prepared(request, fusion, probe)

    def render(self, prepared: Prepared, seed: int, label: str = "", callback=None):
        """One image at `seed` (CPU generator: the same noise on any device). `callback` goes to the
        pipeline as `callback_on_step_end` (a progress display)."""
        if self.fusion is not prepared.fusion:
            raise RuntimeError("render a prepared request on the session that prepared it, before the next configure")
        self.pipe.set_progress_bar_config(desc=label or None, leave=False, disable=not self.console_progress)
        kwargs = self.family.call_arguments(prepared.request.sampling, prepared.steps)
        if callback is not None:
            kwargs["callback_on_step_end"] = callback
        generator = torch.Generator("cpu").manual_seed(seed)
        try:
            return self.pipe(prepared.request.prompt, generator=generator, **kwargs).images[0]
        finally:  # a run stopped mid-way leaves no merged weights behind (after a whole run: nothing to do)
            prepared.fusion.to_base()

    def settings(self, prepared: Prepared, seed: int) -> dict:
        """Every setting of one image, flat, as `estlora generate` takes them (beta as used: no new probe)."""
        request, config = prepared.request, prepared.fusion.config
        plan = prepared.plan
        fusion = {**dataclasses.asdict(config), "beta": plan.beta}
        sampling = {**dataclasses.asdict(request.sampling), "seed": seed, "num_images": 1}
        model = dataclasses.asdict(self.model)
        return {
            "subject": request.subject,
            "style": request.style,
            "prompt": request.prompt,
            **model,
            **fusion,
            **sampling,
        }

    def metadata(self, prepared: Prepared, seed: int, method: str | None = None) -> dict:
        """The settings that regenerate this image bit for bit on the same hardware (with `method`: one of
        the reference renders, made under that method)."""
        import diffusers
        import peft
        import transformers

        fusion = prepared.fusion
        with fusion.using(method=method) if method else contextlib.nullcontext():
            plan, settings = prepared.plan, self.settings(prepared, seed)
        model = self.family.denoiser_of(self.pipe)
        return {
            "estlora": __version__,
            "family": self.family.name,
            "settings": settings,
            "beta": plan.beta,
            "beta_source": plan.beta_source,
            "gamma": plan.gamma,
            "plan_hash": plan.hash(),
            "base_fingerprint": fusion.fingerprint,  # which weights, whatever the base's path
            "subject_sha256": fusion.subject.sha256,
            "style_sha256": fusion.style.sha256,
            "scheduler": type(self.pipe.scheduler).__name__,
            "device": str(model.device) if not self.model.cpu_offload else self.model.device,
            "torch_dtype": str(model.dtype),
            "versions": {
                "torch": torch.__version__,
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
            },
            "command": regenerate_command(settings),
        }

    def save(self, prepared: Prepared, image, path: Path, seed: int, method: str | None = None, extra=None) -> Path:
        meta = self.metadata(prepared, seed, method)
        return save_image(image, path, {**meta, **(extra or {})})

    # ------------------------------------------------------------ the whole story

    def generate(self, request: Request, out: str | os.PathLike) -> list[Path]:
        """`estlora generate`: the pair fused, beta measured (est on auto), `num_images` images saved."""
        prepared = self.configure(request)
        fusion, sampling = prepared.fusion, prepared.request.sampling
        strengths = fusion.config.static_weights
        energies = fusion.scores.energy.sum(dim=0).tolist()
        pair = (("subject", fusion.subject), ("style", fusion.style))
        for (role, lora), strength, energy in zip(pair, strengths, energies, strict=True):
            for note in lora.notes:
                self.report(f"{role} LoRA {note}")
            line = describe(role, self.family, lora.unrouted(fusion.routed), strength, fusion.config.other_weights)
            if line:
                self.report(line)
            if energy == 0:
                self.report(f"warning: the {role} LoRA changes nothing: its update is zero in every routed linear")
        if prepared.probe is not None:
            self.report(
                f"beta = {prepared.probe.beta:.4g} (style discrepancy{', cached' if prepared.probe.cached else ''})"
            )
        paths = []
        for k in range(sampling.num_images):
            seed = sampling.seed + k
            image = self.render(prepared, seed, f"image {k + 1}/{sampling.num_images}")
            path = Path(out) / f"{slug(request.prompt)}-{fusion.config.method}-seed{seed}.png"
            paths.append(self.save(prepared, image, path, seed))
            self.report(f"wrote {path}")
        return paths
