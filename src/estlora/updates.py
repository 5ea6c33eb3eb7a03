"""Per-linear updates, the data every later stage works on: a LoRA file becomes one of these per linear.

Data only (torch, nothing else): the loaders fill them, scores and plans read them, routing applies
them. A projection is any linear of the denoiser that a LoRA touches (shared/design/method.md),
named by its module path in the diffusers model (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class LoraFactors:
    """One projection's LoRA: delta W = scale * up @ down."""

    down: torch.Tensor  # A: (rank, in_features)
    up: torch.Tensor  # B: (out_features, rank)
    alpha: float
    rslora: bool = False  # rank-stabilised LoRA divides alpha by sqrt(rank)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def denominator(self) -> float:
        return math.sqrt(self.rank) if self.rslora else float(self.rank)

    def scale_at(self, weight: float = 1.0) -> float:
        """weight * alpha / denominator, computed in peft's order so that results match it bit for bit."""
        return weight * self.alpha / self.denominator

    @property
    def scale(self) -> float:
        return self.scale_at(1.0)

    @property
    def in_features(self) -> int:
        return self.down.shape[1]

    @property
    def out_features(self) -> int:
        return self.up.shape[0]


@dataclass
class Lora:
    """A loaded LoRA: the factors of every linear it updates that routing can take, plus every other key.

    `projections` covers every linear any route set of the family names (so `--route` can choose later);
    `other` holds the keys outside them under the names diffusers' loader reads, and `projection_keys`
    each projection's own tensors under those names, so that the projections a route leaves out can
    be merged statically (`--other-weights merge`) exactly as diffusers would load them.
    """

    source: str
    path: Path
    layout: str
    projections: dict[str, LoraFactors]
    other: dict[str, torch.Tensor] = field(default_factory=dict)
    sha256: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    family: str = ""  # the model family it was made for ("sdxl"); "" when built in memory
    projection_keys: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # how the file was read where it could be read two ways (alpha 0)

    @property
    def ranks(self) -> Counter:
        return Counter(f.rank for f in self.projections.values())

    @property
    def alphas(self) -> Counter:
        return Counter(f.alpha for f in self.projections.values())

    def unrouted(self, routed: set[str] | frozenset[str]) -> dict[str, torch.Tensor]:
        """The tensors a fusion routing `routed` leaves to the other-weights policy, under the loader's names."""
        left = dict(self.other)
        for module, tensors in self.projection_keys.items():
            if module not in routed:
                left.update(tensors)
        return left
