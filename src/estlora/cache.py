"""A small on-disk cache of JSON results (pair scores, measured betas), keyed by what they depend on.

Entries are named by a hash of their key (LoRA file hashes, settings, a version) and written
atomically, so a crash never leaves a half entry and concurrent runs at worst compute twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .outputs import write_text


def cache_dir() -> Path:
    """estlora's cache: built-in models, pair scores, measured betas ($ESTLORA_CACHE to move it)."""
    return Path(os.environ.get("ESTLORA_CACHE", Path.home() / ".cache" / "estlora"))


def entry_path(kind: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir() / kind / f"{digest}.json"


def read(kind: str, key: dict) -> dict | None:
    path = entry_path(kind, key)
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return entry.get("value") if entry.get("key") == key else None


def write(kind: str, key: dict, value: dict) -> None:
    write_text(entry_path(kind, key), json.dumps({"key": key, "value": value}))
