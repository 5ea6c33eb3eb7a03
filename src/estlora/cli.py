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

from .errors import EstloraError  # noqa: E402


def cmd_tiny_model(args: argparse.Namespace) -> None:
    from .tiny_model import write_tiny_sdxl

    try:
        folder = write_tiny_sdxl(args.dir, seed=args.seed)
    except FileExistsError as exc:
        raise EstloraError(args.dir, "folder exists and is not empty") from exc
    print(f"wrote a tiny SDXL pipeline (560 attention projections, seed {args.seed}) to {folder}")


def cmd_inspect(args: argparse.Namespace) -> None:
    from .lora import load_lora, summary

    base_shapes = None
    if args.base:
        from .base import projection_shapes, unet_config

        base_shapes = projection_shapes(unet_config(args.base))
    lora = load_lora(args.lora, base_shapes=base_shapes, base_name=args.base or "the base model")
    if args.json:
        print(json.dumps(inspect_report(lora), indent=2))
    else:
        print(summary(lora))
        if args.base:
            print(f"fits base:   {args.base} (every projection's shape matches)")


def inspect_report(lora) -> dict:
    return {
        "file": str(lora.path),
        "sha256": lora.sha256,
        "layout": lora.layout,
        "family": lora.family(),
        "attention_projections": len(lora.projections),
        "ranks": {str(k): v for k, v in sorted(lora.ranks.items())},
        "alphas": {f"{k:g}": v for k, v in sorted(lora.alphas.items())},
        "other_tensors": len(lora.other),
        "other_modules": dict(sorted(lora.other_modules().items())),
        "projections": {
            name: {"rank": f.rank, "alpha": f.alpha, "scale": f.scale, "in": f.in_features, "out": f.out_features}
            for name, f in lora.projections.items()
        },
    }


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
    inspect.add_argument("lora", help="a .safetensors file, a folder holding one, a hub id, or example:subject")
    inspect.add_argument("--base", help="also check it fits this base model (folder or hub id)")
    inspect.add_argument("--json", action="store_true", help="print a JSON report instead")
    inspect.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except EstloraError as exc:
        print(f"estlora: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("estlora: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
