"""Each update kind's delta W x, as a routed linear computes it for one LoRA (its scale applied outside).

A LoRA is two thin matmuls in peft's order, so that a plan mirroring a diffusers adapter setting gives
the same bits. A LoKr is applied as the Kronecker product it is, never formed: with x read as a
(b, d) matrix X, kron(W1, W2) x = vec(W1 X W2^T), a (b d c + a b c)-multiply product instead of the
(a c)(b d) of the dense matrix (98% fewer on a 3072-wide linear factored 48 x 64). A LoHa's Hadamard
product has no such shortcut: it is formed once, as LyCORIS forms it, and applied as one matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..scores import dense_of
from ..updates import LokrFactors, LoraFactors, Update


class LoraDelta(nn.Module):
    """B (A x), computed in the base's dtype."""

    def __init__(self, factors: LoraFactors, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("down", factors.down.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("up", factors.up.to(device=device, dtype=dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Contiguous first: peft's LoRA weights require grad, and for such a weight torch folds a
        # non-contiguous input (SDXL's proj_in gets a permuted one) into one matrix, a copy, before the
        # matmul; without it torch takes a batched kernel that sums in another order. A no-op otherwise.
        return F.linear(F.linear(x.to(self.down.dtype).contiguous(), self.down), self.up)


class KronDelta(nn.Module):
    """kron(W1, W2) x as W1 X W2^T; a fused member whose rows are not whole rows of W1 computes the
    whole product and keeps its rows."""

    def __init__(self, update: LokrFactors, device: torch.device, dtype: torch.dtype):
        super().__init__()
        w1, w2 = (w.to(device=device, dtype=dtype) for w in update.matrices())
        self.register_buffer("w1", w1, persistent=False)
        self.register_buffer("w2", w2, persistent=False)
        self.rows = update.rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (a, b), (c, d) = self.w1.shape, self.w2.shape
        lead = x.shape[:-1]
        product = torch.matmul(self.w1, x.to(self.w1.dtype).reshape(*lead, b, d) @ self.w2.T)
        y = product.reshape(*lead, a * c)
        return y if self.rows is None else y[..., self.rows]


class DenseDelta(nn.Module):
    """delta W x with delta W formed once (LoHa)."""

    def __init__(self, update: Update, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", dense_of(update).to(device=device, dtype=dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight)


def delta_module(update: Update, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The module that computes `update`'s delta W x (without its scale) on `device` in `dtype`."""
    kind = {"lora": LoraDelta, "lokr": KronDelta}.get(update.kind, DenseDelta)
    return kind(update, device, dtype)
