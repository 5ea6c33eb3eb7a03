"""Scores of one LoRA projection, pure tensor math (no diffusers): energy, L1 norm, top-k sum, gamma.

Each takes the factors and the scale of delta W = s * B @ A, with B (out x rank), A (rank x in) and
s = alpha / rank (or 1 for the research code's unscaled scores). The energy needs only the two
rank x rank Gram matrices; the L1 norm and the top-k sum need the dense delta W, which is built in
row chunks (fp32, a bounded number of elements at a time) and never kept.
"""

from __future__ import annotations

import math

import torch

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
    """Sum of the k largest |delta W| entries (K-LoRA's score S, with k = rank_c * rank_s).

    A running top-k: each chunk contributes only the entries above the current k-th largest, so
    the full top-k runs on a handful of candidates instead of on every chunk.
    """
    best = torch.empty(0)
    for chunk in _dense_chunks(down, up, scale):
        flat = chunk.flatten()
        if best.numel() >= k:
            flat = flat[flat > best[-1]]
        if flat.numel():
            merged = torch.cat([best, flat])
            best = merged.topk(min(k, merged.numel()), sorted=True).values
    return float(best.sum(dtype=torch.float64))


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
