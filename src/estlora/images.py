"""Images as results: each PNG carries the settings that regenerate it (a text chunk and a JSON sidecar).

Files are written atomically, so an interrupted run leaves no half-written image.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from .config import all_settings
from .outputs import atomic_path, write_text

# Settings a regenerate command leaves out: one image is regenerated, with the beta it used (no probe).
NOT_REGENERATED = {"num_images", "beta_probe_steps", "dino_model"}


def regenerate_command(settings: dict) -> str:
    """`estlora generate ...` with every setting spelled out as its flag."""
    flags = {item.name: item.flag for _, item in all_settings()}
    words = ["estlora", "generate"]
    for key, value in settings.items():
        if key in NOT_REGENERATED or value is None or value is False:
            continue
        flag = flags.get(key, "--" + key.replace("_", "-"))
        words += [flag] if value is True else [flag, repr(value) if isinstance(value, float) else str(value)]
    return shlex.join(words)


def a1111_parameters(meta: dict) -> str:
    """The `parameters` text A1111 writes and other tools read (its PNG Info, Forge, Civitai, ComfyUI
    readers): the prompt, `Negative prompt: ...`, then one line of `Key: value` pairs, values with a
    comma quoted. Hashes are A1111's short form, the file's sha256 cut to 10 digits."""
    settings = meta.get("settings", {})
    lines = [settings.get("prompt", "")]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    loras = {
        Path(str(settings.get(role) or role)).stem.replace(":", "-"): meta.get(f"{role}_sha256", "")[:10]
        for role in ("subject", "style")
    }
    beta = meta.get("beta")
    pairs = {
        "Steps": settings.get("steps"),
        "Sampler": settings.get("scheduler") or meta.get("scheduler"),
        "CFG scale": settings.get("guidance"),
        "Seed": settings.get("seed"),
        "Size": f"{settings.get('width')}x{settings.get('height')}" if settings.get("width") else None,
        "Model": settings.get("base"),
        "Lora hashes": ", ".join(f"{name}: {digest}" for name, digest in loras.items() if digest),
        "EST-LoRA": f"method: {settings.get('method')}" + (f", beta: {beta:.4g}" if beta is not None else ""),
        "Version": f"estlora {meta.get('estlora', '')}".strip(),
    }
    quoted = {k: (f'"{v}"' if "," in str(v) or ":" in str(v) else v) for k, v in pairs.items() if v not in (None, "")}
    lines.append(", ".join(f"{key}: {value}" for key, value in quoted.items()))
    return "\n".join(lines)


def save_image(image, path: Path, meta: dict) -> Path:
    """PNG with an `estlora` text chunk (every setting, as JSON) and A1111's `parameters` chunk, plus a
    JSON sidecar; all written atomically."""
    from PIL.PngImagePlugin import PngInfo

    text = json.dumps(meta, indent=2)
    write_text(path.with_suffix(".json"), text + "\n")
    info = PngInfo()
    info.add_text("estlora", text)
    info.add_text("parameters", a1111_parameters(meta))
    with atomic_path(path) as staging:
        image.save(staging, format="PNG", pnginfo=info)
    return path


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "image"


def labelled_sheet(rows: list[tuple[str, list]], path: Path, zoom: int = 4) -> None:
    """Rows of enlarged images, each under its label (toy images are 32 x 32, too small to judge at
    their own size)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=15)
    w, h = rows[0][1][0].size
    gap, label_h = 8, 24
    width = max(len(images) for _, images in rows) * (w * zoom + gap) - gap
    width = max(width, *(int(font.getlength(label)) + 8 for label, _ in rows))
    sheet = Image.new("RGB", (width, len(rows) * (label_h + h * zoom + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(rows):
        top = r * (label_h + h * zoom + gap)
        draw.text((2, top + 3), label, fill="black", font=font)
        for i, image in enumerate(images):
            sheet.paste(image.resize((w * zoom, h * zoom), Image.NEAREST), (i * (w * zoom + gap), top + label_h))
    with atomic_path(path) as staging:
        sheet.save(staging, format="PNG")
