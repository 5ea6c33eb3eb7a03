"""Time a fusion plan for a real-size SDXL pair, beside the research code's way of scoring.

Real SDXL attention shapes (560 projections, from SDXL's UNet config; no weights needed), random
LoRA factors (speed does not depend on the values). Our way: energies from r x r Grams once, the
reference gamma from one chunked dense pass, then the (steps x projections) plan. The research
code's way: at every step, in every projection, rebuild both dense delta W and take their norms.
One full step of that is measured and multiplied by the step count.

    .venv/bin/python benchmarks/plan_speed.py [--steps 30] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from estlora import plan as P
from estlora.base import SDXL_UNET_CONFIG, projection_shapes
from estlora.lora import Lora, LoraFactors


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ranks", default="8,64", help="subject,style ranks")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    shapes = projection_shapes(SDXL_UNET_CONFIG)
    rank_c, rank_s = (int(r) for r in args.ranks.split(","))
    subject, style = random_lora(shapes, rank_c, 1), random_lora(shapes, rank_s, 2)
    elements = sum(o * n for o, n in shapes.values())
    config = P.FusionConfig(method="est", beta=0.5)

    energies_s, _ = timed(lambda: P.pair_scores(subject, style, need_l1=False), args.repeats)
    scores_s, scores = timed(lambda: P.pair_scores(subject, style), args.repeats)
    build_s, plan = timed(lambda: P.build_plan(scores, config, args.steps), args.repeats)
    topk_s, _ = timed(lambda: P.pair_scores(subject, style, need_l1=False, need_topk=True), 1)
    step_s, _ = timed(lambda: research_step(subject, style), args.repeats)
    research_s = step_s * args.steps

    results = {
        "threads": torch.get_num_threads(),
        "projections": len(shapes),
        "dense_elements_per_lora": elements,
        "ranks": [rank_c, rank_s],
        "steps": args.steps,
        "energies_s": energies_s,
        "est_plan_s": scores_s + build_s,
        "est_plan_energy_gamma_s": energies_s + build_s,
        "build_from_cached_scores_s": build_s,
        "klora_topk_scores_s": topk_s,
        "research_one_step_s": step_s,
        "research_per_image_s": research_s,
        "research_over_est_plan": research_s / (scores_s + build_s),
    }
    rows = [
        ("energies (Gram matrices), both LoRAs", energies_s),
        ("est plan, reference gamma (energies + L1 pass + plan)", scores_s + build_s),
        ("est plan, energy gamma (no dense pass)", energies_s + build_s),
        ("plan from cached scores", build_s),
        ("klora top-k scores (dense pass), both LoRAs", topk_s),
        ("research code's way, one step", step_s),
        (f"research code's way, {args.steps} steps (one image)", research_s),
    ]
    print(
        f"SDXL shapes: {len(shapes)} projections, {elements / 1e6:.0f} M delta-W entries per LoRA; "
        f"ranks {rank_c}/{rank_s}; {torch.get_num_threads()} threads; medians of {args.repeats}"
    )
    for label, seconds in rows:
        print(f"  {label:58} {seconds:9.3f} s")
    print(
        f"  research way / est plan: {results['research_over_est_plan']:.0f}x per image "
        f"(and the plan is computed once per pair, not per image)"
    )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
    assert plan.weights.shape == (args.steps, len(shapes), 2)


if __name__ == "__main__":
    main()
