"""Typed errors for bad input. Each carries the offending file or setting, and its message is one line.

The CLI turns an `EstloraError`, and only that, into one line on stderr and exit code 2: anything
else is a bug (ours or a library's) and keeps its traceback. Python callers can catch the precise
subclass; every one is also a `ValueError` or an `OSError`, as the standard library would raise.
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


class UnsupportedModelError(EstloraError, ValueError):
    """A pipeline, base or LoRA of a model family estlora does not serve (yet)."""


class SettingError(EstloraError, ValueError):
    """A setting out of range, of the wrong type, or not one of its choices (`path` names the setting)."""


class FusionError(EstloraError, ValueError):
    """A fusion asked of a pipeline that cannot take it (one is already installed, say)."""


# What the CLI prints under a traceback that is not one of ours.
REPORT_BUG = (
    "this is not a problem with your input but a bug in estlora or a library it uses; please report it "
    "to estlora's issue tracker with the command you ran and the traceback above"
)


def first_line(error: BaseException) -> str:
    """The first line of a library's exception: enough to say why, on the one line we print."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
