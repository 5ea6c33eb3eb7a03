"""Scores of one projection's update, pure tensor math (no diffusers): energy, L1 norm, top-k sum, gamma.

A LoRA's take the factors and the scale of delta W = s * B @ A, with B (out x rank), A (rank x in) and
s = alpha / rank (or 1 for the research code's unscaled scores). The energy needs only the two
rank x rank Gram matrices; the L1 norm and the top-k sum need the dense delta W, which is built in
row chunks (fp32, a bounded number of elements at a time) and never kept. LoKr and LoHa
(shared/design/method.md, "Other update kinds") have closed forms for the energy, LoKr for the L1
norm too; their top-k sums read row chunks as well. `energy_of`, `l1_of` and `topk_of` take any kind.
"""

from __future__ import annotations

import math

import torch

from .updates import DoraFactors, LokrFactors, LoraFactors, Update

# Dense delta W is built this many elements at a time: 4 MB of fp32, which stays in the CPU's caches
# between the matmul that writes a block, the abs and the sum that read it (2.2 to 2.5x faster than
# 16 MB blocks on FLUX.1's and SDXL's shapes; benchmarks/RESULTS.md, "Plan cost, FLUX.1").
CHUNK_ELEMENTS = 1 << 20


def energy(down: torch.Tensor, up: torch.Tensor, scale: float) -> float:
    """E = ||s B A||_F^2 = s^2 trace((B^T B)(A A^T)), EST-LoRA's E (Zhang & Xiong 2025), from r x r Grams.

    The Grams are fp32 (relative error ~1e-6, like the dense fp32 delta W the research code uses);
    their r x r product is summed in fp64.
    """
    down, up = down.float(), up.float()
    gram_up, gram_down = up.T @ up, down @ down.T
    return scale**2 * float((gram_up * gram_down).sum(dtype=torch.float64))


def _dense_chunks(down: torch.Tensor, up: torch.Tensor, scale: float):
    """Row blocks of |delta W| in fp32, each at most CHUNK_ELEMENTS elements, written into one buffer
    (each block is gone once the next is yielded): a fresh 16 MB allocation per block costs as much
    as the matmul that fills it (page faults), so reusing one made the dense pass 1.7x faster."""
    down = down.float()
    up = up.float() * scale
    rows = max(1, CHUNK_ELEMENTS // max(1, down.shape[1]))
    buffer = torch.empty(min(rows, up.shape[0]), down.shape[1], dtype=torch.float32, device=down.device)
    for start in range(0, up.shape[0], rows):
        block = up[start : start + rows]
        yield torch.matmul(block, down, out=buffer[: block.shape[0]]).abs_()


def l1_norm(down: torch.Tensor, up: torch.Tensor, scale: float) -> float:
    """||s B A||_1, the sum of absolute entries (K-LoRA's gamma uses its ratio)."""
    # fp32 sums within a chunk (torch sums pairwise; an fp64 sum here costs 3x the whole pass),
    # exact summation across chunks.
    return math.fsum(float(chunk.sum()) for chunk in _dense_chunks(down, up, scale))


def topk_sum(down: torch.Tensor, up: torch.Tensor, scale: float, k: int) -> float:
    """Sum of the k largest |delta W| entries (K-LoRA's score S, with k = rank_c * rank_s)."""
    return _topk_of_chunks(_dense_chunks(down, up, scale), k)


def _topk_of_chunks(chunks, k: int) -> float:
    """The sum of the k largest entries of row blocks. A running top-k: each chunk contributes only the
    entries above the current k-th largest, so the full top-k runs on a handful of candidates."""
    best = torch.empty(0)
    for chunk in chunks:
        flat = chunk.flatten()
        if best.numel() >= k:
            flat = flat[flat > best[-1]]
        if flat.numel():
            merged = torch.cat([best, flat])
            best = merged.topk(min(k, merged.numel()), sorted=True).values
    return float(best.sum(dtype=torch.float64))


def lokr_energy(w1: torch.Tensor, w2: torch.Tensor, scale: float, rows: slice | None = None) -> float:
    """||s kron(W1, W2)[rows]||_F^2 without forming the product: row a c + b of the product is
    W1[a] (x) W2[b], of squared norm ||W1[a]||^2 ||W2[b]||^2; over all rows, s^2 ||W1||_F^2 ||W2||_F^2."""
    per_row = torch.outer(w1.double().square().sum(1), w2.double().square().sum(1)).flatten()
    return scale**2 * float(per_row[rows or slice(None)].sum())


def lokr_l1(w1: torch.Tensor, w2: torch.Tensor, scale: float, rows: slice | None = None) -> float:
    """||s kron(W1, W2)[rows]||_1, row by row as the energy: |s| ||W1||_1 ||W2||_1 over all rows."""
    per_row = torch.outer(w1.double().abs().sum(1), w2.double().abs().sum(1)).flatten()
    return abs(scale) * float(per_row[rows or slice(None)].sum())


def _kron_chunks(w1: torch.Tensor, w2: torch.Tensor, scale: float, rows: slice | None = None):
    """Row blocks of |s kron(W1, W2)[rows]|: rows of W1 at a time (each gives W2's row count), within
    CHUNK_ELEMENTS where one W1 row allows it."""
    w1, w2 = w1.float().abs() * abs(scale), w2.float().abs()
    first, stop, _ = (rows or slice(None)).indices(w1.shape[0] * w2.shape[0])
    height = w2.shape[0]
    step = max(1, CHUNK_ELEMENTS // max(1, w2.numel() * w1.shape[1]))
    for row in range(first // height, -(-stop // height), step):
        block = torch.kron(w1[row : row + step], w2)
        offset = row * height
        yield block[max(first - offset, 0) : stop - offset]


def loha_factors(
    w1: tuple[torch.Tensor, torch.Tensor], w2: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) with (W1a W1b) * (W2a W2b) = U @ V: the row-wise and column-wise Khatri-Rao products
    U[i,(a,b)] = W1a[i,a] W2a[i,b], V[(a,b),j] = W1b[a,j] W2b[b,j]. A LoHa is a LoRA of rank r1 r2."""
    (a1, b1), (a2, b2) = (_wide(t) for t in w1), (_wide(t) for t in w2)
    return (a1[:, :, None] * a2[:, None, :]).flatten(1), (b1[:, None, :] * b2[None, :, :]).flatten(0, 1)


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """fp32 at least: half-precision factors multiplied in fp32, fp64 ones kept."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def loha_energy(w1: tuple[torch.Tensor, torch.Tensor], w2: tuple[torch.Tensor, torch.Tensor], scale: float) -> float:
    """||s (W1a W1b) * (W2a W2b)||_F^2 = s^2 tr((U^T U)(V V^T)) with U, V the Khatri-Rao factors
    (`loha_factors`), from their (r1 r2)^2 Grams."""
    u, v = loha_factors(w1, w2)
    return scale**2 * float(((u.T @ u) * (v @ v.T)).sum(dtype=torch.float64))


def _loha_chunks(w1: tuple[torch.Tensor, torch.Tensor], w2: tuple[torch.Tensor, torch.Tensor], scale: float):
    """Row blocks of |s (W1a W1b) * (W2a W2b)|, CHUNK_ELEMENTS at a time."""
    (a1, b1), (a2, b2) = (_wide(t) for t in w1), (_wide(t) for t in w2)
    rows = max(1, CHUNK_ELEMENTS // max(1, b1.shape[1]))
    for start in range(0, a1.shape[0], rows):
        yield ((a1[start : start + rows] @ b1) * (a2[start : start + rows] @ b2)).abs_().mul_(abs(scale))


def _dora_chunks(update: DoraFactors, scale: float, signed: bool = False):
    """Row blocks of |W' - W0| for a DoRA at strength 1 (`DoraFactors`), against its bound base W0; the
    norms are per row, so each block needs its own rows only."""
    if update.base is None:
        raise ValueError("a DoRA update's scores need the base weight it runs on (Lora.with_bases)")
    down, up, base = update.down.float(), update.up.float() * scale, update.base.float()
    magnitude = update.magnitude.float()
    eps = torch.finfo(torch.float32).eps if update.convention == "lycoris" else 0.0
    rows = max(1, CHUNK_ELEMENTS // max(1, down.shape[1]))
    for start in range(0, up.shape[0], rows):
        stop = start + rows
        merged = base[start:stop] + up[start:stop] @ down
        rescale = magnitude[start:stop] / (torch.linalg.norm(merged, dim=1) + eps)
        applied = merged * rescale[:, None] - base[start:stop]
        yield applied if signed else applied.abs_()


def dora_delta(update: DoraFactors, scale: float) -> torch.Tensor:
    """W' - W0 of a DoRA at `scale`, dense (fp32): not `scale` times a fixed update, since the norm that
    rescales the magnitude is taken at that scale."""
    return torch.cat(list(_dora_chunks(update, scale, signed=True)))


def energy_of(update: Update, scale: float) -> float:
    """E of any update kind at this scale (a fused LoKr's member: of its rows; a DoRA: of the update it
    applies to its bound base, which has no closed form)."""
    if isinstance(update, DoraFactors):
        return math.fsum(float(chunk.square().sum(dtype=torch.float64)) for chunk in _dora_chunks(update, scale))
    if isinstance(update, LoraFactors):
        return energy(update.down, update.up, scale)
    if isinstance(update, LokrFactors):
        return lokr_energy(*update.matrices(), scale, update.rows)
    return loha_energy(update.w1, update.w2, scale)


def l1_of(update: Update, scale: float) -> float:
    """The L1 norm of any update kind at this scale."""
    if isinstance(update, DoraFactors):
        return math.fsum(float(chunk.sum()) for chunk in _dora_chunks(update, scale))
    if isinstance(update, LoraFactors):
        return l1_norm(update.down, update.up, scale)
    if isinstance(update, LokrFactors):
        return lokr_l1(*update.matrices(), scale, update.rows)
    return math.fsum(float(chunk.sum()) for chunk in _loha_chunks(update.w1, update.w2, scale))


def _chunks_of(update: Update, scale: float):
    if isinstance(update, DoraFactors):
        return _dora_chunks(update, scale)
    if isinstance(update, LoraFactors):
        return _dense_chunks(update.down, update.up, scale)
    if isinstance(update, LokrFactors):
        return _kron_chunks(*update.matrices(), scale, update.rows)
    return _loha_chunks(update.w1, update.w2, scale)


def topk_of(updates: list[Update], scales: list[float], k: int) -> float:
    """The sum of the k largest |delta W| entries over one or more updates (a unit's members) at their scales."""
    return _topk_of_chunks((chunk for u, s in zip(updates, scales, strict=True) for chunk in _chunks_of(u, s)), k)


def dense_of(update: Update) -> torch.Tensor:
    """The update without its scale, dense (fp32; a fused LoKr's member: its rows; a DoRA: W' - W0 at
    its scale, strength 1): what LoHa's routing and static merging apply."""
    if isinstance(update, DoraFactors):
        return dora_delta(update, update.scale) / update.scale
    if isinstance(update, LoraFactors):
        return update.up.float() @ update.down.float()
    if isinstance(update, LokrFactors):
        return torch.kron(*update.matrices())[update.rows or slice(None)]
    (a1, b1), (a2, b2) = (_wide(t) for t in update.w1), (_wide(t) for t in update.w2)
    return (a1 @ b1) * (a2 @ b2)


def gamma_reference(ratios: list[float]) -> float:
    """K-LoRA's gamma: mean of per-projection L1 ratios after dropping those >= 3 x the mean.

    Ratios that are not finite (a style projection with a zero update) carry no balance
    information and are left out before the mean.
    """
    finite = [r for r in ratios if math.isfinite(r)]
    if not finite:
        return 1.0
    mean = math.fsum(finite) / len(finite)
    kept = [r for r in finite if r < 3 * mean]
    return math.fsum(kept) / len(kept) if kept else mean


def gamma_energy(energies_subject: list[float], energies_style: list[float]) -> float:
    """Energy-consistent gamma: sum E_c / sum E_s over the shared projections."""
    total_style = math.fsum(energies_style)
    return math.fsum(energies_subject) / total_style if total_style > 0 else 1.0
