"""LyCORIS LoKr and LoHa as files spell them: their part names, the checks on their tensors, and the
`LokrFactors` / `LohaFactors` they become (scales as LyCORIS' own modules apply them).

LyCORIS writes each module's parts under kohya's module names (`lora_unet_...`, its own `lycoris_...`,
ComfyUI's `diffusion_model....`): `lokr_w1` or `lokr_w1_a`/`lokr_w1_b`, `lokr_w2` or
`lokr_w2_a`/`lokr_w2_b`, `lokr_t2` (a Tucker core, convolutions only) and `alpha`; LoHa
`hada_w1_a/b`, `hada_w2_a/b` and `hada_t1/t2`. A `.weight` suffix (peft's spelling) is read as well.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LoraShapeError, LoraValueError
from ..lazy import torch
from ..updates import LohaFactors, LokrFactors

LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
PARTS = LOKR_PARTS + LOHA_PARTS
ROWS, UNIT = "rows", "unit"  # a fused member's rows of the whole update, and the fused module's name


def part_name(part: str) -> str | None:
    """'lokr_w1' or 'lokr_w1.weight' -> 'lokr_w1'; None for any other part."""
    name = part.removesuffix(".weight")
    return name if name in PARTS else None


def kind_of(parts: dict) -> str:
    """'lokr', 'loha' or 'lora' from a module's part names."""
    if any(p in parts for p in LOKR_PARTS):
        return "lokr"
    if any(p in parts for p in LOHA_PARTS):
        return "loha"
    return "lora"


def update_of(path: Path, module: str, parts: dict, alpha: float | None) -> LokrFactors | LohaFactors:
    """The update a module's LyCORIS parts mean, checked; `alpha` None: LyCORIS' dim (scale 1)."""
    kind = kind_of(parts)
    if "lokr_t2" in parts or "hada_t1" in parts or "hada_t2" in parts:
        raise LoraShapeError(path, f"{module}: a Tucker core ({kind} t1/t2) belongs to a convolution, not a linear")
    matrices = {name: _matrix(path, module, name, tensor) for name, tensor in parts.items() if name in PARTS}
    if kind == "loha":
        w1, w2 = (_pair(path, module, matrices, f"hada_{w}") for w in ("w1", "w2"))
        if w1[0].shape[0] != w2[0].shape[0] or w1[1].shape[1] != w2[1].shape[1]:
            raise LoraShapeError(path, f"{module}: LoHa's two products differ in shape")
        dim = w1[1].shape[0]
        update = LohaFactors(alpha=dim if alpha is None else alpha, dim=dim, w1=w1, w2=w2)
    else:
        w1, w2 = (_full_or_pair(path, module, matrices, f"lokr_{w}") for w in ("w1", "w2"))
        # LyCORIS' lora_dim: the rank of the decomposed factor (w1's first), 1 when both are full.
        dim = w1[1].shape[0] if len(w1) == 2 else w2[1].shape[0] if len(w2) == 2 else 1
        update = LokrFactors(alpha=dim if alpha is None else alpha, dim=dim, w1=w1, w2=w2)
    if not all(torch.isfinite(t).all() for t in (*update.w1, *update.w2)):
        raise LoraValueError(path, f"{module}: {kind} factors hold NaN or infinite values")
    return update


def rows_of(parts: dict, rows: slice, unit: str) -> dict:
    """A fused update's member: the parts of rows `rows`. LoHa's rows are rows of w1_a and w2_a, a LoHa
    of its own; LoKr's are, where they span whole rows of W1 (W2's height divides them), W1's rows;
    otherwise the whole update with its rows and unit, gated as one with the other members."""
    if kind_of(parts) == "loha":
        return {**parts, "hada_w1_a": parts["hada_w1_a"][rows], "hada_w2_a": parts["hada_w2_a"][rows]}
    height = (parts["lokr_w2"] if "lokr_w2" in parts else parts["lokr_w2_a"]).shape[0]
    if rows.start % height or rows.stop % height:
        return {**parts, ROWS: rows, UNIT: unit}
    inner = slice(rows.start // height, rows.stop // height)
    if "lokr_w1" in parts:
        return {**parts, "lokr_w1": parts["lokr_w1"][inner]}
    return {**parts, "lokr_w1_a": parts["lokr_w1_a"][inner]}


def rows_count(parts: dict) -> int:
    """The whole update's rows (out features) from its parts, for splitting a fused one."""
    if kind_of(parts) == "loha":
        return parts["hada_w1_a"].shape[0]
    first = (parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"]).shape[0]
    second = (parts["lokr_w2"] if "lokr_w2" in parts else parts["lokr_w2_a"]).shape[0]
    return first * second


def _matrix(path: Path, module: str, name: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.ndim == 4 and tensor.shape[2:] == (1, 1):  # saved as a 1x1 convolution
        tensor = tensor[:, :, 0, 0]
    if tensor.ndim != 2:
        raise LoraShapeError(path, f"{module}: {name} has shape {tuple(tensor.shape)}, expected a matrix")
    if not tensor.is_floating_point():
        raise LoraValueError(path, f"{module}: {name} has dtype {str(tensor.dtype).removeprefix('torch.')}")
    return tensor.float() if tensor.element_size() == 1 else tensor  # fp8: no arithmetic in torch


def _pair(path: Path, module: str, matrices: dict, stem: str) -> tuple[torch.Tensor, torch.Tensor]:
    if f"{stem}_a" not in matrices or f"{stem}_b" not in matrices:
        missing = f"{stem}_a" if f"{stem}_a" not in matrices else f"{stem}_b"
        raise LoraShapeError(path, f"{module}: {missing} missing")
    a, b = matrices[f"{stem}_a"], matrices[f"{stem}_b"]
    if a.shape[1] != b.shape[0]:
        raise LoraShapeError(
            path, f"{module}: rank mismatch, {stem}_a is {tuple(a.shape)} but {stem}_b is {tuple(b.shape)}"
        )
    return a, b


def _full_or_pair(path: Path, module: str, matrices: dict, stem: str) -> tuple[torch.Tensor, ...]:
    if stem in matrices:
        return (matrices[stem],)
    if f"{stem}_a" not in matrices and f"{stem}_b" not in matrices:
        raise LoraShapeError(path, f"{module}: {stem} (or {stem}_a and {stem}_b) missing")
    return _pair(path, module, matrices, stem)
