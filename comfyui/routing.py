"""EST-LoRA's plan inside ComfyUI's own samplers, on ComfyUI's public model-patcher API.

Two pieces, both attached to a clone of the MODEL (nothing of the input model changes):

- a `StepClock` on the model-call wrapper (`WrappersMP.APPLY_MODEL`) says which step of the running
  sampler's schedule (`transformer_options["sample_sigmas"]`) each model call belongs to, and builds
  the plan for that schedule's length on first use;
- a `PlannedWeight` weight function per routed weight (`ModelPatcher.add_weight_wrapper`) adds that
  step's LoRA(s) with ComfyUI's own `comfy.lora.calculate_weight` and rounds as `LoraLoader` does, so
  a plan that picks one LoRA gives bit for bit what `LoraLoader` gives, and every LoRA spelling
  ComfyUI reads applies as ComfyUI applies it. FLUX.1's fused weights (qkv, linear1) get one function
  that adds each slice's own choice.

The step of a call is the interval of the schedule that holds its sigma: sigma_i >= sigma > sigma_i+1
is step i. Midpoint and SDE samplers (dpm_2, dpmpp_sde) call inside the interval: step i, as in
diffusers. Heun's corrector is evaluated at sigma_i+1, so it counts for step i+1, where diffusers'
Heun counts it for step i (a flip at step k then shows one corrector call early).
"""

from __future__ import annotations

from collections.abc import Callable

import comfy.float
import comfy.lora
import comfy.model_patcher
import torch

WRAPPER_KEY = "estlora"  # our model wrapper's key: replaced, never stacked, when the node runs again


class PlanMismatch(ValueError):
    """The sampler runs another number of steps than the node was told to plan."""


class StepClock:
    """Which step of the sampler's schedule the running model call belongs to; the plan's row for it."""

    def __init__(self, plan_for: Callable[[int], torch.Tensor], steps: int = 0):
        self.plan_for = plan_for  # steps -> (steps, projections, 2) weights, built once per length
        self.steps = steps  # 0: as many as the sampler runs
        self.tables: dict[int, list] = {}
        self.row: list | None = None  # [(subject, style)] per projection for the current call; None: no LoRA

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                 **kwargs):
        options = transformer_options if transformer_options is not None else {}
        self.row = self.row_for(options.get("sample_sigmas"), t)
        try:
            return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
        finally:
            self.row = None

    def row_for(self, sigmas: torch.Tensor | None, sigma: torch.Tensor) -> list:
        if sigmas is None:
            raise PlanMismatch("EST-LoRA: the model was called outside a sampler (no schedule to place the call in)")
        steps = len(sigmas) - 1
        if self.steps and steps != self.steps:
            raise PlanMismatch(
                f"EST-LoRA: the plan has {self.steps} steps but the sampler runs {steps}; "
                f"set the Fuse node's steps to {steps}, or to 0 to follow the sampler"
            )
        if steps not in self.tables:  # as Python floats: the weight functions read them without tensor ops
            self.tables[steps] = self.plan_for(steps).tolist()
        return self.tables[steps][step_of(sigmas, sigma)]


def step_of(sigmas: torch.Tensor, sigma: torch.Tensor) -> int:
    """i with sigma_i >= sigma > sigma_i+1 (a relative 1e-4 of slack for sigma_i itself): the step a
    model call at `sigma` belongs to. One sigma per call (CFG's batch shares it)."""
    value = float(sigma.flatten()[0]) if torch.is_tensor(sigma) else float(sigma)
    starts = sigmas[:-1].detach().float().cpu()
    count = int((starts >= value * (1 - 1e-4)).sum())
    return min(max(count - 1, 0), len(starts) - 1)


class PlannedWeight:
    """The weight function of one routed weight: the stored weight plus this step's LoRA(s).

    `members`: (plan row, subject patch, style patch, offset) per projection the weight holds (one; on
    FLUX.1's fused weights, one per slice: disjoint rows, so their order does not change the sum).
    """

    def __init__(self, key: str, members: list[tuple[int, object, object, tuple | None]], clock: StepClock,
                 stored_dtype: torch.dtype):
        self.key, self.members, self.clock, self.stored_dtype = key, members, clock, stored_dtype
        self.seed = comfy.model_patcher.string_to_seed(key)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        row = self.clock.row
        if row is None:
            return weight
        patches = []
        for index, subject, style, offset in self.members:
            for strength, patch in zip(row[index], (subject, style), strict=True):
                if strength and patch is not None:
                    patches.append((strength, patch, 1.0, offset, None))
        if not patches:
            return weight
        # As ModelPatcher.patch_weight_to_device: in fp32, then rounded to the stored dtype with the same seed.
        merged = comfy.lora.calculate_weight(patches, weight.to(torch.float32, copy=True), self.key)
        merged = comfy.float.stochastic_rounding(merged, self.stored_dtype, seed=self.seed)
        return merged.to(weight.dtype)
