"""Runtime routing: each UNet attention projection applies the plan's weights for the current step.

Mechanism (shared/design/environment.md section 4, "M3"): every projection that either LoRA touches
is replaced by a `RoutedLinear` that owns the original `nn.Linear` and both LoRAs' factors, and
reads its two LoRA scales for this step from one shared `Router`. One forward pre-hook on the UNet asks the
scheduler which denoising step is running and points the router at that step's row of the plan.

Why this one: the per-step work is one list lookup whatever the number of projections (nothing is
written to 560 modules), only the LoRA with a nonzero weight is computed, it depends on no private
peft state, it leaves a user's own peft adapters alone, and removing it puts the very same
`nn.Linear` objects back. Its arithmetic is peft's (`base(x) + B(A(x)) * (w * alpha / r)`, subject
then style), so a plan that mirrors a diffusers adapter setting gives the same bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LoraFactors


class Router:
    """The current step's LoRA scales, one (subject, style) pair per routed projection.

    A scale is the plan weight times alpha / rank, worked out once per plan (not per call).
    """

    def __init__(self, layers: int):
        self.idle = [(0.0, 0.0)] * layers  # outside a pipeline call: the base model alone
        self.row: list = self.idle
        self.rows: list[list] = []
        self.step: int | None = None


class RoutedLinear(nn.Module):
    """A linear projection plus two LoRAs, each applied only when its plan weight is nonzero."""

    def __init__(
        self, base: nn.Linear, index: int, router: Router, subject: LoraFactors | None, style: LoraFactors | None
    ):
        super().__init__()
        self.base = base
        self.index = index
        self.router = router
        device, dtype = base.weight.device, base.weight.dtype
        for name, lora in (("subject", subject), ("style", style)):
            down = None if lora is None else lora.down.to(device=device, dtype=dtype)
            up = None if lora is None else lora.up.to(device=device, dtype=dtype)
            self.register_buffer(f"{name}_down", down, persistent=False)
            self.register_buffer(f"{name}_up", up, persistent=False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # code that inspects attn.to_q.weight (dtype, device) still works
        return self.base.weight

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base(x, *args, **kwargs)
        scale_subject, scale_style = self.router.row[self.index]
        if scale_subject:
            result = result + self._delta(x, self.subject_down, self.subject_up) * scale_subject
        if scale_style:
            result = result + self._delta(x, self.style_down, self.style_up) * scale_style
        return result

    @staticmethod
    def _delta(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x.to(down.dtype), down), up)


def denoising_step(scheduler, timestep) -> tuple[int, int]:
    """(i, N): which of the N scheduled denoising steps this UNet call belongs to.

    Uses the scheduler's own step counter where it has one (no device sync; img2img's skipped
    steps included through its begin index), else finds the timestep in the schedule. Second-order
    schedulers make `order` UNet calls per step.
    """
    steps = scheduler.num_inference_steps
    order = getattr(scheduler, "order", 1)
    index = getattr(scheduler, "step_index", None)
    if index is None:
        value = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        matches = torch.nonzero(scheduler.timesteps.cpu().float() == value)
        index = int(matches[0]) if len(matches) else 0
    return min(index // order, steps - 1), steps
