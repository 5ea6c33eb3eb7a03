"""`estlora` command line: a thin shell over the commands. Every setting's flag, type, default and help
come from its declaration (`estlora.config`).

Bad input (an `EstloraError`) -> one line on stderr, exit 2. Anything else is a bug and keeps its
traceback, with a line saying where to report it, exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

# Quiet the import-time chatter of transformers/diffusers (torchvision fallbacks, progress bars);
# our own progress and errors are what the user should see.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from .config import (  # noqa: E402
    DEFAULT_CLIP,
    DEFAULT_DINO,
    METRIC_SETS,
    FusionConfig,
    ModelConfig,
    SamplingConfig,
    Setting,
    settings_of,
)
from .errors import REPORT_BUG, EstloraError, FusionError, SettingError  # noqa: E402
from .toy.world import STYLES, SUBJECTS  # noqa: E402

LORA_HELP = "a .safetensors file, a folder holding one, a hub id, example:{0} or toy:{1}"


# ---------------------------------------------------------------- flags from the settings' declarations


def _typed(item: Setting):
    def parse(text: str):
        try:
            return item.parse(text)
        except SettingError as exc:
            raise argparse.ArgumentTypeError(exc.problem) from None

    parse.__name__ = item.name  # argparse names the type in some messages
    return parse


def add_settings(
    parser: argparse.ArgumentParser,
    group: type,
    title: str,
    skip: tuple[str, ...] = (),
    overrides: bool = False,
    choices: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """One flag per setting of `group`. With `overrides`, a flag not given is absent from the result
    (the grid's spec keeps its value) instead of taking the default."""
    arguments = parser.add_argument_group(title)
    for item in settings_of(group):
        if item.name in skip:
            continue
        default = argparse.SUPPRESS if overrides else item.default
        help = f"{item.help} (default {describe_default(item)})"
        if item.kind is bool:
            arguments.add_argument(item.flag, action="store_true", default=default, help=help)
            continue
        options = (choices or {}).get(item.name, item.choices)
        metavar = None if options else item.name.upper()
        arguments.add_argument(
            item.flag, type=_typed(item), choices=options, default=default, help=help, metavar=metavar
        )


def describe_default(item: Setting) -> str:
    """The default as --help says it; a family's default names each family's value."""
    if not item.family_default:
        return item.describe_default()
    return f"{item.describe_default()}: {family_values(item.family_default)}"


def family_values(attribute: str) -> str:
    """`SDXL 30`, one entry per family: what each model family sets `attribute` to."""
    from .families import FAMILIES

    values = {f.label: getattr(f, attribute) for f in FAMILIES}
    return ", ".join(
        f"{label} {value:g}" if isinstance(value, float) else f"{label} {value}" for label, value in values.items()
    )


def values(args: argparse.Namespace, group: type) -> dict:
    """The flags of `group` that `args` holds, by setting name."""
    return {item.name: getattr(args, item.name) for item in settings_of(group) if hasattr(args, item.name)}


def scheduler_choices() -> dict[str, tuple[str, ...]]:
    from .families import scheduler_names

    return {"scheduler": scheduler_names()}


# ---------------------------------------------------------------- commands


def cmd_tiny_model(args: argparse.Namespace) -> None:
    from .testing.tiny_flux import write_tiny_flux
    from .testing.tiny_sdxl import write_tiny_sdxl

    write, what = {
        "sdxl": (write_tiny_sdxl, "SDXL pipeline (SDXL's block layout: 560 attention projections)"),
        "flux1": (write_tiny_flux, "FLUX.1 pipeline (19 double + 38 single blocks: 494 linears in the blocks)"),
    }[args.family]
    try:
        folder = write(args.dir, seed=args.seed)
    except FileExistsError as exc:
        raise EstloraError(args.dir, "folder exists and is not empty") from exc
    print(f"wrote a tiny {what}, seed {args.seed}, to {folder}")


def _checked_base(args: argparse.Namespace, loras) -> None:
    """With --base, every LoRA fits that base: its family and its shapes (read from a config or a header)."""
    if args.base:
        from .families import family_named
        from .loading.base import check_fits, describe_base

        source = describe_base(args.base, args.base_config, family_named(loras[0].family))
        check_fits(source, loras)


def cmd_inspect(args: argparse.Namespace) -> None:
    from .loading.inspect import report, summary
    from .loading.lora import load_lora

    lora = load_lora(args.lora, zero_alpha=args.zero_alpha)
    _checked_base(args, [lora])
    if args.json:
        print(json.dumps(report(lora), indent=2))
    else:
        print(summary(lora))
        if args.base:
            print(f"fits base:   {args.base} (every projection's shape matches)")


def cmd_plan(args: argparse.Namespace) -> None:
    from .commands.plan_view import heatmap, summary
    from .families import family_named
    from .loading.lora import load_pair
    from .plan import build_plan
    from .score_cache import cached_pair_scores

    subject, style = load_pair(args.subject, args.style, zero_alpha=args.zero_alpha)
    _checked_base(args, [subject, style])
    for lora in (subject, style):
        if "dora" in lora.kinds:  # its update depends on the base weights, which `plan` does not load
            raise FusionError(
                lora.path,
                "a DoRA: its energies depend on the base weights, which `plan` does not load; "
                "`generate` (and the UI) plan it against the loaded base",
            )
    for role, lora in (("subject", subject), ("style", style)):
        for note in lora.notes:
            print(f"{role} LoRA {note}", file=sys.stderr)
    family = family_named(subject.family)
    config = family.resolve_fusion(FusionConfig(**values(args, FusionConfig)))
    layers = family.routed(set(subject.projections) | set(style.projections), config.route)
    scores = cached_pair_scores(subject, style, layers, config)
    plan = build_plan(scores, config, args.steps or family.default_steps, (subject.sha256, style.sha256))
    if args.png:
        heatmap(plan, family, args.png)
    if args.json:
        print(json.dumps({"family": family.name, **plan.to_dict()}))
        return
    print(summary(plan, family))
    if plan.beta_source == "default":
        print(
            f"\nnote: beta was not measured; {plan.beta:g} is K-LoRA's default (give --beta, or let "
            "`estlora generate` measure it)"
        )
    if args.png:
        print(f"heatmap: {args.png}")


def cmd_generate(args: argparse.Namespace) -> None:
    from .commands.generate import generate
    from .session import Request

    request = Request(
        subject=args.subject,
        style=args.style,
        prompt=args.prompt,
        fusion=FusionConfig(**values(args, FusionConfig)),
        sampling=SamplingConfig(**values(args, SamplingConfig)),
    )
    generate(request, ModelConfig(**values(args, ModelConfig)), args.out)


def cmd_demo(args: argparse.Namespace) -> None:
    from .commands.demo import run_demo

    run_demo(args.out, args.steps, args.num_images, args.device, args.subject, args.style)


def cmd_grid(args: argparse.Namespace) -> None:
    import torch

    from .commands.grid import GridSpec, load_spec, run_grid

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {**values(args, ModelConfig), **values(args, SamplingConfig), **values(args, FusionConfig)}
    overrides |= {key: getattr(args, key) for key in ("prompts", "seeds", "methods") if getattr(args, key)}
    if args.spec:
        spec = load_spec(args.spec, overrides)
    else:
        if not (args.subjects and args.styles):
            raise EstloraError(None, "give a spec file, or --subjects and --styles")
        names = _names([*args.subjects, *args.styles])
        data = {
            "subjects": [{"name": names[p], "lora": p} for p in args.subjects],
            "styles": [{"name": names[p], "lora": p} for p in args.styles],
        }
        spec = GridSpec.from_dict({**data, **overrides}, "flags")
    done = run_grid(spec, args.out, device=args.device)
    print(f"grid: {done} images rendered by this process into {args.out}")


def _names(paths: list[str]) -> dict[str, str]:
    """Each LoRA's name in the grid: its file's stem, with as many parent folders as make it unique
    (`subject/pytorch_lora_weights.safetensors` and `style/...`, diffusers' default file name, become
    `subject-pytorch_lora_weights` and `style-pytorch_lora_weights`)."""
    from pathlib import Path

    def name(path: str, depth: int) -> str:
        parts = Path(path).with_suffix("").parts[-depth - 1 :]
        return "-".join(parts).replace(":", "-").lstrip("-/")

    depth = {path: 0 for path in paths}
    while True:
        named = {path: name(path, depth[path]) for path in paths}
        clashes = {path for path in paths if list(named.values()).count(named[path]) > 1}
        deeper = {path for path in clashes if depth[path] + 1 < len(Path(path).parts)}
        if not deeper:
            return named  # unique, or the same file twice (GridSpec says so)
        for path in deeper:
            depth[path] += 1


def cmd_eval(args: argparse.Namespace) -> None:
    from .commands.evaluation import evaluate

    report = evaluate(args.run_dir, args.clip_model, args.dino_model, args.device, args.batch_size, args.metrics)
    print(f"wrote {report}, report.html, scores.csv and summary.json in {args.run_dir}")


def cmd_ui(args: argparse.Namespace) -> None:
    from .ui import launch, read_auth

    auth = read_auth(args.auth)
    launch(base=args.base, base_config=args.base_config, vae=args.vae, host=args.host, port=args.port, auth=auth)


# ---------------------------------------------------------------- the parser


def add_base_options(parser: argparse.ArgumentParser, purpose: str, reads_loras: bool = True) -> None:
    """--base and --base-config, for commands that only check LoRAs against a base (no model loads),
    and how those LoRAs are read (--zero-alpha)."""
    names = ("base", "base_config", "zero_alpha") if reads_loras else ("base", "base_config")
    base, config, *reading = (item for item in settings_of(ModelConfig) if item.name in names)
    parser.add_argument(base.flag, help=f"{purpose}: {base.help}")
    parser.add_argument(config.flag, help=f"{config.help} (default {describe_default(config)})")
    for item in reading:
        parser.add_argument(item.flag, choices=item.choices, default=item.default, help=item.help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="estlora",
        description="EST-LoRA: adaptive, training-free fusion of a subject LoRA and a style LoRA.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("tiny-model", help="write a built-in tiny pipeline folder (SDXL or FLUX.1)")
    tiny.add_argument("dir", help="folder to create (must be new or empty)")
    tiny.add_argument("--family", choices=("sdxl", "flux1"), default="sdxl", help="which tiny model (default sdxl)")
    tiny.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    tiny.set_defaults(func=cmd_tiny_model)

    inspect = commands.add_parser("inspect", help="summarise a LoRA file: layout, projections, ranks, alphas")
    inspect.add_argument("lora", help=LORA_HELP.format("subject", "heart"))
    add_base_options(inspect, "also check it fits this base model")
    inspect.add_argument("--json", action="store_true", help="print a JSON report instead")
    inspect.set_defaults(func=cmd_inspect)

    plan = commands.add_parser("plan", help="compute the fusion plan: which LoRA each projection uses at each step")
    plan.add_argument("subject", help="subject LoRA: " + LORA_HELP.format("subject", "heart"))
    plan.add_argument("style", help="style LoRA: " + LORA_HELP.format("style", "diagonal"))
    steps = f"number of denoising steps (default the model family's: {family_values('default_steps')})"
    plan.add_argument("--steps", type=int, help=steps)
    add_base_options(plan, "check both LoRAs fit this base model")
    plan.add_argument("--json", action="store_true", help="print the whole plan as one JSON object")
    plan.add_argument("--png", help="also draw the plan as a heatmap PNG")
    add_settings(plan, FusionConfig, "fusion")
    plan.set_defaults(func=cmd_plan)

    gen = commands.add_parser("generate", help="render the subject in the style with a fusion method")
    gen.add_argument("--subject", required=True, help="subject LoRA: " + LORA_HELP.format("subject", "heart"))
    gen.add_argument("--style", required=True, help="style LoRA: " + LORA_HELP.format("style", "diagonal"))
    gen.add_argument("--prompt", required=True, help='e.g. "a sks dog in szn style"')
    add_settings(gen, ModelConfig, "model")
    add_settings(gen, SamplingConfig, "sampling", choices=scheduler_choices())
    add_settings(gen, FusionConfig, "fusion")
    gen.add_argument("--out", default="outputs", help="output folder (default ./outputs)")
    gen.set_defaults(func=cmd_generate)

    demo = commands.add_parser("demo", help="fuse a subject and a style on the shipped toy SDXL, offline")
    demo.add_argument("--out", default="estlora-demo", help="output folder (default ./estlora-demo)")
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--num-images", type=int, default=4)
    demo.add_argument("--subject", choices=SUBJECTS, help="toy subject LoRA (default: the demo's pair)")
    demo.add_argument("--style", choices=STYLES, help="toy style LoRA (default: the demo's pair)")
    demo.add_argument("--device", default="auto")
    demo.set_defaults(func=cmd_demo)

    grid = commands.add_parser(
        "grid", help="subjects x styles x prompts x seeds x methods, resumable; flags override the spec's settings"
    )
    grid.add_argument("spec", nargs="?", help="grid spec, YAML or JSON (see estlora.commands.grid)")
    grid.add_argument("--out", required=True, help="run folder (rerun with the same folder to resume)")
    grid.add_argument("--subjects", nargs="+", help="subject LoRAs (instead of a spec file)")
    grid.add_argument("--styles", nargs="+", help="style LoRAs (instead of a spec file)")
    grid.add_argument("--prompts", nargs="+", help='prompt templates, e.g. "a {subject} in {style} style"')
    grid.add_argument("--seeds", nargs="+", type=int)
    grid.add_argument("--methods", nargs="+")
    skip = ("seed", "num_images", "device")  # per image, or per process
    add_settings(grid, ModelConfig, "model", skip=skip, overrides=True)
    add_settings(grid, SamplingConfig, "sampling", skip=skip, overrides=True, choices=scheduler_choices())
    add_settings(
        grid, FusionConfig, "fusion (a spec may give lists, which the grid varies)", skip=("method",), overrides=True
    )
    grid.add_argument("--device", default="auto", help="device for a single process (accelerate picks its own)")
    grid.add_argument("--threads", type=int, help="CPU threads per process (numerics depend on it)")
    grid.set_defaults(func=cmd_grid)

    ev = commands.add_parser("eval", help="score a finished grid: scores.csv, summary.json, report")
    ev.add_argument("run_dir", help="the grid's --out folder")
    ev.add_argument(
        "--metrics",
        choices=METRIC_SETS,
        default="auto",
        help="what scores the images: clip-dino (CLIP and DINO against each entry's references), toy (the toy "
        "world's scorer, offline) or auto (toy for a grid on the toy base, else clip-dino)",
    )
    ev.add_argument("--clip-model", default=DEFAULT_CLIP, help="CLIP model id or folder")
    ev.add_argument("--dino-model", default=DEFAULT_DINO, help="DINO model id or folder")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.set_defaults(func=cmd_eval)

    ui = commands.add_parser("ui", help="a local web page to fuse, compare and understand (Gradio)")
    add_base_options(ui, "the base (default: the shipped toy model, toy)", reads_loras=False)
    vae = next(item for item in settings_of(ModelConfig) if item.name == "vae")
    ui.add_argument(vae.flag, help=vae.help)
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=int, default=7860)
    ui.add_argument(
        "--auth", help="ask for a login: user:password, or a file of user:password lines (with --host 0.0.0.0)"
    )
    ui.set_defaults(func=cmd_ui)
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
    except Exception:
        traceback.print_exc()
        print(f"estlora: {REPORT_BUG}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
