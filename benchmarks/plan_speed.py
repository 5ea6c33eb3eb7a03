"""Time a fusion plan for a real-size SDXL or FLUX.1 pair, beside the research code's way of scoring.

Real shapes (SDXL: the 560 attention projections of SDXL's UNet config; FLUX.1: the 494 linears of
FLUX.1-dev's blocks, `--family flux1`; no weights needed), random
LoRA factors (speed does not depend on the values). Our way: energies from r x r Grams once, the
reference gamma from one chunked dense pass, then the (steps x projections) plan. The research
code's way: at every step, in every projection, rebuild both dense delta W and take their norms.
One full step of that is measured and multiplied by the step count.

    .venv/bin/python benchmarks/plan_speed.py [--steps 30] [--pairs 8,64 64,64 128,128] [--json out.json]
    .venv/bin/python benchmarks/plan_speed.py --family flux1 --steps 28 --pairs 16,16 --no-topk --no-probe

It also times the beta probe (two renders + DINO) on the tiny SDXL, new and from the cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from estlora import plan as P
from estlora.config import FusionConfig
from estlora.families import family_named
from estlora.families.flux import FLUX_DEV_TRANSFORMER_CONFIG
from estlora.families.sdxl import SDXL_UNET_CONFIG
from estlora.updates import Lora, LoraFactors


def random_lora(shapes, rank: int, seed: int) -> Lora:
    generator = torch.Generator().manual_seed(seed)
    projections = {
        name: LoraFactors(
            torch.randn(rank, n, generator=generator) / n**0.5,
            torch.randn(o, rank, generator=generator) * 0.01,
            float(rank),
        )
        for name, (o, n) in shapes.items()
    }
    return Lora(source=f"rank{rank}", path=f"rank{rank}", layout="random", projections=projections, sha256=str(seed))


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def research_step(subject: Lora, style: Lora) -> None:
    """One denoising step of the research code's scoring: dense delta W and its norm, both LoRAs, everywhere."""
    for name in subject.projections:
        for lora in (subject, style):
            f = lora.projections[name]
            delta = f.up.float() @ f.down.float()
            torch.linalg.matrix_norm(delta) ** 2


def measure_pair(shapes, rank_c: int, rank_s: int, steps: int, repeats: int, topk: bool) -> dict:
    subject, style = random_lora(shapes, rank_c, 1), random_lora(shapes, rank_s, 2)
    config = FusionConfig(method="est", beta=0.5)
    layers = sorted(shapes)  # any fixed order: the plan's cost does not depend on it
    energies_s, _ = timed(lambda: P.pair_scores(subject, style, layers, need_l1=False), repeats)
    scores_s, scores = timed(lambda: P.pair_scores(subject, style, layers), repeats)
    build_s, plan = timed(lambda: P.build_plan(scores, config, steps), repeats)
    assert plan.weights.shape == (steps, len(shapes), 2)
    topk_s = timed(lambda: P.pair_scores(subject, style, layers, need_l1=False, need_topk=True), 1)[0] if topk else None
    step_s, _ = timed(lambda: research_step(subject, style), repeats)
    return {
        "ranks": [rank_c, rank_s],
        "energies_s": energies_s,
        "est_plan_s": scores_s + build_s,
        "est_plan_energy_gamma_s": energies_s + build_s,
        "build_from_cached_scores_s": build_s,
        "klora_topk_scores_s": topk_s,
        "research_one_step_s": step_s,
        "research_per_image_s": step_s * steps,
        "research_over_est_plan": step_s * steps / (scores_s + build_s),
        "research_over_est_plan_cached": step_s * steps / build_s,
    }


def measure_probe(steps: int) -> dict:
    """The beta probe on the tiny SDXL: two renders + DINO when new, a file read when cached."""
    import estlora
    from estlora.loading.base import load_pipeline
    from estlora.testing.tiny_encoders import builtin_tiny_dino
    from estlora.testing.tiny_sdxl import builtin_tiny_sdxl

    pipe = load_pipeline(builtin_tiny_sdxl(), "cpu")
    pipe.set_progress_bar_config(disable=True)
    with estlora.fuse(pipe, "example:subject", "example:style") as fusion:
        kwargs = dict(dino_model=str(builtin_tiny_dino()), num_inference_steps=steps)
        estlora.measure_beta(fusion, "warm-up", **kwargs, use_cache=False)
        cold, _ = timed(lambda: estlora.measure_beta(fusion, "a sks dog in szn style", **kwargs, use_cache=False), 3)
        estlora.measure_beta(fusion, "a sks dog in szn style", **kwargs)  # fills the cache
        warm, _ = timed(lambda: estlora.measure_beta(fusion, "a sks dog in szn style", **kwargs), 3)
    return {"steps": steps, "probe_s": cold, "cached_probe_s": warm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pairs", nargs="+", default=["8,64", "64,64", "128,128"], help="subject,style ranks")
    parser.add_argument("--no-topk", action="store_true", help="skip klora's (slow) top-k scores")
    parser.add_argument("--no-probe", action="store_true", help="skip the beta probe timing")
    parser.add_argument("--family", choices=("sdxl", "flux1"), default="sdxl", help="real shapes of which base")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    family = family_named(args.family)
    config = SDXL_UNET_CONFIG if args.family == "sdxl" else FLUX_DEV_TRANSFORMER_CONFIG
    route = family.default_route
    shapes = {m: shape for m, shape in family.shapes_from_config(config).items() if family.in_route(m, route)}
    elements = sum(o * n for o, n in shapes.values())
    print(
        f"{family.label} shapes (route {route}): {len(shapes)} projections, "
        f"{elements / 1e6:.0f} M delta-W entries per LoRA; {torch.get_num_threads()} threads; "
        f"medians of {args.repeats}; research way at {args.steps} steps"
    )
    header = (
        "ranks",
        "energies",
        "est plan",
        "energy-gamma plan",
        "from cache",
        "klora top-k",
        "research/img",
        "research/plan",
    )
    print("  ".join(f"{h:>12}" for h in header))
    results = {
        "family": family.name,
        "threads": torch.get_num_threads(),
        "projections": len(shapes),
        "dense_elements_per_lora": elements,
        "steps": args.steps,
        "pairs": [],
    }
    for pair in args.pairs:
        rank_c, rank_s = (int(r) for r in pair.split(","))
        r = measure_pair(shapes, rank_c, rank_s, args.steps, args.repeats, not args.no_topk)
        results["pairs"].append(r)
        cells = [
            pair,
            f"{r['energies_s']:.3f} s",
            f"{r['est_plan_s']:.3f} s",
            f"{r['est_plan_energy_gamma_s']:.3f} s",
            f"{1000 * r['build_from_cached_scores_s']:.2f} ms",
            "-" if r["klora_topk_scores_s"] is None else f"{r['klora_topk_scores_s']:.1f} s",
            f"{r['research_per_image_s']:.1f} s",
            f"{r['research_over_est_plan']:.0f}x",
        ]
        print("  ".join(f"{c:>12}" for c in cells))
    if not args.no_probe:
        probe = measure_probe(steps=20)
        results["beta_probe_tiny"] = probe
        print(
            f"beta probe on the tiny SDXL (20 steps, 2 renders + DINO): {probe['probe_s']:.2f} s new, "
            f"{1000 * probe['cached_probe_s']:.1f} ms cached"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
