"""Shared fixtures: everything offline, one tiny SDXL folder per test session."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)  # numerics depend slightly on the thread count


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep the built-in model/example cache inside the test session."""
    os.environ["ESTLORA_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from estlora.tiny_model import write_tiny_sdxl

    return write_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_shapes():
    from estlora.base import projection_shapes
    from estlora.tiny_model import tiny_unet

    return projection_shapes(dict(tiny_unet().config))
