"""`estlora generate`: load the base, fuse the two LoRAs, measure beta, render, save with settings.

Every image is saved with its full settings twice (a PNG text chunk `estlora` and a JSON sidecar),
including the beta actually used and the plan hash, and with the command that regenerates it.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..config import ModelConfig
from ..session import Request, Session


def generate(request: Request, model: ModelConfig, out: str | os.PathLike = "outputs") -> list[Path]:
    """The whole story: LoRAs and settings checked against the base's config, then base, plan, beta,
    images. Returns the PNG paths."""
    session = Session.open(model, check=request)
    try:
        return session.generate(request, out)
    finally:
        session.close()
