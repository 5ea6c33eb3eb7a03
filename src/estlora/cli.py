"""`estlora` command line: a thin shell over the library. Bad input -> one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys

# Quiet the import-time chatter of transformers/diffusers (torchvision fallbacks, progress bars);
# our own progress and errors are what the user should see.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from .base import DEFAULT_BASE  # noqa: E402
from .discrepancy import DEFAULT_DINO  # noqa: E402
from .errors import EstloraError  # noqa: E402
from .metrics import DEFAULT_CLIP  # noqa: E402
from .toy_world import STYLES, SUBJECTS  # noqa: E402


def cmd_tiny_model(args: argparse.Namespace) -> None:
    from .tiny_model import write_tiny_sdxl

    try:
        folder = write_tiny_sdxl(args.dir, seed=args.seed)
    except FileExistsError as exc:
        raise EstloraError(args.dir, "folder exists and is not empty") from exc
    print(f"wrote a tiny SDXL pipeline (560 attention projections, seed {args.seed}) to {folder}")


def cmd_inspect(args: argparse.Namespace) -> None:
    from .lora import load_lora, summary

    lora = load_lora(args.lora, base_shapes=_base_shapes(args), base_name=args.base or "the base model")
    if args.json:
        print(json.dumps(inspect_report(lora), indent=2))
    else:
        print(summary(lora))
        if args.base:
            print(f"fits base:   {args.base} (every projection's shape matches)")


def _base_shapes(args: argparse.Namespace):
    if not args.base:
        return None
    from .base import base_projection_shapes

    return base_projection_shapes(args.base, args.base_config)


def fusion_config(args: argparse.Namespace):
    from .plan import FusionConfig

    return FusionConfig(method=args.method, beta=args.beta, **fusion_options(args))


def fusion_options(args: argparse.Namespace) -> dict:
    """The `add_fusion_options` flags other than method and beta, as FusionConfig / Request fields."""
    from .plan import FUSION_OPTIONS

    return {name: getattr(args, name) for name in FUSION_OPTIONS}


def cmd_plan(args: argparse.Namespace) -> None:
    from .lora import load_pair
    from .plan import build_plan, cached_pair_scores
    from .plan_view import heatmap, summary

    subject, style = load_pair(args.subject, args.style, _base_shapes(args), args.base or "the base model")
    config = fusion_config(args)
    plan = build_plan(cached_pair_scores(subject, style, config), config, args.steps, (subject.sha256, style.sha256))
    if args.png:
        heatmap(plan, args.png)
    if args.json:
        print(json.dumps(plan.to_dict()))
        return
    print(summary(plan))
    if plan.beta_source == "default":
        print(
            f"\nnote: beta was not measured; {plan.beta:g} is K-LoRA's default (give --beta, or let "
            "`estlora generate` measure it)"
        )
    if args.png:
        print(f"heatmap: {args.png}")


def beta_value(text: str) -> float | None:
    """--beta: a number, or "auto" (None: measured for est, K-LoRA's default for klora)."""
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"beta must be a number or auto, not {text!r}") from None


def cmd_generate(args: argparse.Namespace) -> None:
    from .generate import Request, generate

    request = Request(
        subject=args.subject,
        style=args.style,
        prompt=args.prompt,
        base=args.base,
        base_config=args.base_config,
        vae=args.vae,
        negative_prompt=args.negative_prompt,
        method=args.method,
        steps=args.steps,
        scheduler=args.scheduler,
        timestep_spacing=args.timestep_spacing,
        guidance=args.guidance,
        guidance_rescale=args.guidance_rescale,
        width=args.width,
        height=args.height,
        seed=args.seed,
        num_images=args.num_images,
        beta=args.beta,
        beta_probe_steps=args.beta_probe_steps,
        dino_model=args.dino_model,
        device=args.device,
        dtype=args.dtype,
        **fusion_options(args),
        cpu_offload=args.cpu_offload,
        out=args.out,
    )
    generate(request)


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.out, args.steps, args.num_images, args.device, args.subject, args.style)


def cmd_grid(args: argparse.Namespace) -> None:
    import torch

    from .grid import GridSpec, load_spec, run_grid

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.spec:
        spec = load_spec(args.spec)
    else:
        if not (args.subjects and args.styles):
            raise EstloraError(None, "give a spec file, or --subjects and --styles")
        data = {
            "subjects": [{"name": _stem(p), "lora": p} for p in args.subjects],
            "styles": [{"name": _stem(p), "lora": p} for p in args.styles],
        }
        spec = GridSpec.from_dict(data, "flags")
    for key in (
        "base",
        "base_config",
        "vae",
        "prompts",
        "seeds",
        "methods",
        "steps",
        "scheduler",
        "timestep_spacing",
        "beta",
    ):
        value = getattr(args, key)
        if value is not None:
            setattr(spec, key, value)
    done = run_grid(spec, args.out, device=args.device)
    print(f"grid: {done} images rendered by this process into {args.out}")


def _stem(path: str) -> str:
    from pathlib import Path

    return Path(path).stem.replace(":", "-")


def cmd_eval(args: argparse.Namespace) -> None:
    from .evaluation import evaluate

    report = evaluate(args.run_dir, args.clip_model, args.dino_model, args.device, args.batch_size)
    print(f"wrote {report}, report.html, scores.csv and summary.json in {args.run_dir}")


def cmd_ui(args: argparse.Namespace) -> None:
    from .ui import launch

    launch(base=args.base, base_config=args.base_config, vae=args.vae, host=args.host, port=args.port)


def add_fusion_options(parser: argparse.ArgumentParser, beta_help: str) -> None:
    """Options shared by every command that fuses (plan, generate, ...)."""
    from .plan import GAMMA_RULES, METHODS, OTHER_WEIGHTS, PATTERNS

    group = parser.add_argument_group("fusion")
    group.add_argument("--method", choices=METHODS, default="est", help="fusion method (default est)")
    group.add_argument("--alpha", type=float, default=1.5, help="time-scale slope alpha (default 1.5)")
    group.add_argument("--beta", type=beta_value, default=None, help=beta_help)
    group.add_argument("--pattern", choices=PATTERNS, default="s", help="time pattern: s (rising) or s* (wrapping)")
    group.add_argument(
        "--gamma-rule",
        choices=GAMMA_RULES,
        default="reference",
        help="gamma: reference (L1 ratio, outliers dropped) or energy (sum E_c / sum E_s)",
    )
    group.add_argument("--subject-scale", type=float, default=1.0, help="strength of the subject LoRA (default 1)")
    group.add_argument("--style-scale", type=float, default=1.0, help="strength of the style LoRA (default 1)")
    group.add_argument(
        "--raw-energy", action="store_true", help="score B @ A without alpha/rank, as the research code does"
    )
    group.add_argument("--switch-every", type=int, default=5, help="LoRA Switch period in steps (default 5)")
    group.add_argument(
        "--other-weights",
        choices=OTHER_WEIGHTS,
        default="ignore",
        help="LoRA weights outside the attention projections (feed-forward, conv, text encoders): ignore them, "
        "as the reference does (default), or merge them statically at each LoRA's strength",
    )


def inspect_report(lora) -> dict:
    return {
        "file": str(lora.path),
        "sha256": lora.sha256,
        "layout": lora.layout,
        "family": lora.family(),
        "attention_projections": len(lora.projections),
        "ranks": {str(k): v for k, v in sorted(lora.ranks.items())},
        "alphas": {f"{k:g}": v for k, v in sorted(lora.alphas.items())},
        "training": lora.training(),
        "other_tensors": len(lora.other),
        "other_modules": dict(sorted(lora.other_modules().items())),
        "projections": {
            name: {"rank": f.rank, "alpha": f.alpha, "scale": f.scale, "in": f.in_features, "out": f.out_features}
            for name, f in lora.projections.items()
        },
    }


def add_base_options(parser: argparse.ArgumentParser, purpose: str, default: str | None = None) -> None:
    parser.add_argument(
        "--base", default=default, help=f"{purpose}: a diffusers folder, hub id, single-file .safetensors, or toy"
    )
    parser.add_argument(
        "--base-config",
        help="for a single-file base: the diffusers SDXL folder or hub id whose configs and tokenizers it uses"
        f" (default {DEFAULT_BASE})",
    )


def add_vae_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vae",
        help="replace the base's VAE: a diffusers VAE folder or hub id (e.g. madebyollin/sdxl-vae-fp16-fix), "
        "or a single .safetensors VAE",
    )


def add_scheduler_option(parser: argparse.ArgumentParser, default: str | None) -> None:
    from .pipelines import SCHEDULERS, TIMESTEP_SPACINGS

    parser.add_argument(
        "--scheduler",
        choices=list(SCHEDULERS),
        default=default,
        help="sampler (default: the base's own; SDXL's is Euler); karras = Karras sigmas, -a = ancestral",
    )
    parser.add_argument(
        "--timestep-spacing",
        choices=TIMESTEP_SPACINGS,
        help="which timesteps the steps take (default: the base's own, SDXL's leading; Lightning/Turbo: trailing)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="estlora",
        description="EST-LoRA: adaptive, training-free fusion of a subject LoRA and a style LoRA (SDXL).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("tiny-model", help="write the built-in tiny SDXL pipeline folder")
    tiny.add_argument("dir", help="folder to create (must be new or empty)")
    tiny.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    tiny.set_defaults(func=cmd_tiny_model)

    inspect = commands.add_parser("inspect", help="summarise a LoRA file: layout, projections, ranks, alphas")
    inspect.add_argument(
        "lora", help="a .safetensors file, a folder holding one, a hub id, example:subject or toy:heart"
    )
    add_base_options(inspect, "also check it fits this base model")
    inspect.add_argument("--json", action="store_true", help="print a JSON report instead")
    inspect.set_defaults(func=cmd_inspect)

    plan = commands.add_parser("plan", help="compute the fusion plan: which LoRA each projection uses at each step")
    plan.add_argument("subject", help="subject LoRA (file, folder, hub id, example:subject, toy:heart)")
    plan.add_argument("style", help="style LoRA (file, folder, hub id, example:style, toy:diagonal)")
    plan.add_argument("--steps", type=int, default=30, help="number of denoising steps (default 30)")
    add_base_options(plan, "check both LoRAs fit this base model")
    plan.add_argument("--json", action="store_true", help="print the whole plan as one JSON object")
    plan.add_argument("--png", help="also draw the plan as a heatmap PNG")
    add_fusion_options(plan, "time-scale offset beta (default auto: K-LoRA's 0.5 here; generate measures it)")
    plan.set_defaults(func=cmd_plan)

    gen = commands.add_parser("generate", help="render the subject in the style with a fusion method")
    gen.add_argument("--subject", required=True, help="subject LoRA (file, folder, hub id, example:subject, toy:heart)")
    gen.add_argument("--style", required=True, help="style LoRA (file, folder, hub id, example:style, toy:diagonal)")
    gen.add_argument("--prompt", required=True, help='e.g. "a sks dog in szn style"')
    gen.add_argument("--negative-prompt")
    add_base_options(gen, f"the SDXL base (default {DEFAULT_BASE})", default=DEFAULT_BASE)
    add_vae_option(gen)
    gen.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    add_scheduler_option(gen, "default")
    gen.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    gen.add_argument(
        "--guidance-rescale",
        type=float,
        default=0.0,
        help="rescale the guided prediction toward the conditional one's spread (0 off; 0.7 for v-prediction models)",
    )
    gen.add_argument("--width", type=int, help="image width (default: the model's, 1024 for SDXL)")
    gen.add_argument("--height", type=int, help="image height (default: the model's)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed + k")
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--beta-probe-steps", type=int, help="steps of the beta probe renders (default: --steps)")
    gen.add_argument("--dino-model", default=DEFAULT_DINO, help="DINO model for beta (id or folder)")
    gen.add_argument("--device", default="auto", help="auto (cuda, mps, else cpu), cpu, cuda, cuda:1, ...")
    gen.add_argument(
        "--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="auto: fp16 on GPU, fp32 on CPU"
    )
    gen.add_argument("--cpu-offload", action="store_true", help="keep only the running model on the GPU")
    gen.add_argument("--out", default="outputs", help="output folder (default ./outputs)")
    add_fusion_options(gen, "time-scale offset beta, or auto (default: measured by style discrepancy for est)")
    gen.set_defaults(func=cmd_generate)

    demo = commands.add_parser("demo", help="fuse a subject and a style on the shipped toy SDXL, offline")
    demo.add_argument("--out", default="estlora-demo", help="output folder (default ./estlora-demo)")
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--num-images", type=int, default=4)
    demo.add_argument("--subject", default="heart", choices=SUBJECTS, help="toy subject LoRA (default heart)")
    demo.add_argument("--style", default="outline", choices=STYLES, help="toy style LoRA (default outline)")
    demo.add_argument("--device", default="auto")
    demo.set_defaults(func=cmd_demo)

    grid = commands.add_parser("grid", help="subjects x styles x prompts x seeds x methods, resumable")
    grid.add_argument("spec", nargs="?", help="grid spec, YAML or JSON (see estlora.grid)")
    grid.add_argument("--out", required=True, help="run folder (rerun with the same folder to resume)")
    grid.add_argument("--subjects", nargs="+", help="subject LoRAs (instead of a spec file)")
    grid.add_argument("--styles", nargs="+", help="style LoRAs (instead of a spec file)")
    add_base_options(grid, "override the spec's base model")
    add_vae_option(grid)
    grid.add_argument("--prompts", nargs="+", help='prompt templates, e.g. "a {subject} in {style} style"')
    grid.add_argument("--seeds", nargs="+", type=int)
    grid.add_argument("--methods", nargs="+")
    grid.add_argument("--steps", type=int)
    add_scheduler_option(grid, None)
    grid.add_argument("--beta", type=float, help="fixed beta instead of measuring it per pair and prompt")
    grid.add_argument("--device", default="auto", help="device for a single process (accelerate picks its own)")
    grid.add_argument("--threads", type=int, help="CPU threads per process (numerics depend on it)")
    grid.set_defaults(func=cmd_grid)

    ev = commands.add_parser("eval", help="score a finished grid: scores.csv, summary.json, report")
    ev.add_argument("run_dir", help="the grid's --out folder")
    ev.add_argument("--clip-model", default=DEFAULT_CLIP, help="CLIP model id or folder")
    ev.add_argument("--dino-model", default=DEFAULT_DINO, help="DINO model id or folder")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.set_defaults(func=cmd_eval)

    ui = commands.add_parser("ui", help="a local web page to fuse, compare and understand (Gradio)")
    add_base_options(ui, "the SDXL base (default: the shipped toy model, toy)")
    add_vae_option(ui)
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=int, default=7860)
    ui.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except EstloraError as exc:
        print(f"estlora: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # invalid option combinations from the config dataclasses
        print(f"estlora: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("estlora: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
