"""Runtime routing: each routed linear of the denoiser applies the plan's weights for the current step.

Mechanism (shared/design/environment.md section 4, "M3"): every routed linear that either LoRA touches
is replaced by a `RoutedLinear` that owns the original `nn.Linear` and both LoRAs' factors, and
reads its two LoRA scales for this step from one shared `Router`. One forward pre-hook on the denoiser
asks the scheduler which denoising step is running and points the router at that step's row of the plan.

Why this one: the per-step work is one list lookup whatever the number of projections (nothing is
written to 560 modules), only the LoRA with a nonzero weight is computed, it depends on no private
peft state, it leaves a user's own peft adapters alone, and removing it puts the very same
`nn.Linear` objects back. Its arithmetic is peft's (`base(x) + B(A(x)) * (w * alpha / r)`, subject
then style), so a plan that mirrors a diffusers adapter setting gives the same bits.

Under `torch.compile` the scales come from a tensor instead (`Router.scales`, overwritten in place
each step): Python floats would be baked into the graph and every new row would recompile the model.
There both LoRAs are computed, the unused one times zero, which costs what a two-LoRA merge costs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..updates import Update
from .deltas import delta_module


class Router:
    """The current step's LoRA scales, one (subject, style) pair per routed projection.

    A scale is the plan weight times alpha / rank, worked out once per plan (not per call). `row`
    holds them as floats for eager runs; `scales` as a (projections, 2) tensor for compiled ones.
    A plan whose LoRAs run in passes of their own (LoRA Composite) has one set of rows per pass;
    `select` says which pass the next denoiser call is.
    """

    def __init__(self, layers: int):
        self.idle = [(0.0, 0.0)] * layers  # outside a pipeline call: the base model alone
        self.row: list = self.idle
        self.rows: list[list] = []
        self.step: int | None = None
        self.scales = torch.zeros(layers, 2)
        self.table: torch.Tensor | None = None  # every step's scales, (steps, projections, 2)
        self.passes: list[tuple[list[list], torch.Tensor | None]] = [(self.rows, None)]

    def set_rows(self, *passes: list[list[tuple[float, float]]]) -> None:
        """A new plan's scales, per pass; until the next denoiser call says which step it is, the base alone."""
        device = self.scales.device
        self.passes = [
            (rows, torch.tensor(rows, dtype=torch.float32, device=device) if rows else None) for rows in passes or [[]]
        ]
        (self.rows, self.table), self.step, self.row = self.passes[0], None, self.idle
        self.scales.zero_()

    def select(self, index: int) -> None:
        """Make pass `index`'s rows the current ones, at the current step."""
        step, (self.rows, self.table) = self.step, self.passes[index]
        self.go_to(step, self.scales.device)

    def go_to(self, step: int | None, device: torch.device) -> None:
        """Point at a step's row (None: the base alone). Writes the tensor in place, on the model's
        device, so a compiled model sees the same input every step and nothing waits on the host."""
        if self.scales.device != device:
            self.scales = self.scales.to(device)
            self.passes = [(rows, None if table is None else table.to(device)) for rows, table in self.passes]
            self.table = next(table for rows, table in self.passes if rows is self.rows)
        if step is None:
            self.row = self.idle
            self.scales.zero_()
        else:
            self.row = self.rows[step]
            self.scales.copy_(self.table[step])
        self.step = step


def compute_dtype(linear: nn.Module) -> torch.dtype:
    """The dtype a linear computes in: its weight's, or a quantized linear's compute dtype (diffusers'
    GGUF and bitsandbytes linears keep integer weights and say what they compute in)."""
    dtype = linear.weight.dtype
    return dtype if dtype.is_floating_point else getattr(linear, "compute_dtype", None) or torch.float32


class RoutedLinear(nn.Module):
    """A linear projection plus two LoRAs' updates (any kind, `estlora.runtime.deltas`), each applied
    only when its plan weight is nonzero."""

    def __init__(self, base: nn.Linear, index: int, router: Router, subject: Update | None, style: Update | None):
        super().__init__()
        self.base = base
        self.index = index
        self.router = router
        # Offloaded weights (sequential offload) sit on the meta device until their hook loads them:
        # the updates wait on the CPU and follow the input to the execution device at the first call.
        self.device = base.weight.device if base.weight.device.type != "meta" else torch.device("cpu")
        dtype = compute_dtype(base)
        self.subject = None if subject is None else delta_module(subject, self.device, dtype, base)
        self.style = None if style is None else delta_module(style, self.device, dtype, base)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # code that inspects attn.to_q.weight (dtype, device) still works
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base(x, *args, **kwargs)
        if x.device != self.device:  # offloaded: the weights came to x's device
            self._follow(x.device)
        if torch.compiler.is_compiling():
            return self._compiled_forward(x, result)
        scale_subject, scale_style = self.router.row[self.index]
        base_out = result
        # `forward`, not the module call: the deltas carry no hooks, and the call's dispatch would cost
        # microseconds on each of hundreds of linears per step.
        if scale_subject:
            result = result + self.subject.forward(x, base_out, scale_subject)
        if scale_style:
            result = result + self.style.forward(x, base_out, scale_style)
        return result

    def _follow(self, device: torch.device) -> None:
        for delta in (self.subject, self.style):
            if delta is not None:
                delta.to(device)
        self.device = device

    def _compiled_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        scales = self.router.scales[self.index]
        base_out = result
        if self.subject is not None:
            result = result + self.subject.forward(x, base_out, scales[0])
        if self.style is not None:
            result = result + self.style.forward(x, base_out, scales[1])
        return result


def denoising_step(scheduler, timestep: Callable[[], object]) -> tuple[int | None, int]:
    """(i, N): which of the N scheduled denoising steps this denoiser call belongs to; i is None
    outside a sampling run (the base alone).

    The scheduler's own step counter where it has one (no device sync; img2img's skipped steps
    included through its begin index). Before a run's first `step()` the counter is unset and the
    first step is meant: the begin index, else the timestep found in the schedule, as diffusers'
    `_init_step_index` does; once the counter has passed the last timestep the run is over.
    Schedulers without a counter: the timestep found in the schedule, none found: no run.
    `timestep()` gives the call's timestep, read only when needed. Second-order schedulers make
    `order` calls per step.
    """
    steps = scheduler.num_inference_steps
    order = getattr(scheduler, "order", 1)
    timesteps = scheduler.timesteps
    if hasattr(scheduler, "step_index"):
        index = scheduler.step_index
        if index is None:
            index = getattr(scheduler, "begin_index", None)
        if index is None:
            index = _position(timesteps, timestep()) or 0
        if index >= len(timesteps):
            return None, steps
    else:
        index = _position(timesteps, timestep())
        if index is None:
            return None, steps
    return min(index // order, steps - 1), steps


def _position(timesteps: torch.Tensor, timestep) -> int | None:
    if timestep is None:
        return None
    value = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
    matches = torch.nonzero(timesteps.cpu().float() == value)
    return int(matches[0]) if len(matches) else None
