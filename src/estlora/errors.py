"""Typed errors for bad input. Each carries the offending file, and its message is one line.

The CLI turns any `EstloraError` into that one line on stderr and exit code 2; Python callers can
catch the precise subclass.
"""

from __future__ import annotations

import os


class EstloraError(Exception):
    """Bad user input that estlora diagnosed: a one-line, user-facing message."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{path}: {problem}")


class LoraError(EstloraError, ValueError):
    """A LoRA file could not be used."""


class LoraNotFoundError(LoraError, FileNotFoundError):
    """The path, folder or hub id does not lead to a LoRA file."""


class PickleRefusedError(LoraError):
    """A pickle-based checkpoint (.bin, .ckpt, .pt, ...): refused, never unpickled."""


class LoraFormatError(LoraError):
    """Not a safetensors file, corrupt or truncated, or holds no LoRA weights we understand."""


class LoraShapeError(LoraError):
    """Factors that do not fit together (rank mismatch between down and up, wrong dimensions)."""


class LoraValueError(LoraError):
    """NaN or infinite weights."""


class BaseModelMismatchError(LoraError):
    """The LoRA was made for another base model than the one it is used with."""


class BaseModelError(EstloraError, ValueError):
    """The base model folder or id cannot be read."""


def first_line(error: BaseException) -> str:
    """The first line of a library's exception: enough to say why, on the one line we print."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
