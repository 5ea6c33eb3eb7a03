"""`estlora generate` and `estlora demo` end to end on the tiny SDXL, offline."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from estlora import discrepancy
from estlora.cli import main
from estlora.errors import SettingError
from estlora.toy.model import DEMO_PAIR

PROMPT = "a photo of sks dog in szn style"


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory):
    from estlora.testing.tiny_encoders import write_tiny_dino

    return write_tiny_dino(tmp_path_factory.mktemp("dino") / "dino")


def gen_args(tiny_dir, out, *extra):
    return [
        "generate",
        "--base",
        str(tiny_dir),
        "--subject",
        "example:subject",
        "--style",
        "example:style",
        "--prompt",
        PROMPT,
        "--steps",
        "3",
        "--out",
        str(out),
        *extra,
    ]


def pixels(path):
    return np.asarray(Image.open(path))


def test_generate_writes_images_with_settings(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(gen_args(tiny_dir, out, "--num-images", "2", "--seed", "5", "--beta", "0.7")) == 0
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == [f"a-photo-of-sks-dog-in-szn-style-est-seed{s}.png" for s in (5, 6)]
    for seed, png in zip((5, 6), pngs, strict=True):
        sidecar = json.loads(png.with_suffix(".json").read_text())
        assert json.loads(Image.open(png).text["estlora"]) == sidecar
        settings = sidecar["settings"]
        prompt, details = Image.open(png).text["parameters"].split("\n")  # A1111's chunk, for other tools
        assert prompt == settings["prompt"]
        assert details.startswith(f"Steps: 3, Sampler: {settings['scheduler']}, CFG scale: {settings['guidance']}")
        assert f"Seed: {seed}, Size: 64x64" in details and 'EST-LoRA: "method: est, beta: 0.7"' in details
        assert f"{sidecar['subject_sha256'][:10]}" in details and f"{sidecar['style_sha256'][:10]}" in details
        assert (settings["seed"], settings["steps"], settings["method"], sidecar["beta"]) == (seed, 3, "est", 0.7)
        assert sidecar["beta_source"] == "given"
        assert len(sidecar["plan_hash"]) == 16 and sidecar["gamma"] > 0
        assert pixels(png).shape == (64, 64, 3)
    assert not pixels(pngs[0]).tolist() == pixels(pngs[1]).tolist()
    assert not list(out.glob(".*")), "temporary files left behind"


def test_regenerates_bit_for_bit_from_metadata(tiny_dir, tmp_path):
    first = tmp_path / "first"
    assert main(gen_args(tiny_dir, first, "--method", "klora", "--seed", "3", "--subject-scale", "0.8")) == 0
    (png,) = first.glob("*.png")
    command = json.loads(png.with_suffix(".json").read_text())["command"]
    words = shlex.split(command)
    assert words[:2] == ["estlora", "generate"]
    assert main(words[1:] + ["--out", str(tmp_path / "again")]) == 0
    (again,) = (tmp_path / "again").glob("*.png")
    assert np.array_equal(pixels(png), pixels(again))


def test_beta_auto_is_measured_then_cached(tiny_dir, tiny_dino, tmp_path, monkeypatch, capsys):
    args = gen_args(tiny_dir, tmp_path / "a", "--dino-model", str(tiny_dino), "--beta-probe-steps", "2")
    assert main(args) == 0
    assert "style discrepancy)" in capsys.readouterr().out
    (png,) = (tmp_path / "a").glob("*.png")
    meta = json.loads(png.with_suffix(".json").read_text())
    assert meta["beta_source"] == "measured"
    assert 0 <= meta["beta"] <= 2

    def no_embedding(*args, **kwargs):
        raise AssertionError("beta was measured again instead of read from the cache")

    monkeypatch.setattr(discrepancy, "DinoEmbedder", no_embedding)
    args[args.index(str(tmp_path / "a"))] = str(tmp_path / "b")
    assert main(args) == 0
    assert "cached" in capsys.readouterr().out
    (again,) = (tmp_path / "b").glob("*.png")
    assert json.loads(again.with_suffix(".json").read_text())["beta"] == meta["beta"]
    assert np.array_equal(pixels(png), pixels(again))


def test_interrupted_write_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    def crash(self, fp, *args, **kwargs):
        with open(fp, "wb") as handle:
            handle.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", crash)
    out = tmp_path / "out"
    assert main(gen_args(tiny_dir, out, "--beta", "0.5")) == 130
    assert not list(out.glob("*.png")) and not list(out.glob(".*"))


@pytest.mark.parametrize("problem", ["pickle", "other-base"])
def test_bad_lora_is_one_line_exit_2(tiny_dir, tmp_path, problem):
    import torch
    from safetensors.torch import save_file

    if problem == "pickle":
        bad = tmp_path / "subject.ckpt"
        torch.save({"a": torch.zeros(1)}, bad)
    else:  # real SDXL widths on the tiny model
        bad = tmp_path / "subject.safetensors"
        name = "unet.down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k"
        save_file(
            {f"{name}.lora_A.weight": torch.ones(2, 2048), f"{name}.lora_B.weight": torch.ones(1280, 2)}, str(bad)
        )
    out = tmp_path / "out"
    args = gen_args(tiny_dir, out, "--beta", "0.5")
    args[args.index("example:subject")] = str(bad)
    done = subprocess.run([sys.executable, "-m", "estlora.cli", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("estlora: error: ") and str(bad) in lines[0]
    assert not out.exists()


def test_a_lora_that_changes_nothing_is_named(tiny_dir, tmp_path, capsys):
    """An untrained LoRA (B = 0, as initialised) still runs, with a warning saying so."""
    import torch
    from safetensors.torch import load_file, save_file

    from estlora.loading.lora import load_lora

    state = load_file(str(load_lora("example:style").path))
    zero = {k: torch.zeros_like(v) if "lora_B" in k or "lora.up" in k else v for k, v in state.items()}
    assert any(not torch.equal(zero[k], state[k]) for k in state)
    save_file(zero, str(tmp_path / "untrained.safetensors"))
    args = gen_args(tiny_dir, tmp_path / "out", "--beta", "0.5")
    args[args.index("example:style")] = str(tmp_path / "untrained.safetensors")
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "warning: the style LoRA changes nothing: its update is zero in every routed linear" in said
    assert "subject LoRA changes nothing" not in said


def test_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "3", "--num-images", "1"]) == 0
    names = sorted(p.name for p in out.iterdir())
    images = ["subject-only", "style-only", "fused-est", "fused-switch", "fused-composite"]
    expected = [f"{stem}-seed0.{ext}" for stem in images for ext in ("png", "json")]
    assert names == sorted([*expected, "overview.png", "plan.png", "summary.md"])
    page = (out / "summary.md").read_text()
    assert "beta = " in page and "136 projections" in page and f"toy:{DEMO_PAIR[0]}" in page
    assert "On the toy benchmark, the share of images showing both for this pair: est " in page
    meta = json.loads((out / "fused-est-seed0.json").read_text())
    assert meta["settings"]["base"] == "toy" and meta["settings"]["dino_model"] == "toy"
    assert json.loads((out / "subject-only-seed0.json").read_text())["settings"]["method"] == "subject"
    assert str(out.resolve()) in capsys.readouterr().out


def test_the_demo_shows_the_benchmarks_best_pair_and_strongest_baselines():
    """The demo's pair is where est shows both most often on the shipped benchmark; its baselines are the
    two fusion methods (est's own variant aside) with the highest mean over the pairs."""
    from estlora.commands.demo import BASELINES
    from estlora.toy.model import benchmark_both

    both = benchmark_both()
    assert len(both) == 9 and " x ".join(DEMO_PAIR) == max(both, key=lambda pair: both[pair]["est"])
    mean = {m: sum(row[m] for row in both.values()) for m in ("klora", "merge", "switch", "composite")}
    assert set(BASELINES) == set(sorted(mean, key=mean.get)[-2:])


def test_every_scheduler_is_built_from_the_bases_own_config(tiny_dir):
    from estlora.families.sdxl import SCHEDULERS, SDXL
    from estlora.loading.base import load_pipeline
    from estlora.loading.samplers import make_scheduler, scheduler_settings

    own = load_pipeline(tiny_dir).scheduler
    settings = {}
    for name, choice in SCHEDULERS.items():
        scheduler = make_scheduler(own, SDXL(), name)
        expected = type(own).__name__ if choice is None else choice[0]
        assert type(scheduler).__name__ == expected
        assert scheduler.config.beta_schedule == own.config.beta_schedule == "scaled_linear"
        assert scheduler.config.timestep_spacing == own.config.timestep_spacing
        settings[name] = scheduler_settings(scheduler)
    assert settings["dpm++2m-karras"]["use_karras_sigmas"] and not settings["dpm++2m"]["use_karras_sigmas"]
    assert settings["dpm++2m-sde-karras"]["algorithm_type"] == "sde-dpmsolver++"
    assert make_scheduler(own, SDXL(), "default") is own
    with pytest.raises(SettingError, match="scheduler: must be one of default, euler"):
        make_scheduler(own, SDXL(), "dpm++ 2m")


@pytest.mark.parametrize("name", ["dpm++2m-karras", "euler-a"])
def test_scheduler_choice_equals_a_plain_diffusers_run(tiny_dir, tmp_path, name):
    """`--method subject --scheduler X` against diffusers' own LoRA loading with that scheduler
    (euler-a draws fresh noise at every step, from the same CPU generator)."""
    import diffusers
    import torch

    from estlora.families.sdxl import SCHEDULERS
    from estlora.loading.lora import load_lora

    assert main(gen_args(tiny_dir, tmp_path, "--method", "subject", "--scheduler", name, "--seed", "4")) == 0
    (png,) = tmp_path.glob("*.png")
    plain = diffusers.StableDiffusionXLPipeline.from_pretrained(str(tiny_dir))
    class_name, overrides = SCHEDULERS[name]
    plain.scheduler = getattr(diffusers, class_name).from_config(plain.scheduler.config, **overrides)
    plain.load_lora_weights(str(load_lora("example:subject").path))
    generator = torch.Generator().manual_seed(4)
    expected = plain(PROMPT, num_inference_steps=3, guidance_scale=5.0, generator=generator).images[0]
    assert np.array_equal(pixels(png), np.asarray(expected))
    meta = json.loads(png.with_suffix(".json").read_text())
    assert meta["scheduler"] == class_name and f"--scheduler {name}" in meta["command"]


def test_guidance_rescale_equals_a_plain_diffusers_run(tiny_dir, tmp_path):
    import diffusers
    import torch

    from estlora.loading.lora import load_lora

    assert main(gen_args(tiny_dir, tmp_path, "--method", "subject", "--guidance-rescale", "0.7", "--seed", "2")) == 0
    (png,) = tmp_path.glob("*.png")
    plain = diffusers.StableDiffusionXLPipeline.from_pretrained(str(tiny_dir))
    plain.load_lora_weights(str(load_lora("example:subject").path))
    generator = torch.Generator().manual_seed(2)
    expected = plain(PROMPT, num_inference_steps=3, guidance_scale=5.0, guidance_rescale=0.7, generator=generator)
    assert np.array_equal(pixels(png), np.asarray(expected.images[0]))
    without = plain(PROMPT, num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(2))
    assert not np.array_equal(pixels(png), np.asarray(without.images[0]))
    assert "--guidance-rescale 0.7" in json.loads(png.with_suffix(".json").read_text())["command"]


def test_timestep_spacing_equals_a_plain_diffusers_run(tiny_dir, tmp_path):
    """SDXL-Lightning and Turbo models want trailing timesteps (the last step at t = 999)."""
    import diffusers
    import torch

    from estlora.families.sdxl import SDXL
    from estlora.loading.base import load_pipeline
    from estlora.loading.lora import load_lora
    from estlora.loading.samplers import make_scheduler

    args = ["--method", "subject", "--scheduler", "euler-a", "--timestep-spacing", "trailing", "--seed", "6"]
    assert main(gen_args(tiny_dir, tmp_path, *args)) == 0
    (png,) = tmp_path.glob("*.png")
    plain = diffusers.StableDiffusionXLPipeline.from_pretrained(str(tiny_dir))
    config = plain.scheduler.config
    plain.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(config, timestep_spacing="trailing")
    plain.load_lora_weights(str(load_lora("example:subject").path))
    expected = plain(PROMPT, num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(6))
    assert np.array_equal(pixels(png), np.asarray(expected.images[0]))
    own = load_pipeline(tiny_dir).scheduler
    trailing = make_scheduler(own, SDXL(), "default", "trailing")
    trailing.set_timesteps(3)
    assert type(trailing) is type(own) and trailing.timesteps.tolist() == [
        999,
        666,
        332,
    ]  # round(1000 - 1000 k / 3) - 1
    with pytest.raises(SettingError, match="timestep-spacing: must be one of leading, trailing, linspace"):
        make_scheduler(own, SDXL(), "euler", "uniform")


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--steps", "0", "steps: must be at least 1, not 0"),
        ("--num-images", "0", "num-images: must be at least 1, not 0"),
        ("--beta-probe-steps", "-2", "beta-probe-steps: must be at least 1, not -2"),
        ("--width", "100", "width: must be a multiple of 8 on SDXL (the VAE's scale), not 100"),
        ("--height", "0", "height: must be at least 8, not 0"),
        ("--guidance-rescale", "1.5", "guidance-rescale: must be at most 1, not 1.5"),
        ("--seed", "-1", "seed: must be at least 0, not -1"),
        ("--alpha", "nan", "alpha: must be a finite number, not nan"),
    ],
)
def test_settings_out_of_range_are_refused_before_loading(
    tiny_dir, tmp_path, capsys, monkeypatch, flag, value, message
):
    """diffusers would fail later, `--steps 0` with a ZeroDivisionError traceback."""
    import estlora.session

    monkeypatch.setattr(estlora.session, "load_pipeline", lambda *a, **k: pytest.fail("loaded the model"))
    out = tmp_path / "out"
    assert main([*gen_args(tiny_dir, out, "--beta", "0.5"), flag, value]) == 2
    assert capsys.readouterr().err.strip() == f"estlora: error: {message}"
    assert not out.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_a_device_this_machine_lacks_is_one_line(tiny_dir, tmp_path, capsys):
    assert main([*gen_args(tiny_dir, tmp_path / "out", "--beta", "0.5"), "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == "estlora: error: device: cuda is not available on this machine"
    assert main([*gen_args(tiny_dir, tmp_path / "out", "--beta", "0.5"), "--device", "gpu"]) == 2
    assert "device: must be auto, cpu, cuda, cuda:N or mps, not 'gpu'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("error", [RuntimeError("boom"), ValueError("a library's own check")])
def test_a_bug_keeps_its_traceback_and_says_where_to_report_it(tiny_dir, tmp_path, capsys, monkeypatch, error):
    """Only estlora's typed errors are one line: anything else, even a ValueError, is a bug to report."""
    import estlora.session

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(estlora.session.Session, "generate", broken)
    assert main(gen_args(tiny_dir, tmp_path / "out", "--beta", "0.5")) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and f"{type(error).__name__}: {error}" in err
    assert err.strip().splitlines()[-1].startswith("estlora: this is not a problem with your input but a bug")
