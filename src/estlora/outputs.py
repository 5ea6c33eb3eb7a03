"""Writing result files atomically: a reader (or an interrupted run) never sees half a file."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; it becomes `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(handle)
    try:
        yield Path(staging)
        os.chmod(staging, 0o666 & ~_umask())  # mkstemp makes files private; results are ordinary files
        os.replace(staging, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as staging:
        staging.write_text(text)


def write_folder(target: str | os.PathLike, fill: Callable[[Path], object]) -> Path:
    """Create folder `target` by fill(staging) then one rename: it appears complete or not at all.

    Refuses a non-empty existing folder, so a user's files are never overwritten.
    """
    target = Path(target)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target}: folder exists and is not empty")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fill(staging)
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes folders private
        if target.exists():
            target.rmdir()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def cached_folder(folder: Path, marker: str, write: Callable[[Path], object]) -> Path:
    """`folder`, made by write(folder) unless it already holds `marker` (built-in models in the cache)."""
    if not (folder / marker).exists():
        shutil.rmtree(folder, ignore_errors=True)
        try:
            write(folder)
        except (FileExistsError, OSError):  # another process won the race
            if not (folder / marker).exists():
                raise
    return folder
