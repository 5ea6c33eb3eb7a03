"""Merged routing (`fuse(..., merged=True)`, `--merge-weights`): the plan's choice written into each
routed weight at the steps where it changes, so that every step runs at the base model's own speed.

EST-LoRA's plan is known before sampling and a projection changes LoRA a few times per image at most,
so instead of adding B(A x) at every call (the exact default path, `routing.RoutedLinear`), the weight
itself becomes W0 + s_c dW_c + s_s dW_s at a step whose scales differ from those it holds. Each is
computed in fp32 from the base W0 and rounded once to the weight's dtype, as diffusers' `fuse_lora`
rounds, so nothing drifts however many images are rendered; `restore` puts W0 back bit for bit.

On an accelerator the merged weight is formed into the weight in place from a kept copy of W0 (one
copy of the routed weights, on their device): the product is one fast GEMM there, and in-place writes
keep the addresses that CUDA graphs and offload hooks hold. On a CPU, where forming s B A costs more
than the steps of a small image, the merged weights formed are kept (`VARIANTS` per linear: est's two
choices, or LoRA Composite's two passes, while memory allows) and swapped in: the weight's data
becomes the kept tensor, and W0 itself, never written, is swapped back. A change of LoRA then costs
no copy at all, where copying the routed weights in and back cost SDXL's widths about half a second
per image; a weight moved to another device or cast since fusing gets a converted tensor of its own.
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
        # on the host: the merged weights formed are kept and swapped in, so later images form none
        self.swaps = keeps_on_host([linear.weight for linear in linears])
        # W0: on the host the weight's own tensor (swapped out, never written), elsewhere a copy
        self.kept = [linear.weight.detach() if self.swaps else linear.weight.detach().clone() for linear in linears]
        # a DoRA rescales W0: bound to the kept base, not to a weight that holds merged values
        self.updates = [tuple(_on_base(u, kept) for u in pair) for pair, kept in zip(updates, self.kept, strict=True)]
        self.variants: list[dict[tuple[float, float], torch.Tensor]] = [{} for _ in linears]
        self.base_row: list[tuple[float, float]] = [(0.0, 0.0)] * len(linears)
        self.applied = list(self.base_row)
        self.row = self.base_row  # the row last applied: the same row object again is nothing to do
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
                if not self.swaps:
                    if source is not None:  # None: formed into the weight in place
                        targets.append(weight)
                        sources.append(source)
                elif source.device == weight.device and source.dtype == weight.dtype:
                    weight.data = source
                else:  # the model was moved or cast since fusing: a tensor of its own, never one kept here
                    weight.data = source.to(weight.device, weight.dtype, copy=True)
                self.applied[index] = scales
        if targets:
            torch._foreach_copy_(targets, sources)
        self.row = row

    def restore(self) -> None:
        """Every weight back to its base, bit for bit."""
        self.apply(self.base_row)

    def _source(self, index: int, scales: tuple[float, float], weight: torch.Tensor) -> torch.Tensor | None:
        """What `weight` must hold at `scales`: the base, a kept variant, one formed now, or (None,
        on an accelerator) formed into the weight here."""
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
        if not self.swaps:
            weight.copy_(merged)  # rounded once to the weight's dtype
            return None
        formed = merged.to(kept.device, weight.dtype)  # rounded once (merged itself in fp32)
        self._keep(variants, scales, formed)
        return formed

    def _keep(self, variants: dict, scales: tuple[float, float], formed: torch.Tensor) -> None:
        """Keep a merged weight as the variant for `scales`, the least recently used going first,
        while the memory it takes leaves RESERVE of the machine's free."""
        if self.spare is None:
            self.spare = spare_bytes()
        size = formed.numel() * formed.element_size()
        if size >= self.spare:
            return
        if len(variants) >= VARIANTS:
            del variants[next(iter(variants))]
        self.spare -= size
        variants[scales] = formed


def keeps_on_host(weights: list[torch.Tensor]) -> bool:
    """Whether merged weights are kept and swapped in (all on the CPU) rather than formed in place."""
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
