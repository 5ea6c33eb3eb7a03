"""Each update kind's delta W x at a scale, as a routed linear adds it for one LoRA.

A LoRA is two thin matmuls in peft's order, so that a plan mirroring a diffusers adapter setting gives
the same bits; so is a DoRA, whose rescaling of W0 + s B A needs the base output and weight too. A
LoKr is applied as the Kronecker product it is, never formed: with x read as a (b, d) matrix X,
kron(W1, W2) x = vec(W1 X W2^T), a (b d c + a b c)-multiply product instead of the (a c)(b d) of the
dense matrix (96% fewer on a 3072-wide linear with W1 and W2 48 x 48 and 64 x 64). A LoHa is the LoRA
of rank r1 r2 its Khatri-Rao factors make (`scores.loha_factors`), applied as such where that is
smaller than the dense matrix (r1 r2 (out + in) < out in: up to dim 39 on a 3072-wide linear), else
formed once, as LyCORIS forms it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..scores import dense_of, loha_factors
from ..updates import DoraFactors, LohaFactors, LokrFactors, LoraFactors, Update


class Delta(nn.Module):
    """What a routed linear adds for one LoRA: delta W x times the LoRA's scale for this step."""

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, scale) -> torch.Tensor:
        return self.delta(x) * scale

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LoraDelta(Delta):
    """B (A x), computed in the base's dtype."""

    def __init__(self, factors: LoraFactors, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("down", factors.down.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("up", factors.up.to(device=device, dtype=dtype), persistent=False)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        # Contiguous first: peft's LoRA weights require grad, and for such a weight torch folds a
        # non-contiguous input (SDXL's proj_in gets a permuted one) into one matrix, a copy, before the
        # matmul; without it torch takes a batched kernel that sums in another order. A no-op otherwise.
        return F.linear(F.linear(x.to(self.down.dtype).contiguous(), self.down), self.up)


class KronDelta(Delta):
    """kron(W1, W2) x as W1 X W2^T; a fused member whose rows are not whole rows of W1 computes the
    product for the W1 rows its rows touch (found once, here) and keeps its rows of that."""

    def __init__(self, update: LokrFactors, device: torch.device, dtype: torch.dtype):
        super().__init__()
        w1, w2 = (w.to(device=device, dtype=dtype) for w in update.matrices())
        self.rows = update.rows
        if self.rows is not None:
            height = w2.shape[0]
            start, stop, _ = self.rows.indices(w1.shape[0] * height)
            first = start // height
            w1 = w1[first : -(-stop // height)]
            self.rows = slice(start - first * height, stop - first * height)
        self.register_buffer("w1", w1, persistent=False)
        self.register_buffer("w2", w2, persistent=False)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        (a, b), (c, d) = self.w1.shape, self.w2.shape
        lead = x.shape[:-1]
        product = torch.matmul(self.w1, x.to(self.w1.dtype).reshape(*lead, b, d) @ self.w2.T)
        y = product.reshape(*lead, a * c)
        return y if self.rows is None else y[..., self.rows]


class DenseDelta(Delta):
    """delta W x with delta W formed once (a LoHa of high dims)."""

    def __init__(self, update: Update, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", dense_of(update).to(device=device, dtype=dtype), persistent=False)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight)


class DoraDelta(LoraDelta):
    """DoRA: (f - 1) W0 x + f (s B A x), f = m / ||W0 + s B A|| per output row, in peft's DoraLinearLayer
    order of operations (its norm from B (A I), cached per scale: the plan has a few); LyCORIS'
    convention blends f with the strength instead (`DoraFactors`)."""

    def __init__(self, factors: DoraFactors, device: torch.device, dtype: torch.dtype, base: nn.Module):
        super().__init__(factors, device, dtype)
        self.register_buffer("magnitude", factors.magnitude.to(device=device, dtype=dtype), persistent=False)
        self.lycoris = factors.convention == "lycoris"
        self.unit_scale = factors.scale  # LyCORIS rescales at strength 1 and blends: s without the strength
        self._base = (base,)  # not a submodule: the routed linear owns it
        self._norms: dict[float, torch.Tensor] = {}

    def _apply(self, fn, recurse=True):  # a move invalidates the cached norms
        self._norms = {}
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, scale) -> torch.Tensor:
        base = self._base[0]
        s = self.unit_scale if self.lycoris else scale
        key = float(scale) if not torch.is_tensor(scale) else None
        factor = self._norms.get(key) if key is not None else None
        if factor is None:
            eye = torch.eye(self.down.shape[1], device=self.down.device, dtype=self.down.dtype)
            lora_weight = F.linear(F.linear(eye, self.down), self.up).T.to(x.dtype)
            weight = base.weight.to(x.dtype)
            norm = torch.linalg.norm(weight + s * lora_weight, dim=1).to(weight.dtype)
            if self.lycoris:
                norm = norm + torch.finfo(norm.dtype).eps
            factor = (self.magnitude / norm).view(1, -1)
            if self.lycoris:
                factor = (scale / self.unit_scale) * (factor - 1) + 1
            if key is not None:
                self._norms[key] = factor
        base_result = base_out if base.bias is None else base_out - base.bias
        return (factor - 1) * base_result + factor * self.delta(x) * s


def delta_module(update: Update, device: torch.device, dtype: torch.dtype, base: nn.Module) -> Delta:
    """The module that adds `update` to the output of the linear `base`, on `device` in `dtype`."""
    if isinstance(update, DoraFactors):
        return DoraDelta(update, device, dtype, base)
    if isinstance(update, LohaFactors):
        up, down = loha_factors(update.w1, update.w2)
        if down.shape[0] * (up.shape[0] + down.shape[1]) < up.shape[0] * down.shape[1]:
            return LoraDelta(LoraFactors(down=down, up=up, alpha=update.alpha), device, dtype)
        return DenseDelta(update, device, dtype)
    kind = {"lora": LoraDelta, "lokr": KronDelta}[update.kind]
    return kind(update, device, dtype)
