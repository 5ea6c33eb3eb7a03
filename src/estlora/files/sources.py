"""Where a LoRA or base name leads: a file, a folder holding one, a registered name, or a hub id."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import LoraNotFoundError, PickleRefusedError, first_line
from ..registry import lora_source
from .safetensors import PICKLE_SUFFIXES, pickle_reason

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+(/[\w./-]+\.safetensors)?")


def resolve_lora_path(source: str | os.PathLike) -> Path:
    """A file, a folder holding one LoRA, a registered name (`toy:heart`), or (with network) a hub id."""
    resolve = lora_source(str(source))
    if resolve is not None:
        return resolve(str(source))
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        return _lora_in_folder(path)
    text = str(source)
    if HUB_ID.fullmatch(text) and not text.startswith("."):
        return download_from_hub(text)
    raise LoraNotFoundError(source, "no such file or folder")


def _lora_in_folder(folder: Path) -> Path:
    preferred = folder / DIFFUSERS_WEIGHT_NAME
    if preferred.is_file():
        return preferred
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise LoraNotFoundError(folder, f"holds several .safetensors files ({names}); name one")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise PickleRefusedError(folder / pickles[0], pickle_reason())
    raise LoraNotFoundError(folder, "folder holds no .safetensors file")


def download_from_hub(hub_id: str) -> Path:
    """`owner/repo` (its diffusers LoRA file) or `owner/repo/path/file.safetensors`, from the hub cache or the hub."""
    from huggingface_hub import hf_hub_download

    repo, _, filename = hub_id.partition("/")
    name, _, filename = filename.partition("/")
    try:
        return Path(hf_hub_download(f"{repo}/{name}", filename or DIFFUSERS_WEIGHT_NAME))
    except Exception as exc:  # offline, no such repo, no such file: all one answer to the user
        raise LoraNotFoundError(hub_id, f"not a local path, and the hub download failed: {first_line(exc)}") from None
