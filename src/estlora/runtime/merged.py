"""Merged routing (`fuse(..., merged=True)`, `--merge-weights`): the plan's choice written into each
routed weight at the steps where it changes, so that every step runs at the base model's own speed.

EST-LoRA's plan is known before sampling and a projection changes LoRA a few times per image at most,
so instead of adding B(A x) at every call (the exact default path, `routing.RoutedLinear`), the weight
itself becomes W0 + s_c dW_c + s_s dW_s at a step whose scales differ from those it holds. Each is
computed in fp32 from a kept copy of W0 and rounded once to the weight's dtype, as diffusers'
`fuse_lora` rounds, so nothing drifts however many images are rendered; `restore` copies W0 back bit
for bit. The kept copy costs one copy of the routed weights, on their device.
"""

from __future__ import annotations

import torch
from torch import nn

from ..scores import dense_of, dora_delta
from ..updates import DoraFactors, Update


class MergedWeights:
    """The routed linears' weights, each holding the update its current (subject, style) scales ask."""

    def __init__(self, linears: list[nn.Module], updates: list[tuple[Update | None, Update | None]]):
        self.linears, self.updates = linears, updates
        self.kept = [linear.weight.detach().clone() for linear in linears]
        self.base_row: list[tuple[float, float]] = [(0.0, 0.0)] * len(linears)
        self.applied = list(self.base_row)
        self.row = self.base_row  # the row last applied: the same row object again is nothing to do

    @torch.no_grad()
    def apply(self, row: list[tuple[float, float]]) -> None:
        """Make each weight hold `row`'s scales (one (subject, style) pair per linear); only those that
        change are written. Called at every denoiser call: the same step's row again costs one check."""
        if row is self.row:
            return
        for index, scales in enumerate(row):
            if scales != self.applied[index]:
                self._write(index, scales)
        self.row = row

    def restore(self) -> None:
        """Every weight back to its base, bit for bit."""
        self.apply(self.base_row)

    def _write(self, index: int, scales: tuple[float, float]) -> None:
        weight, kept = self.linears[index].weight, self.kept[index]
        if not any(scales):
            weight.copy_(kept)
        else:
            merged = kept.to(weight.device, torch.float32, copy=True)
            for update, scale in zip(self.updates[index], scales, strict=True):
                if scale:
                    merged += applied(update, scale).to(weight.device)
            weight.copy_(merged)  # rounded once to the weight's dtype
        self.applied[index] = scales


def applied(update: Update, scale: float) -> torch.Tensor:
    """What the unfused path adds to the weight at this scale: scale x the update, except a peft DoRA,
    whose magnitude is renormalised at the scale itself (a LyCORIS DoRA blends linearly, as LyCORIS does)."""
    if isinstance(update, DoraFactors) and update.convention == "peft":
        return dora_delta(update, scale)
    return scale * dense_of(update)
