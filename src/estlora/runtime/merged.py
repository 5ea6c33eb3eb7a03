"""Merged routing (`fuse(..., merged=True)`, `--merge-weights`): the plan's choice written into each
routed weight at the steps where it changes, so that every step runs at the base model's own speed.

EST-LoRA's plan is known before sampling and a projection changes LoRA a few times per image at most,
so instead of adding B(A x) at every call (the exact default path, `routing.RoutedLinear`), the weight
itself becomes W0 + s_c dW_c + s_s dW_s at a step whose scales differ from those it holds. Each is
computed in fp32 from a kept copy of W0 and rounded once to the weight's dtype, as diffusers'
`fuse_lora` rounds, so nothing drifts however many images are rendered; `restore` copies W0 back bit
for bit. The kept copy costs one copy of the routed weights, on their device. Writes go into the
weights' own storage, never swap it: CUDA graphs and offload hooks hold those addresses (swapping
kept tensors in was tried on the CPU and gained nothing measurable: benchmarks/RESULTS.md).

Where memory allows, the merged weights are kept too (`VARIANTS` per linear: est's two choices, or
LoRA Composite's two passes), so that from the second image on a write is a copy, all of a step's
copies in one `torch._foreach_copy_`: on a CPU, forming s B A in fp32 costs more than the steps of a
small image. Only on the CPU: on an accelerator the product is one fast GEMM and its memory is better
spent on activations. Kept variants are what the write would compute, so results do not change.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ..errors import FusionError
from ..scores import dense_of, dora_delta
from ..updates import DoraFactors, Update

VARIANTS = 2  # merged weights kept per linear (least recently used dropped first)
RESERVE = 0.25  # of the machine's memory left free by kept variants
OFFLOADED = (
    "--merge-weights: the base's weights were offloaded (sequential CPU offload) after fusing; "
    "fuse after enabling offload, which routes unfused"
)


class MergedWeights:
    """The routed linears' weights, each holding the update its current (subject, style) scales ask."""

    def __init__(self, linears: list[nn.Module], updates: list[tuple[Update | None, Update | None]]):
        self.linears = linears
        self.kept = [linear.weight.detach().clone() for linear in linears]
        # a DoRA rescales W0: bound to the kept copy, not to a weight that may hold the other LoRA
        self.updates = [tuple(_on_base(u, kept) for u in pair) for pair, kept in zip(updates, self.kept, strict=True)]
        self.variants: list[dict[tuple[float, float], torch.Tensor]] = [{} for _ in linears]
        self.base_row: list[tuple[float, float]] = [(0.0, 0.0)] * len(linears)
        self.applied = list(self.base_row)
        self.row = self.base_row  # the row last applied: the same row object again is nothing to do
        self.keeps_variants = keeps_on_host(self.kept)
        self.spare: int | None = None  # bytes variants may still take, read once per apply that forms one

    @torch.no_grad()
    def apply(self, row: list[tuple[float, float]]) -> None:
        """Make each weight hold `row`'s scales (one (subject, style) pair per linear); only those that
        change are written. Called at every denoiser call: the same step's row again costs one check."""
        if row is self.row:
            return
        self.spare = None
        targets, sources = [], []
        for index, scales in enumerate(row):
            if scales != self.applied[index]:
                weight = self.linears[index].weight
                if weight.is_meta:  # a write there would be lost: the offload hook loads its own copy
                    raise FusionError(None, OFFLOADED)
                source = self._source(index, scales, weight)
                if source is not None:
                    targets.append(weight)
                    sources.append(source)
                self.applied[index] = scales
        if targets:
            torch._foreach_copy_(targets, sources)
        self.row = row

    def restore(self) -> None:
        """Every weight back to its base, bit for bit."""
        self.apply(self.base_row)

    def _source(self, index: int, scales: tuple[float, float], weight: torch.Tensor) -> torch.Tensor | None:
        """What `weight` must hold at `scales`: the kept base, a kept variant, or (None) written here."""
        if not any(scales):
            return self.kept[index]
        variants = self.variants[index]
        if scales in variants:
            variants[scales] = variants.pop(scales)  # most recently used last
            return variants[scales]
        kept = self.kept[index]
        merged = kept.to(weight.device, torch.float32, copy=True)
        for update, scale in zip(self.updates[index], scales, strict=True):
            if scale:
                merged += applied(update, scale).to(weight.device)
        weight.copy_(merged)  # rounded once to the weight's dtype
        if self.keeps_variants:
            self._keep(variants, scales, merged, weight, kept.device)
        return None

    def _keep(self, variants: dict, scales: tuple[float, float], merged, weight, device) -> None:
        """Keep the weight just formed as the variant for `scales`, the least recently used going first,
        while the memory it takes leaves RESERVE of the machine's free."""
        if self.spare is None:
            self.spare = spare_bytes()
        size = weight.numel() * weight.element_size()
        if size >= self.spare:
            return
        if len(variants) >= VARIANTS:
            del variants[next(iter(variants))]
        self.spare -= size
        same = merged.dtype == weight.dtype and merged.device == device
        variants[scales] = merged if same else weight.detach().to(device, copy=True)


def keeps_on_host(weights: list[torch.Tensor]) -> bool:
    """Whether the merged weights formed are kept (the kept copy on the CPU): an accelerator forms
    s B A in one fast GEMM, and its memory is the activations'."""
    return all(weight.device.type == "cpu" for weight in weights)


def _on_base(update: Update | None, kept: torch.Tensor) -> Update | None:
    return replace(update, base=kept) if isinstance(update, DoraFactors) else update


def spare_bytes() -> int:
    """Memory that variants may take and leave RESERVE of the machine's free (Linux's MemAvailable,
    which counts the page cache as free; elsewhere 0: variants are not kept)."""
    try:
        with open("/proc/meminfo") as info:
            fields = dict(line.split(":", 1) for line in info)
        available, total = (int(fields[key].split()[0]) * 1024 for key in ("MemAvailable", "MemTotal"))
    except (OSError, KeyError, ValueError):
        return 0
    return max(0, int(available - RESERVE * total))


def applied(update: Update, scale: float) -> torch.Tensor:
    """What the unfused path adds to the weight at this scale: scale x the update, except a peft DoRA,
    whose magnitude is renormalised at the scale itself (a LyCORIS DoRA blends linearly, as LyCORIS does)."""
    if isinstance(update, DoraFactors) and update.convention == "peft":
        return dora_delta(update, scale)
    return scale * dense_of(update)
