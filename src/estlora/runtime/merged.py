"""Merged routing (`fuse(..., merged=True)`, `--merge-weights`): the plan's choice put into each
routed weight at the steps where it changes, so that every step runs at the base model's own speed.

EST-LoRA's plan is known before sampling and a projection changes LoRA a few times per image at most,
so instead of adding B(A x) at every call (the exact default path, `routing.RoutedLinear`), the weight
itself becomes W0 + s_c dW_c + s_s dW_s at a step whose scales differ from those it holds. Each is
computed in fp32 from W0 and rounded once to the weight's dtype, as diffusers' `fuse_lora` rounds, so
nothing drifts however many images are rendered, and W0 comes back bit for bit after every call.

Two ways, by where the weights live:
- **On the CPU, swapped** (`swaps`): each merged weight formed is kept (`VARIANTS` per linear: est's
  two choices, or LoRA Composite's two passes, while memory allows) and becomes the weight's data at
  its steps; W0's own tensor, never written, is swapped back after the call. On a CPU forming s B A
  in fp32 costs more than the steps of a small image, and copying the routed weights in and out
  (1.9 GB at SDXL's widths) costs several per cent of an image (benchmarks/RESULTS.md); a swap costs
  nothing.
- **On an accelerator, or under offload hooks, written**: each merged weight is formed (one fast GEMM)
  and copied into the weight's own storage, and W0 copied back from a kept copy on its device. CUDA
  graphs and offload hooks hold those addresses, and the memory variants would take is the
  activations'.
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

    def __init__(self, linears: list[nn.Module], updates: list[tuple[Update | None, Update | None]], swaps: bool):
        self.linears = linears
        self.swaps = swaps
        # W0: swapping never writes its tensor, so that is the kept copy; writing needs a copy of it
        self.kept = [linear.weight.detach() if swaps else linear.weight.detach().clone() for linear in linears]
        # a DoRA rescales W0: bound to the kept copy, not to a weight that may hold the other LoRA
        self.updates = [tuple(_on_base(u, kept) for u in pair) for pair, kept in zip(updates, self.kept, strict=True)]
        self.variants: list[dict[tuple[float, float], torch.Tensor]] = [{} for _ in linears]
        self.base_row: list[tuple[float, float]] = [(0.0, 0.0)] * len(linears)
        self.applied = list(self.base_row)
        self.row = self.base_row  # the row last applied: the same row object again is nothing to do
        self.spare: int | None = None  # bytes variants may still take, read once per apply that forms one

    @torch.no_grad()
    def apply(self, row: list[tuple[float, float]]) -> None:
        """Make each weight hold `row`'s scales (one (subject, style) pair per linear); only those that
        change are touched. Called at every denoiser call: the same step's row again costs one check."""
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
        if self.swaps:
            for weight, source in zip(targets, sources, strict=True):
                weight.data = source
        elif targets:
            torch._foreach_copy_(targets, sources)
        self.row = row

    def restore(self) -> None:
        """Every weight back to its base, bit for bit."""
        self.apply(self.base_row)

    def release(self) -> None:
        """Back to the base and the variants let go: whatever still holds this object (a wrapper, a
        reference cycle awaiting the collector) pins no merged weights, which would otherwise take the
        next fusion's room to keep its own (2 GB at SDXL's widths)."""
        self.restore()
        self.variants = [{} for _ in self.linears]

    def _source(self, index: int, scales: tuple[float, float], weight: torch.Tensor) -> torch.Tensor | None:
        """What `weight` must hold at `scales`: the kept base, a kept variant, a merged weight formed
        here, or (None, writing) nothing: formed straight into the weight."""
        kept = self.kept[index]
        if not any(scales):  # a model cast after fusing gets W0 cast as the cast did
            return kept.to(weight.device, weight.dtype) if self.swaps else kept
        variants = self.variants[index]
        variant = variants.pop(scales, None)
        if variant is not None and (variant.dtype, variant.device) == (weight.dtype, weight.device):
            variants[scales] = variant  # most recently used last
            return variant
        merged = kept.to(weight.device, torch.float32, copy=True)
        for update, scale in zip(self.updates[index], scales, strict=True):
            if scale:
                merged += applied(update, scale).to(weight.device)
        if not self.swaps:
            weight.copy_(merged)  # rounded once to the weight's dtype
            return None
        formed = aligned_as(weight)
        formed.copy_(merged)  # rounded once to the weight's dtype
        self._keep(variants, scales, formed)
        return formed

    def _keep(self, variants: dict, scales: tuple[float, float], formed: torch.Tensor) -> None:
        """Keep a merged weight just formed as the variant for `scales`, the least recently used going
        first, while the memory it takes leaves RESERVE of the machine's free."""
        if self.spare is None:
            self.spare = spare_bytes()
        size = formed.numel() * formed.element_size()
        if size >= self.spare or formed.device.type != "cpu":  # a model moved to an accelerator after fusing
            return
        if len(variants) >= VARIANTS:
            del variants[next(iter(variants))]
        self.spare -= size
        variants[scales] = formed


def swaps_weights(model: nn.Module, weights: list[torch.Tensor]) -> bool:
    """Whether merged weights are swapped in (kept on the CPU) rather than written: every weight on
    the CPU and no offload hook on the model (accelerate's or diffusers' hooks move and hold the
    weights' tensors themselves). An empty diffusers registry is no hook: FLUX's pipeline leaves one on
    its transformer at the first image (`cache_context`), and reading it as offload made every later
    fusion form all its merged weights again at every image."""
    hooked = any(hasattr(m, "_hf_hook") or _holds_hooks(getattr(m, "_diffusers_hook", None)) for m in model.modules())
    return not hooked and all(weight.device.type == "cpu" for weight in weights)


def _holds_hooks(registry: object) -> bool:
    """Whether a diffusers `HookRegistry` (or anything else under its name) may move the weights."""
    return registry is not None and (not isinstance(getattr(registry, "hooks", None), dict) or bool(registry.hooks))


def aligned_as(weight: torch.Tensor) -> torch.Tensor:
    """An empty tensor shaped as `weight` whose data starts as far past a 64-byte boundary as
    `weight`'s: CPU matmul kernels take other paths (and sum in another order) for data at other
    alignments, and a base loaded from safetensors sits at the file's offsets, so a swapped-in weight
    freshly allocated would not compute bit for bit as the same values written in place."""
    size, offset = weight.element_size(), weight.data_ptr() % 64
    if not weight.is_contiguous() or offset % size:
        return torch.empty_like(weight)
    room = torch.empty(weight.numel() + 64 // size, dtype=weight.dtype, device=weight.device)
    start = (offset - room.data_ptr() % 64) % 64 // size
    return room[start : start + weight.numel()].view(weight.shape)


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
