"""The demo's images and plan, pinned: files written by the code as it stood before the architecture
move (issue 16) and compared on every run since, so a refactor cannot change a result unseen.

What another CPU may change, and so what is allowed: its fp32 kernels sum in another order, so pixels
may differ by one level, the energies (fp32 Grams) by 1e-6 relative, and the measured beta (a cosine
of two renders' features) by 1e-4. est's plan is a hard choice per projection, so a beta a few 1e-6 off
can flip one (seen between two CPUs: 3e-6 apart, one projection's choice at one step); the fused images
are therefore compared as rendered at the pinned beta (each image's own `command`, beta set to the
pinned one), and the plan there exactly: every projection's weights at every step.

`ESTLORA_WRITE_GOLDEN=1 pytest tests/test_golden_demo.py` rewrites the files (only when a change of
results is intended: say so in the commit).
"""

from __future__ import annotations

import json
import math
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from estlora.cli import main
from estlora.toy.model import DEMO_PAIR

GOLDEN = Path(__file__).parent / "data" / "golden-demo"
IMAGES = ("subject-only-seed0.png", "style-only-seed0.png", "fused-est-seed0.png", "fused-est-seed1.png")
WRITE = os.environ.get("ESTLORA_WRITE_GOLDEN") == "1"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("golden") / "demo"
    assert main(["demo", "--out", str(out), "--steps", "8", "--num-images", "2", "--device", "cpu"]) == 0
    return out


def beta_of(folder: Path) -> float:
    return json.loads((folder / "fused-est-seed0.json").read_text())["beta"]


def plan_json(beta: float, capsys) -> dict:
    capsys.readouterr()
    args = ["plan", *(f"toy:{name}" for name in DEMO_PAIR), "--steps", "8", "--beta", repr(beta), "--json"]
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


def pinned_beta() -> float:
    return json.loads((GOLDEN / "beta.json").read_text())["beta"]


def at_pinned_beta(demo: Path, name: str, out: Path) -> Path:
    """A demo image rendered again by its own command, with the pinned beta."""
    words = shlex.split(json.loads((demo / name).with_suffix(".json").read_text())["command"])
    words[words.index("--beta") + 1] = repr(pinned_beta())
    assert main([*words[1:], "--out", str(out)]) == 0
    (image,) = out.glob("*.png")
    return image


def assert_same_pixels(got_path: Path, want_path: Path) -> None:
    got = np.asarray(Image.open(got_path).convert("RGB"), dtype=np.int16)
    want = np.asarray(Image.open(want_path).convert("RGB"), dtype=np.int16)
    assert got.shape == want.shape, want_path.name
    assert np.abs(got - want).max() <= 1, f"{want_path.name}: pixels moved"
    assert (got != want).mean() < 0.01, f"{want_path.name}: more than 1% of values moved"


def test_demo_images_are_unchanged(demo, tmp_path):
    if WRITE:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        for name in IMAGES:
            Image.open(demo / name).save(GOLDEN / name)
        (GOLDEN / "beta.json").write_text(json.dumps({"beta": beta_of(demo)}) + "\n")
    assert beta_of(demo) == pytest.approx(pinned_beta(), abs=1e-4)
    for name in IMAGES:
        fused = name.startswith("fused-")
        assert_same_pixels(at_pinned_beta(demo, name, tmp_path / name) if fused else demo / name, GOLDEN / name)


def test_demo_plan_is_unchanged(demo, capsys):
    """The plan at the pinned beta, as `estlora plan --json` writes it."""
    beta = pinned_beta() if not WRITE else beta_of(demo)
    got = plan_json(beta, capsys)
    if WRITE:
        (GOLDEN / "plan.json").write_text(json.dumps(got, indent=1) + "\n")
    want = json.loads((GOLDEN / "plan.json").read_text())
    # plan_hash identifies the whole config, which has gained settings since (route): not a result.
    for key in set(want) - {"plan_hash", "layers"}:
        if isinstance(want[key], float):
            assert math.isclose(got[key], want[key], rel_tol=1e-6), key
        else:
            assert got[key] == want[key], key
    assert [layer["name"] for layer in got["layers"]] == [layer["name"] for layer in want["layers"]]
    for g, w in zip(got["layers"], want["layers"], strict=True):
        assert g["weights"] == w["weights"], g["name"]
        for key in ("energy_subject", "energy_style"):
            assert math.isclose(g[key], w[key], rel_tol=1e-6), (g["name"], key)
