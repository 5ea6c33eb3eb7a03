"""Reading GGUF files (city96's quantized FLUX.1 transformers, `flux1-dev-Q4_K_S.gguf`) as a header:
tensor names and their logical shapes, in the form a safetensors header takes, so a quantized base is
checked against its config before anything loads. The `gguf` package reads the file memory-mapped
(no tensor is read); it is an optional dependency, needed only for GGUF bases.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LoraFormatError, first_line

GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"


def is_gguf(path: Path) -> bool:
    return path.suffix.lower() == GGUF_SUFFIX


def read_gguf_header(path: Path) -> dict[str, dict]:
    """name -> {"dtype": the GGML type's name, "shape": the logical shape (rows first, as torch's)}."""
    with open(path, "rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise LoraFormatError(path, "not a GGUF file (no GGUF magic)")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise LoraFormatError(path, "GGUF files need the gguf package (pip install gguf)") from None
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # truncated or corrupt: the reader's own words, in one line
        raise LoraFormatError(path, f"truncated or corrupt GGUF file ({first_line(exc)})") from None
    return {
        tensor.name: {"dtype": tensor.tensor_type.name, "shape": [int(n) for n in reversed(tensor.shape)]}
        for tensor in reader.tensors
    }
