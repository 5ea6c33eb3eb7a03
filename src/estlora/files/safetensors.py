"""Reading safetensors files safely: the header is checked whole before any tensor is read, and pickles
are refused unopened.

Loading a pickle can run arbitrary code, so a `.bin`/`.ckpt`/`.pt` file (or a pickle renamed
`.safetensors`) is refused without being unpickled. A truncated download is caught from the header's
data offsets, in milliseconds even for a 7 GB checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch

from ..errors import LoraFormatError, PickleRefusedError, first_line

PICKLE_SUFFIXES = {".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle"}


def pickle_reason() -> str:
    return "pickle checkpoints are refused (loading one can run arbitrary code); convert it to .safetensors"


def _looks_like_pickle(head: bytes) -> bool:
    # torch.save writes a zip archive (PK..) or a raw pickle (protocol byte 0x80, then version 2..5).
    return head.startswith(b"PK\x03\x04") or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5)


def read_header(path: Path) -> dict[str, dict]:
    """The safetensors header (tensor name -> dtype, shape, offsets), after checking the whole file is there.

    Reads only the header, so a 7 GB checkpoint is checked in milliseconds; pickles are refused unopened.
    """
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise PickleRefusedError(path, pickle_reason())
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(16)
        (header_len,) = struct.unpack("<Q", head[:8].ljust(8, b"\0"))
        # A safetensors header length can begin like a pickle (640 bytes: 80 02 ...); its JSON cannot.
        safetensors = head[8:9] == b"{" and header_len <= size - 8
        if not safetensors and _looks_like_pickle(head):
            raise PickleRefusedError(path, "this is a pickle checkpoint, not safetensors; " + pickle_reason())
        if size < 8:
            raise LoraFormatError(path, f"not a safetensors file ({size} bytes)")
        if header_len > size - 8 or head[8:9] != b"{":
            kind = "truncated or corrupt safetensors file" if head[8:9] == b"{" else "not a safetensors file"
            raise LoraFormatError(path, f"{kind} (bad header)")
        handle.seek(8)
        try:
            header = json.loads(handle.read(header_len))
        except ValueError:
            raise LoraFormatError(path, "truncated or corrupt safetensors file (header is not JSON)") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        spans = sorted((int(v["data_offsets"][0]), int(v["data_offsets"][1]), k) for k, v in tensors.items())
    except (TypeError, KeyError, IndexError, ValueError):
        raise LoraFormatError(path, "truncated or corrupt safetensors file (bad tensor entries)") from None
    end = max((stop for _, stop, _ in spans), default=0)
    if 8 + header_len + end > size:
        raise LoraFormatError(path, f"truncated safetensors file ({size} of {8 + header_len + end} bytes)")
    _check_spans(path, spans)
    return tensors


def _check_spans(path: Path, spans: list[tuple[int, int, str]]) -> None:
    """The tensors' byte ranges must tile the data section, each once, as the format requires: a file
    whose entries overlap or share bytes is corrupt (or crafted), not truncated."""
    position, previous = 0, None
    for start, stop, key in spans:
        if stop < start:
            raise LoraFormatError(path, f"corrupt safetensors file ({key} ends before it starts)")
        if start < position:
            how = "share the same bytes" if (start, stop) == previous[:2] else "overlap"
            raise LoraFormatError(path, f"corrupt safetensors file (tensors {previous[2]} and {key} {how})")
        if start > position:
            raise LoraFormatError(path, f"corrupt safetensors file ({start - position} unused bytes before {key})")
        position, previous = stop, (start, stop, key)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the header metadata, after checking the file is a whole safetensors file."""
    from safetensors import safe_open

    read_header(path)
    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    except Exception as exc:
        raise LoraFormatError(path, f"truncated or corrupt safetensors file ({first_line(exc)})") from None
    return tensors, metadata


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
