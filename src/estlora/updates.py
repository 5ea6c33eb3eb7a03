"""Per-linear updates, the data every later stage works on: a LoRA file becomes one of these per linear.

Data only (torch, nothing else): the loaders fill them, scores and plans read them, routing applies
them. Three update kinds (shared/design/method.md, "Other update kinds"): a LoRA (`LoraFactors`),
LyCORIS' LoKr (`LokrFactors`, a Kronecker product) and LoHa (`LohaFactors`, a Hadamard product of
two low-rank matrices); each says its scale the way the trainer that wrote it applies it.
A projection is any linear of the denoiser that a LoRA touches (shared/design/method.md), named by its
module path in the diffusers model (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace
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

    kind = "lora"
    unit = ""  # a LoRA's fused update splits exactly: every slice is a LoRA of its own


@dataclass(frozen=True)
class _LycorisUpdate:
    """What LoKr and LoHa share: LyCORIS' scale, alpha / dim, dim being the rank of the decomposed
    factors (`lora_dim`); a missing alpha is dim (scale 1)."""

    alpha: float
    dim: int
    unit = ""

    def scale_at(self, weight: float = 1.0) -> float:
        return weight * self.alpha / self.dim

    @property
    def scale(self) -> float:
        return self.scale_at(1.0)

    @property
    def out_features(self) -> int:
        return self.whole_shape[0]

    @property
    def in_features(self) -> int:
        return self.whole_shape[1]

    @property
    def whole_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def rank(self) -> int:
        """The rank bound of delta W (K-LoRA's k multiplies the two LoRAs' ranks)."""
        raise NotImplementedError


def _product(factors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A full matrix, or the product of its two factors (w_a @ w_b), in fp32 at least."""
    full = factors[0] if len(factors) == 1 else factors[0].float() @ factors[1].float()
    return full if full.dtype == torch.float64 else full.float()


def _rank_of(factors: tuple[torch.Tensor, ...]) -> int:
    return min(factors[0].shape) if len(factors) == 1 else factors[0].shape[1]


@dataclass(frozen=True)
class LokrFactors(_LycorisUpdate):
    """One linear's LyCORIS LoKr: delta W = scale * kron(W1, W2), W1 (a x b), W2 (c x d), out = a c,
    in = b d; each W is one full matrix `(W,)` or two factors `(w_a, w_b)`. LyCORIS applies two full
    matrices at scale 1 whatever alpha says.

    A BFL fused projection (FLUX.1's qkv, linear1) holds one update over several diffusers linears.
    Where a member's rows are whole rows of W1 it is a LoKr of its own (W1's rows sliced); where they
    are not, each member holds the whole update, its `rows` and the fused module's name as `unit`, and
    the plan gates the members as one unit.
    """

    w1: tuple[torch.Tensor, ...] = ()
    w2: tuple[torch.Tensor, ...] = ()
    rows: slice | None = None
    unit: str = ""
    kind = "lokr"

    def scale_at(self, weight: float = 1.0) -> float:
        """LyCORIS: alpha / dim when a factor is decomposed; two full matrices are applied as they are."""
        return super().scale_at(weight) if self.decomposed else weight

    @property
    def decomposed(self) -> bool:
        return len(self.w1) == 2 or len(self.w2) == 2

    @property
    def whole_shape(self) -> tuple[int, int]:
        (a, b), (c, d) = self.shape1, self.shape2
        return a * c, b * d

    @property
    def out_features(self) -> int:
        whole = self.whole_shape[0]
        return whole if self.rows is None else len(range(whole)[self.rows])

    @property
    def shape1(self) -> tuple[int, int]:
        return self.w1[0].shape[0], self.w1[-1].shape[1]

    @property
    def shape2(self) -> tuple[int, int]:
        return self.w2[0].shape[0], self.w2[-1].shape[1]

    @property
    def rank(self) -> int:
        return min(_rank_of(self.w1) * _rank_of(self.w2), *self.whole_shape)

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W1 and W2 themselves (fp32; small: their product is the large one)."""
        return _product(self.w1), _product(self.w2)


@dataclass(frozen=True)
class LohaFactors(_LycorisUpdate):
    """One linear's LyCORIS LoHa: delta W = scale * (w1_a @ w1_b) * (w2_a @ w2_b), elementwise."""

    w1: tuple[torch.Tensor, torch.Tensor] = ()
    w2: tuple[torch.Tensor, torch.Tensor] = ()
    kind = "loha"

    @property
    def whole_shape(self) -> tuple[int, int]:
        return self.w1[0].shape[0], self.w1[1].shape[1]

    @property
    def rank(self) -> int:
        return min(self.w1[0].shape[1] * self.w2[0].shape[1], *self.whole_shape)


@dataclass(frozen=True)
class DoraFactors(LoraFactors):
    """One linear's DoRA (Liu et al. 2024, arXiv 2402.09353): W' = m * (W0 + s B A) / ||W0 + s B A||, the
    norm per output row, so the update applied, W' - W0, depends on the base weight W0.

    `convention` says how a strength w other than 1 applies, as the trainer's own code does: "peft"
    renormalises with w in s (peft's DoRA layers, diffusers' `set_adapters`); "lycoris" blends the
    rescaling, W0 + s B A scaled by w (m / (||W0 + s B A|| + eps) - 1) + 1 (LyCORIS, kohya's
    `dora_scale`). At w = 1 they agree (apart from LyCORIS' eps). `base` is W0, bound where a
    model is at hand (`Lora.with_bases`): the scores need it.
    """

    magnitude: torch.Tensor | None = None  # m: (out,)
    convention: str = "peft"
    base: torch.Tensor | None = None
    kind = "dora"


Update = LoraFactors | LokrFactors | LohaFactors | DoraFactors
MERGED_BY_ESTLORA = ("lokr", "loha")  # kinds diffusers' loader cannot merge outside the route


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
    projections: dict[str, Update]
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

    @property
    def kinds(self) -> Counter:
        return Counter(f.kind for f in self.projections.values())

    def units(self) -> dict[str, list[str]]:
        """Fused linears whose update does not split (a FLUX.1 qkv LoKr) -> their members, in row order."""
        found: dict[str, list[str]] = {}
        for module, update in self.projections.items():
            if update.unit:
                found.setdefault(update.unit, []).append(module)
        return {unit: sorted(members, key=lambda m: self.projections[m].rows.start) for unit, members in found.items()}

    def with_bases(self, weight_of) -> Lora:
        """This LoRA with each DoRA projection's base weight W0 bound (`weight_of(module)`); others as they are."""
        bound = {
            name: replace(update, base=weight_of(name)) if update.kind == "dora" else update
            for name, update in self.projections.items()
        }
        return replace(self, projections=bound)

    def unrouted(self, routed: set[str] | frozenset[str]) -> dict[str, torch.Tensor]:
        """The tensors a fusion routing `routed` leaves to the other-weights policy, under the loader's
        names; LoKr and LoHa projections are not among them (`unrouted_updates`: no loader reads them)."""
        left = dict(self.other)
        for module, tensors in self.projection_keys.items():
            if module not in routed and getattr(self.projections.get(module), "kind", "lora") not in MERGED_BY_ESTLORA:
                left.update(tensors)
        return left

    def unrouted_updates(self, routed: set[str] | frozenset[str]) -> dict[str, Update]:
        """The LoKr and LoHa projections a routing `routed` leaves out: merged by estlora itself."""
        return {
            module: update
            for module, update in self.projections.items()
            if module not in routed and update.kind in MERGED_BY_ESTLORA
        }
