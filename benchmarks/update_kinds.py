"""What each update kind costs a routed linear, at FLUX.1's widths: the call of one linear with no
update, with a LoRA, a LoKr (applied as W1 X W2^T), a LoHa (as the LoRA of its Khatri-Rao factors, or
dense) and the LoHa's dense delta W, and the memory each keeps. Interleaved repeats, medians; and the
scores (energy, L1) of each kind, closed form against the dense matrix.

    .venv/bin/python benchmarks/update_kinds.py --repeats 15 [--width 3072] [--tokens 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
from torch import nn

from estlora import scores as S
from estlora.runtime.deltas import DenseDelta, delta_module
from estlora.updates import LohaFactors, LokrFactors, LoraFactors


def updates(width: int, rank: int) -> dict:
    """One update of each kind for a width x width linear, shaped as LyCORIS shapes them (LoKr factor 16:
    W1 16 x 16, W2 decomposed at `rank`; LoHa dim `rank` // 2, so that both have about a LoRA's size)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(shape, generator=g) * 0.05

    inner = width // 16
    half = max(1, rank // 2)
    return {
        "lora": LoraFactors(down=rand(rank, width), up=rand(width, rank), alpha=float(rank)),
        "lokr": LokrFactors(alpha=float(rank), dim=rank, w1=(rand(16, 16),), w2=(rand(inner, rank), rand(rank, inner))),
        "loha": LohaFactors(alpha=float(half), dim=half, w1=(rand(width, half), rand(half, width)),
                            w2=(rand(width, half), rand(half, width))),
    }


def timed(call, x: torch.Tensor) -> float:
    start = time.perf_counter()
    call(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--width", type=int, default=3072)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = nn.Linear(args.width, args.width)
    kinds = updates(args.width, args.rank)
    cpu, dtype = torch.device("cpu"), torch.float32
    deltas = {name: delta_module(u, cpu, dtype, base) for name, u in kinds.items()}
    deltas["loha dense"] = DenseDelta(kinds["loha"], cpu, dtype)
    calls = {"no update": base}
    calls |= {name: (lambda x, d=d: base(x) + d.delta(x) * 0.5) for name, d in deltas.items()}
    x = torch.randn(args.tokens, args.width)
    with torch.no_grad():
        for call in calls.values():  # warm-up
            call(x)
        times = {name: [] for name in calls}
        for _ in range(args.repeats):
            for name in random.sample(list(calls), len(calls)):
                times[name].append(timed(calls[name], x))
        medians = {name: statistics.median(t) for name, t in times.items()}
        memory = {name: sum(b.numel() * b.element_size() for b in d.buffers()) for name, d in deltas.items()}
        score_times = {}
        for name, update in kinds.items():
            start = time.perf_counter()
            closed = (S.energy_of(update, update.scale), S.l1_of(update, update.scale))
            score_times[name] = time.perf_counter() - start
            dense = S.dense_of(update).double() * update.scale
            exact = (float(dense.square().sum()), float(dense.abs().sum()))
            score_times[f"{name} error"] = max(abs(a - b) / b for a, b in zip(closed, exact, strict=True))
    result = {
        "settings": vars(args) | {"threads": torch.get_num_threads()},
        "median_ms": {k: round(v * 1e3, 3) for k, v in medians.items()},
        "ratio_to_no_update": {k: round(v / medians["no update"], 3) for k, v in medians.items()},
        "kept_MiB": {k: round(v / 2**20, 3) for k, v in memory.items()},
        "scores_s_and_relative_error": score_times,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
