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


def save_image(image, path: Path, meta: dict) -> Path:
    """PNG with an `estlora` text chunk, plus a JSON sidecar; both written atomically."""
    from PIL.PngImagePlugin import PngInfo

    text = json.dumps(meta, indent=2)
    write_text(path.with_suffix(".json"), text + "\n")
    info = PngInfo()
    info.add_text("estlora", text)
    with atomic_path(path) as staging:
        image.save(staging, format="PNG", pnginfo=info)
    return path


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "image"


def overview(images: list, path: Path, zoom: int = 4) -> None:
    """One enlarged row of images (toy images are 32 x 32, too small to judge at their own size)."""
    from PIL import Image

    w, h = images[0].size
    sheet = Image.new("RGB", (len(images) * (w * zoom + 8) - 8, h * zoom), "white")
    for i, image in enumerate(images):
        sheet.paste(image.resize((w * zoom, h * zoom), Image.NEAREST), (i * (w * zoom + 8), 0))
    with atomic_path(path) as staging:
        sheet.save(staging, format="PNG")
