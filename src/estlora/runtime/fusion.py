"""`estlora.fuse`: EST-LoRA (or a baseline) inside a diffusers pipeline the user already has.

    fusion = estlora.fuse(pipe, subject="dog.safetensors", style="watercolor.safetensors", beta=0.6)
    image = pipe("a sks dog in szn style", num_inference_steps=30).images[0]
    fusion.set(method="merge")          # re-plans; the LoRAs are not reloaded
    fusion.remove()                     # the pipeline is exactly as before

The pipeline's model family (`estlora.families`) says which module is the denoiser and which of its
linears the route covers. Both LoRAs are loaded and checked against that denoiser once. The plan for
a step count is built (from cached scores) the first time the pipeline runs with that many steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import weakref
from collections.abc import Iterator
from dataclasses import fields, replace

import torch

from ..config import FusionConfig
from ..errors import BaseModelMismatchError, FusionError
from ..families import ModelFamily, family_named, family_of
from ..loading.lora import check_against_base, check_pair, load_lora
from ..plan import Plan, build_plan
from ..score_cache import cached_pair_scores, covers
from ..updates import Lora
from .merged import MergedWeights, swaps_weights
from .other_weights import StaticAdapters
from .routing import RoutedLinear, Router, denoising_step

LoraSource = str | os.PathLike | Lora
# Denoisers with a fusion installed: merged routing leaves no RoutedLinear behind to tell by.
_FUSED: weakref.WeakKeyDictionary[torch.nn.Module, Fusion] = weakref.WeakKeyDictionary()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A model's identity for cached results and image metadata: every parameter's name, shape,
    dtype and the sum of its bits, read four bytes at a time as integers (addition modulo 2^32 is
    exact and order-free, so the same weights give the same fingerprint on any device and thread
    count; a quantized weight by its stored bytes). Two checkpoints never share a cached beta, even
    loaded from one path or with no path at all (`from_single_file` pipelines have none), and one
    changed weight changes it. One pass over the weights at memory speed and one transfer: about a
    second for SDXL's UNet on two CPU cores (measured 0.7 to 0.9 s in fp32, 1.4 s in fp16, beside
    another job), milliseconds on a GPU. A session takes it once for every pair it fuses."""
    digest = hashlib.sha256()
    sums = []
    for name, parameter in model.named_parameters():
        digest.update(f"{name}{tuple(parameter.shape)}{parameter.dtype};".encode())
        if parameter.is_meta:  # offloaded weights (sequential offload) have no values here
            continue
        # A plain tensor first: quantized weights (diffusers' GGUF parameters) are tensor subclasses.
        raw = parameter.detach().as_subclass(torch.Tensor).contiguous().reshape(-1).view(torch.uint8)
        whole = raw.numel() // 4 * 4
        total = raw[:whole].view(torch.int32).sum(dtype=torch.int32).to(torch.int64)
        sums.append(total + raw[whole:].sum(dtype=torch.int64))
    if sums:
        digest.update(torch.stack([s.to(sums[0].device) for s in sums]).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _with_bases(lora: Lora, model: torch.nn.Module) -> Lora:
    """A LoRA's DoRA projections bound to the weights they rescale (their scores depend on them)."""
    if "dora" not in lora.kinds:
        return lora

    def weight_of(module: str) -> torch.Tensor:
        weight = model.get_submodule(module).weight
        if not weight.is_floating_point() or weight.is_meta:
            raise FusionError(
                lora.path, f"{module}: DoRA rescales the base weight, and this base's is quantized or offloaded"
            )
        return weight.detach()

    return lora.with_bases(weight_of)


class Fusion:
    """Two LoRAs routed into one pipeline's denoiser by a fusion plan."""

    def __init__(
        self,
        pipe,
        subject: Lora,
        style: Lora,
        config: FusionConfig,
        beta_source: str | None = None,
        family: ModelFamily | None = None,
        fingerprint: str | None = None,
        merged: bool = False,
    ):
        self.family = family or family_of(pipe)
        model = self.family.denoiser_of(pipe)
        if model in _FUSED or any(isinstance(m, RoutedLinear) for m in model.modules()):
            raise FusionError(
                None, "this pipeline already has an estlora fusion; remove() it (or use Fusion.set) first"
            )
        shapes = self.family.linear_shapes(model)
        base_name = getattr(pipe, "name_or_path", None) or f"the pipeline's {self.family.denoiser}"
        for lora in (subject, style):
            if lora.family and lora.family != self.family.name:
                label = family_named(lora.family).label
                raise BaseModelMismatchError(lora.path, f"a {label} LoRA, but the pipeline is {self.family.label}")
            check_against_base(lora, shapes, base_name)
        check_pair(subject, style)
        subject, style = (_with_bases(lora, model) for lora in (subject, style))
        self.pipe, self.subject, self.style = pipe, subject, style
        self.config, self.beta_source = self._resolved(config), beta_source
        # Taken before routing renames the model's modules (a session takes it once, for every pair).
        self.fingerprint = fingerprint or weights_fingerprint(model)
        self._plans: dict[int, Plan] = {}
        self._scores = None
        self._hook = None
        self.merge_asked, self.note = merged, ""
        self._install()

    def _resolved(self, config: FusionConfig) -> FusionConfig:
        """The family's route (and klora's pattern) where none is given: the plan and metadata name them."""
        self.asked = config  # what was asked, so that a later method change resolves afresh
        return self.family.resolve_fusion(config)

    # ------------------------------------------------------------ plans

    @property
    def scores(self):
        if self._scores is None or not covers(self._scores, self.config):
            self._scores = cached_pair_scores(self.subject, self.style, self.layers, self.config)
        return self._scores

    def plan_for(self, steps: int) -> Plan:
        """The plan for a run of `steps` denoising steps (built once per step count and config)."""
        if steps not in self._plans:
            hashes = (self.subject.sha256, self.style.sha256)
            self._plans[steps] = build_plan(self.scores, self.config, steps, hashes, self.beta_source)
        return self._plans[steps]

    def set(self, beta_source: str | None = None, **changes) -> Fusion:
        """Change method, beta, alpha, route, strengths...: re-plans (re-routes for a new route), never reloads."""
        config = self._resolved(replace(self.asked, **changes))
        if config.route != self.config.route:
            self._uninstall()
            self.config = config
            self._scores = None
            self._install()
        else:
            self._apply_other_weights(config)
            self.config = config
        if "beta" in changes:
            self.beta_source = beta_source or ("given" if changes["beta"] is not None else None)
        self._reset()
        return self

    def _reset(self) -> None:
        self._plans.clear()
        self.router.set_rows([])
        if self.weights is not None:
            self.weights.restore()

    @contextlib.contextmanager
    def using(self, **changes) -> Iterator[Fusion]:
        """Temporarily another config (e.g. method="subject" for a reference render)."""
        saved = (self.asked, self.beta_source)
        self.set(**changes)
        try:
            yield self
        finally:
            config, beta_source = saved
            self.set(**{item.name: getattr(config, item.name) for item in fields(config)})
            self.beta_source = beta_source

    def _apply_other_weights(self, config: FusionConfig) -> None:
        """Weights outside the routed linears at the config's static strengths (loaded on first use)."""
        subject, style = config.static_weights
        loras = {"subject": self.subject, "style": self.style}
        unrouted = {role: lora.unrouted(self.routed) for role, lora in loras.items()}
        updates = {role: lora.unrouted_updates(self.routed) for role, lora in loras.items()}
        if self.static is None and (subject or style) and any((*unrouted.values(), *updates.values())):
            self.static = StaticAdapters(self.pipe, self.family, loras, unrouted, updates)
        if self.static is not None:
            self.static.set_weights({"subject": subject, "style": style})

    # ------------------------------------------------------------ the pipeline side

    def _install(self) -> None:
        model = self.family.denoiser_of(self.pipe)
        touched = set(self.subject.projections) | set(self.style.projections)
        self.layers = self.family.routed(touched, self.config.route)
        self.routed = frozenset(self.layers)
        self.router = Router(len(self.layers))
        self.static: StaticAdapters | None = None  # the LoRAs' weights outside the route, when merged
        self._originals = {}
        self.weights: MergedWeights | None = None
        # Merged routing writes into the weights (`runtime.merged`). Quantized ones keep the exact path,
        # and so do offloaded ones (sequential offload: on the meta device, each hook loads its own copy).
        weights = [model.get_submodule(name).weight for name in self.layers]
        kept_out = "quantized" if not all(w.dtype.is_floating_point for w in weights) else None
        if kept_out is None and any(w.is_meta for w in weights):
            kept_out = "offloaded (sequential CPU offload)"
        self.merged = self.merge_asked and kept_out is None
        if self.merge_asked and kept_out:
            self.note = f"--merge-weights: the base's weights are {kept_out}; routed unfused"
        # The unfused path freezes the base as peft freezes a model it loads adapters into (every
        # parameter but its `lora_` ones): on the CPU torch picks another matmul kernel for weights that
        # require grad, so otherwise it could differ from a diffusers LoRA run in the last bits. Merged
        # weights run the base's own kernels, as the base runs them (frozen, it was 1-1.7 % slower at
        # SDXL's widths in bf16). remove() unfreezes them.
        frozen = () if self.merged else model.named_parameters()
        self._frozen = [p for n, p in frozen if p.requires_grad and "lora_" not in n]
        for parameter in self._frozen:
            parameter.requires_grad_(False)
        if self.merged:
            linears = [model.get_submodule(name) for name in self.layers]
            updates = [(self.subject.projections.get(n), self.style.projections.get(n)) for n in self.layers]
            self.weights = MergedWeights(linears, updates, swaps_weights(model, weights))
        for index, name in enumerate(self.layers if not self.merged else ()):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            original = getattr(parent, child)
            self._originals[name] = original
            routed = RoutedLinear(
                original, index, self.router, self.subject.projections.get(name), self.style.projections.get(name)
            )
            setattr(parent, child, routed)
        parameters = list(inspect.signature(model.forward).parameters)
        argument = self.family.timestep_argument
        self._timestep_at = parameters.index(argument) if argument in parameters else None
        # Runs as Python even in a compiled model: a new step is new data, not a new graph. (Wrapped
        # here, not decorated: the decorator would import torch._dynamo, 0.9 s, with `import estlora`.)
        hook = torch.compiler.disable(self._on_denoiser_call)
        self._hook = model.register_forward_pre_hook(hook, with_kwargs=True)
        after = torch.compiler.disable(self._after_denoiser_call)
        self._after = model.register_forward_hook(after, with_kwargs=True)
        _FUSED[model] = self
        try:
            self._apply_other_weights(self.config)
        except BaseException:  # diffusers could not load them: the pipeline is left as it was
            self._uninstall()
            raise

    def _timestep(self, args: tuple, kwargs: dict):
        name, at = self.family.timestep_argument, self._timestep_at
        if name in kwargs:
            return kwargs[name]
        return args[at] if at is not None and at < len(args) else None

    def _on_denoiser_call(self, module, args, kwargs) -> None:
        scheduler = self.pipe.scheduler
        step = None  # outside a sampling run: the base model alone
        if getattr(scheduler, "num_inference_steps", None) is not None:
            step, steps = denoising_step(scheduler, lambda: self._timestep(args, kwargs))
            if step is not None and len(self.router.rows) != steps:
                self.router.set_rows(*self.pass_rows(self.plan_for(steps)))
        device = next((v.device for v in (*args, *kwargs.values()) if torch.is_tensor(v)), self.router.scales.device)
        if step != self.router.step or self.router.scales.device != device:
            self.router.go_to(step, device)
        if self.weights is not None:  # every call: a second-order step's second call finds it restored
            self.weights.apply(self.router.row)

    def _after_denoiser_call(self, module, args, kwargs, output):
        """LoRA Composite: the call's other passes, each LoRA alone, and their outputs averaged. Merged
        routing: after a run's last step the base weights are back (the VAE and the next run see the
        base model)."""
        step = self.router.step
        if step is not None and len(self.router.passes) > 1:
            outputs = [output]
            for index in range(1, len(self.router.passes)):
                self._enter_pass(index)
                outputs.append(module.forward(*args, **kwargs))  # not the call: this hook is not run again
            self._enter_pass(0)
            output = mean_output(outputs)
        if self.weights is not None and step is not None and step == len(self.router.rows) - 1:
            self.weights.restore()
        return output

    def _enter_pass(self, index: int) -> None:
        self.router.select(index)
        if self.weights is not None:
            self.weights.apply(self.router.row)

    def pass_rows(self, plan: Plan) -> list[list[list[tuple[float, float]]]]:
        """The router's rows per pass: one set, or for LoRA Composite each LoRA's scales in a pass of its own.
        (Weights outside the route, with other_weights merge, stay merged in both passes.)"""
        rows = self.scale_rows(plan)
        if not plan.config.separate_passes:
            return [rows]
        return [[[(c, 0.0) for c, _ in row] for row in rows], [[(0.0, s) for _, s in row] for row in rows]]

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

    def _uninstall(self) -> None:
        _FUSED.pop(self.family.denoiser_of(self.pipe), None)
        self._hook.remove()
        self._hook = None
        self._after.remove()
        self._after = None
        if self.weights is not None:
            self.weights.release()
            self.weights = None
        model = self.family.denoiser_of(self.pipe)
        for name, original in self._originals.items():
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, original)
        self._originals = {}
        if self.static is not None:  # first: it puts back the flags it found, some frozen by _install
            self.static.remove()
            self.static = None
        for parameter in self._frozen:
            parameter.requires_grad_(True)
        self._frozen = []

    def to_base(self) -> None:
        """Merged routing: the base weights back now. A run stopped between steps (an error, the UI's
        Stop) never reaches the last step's restore, and whatever reads the weights next (a save, a
        diffusers `fuse_lora`, a state dict) must find the base. Nothing to do otherwise."""
        if self.weights is not None:
            self.weights.restore()

    def remove(self) -> None:
        """Put the original linears back and drop the hook: the pipeline is as it was."""
        if self._hook is not None:
            self._uninstall()

    def __enter__(self) -> Fusion:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def mean_output(outputs: list):
    """The average of a denoiser's outputs (a tensor, a tuple whose first item is the prediction, or a
    diffusers output with `sample`), summed in pass order, then divided: what LoRA Composite's
    reference computes. Guidance is linear, so averaging both guidance branches here is averaging each
    LoRA's guided prediction (Zhong et al. 2024, eq. 4)."""
    first = outputs[0]
    if torch.is_tensor(first):
        return sum(outputs[1:], first) / len(outputs)
    if isinstance(first, tuple):
        return (sum((o[0] for o in outputs[1:]), first[0]) / len(outputs), *first[1:])
    first.sample = sum((o.sample for o in outputs[1:]), first.sample) / len(outputs)
    return first


def fuse(
    pipe,
    subject: LoraSource,
    style: LoraSource,
    method: str = "est",
    beta: float | None = None,
    merged: bool = False,
    **options,
) -> Fusion:
    """Route a subject and a style LoRA into `pipe` (a diffusers pipeline of a family estlora serves) by a plan.

    `subject`/`style`: a .safetensors file, a folder holding one, a hub id, or an already loaded
    `estlora.updates.Lora`. `method`: est (default), klora, merge, switch, subject, style. `beta`: the
    time offset; for est, measure it with `estlora.beta.measure_beta` (CLI: `--beta auto`), else
    K-LoRA's 0.5 is used. Other options are `FusionConfig` fields (route, alpha, pattern, gamma_rule,
    subject_scale, style_scale, raw_energy, switch_every, other_weights: "ignore" the LoRAs' weights
    outside the routed linears, as the reference does, or "merge" them statically). `merged`: write
    the plan's choice into the weights at the steps where it changes (`estlora.runtime.merged`: the base
    model's speed, rounding as diffusers' `fuse_lora`) instead of the exact unfused path.
    """
    family = family_of(pipe)
    loras = [s if isinstance(s, Lora) else load_lora(s, family=family) for s in (subject, style)]
    config = FusionConfig(method=method, beta=beta, **options)
    beta_source = "given" if beta is not None else None
    return Fusion(pipe, *loras, config, beta_source=beta_source, family=family, merged=merged)
