"""Generation speed and memory: no LoRA, one LoRA, direct merge, est, klora, and the research code's way.

Interleaved repeats (every repeat runs every configuration once, in a shuffled order), medians and
ratios against one LoRA, from one run. Models:

    --model tiny        the built-in tiny SDXL (560 projections), CPU, 64 x 64 (default)
    --model sdxl        SDXL's real UNet config with random weights (speed does not depend on the
                        values), fp16, 1024 x 1024, GPU; no network and no weights needed
    --model tiny-flux1  the built-in tiny FLUX.1 (494 linears), CPU, 32 x 32
    --model flux1       FLUX.1-dev's transformer config with random weights, bf16, 1024 x 1024;
                        `--blocks 1,2` keeps FLUX.1's widths with fewer blocks (CPU runs)

Configurations: `none` (base), `single` (subject LoRA via diffusers/peft), `fused` (that LoRA merged
into the weights by diffusers' `fuse_lora`), `merge` (both via `set_adapters`), `est` and `klora`
(estlora routing), `est-merged` (estlora's merged routing, `--merge-weights`: the writes at the plan's
changes and the restore counted in each image's time; an image after the fusion's first, as when a fusion
renders several, so that on a CPU the merged weights it keeps are copied, not formed), `est-merged-first`
(a fusion's first image, every merged weight formed), `research` (a re-creation, for measurement
only, of the research code's way: every projection rebuilds both dense delta W, scores them and
applies the winner densely, on every call, with a global call counter for time).

    .venv/bin/python benchmarks/generation.py --model tiny --repeats 15 --steps 8 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import random
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import estlora
from estlora.families import family_named
from estlora.updates import Lora, LoraFactors

CONFIGS = tuple("none single fused merge est est-merged est-merged-first klora composite research".split())
FUSIONS = ("est", "klora", "est-merged", "est-merged-first", "composite")  # the configurations estlora fuses
PEFT_CONFIGS = {"single", "merge", "fused"}  # the configurations diffusers' own LoRA layers run


def fused_by_estlora(pipe, subject: Lora, style: Lora, config: str):
    """One of FUSIONS on `pipe`: its method (est-merged, est-merged-first: est, merged routing), beta 0.5."""
    method = config.split("-")[0]
    return estlora.fuse(pipe, subject, style, method=method, beta=0.5, merged=config != method)


# The real-shaped models' dtype: fp16 (SDXL) or bf16 (FLUX.1) as on GPUs, fp32 for CPUs.
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FAMILY = {"tiny": "sdxl", "sdxl": "sdxl", "tiny-flux1": "flux1", "flux1": "flux1"}


# ---------------------------------------------------------------- the research code's way (measurement only)


class ResearchCounter:
    calls = 0


class ResearchLinear(nn.Module):
    """Per call: both dense delta W from the factors, their energies, a host-synced choice, a dense apply."""

    def __init__(self, base: nn.Linear, subject: LoraFactors, style: LoraFactors, counter, total_calls: int):
        super().__init__()
        self.base, self.counter, self.total = base, counter, total_calls
        device = base.weight.device
        self.factors = [(f.up.to(device, torch.float32), f.down.to(device, torch.float32)) for f in (subject, style)]

    def forward(self, x, *args, **kwargs):
        self.counter.calls += 1
        p = (self.counter.calls % self.total) / self.total
        (up_c, down_c), (up_s, down_s) = self.factors
        delta_c, delta_s = up_c @ down_c, up_s @ down_s
        use_subject = bool(delta_c.pow(2).sum() > delta_s.pow(2).sum() * (1.5 * p + 0.5))  # host sync
        delta = delta_c if use_subject else delta_s
        return self.base(x, *args, **kwargs) + F.linear(x, delta.to(x.dtype))


def install_research(denoiser, subject: Lora, style: Lora, steps: int):
    counter, originals = ResearchCounter(), {}
    names = list(subject.projections)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = denoiser.get_submodule(parent_name)
        originals[name] = getattr(parent, child)
        wrapped = ResearchLinear(
            originals[name], subject.projections[name], style.projections[name], counter, steps * len(names)
        )
        setattr(parent, child, wrapped)

    def remove():
        for name, module in originals.items():
            parent_name, _, child = name.rpartition(".")
            setattr(denoiser.get_submodule(parent_name), child, module)

    return remove


# ---------------------------------------------------------------- models


def random_lora(shapes, rank: int, seed: int, name: str, dtype: torch.dtype = torch.float32) -> Lora:
    """A LoRA of random factors, stored in `dtype` as a trainer saves them (fp16 files for fp16 models:
    factors in another dtype than the model's would be held twice, as loaded and as cast)."""
    generator = torch.Generator().manual_seed(seed)
    projections = {
        module: LoraFactors(
            (torch.randn(rank, n, generator=generator) / n**0.5).to(dtype),
            (torch.randn(o, rank, generator=generator) * 0.02 * (1 + i % 3)).to(dtype),
            float(rank),
        )
        for i, (module, (o, n)) in enumerate(shapes.items())
    }
    # The cache key for its scores: the same for the same factors, other for another model's shapes.
    fingerprint = hashlib.sha256(json.dumps(sorted(shapes.items())).encode()).hexdigest()[:16]
    stored = "" if dtype == torch.float32 else f"-{str(dtype).removeprefix('torch.')}"
    sha256 = f"bench-{name}-rank{rank}-seed{seed}{stored}-{fingerprint}"
    return Lora(source=name, path=name, layout="random", projections=projections, sha256=sha256)


def peft_state(lora: Lora, prefix: str = "unet") -> dict:
    state = {}
    for module, f in lora.projections.items():
        state[f"{prefix}.{module}.lora_A.weight"] = f.down
        state[f"{prefix}.{module}.lora_B.weight"] = f.up
    return state


def build(
    model: str,
    device: str,
    size: int | None = None,
    dtype: torch.dtype = torch.float16,
    blocks: tuple[int, int] | None = None,
    tokens: int = 512,
):
    """(pipeline, call kwargs) with prompt embeddings prepared, so only denoising is timed.

    `dtype` is the real-shaped model's (fp16 / bf16 as on GPUs; fp32 for CPU runs, where half
    precision matmuls are slow); `blocks` a FLUX.1's double and single block counts."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    if FAMILY[model] == "flux1":
        return build_flux(model, device, size, dtype, blocks, tokens)
    if model == "tiny":
        from estlora.testing.tiny_sdxl import builtin_tiny_sdxl

        pipe = StableDiffusionXLPipeline.from_pretrained(builtin_tiny_sdxl()).to(device)
        embeds = pipe.encode_prompt("a photo of sks dog in szn style", device=device, do_classifier_free_guidance=True)
        size = size or 64
    else:
        from estlora.families.sdxl import SDXL_SCHEDULER_CONFIG, SDXL_UNET_CONFIG

        with torch.device(device):
            unet = UNet2DConditionModel(**SDXL_UNET_CONFIG).to(dtype)
        scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG)
        pipe = StableDiffusionXLPipeline(
            vae=None,
            text_encoder=None,
            text_encoder_2=None,
            tokenizer=None,
            tokenizer_2=None,
            unet=unet,
            scheduler=scheduler,
        )
        pipe.vae_scale_factor = 8
        g = torch.Generator(device).manual_seed(0)
        embeds = (
            torch.randn(1, 77, 2048, generator=g, device=device, dtype=dtype),
            torch.randn(1, 77, 2048, generator=g, device=device, dtype=dtype),
            torch.randn(1, 1280, generator=g, device=device, dtype=dtype),
            torch.randn(1, 1280, generator=g, device=device, dtype=dtype),
        )
        size = size or 1024
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(
        prompt_embeds=embeds[0],
        negative_prompt_embeds=embeds[1],
        pooled_prompt_embeds=embeds[2],
        negative_pooled_prompt_embeds=embeds[3],
        height=size,
        width=size,
        guidance_scale=5.0,
        output_type="latent",
    )
    return pipe, kwargs


def build_flux(
    model: str, device: str, size: int | None, dtype: torch.dtype, blocks: tuple[int, int] | None, tokens: int = 512
):
    """A FluxPipeline with only its transformer: the tiny FLUX.1, or FLUX.1-dev's config with random
    weights and `tokens` random T5 tokens (512, FluxPipeline's default length)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from estlora.families.flux import FLUX_DEV_SCHEDULER_CONFIG, FLUX_DEV_TRANSFORMER_CONFIG

    if model == "tiny-flux1":
        from estlora.testing.tiny_flux import builtin_tiny_flux

        pipe = FluxPipeline.from_pretrained(builtin_tiny_flux()).to(device)
        prompt, pooled, _ = pipe.encode_prompt("a photo of sks dog", None, device=device, max_sequence_length=64)
        size = size or 32
    else:
        config = dict(FLUX_DEV_TRANSFORMER_CONFIG)
        if blocks:
            config |= {"num_layers": blocks[0], "num_single_layers": blocks[1]}
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built in its dtype: 12 B parameters never held in fp32
        try:
            with torch.device(device):
                transformer = FluxTransformer2DModel(**config)
        finally:
            torch.set_default_dtype(default)
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER_CONFIG),
            vae=None,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            transformer=transformer,
        )
        g = torch.Generator(device).manual_seed(0)
        prompt = torch.randn(1, tokens, 4096, generator=g, device=device, dtype=dtype)
        pooled = torch.randn(1, 768, generator=g, device=device, dtype=dtype)
        size = size or 1024
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt_embeds=prompt, pooled_prompt_embeds=pooled, height=size, width=size, output_type="latent")
    return pipe, kwargs | {"guidance_scale": 3.5}


def model_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options every benchmark shares: which model, where, how many steps, which LoRA ranks."""
    parser.add_argument("--model", choices=list(FAMILY), default="tiny")
    parser.add_argument("--blocks", help="flux1: double,single block counts (default FLUX.1's 19,38)")
    parser.add_argument("--tokens", type=int, default=512, help="flux1: prompt tokens (default 512)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--ranks", default="8,64", help="subject,style LoRA ranks")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, help="image size (default 64 tiny, 1024 sdxl); small for smoke tests")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp16", help="the real-shaped model's (default fp16)")
    return parser


def blocks_of(args: argparse.Namespace) -> tuple[int, int] | None:
    return tuple(int(n) for n in args.blocks.split(",")) if args.blocks else None


def timed_run(pipe, kwargs: dict, steps: int, device: str) -> float:
    """Seconds for one generation from seed 0, the GPU's queue drained before and after."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    pipe(num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(0), **kwargs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = model_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--json", help="write the results here (also after every repeat)")
    parser.add_argument(
        "--max-seconds", type=float, help="start no repeat that would end past this many seconds from launch"
    )
    args = parser.parse_args()
    configs = args.configs.split(",")

    clock = time.perf_counter()

    def log(message: str) -> None:  # progress as it goes: a run cut short by a time limit still says how far it got
        print(f"[{time.perf_counter() - clock:6.1f} s] {message}", flush=True)

    pipe, kwargs = build(args.model, args.device, args.size, DTYPES[args.dtype], blocks_of(args), args.tokens)
    log("model built")
    family = family_named(FAMILY[args.model])
    denoiser = family.denoiser
    shapes = family.linear_shapes(getattr(pipe, denoiser), family.default_route)
    rank_c, rank_s = (int(r) for r in args.ranks.split(","))
    plain = getattr(pipe, denoiser)
    subject = random_lora(shapes, rank_c, 1, "subject", plain.dtype)  # stored as a LoRA for this model is
    style = random_lora(shapes, rank_s, 2, "style", plain.dtype)

    # diffusers/peft adapters live on a copy of the denoiser, so estlora's routing runs on an untouched one
    # (made only when a configuration uses them: at SDXL's widths the copy is 5 GB).
    with_peft = None
    if PEFT_CONFIGS & set(configs):
        with_peft = copy.deepcopy(plain)
        setattr(pipe, denoiser, with_peft)
        pipe.load_lora_weights(peft_state(subject, family.lora_prefix), adapter_name="subject")
        pipe.load_lora_weights(peft_state(style, family.lora_prefix), adapter_name="style")
        setattr(pipe, denoiser, plain)
    log("LoRAs ready")

    hook_seconds = []
    writing = [0.0]  # seconds in MergedWeights.apply during the current image (writes, swaps, restore)
    apply_seconds = {c: [] for c in configs if c.startswith("est-merged")}  # per timed image

    def setup(config: str):
        if config in PEFT_CONFIGS:
            setattr(pipe, denoiser, with_peft)
            pipe.set_adapters(["subject"] if config != "merge" else ["subject", "style"])
            if config == "fused":
                pipe.fuse_lora(adapter_names=["subject"])

                def unfuse():
                    pipe.unfuse_lora()
                    setattr(pipe, denoiser, plain)

                return unfuse
            return lambda: setattr(pipe, denoiser, plain)
        if config in FUSIONS:
            fusion = fused_by_estlora(pipe, subject, style, config)
            real = fusion._on_denoiser_call

            def timed_hook(*a):
                steady = len(fusion.router.rows) == args.steps  # a run's first call also sets the plan's rows
                start = time.perf_counter()
                real(*a)
                if steady:
                    hook_seconds.append(time.perf_counter() - start)

            fusion._hook.remove()
            fusion._hook = plain.register_forward_pre_hook(timed_hook, with_kwargs=True)
            fusion.plan_for(args.steps)  # the plan is per pair, computed before sampling
            weights = fusion.weights
            if weights is None:
                return fusion.remove
            apply = weights.apply

            def timed_apply(row):
                start = time.perf_counter()
                apply(row)
                writing[0] += time.perf_counter() - start

            weights.apply = timed_apply
            if config == "est-merged" and weights.swaps:  # the first image, untimed: it forms the
                run_once()  # merged weights that later ones swap in (on accelerators none are kept)

            def remove():
                fusion.remove()
                del weights.apply  # the wrapper's cycle (weights -> wrapper -> weights) broken at once

            return remove
        if config == "research":
            return install_research(plain, subject, style, args.steps)
        return lambda: None

    def run_once() -> float:
        return timed_run(pipe, kwargs, args.steps, args.device)

    times = {c: [] for c in configs}
    peak = {}
    for c in configs:  # warm-up, and peak memory of each configuration on the GPU
        teardown = setup(c)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        log(f"warm-up {c}: {run_once():.2f} s")
        if args.device.startswith("cuda"):
            peak[c] = torch.cuda.max_memory_allocated() / 2**20
        teardown()
    header = {
        "model": args.model,
        "steps": args.steps,
        "size": kwargs["height"],
        "dtype": str(plain.dtype).removeprefix("torch."),
        "device": args.device,
        "card": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "threads": torch.get_num_threads(),
        "ranks": [rank_c, rank_s],
        "projections": len(shapes),
    }
    for repeat in range(args.repeats):
        started = time.perf_counter()
        for c in random.sample(configs, len(configs)):
            teardown = setup(c)
            writing[0] = 0.0
            times[c].append(run_once())
            if c in apply_seconds:
                apply_seconds[c].append(writing[0])
            teardown()
        untimed = time.perf_counter() - started - sum(times[c][-1] for c in configs)
        log(
            f"repeat {repeat + 1}/{args.repeats}: "
            + ", ".join(f"{c} {times[c][-1]:.2f}" for c in configs)
            + f" (set-up and tear-down {untimed:.2f})"
        )
        if args.json:  # after every repeat: a run cut short still leaves its numbers
            write_json(args.json, summarise(header, times, peak, hook_seconds, apply_seconds))
        left = args.max_seconds - (time.perf_counter() - clock) if args.max_seconds else None
        if left is not None and left < time.perf_counter() - started and repeat + 1 < args.repeats:
            log(f"stopping after {repeat + 1} repeats: the next would pass --max-seconds {args.max_seconds:g}")
            break

    results = summarise(header, times, peak, hook_seconds, apply_seconds)
    print(
        f"model {args.model}, {len(shapes)} projections, ranks {rank_c}/{rank_s}, {args.steps} steps, "
        f"{header['size']} x {header['size']}, {header['dtype']}, device {header['card'] or args.device}, "
        f"{torch.get_num_threads()} threads, {results['repeats']} interleaved repeats"
    )
    print(table(results))
    if args.json:
        write_json(args.json, results)


def summarise(header: dict, times: dict, peak: dict, hook_seconds: list, apply_seconds: dict) -> dict:
    """Medians, minimums and ratios against one LoRA (and est against merge and research), as JSON;
    for the merged rows also the median of the per-repeat ratios (paired, robust to a drifting
    machine) and the seconds per image spent putting merged weights in and W0 back."""
    done = min(len(t) for t in times.values())
    median = {c: statistics.median(t) for c, t in times.items() if t}
    results = {**header, "repeats": done, "configs": {}}
    for c, t in times.items():
        if not t:
            continue
        results["configs"][c] = {
            "median_s": median[c],
            "min_s": min(t),
            "ratio_vs_single": median[c] / median["single"] if "single" in median else None,
            "times_s": t,
            "peak_mib": peak.get(c),
        }
    if "est" in median:
        results["est_vs"] = {c: median["est"] / median[c] for c in ("single", "merge") if c in median}
        if "research" in median:
            results["research_vs_est"] = median["research"] / median["est"]
    for merged in ("est-merged", "est-merged-first"):
        if merged in median and "none" in median:
            key = merged.replace("-", "_")
            results[key + "_vs_none"] = median[merged] / median["none"]
            pairs = zip(times[merged], times["none"], strict=False)
            results[key + "_vs_none_paired"] = statistics.median(m / n for m, n in pairs)
        if apply_seconds.get(merged):
            results[merged.replace("-", "_") + "_apply_s_per_image"] = statistics.median(apply_seconds[merged])
    if "composite" in median and "single" in median:  # two denoiser passes a step: about 2
        results["composite_vs_single"] = median["composite"] / median["single"]
    if hook_seconds:
        results["routing_hook_us_per_unet_call"] = 1e6 * statistics.median(hook_seconds)
    return results


def table(results: dict) -> str:
    peaks = any(r["peak_mib"] for r in results["configs"].values())
    lines = [f"{'config':16} {'median s':>9} {'ms/step':>8} {'vs single':>9} {'min s':>8}" + ("  peak MiB" * peaks)]
    for c, r in results["configs"].items():
        ratio = f"{r['ratio_vs_single']:9.3f}" if r["ratio_vs_single"] else f"{'-':>9}"
        line = f"{c:16} {r['median_s']:9.3f} {1000 * r['median_s'] / results['steps']:8.1f} {ratio} {r['min_s']:8.3f}"
        lines.append(line + (f"  {r['peak_mib']:8.0f}" if peaks else ""))
    for name, value in results.get("est_vs", {}).items():
        lines.append(f"est / {name}: {value:.3f}")
    for key, label in (("est_merged", "est merged"), ("est_merged_first", "est merged, a fusion's first image")):
        if key + "_vs_none" in results:
            paired = results[key + "_vs_none_paired"]
            lines.append(f"{label} / none: {results[key + '_vs_none']:.3f} (paired per repeat {paired:.3f})")
        if key + "_apply_s_per_image" in results:
            spent = 1000 * results[key + "_apply_s_per_image"]
            lines.append(f"{label}: {spent:.1f} ms per image putting weights in and back")
    if "composite_vs_single" in results:
        lines.append(f"composite / single: {results['composite_vs_single']:.3f}")
    if "research_vs_est" in results:
        lines.append(f"research / est: {results['research_vs_est']:.2f}")
    if "routing_hook_us_per_unet_call" in results:
        hook = results["routing_hook_us_per_unet_call"]
        steady = "each run's first call, which sets the plan's rows, left out"
        lines.append(f"routing hook: median {hook:.1f} us per denoiser call ({steady})")
    return "\n".join(lines)


def write_json(path: str, results: dict) -> None:
    with open(path, "w") as out:
        json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
