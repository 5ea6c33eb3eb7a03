"""`estlora grid` and `estlora eval` end to end on the tiny SDXL: resumable, multi-process, scored."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from PIL import Image

from estlora.cli import main
from estlora.commands.evaluation import bootstrap_ci
from estlora.commands.grid import GridSpec, jobs, manifest_entries, share
from estlora.errors import EstloraError


@pytest.fixture(scope="module")
def encoders():
    from estlora.testing.tiny_encoders import builtin_tiny_clip, builtin_tiny_dino

    return str(builtin_tiny_clip()), str(builtin_tiny_dino())


@pytest.fixture
def spec_file(tmp_path, tiny_dir, encoders):
    rng = np.random.default_rng(0)
    for folder, count in (("refs/dog", 3), ("refs/cat", 2), ("refs/wc", 1), ("refs/oil", 1)):
        (tmp_path / folder).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / folder / f"{i}.png")
    spec = {
        "base": str(tiny_dir),
        "subjects": [
            {"name": "dog", "lora": "example:subject", "token": "sks", "class": "dog", "references": "refs/dog"},
            {"name": "cat", "lora": "example:style", "token": "sbu", "class": "cat", "references": "refs/cat"},
        ],
        "styles": [
            {"name": "wc", "lora": "example:style", "token": "szn", "class": "watercolor", "references": "refs/wc"},
            {
                "name": "oil",
                "lora": "example:subject",
                "token": "zkz",
                "class": "oil painting",
                "references": "refs/oil/0.png",
            },
        ],
        "seeds": [0, 1],
        "methods": ["est", "merge"],
        "steps": 3,
        "dino_model": encoders[1],
        "beta_probe_steps": 2,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def pngs(run):
    return sorted(p.relative_to(run).as_posix() for p in run.rglob("*.png") if p.parent.name != "report")


@pytest.mark.slow
def test_grid_then_eval(spec_file, tmp_path, encoders, capsys):
    run = tmp_path / "run"
    assert main(["grid", str(spec_file), "--out", str(run)]) == 0
    expected = sorted(job.relpath for job in jobs(GridSpec.from_dict(yaml.safe_load(spec_file.read_text()))))
    assert len(expected) == 16 and pngs(run) == expected
    assert sorted(e["path"] for e in manifest_entries(run)) == expected
    meta = json.loads((run / "images/dog/wc/est/p0-seed1.json").read_text())
    assert meta["settings"]["prompt"] == "a sks dog in szn style"
    assert meta["grid"]["neutral_prompt"] == "a dog in watercolor style"
    assert meta["beta_source"] == "measured"
    assert json.loads((run / "images/dog/wc/merge/p0-seed1.json").read_text())["beta_source"] == "unused"

    assert main(["grid", str(spec_file), "--out", str(run)]) == 0  # rerun: nothing to do
    assert "grid: 0 images rendered" in capsys.readouterr().out

    clip, dino = encoders
    assert main(["eval", str(run), "--clip-model", clip, "--dino-model", dino, "--batch-size", "3"]) == 0
    rows = list(csv.DictReader((run / "scores.csv").open()))
    assert len(rows) == 16
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["methods"]) == {"est", "merge"} and summary["methods"]["est"]["n"] == 8
    for name in ("report.md", "report.html", "report/bars.png", "report/scatter.png", "report/grid-est.png"):
        assert (run / name).is_file(), name
    # one row against a direct computation with the metrics module
    from estlora.metrics import Scorer, load_reference_images

    row = next(r for r in rows if r["path"] == "images/cat/oil/merge/p0-seed0.png")
    scorer = Scorer(clip, dino)
    direct = scorer.score(
        [Image.open(run / row["path"]).convert("RGB")],
        ["a cat in oil painting style"],
        scorer.embed_refs(load_reference_images(tmp_path / "refs/cat")),
        scorer.embed_refs(load_reference_images(tmp_path / "refs/oil/0.png")),
    )
    for metric in ("style_clip", "subject_dino", "subject_clip", "text_clip"):
        assert float(row[metric]) == pytest.approx(direct[metric][0], abs=1e-6)  # batch of 8 vs 1
    means = [float(r["style_clip"]) for r in rows if r["method"] == "est"]
    assert summary["methods"]["est"]["style_clip"]["mean"] == pytest.approx(sum(means) / len(means))


@pytest.mark.slow
def test_killed_grid_resumes_without_duplicates_or_gaps(spec_file, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "estlora.cli", "grid", str(spec_file), "--out", str(run), "--beta", "0.6"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(pngs(run)) < 3 and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = len(pngs(run))
    assert 3 <= done_before < 16, "the kill should land mid-run"
    assert subprocess.run(command, capture_output=True, timeout=300).returncode == 0
    paths = [e["path"] for e in manifest_entries(run)]
    assert len(paths) == len(set(paths)) == 16
    assert pngs(run) == sorted(paths)
    assert not [p for p in run.rglob(".*") if p.is_file()], "temporary files left behind"


@pytest.mark.slow
def test_two_processes_make_the_same_images(spec_file, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single"
    args = ["grid", str(spec_file), "--beta", "0.6", "--threads", "1", "--seeds", "0", "--out"]
    assert (
        subprocess.run(
            [sys.executable, "-m", "estlora.cli", *args, str(single)], env=env, capture_output=True, timeout=300
        ).returncode
        == 0
    )
    double = tmp_path / "double"
    launch = [
        os.path.join(os.path.dirname(sys.executable), "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "estlora.cli",
        *args,
        str(double),
    ]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("grid: 4 images rendered by this process") == 2  # 8 images, split 4 + 4
    assert pngs(single) == pngs(double) and len(pngs(single)) == 8
    for rel in pngs(single):
        assert np.array_equal(np.asarray(Image.open(single / rel)), np.asarray(Image.open(double / rel))), rel


def test_share_deals_whole_groups():
    spec = GridSpec.from_dict(
        {
            "subjects": [{"name": s, "lora": "x"} for s in "abc"],
            "styles": [{"name": "t", "lora": "y"}],
            "seeds": [0, 1],
            "methods": ["est", "merge"],
        }
    )
    everything = jobs(spec)
    parts = [share(everything, rank, 2) for rank in range(2)]
    assert sorted(parts[0] + parts[1], key=everything.index) == everything
    assert not {j.group for j in parts[0]} & {j.group for j in parts[1]}


def test_bad_specs(tmp_path, spec_file, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("subjects: []\nstyles: [{name: t, lora: y}]\n")
    assert main(["grid", str(bad), "--out", str(tmp_path / "r")]) == 2
    bad.write_text("subjects: [{name: s, lora: x}]\nstyles: [{name: t, lora: y}]\nsteeps: 3\n")
    assert main(["grid", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "unknown grid settings: steeps" in capsys.readouterr().err
    loras = "subjects: [{name: s, lora: 'example:subject'}]\nstyles: [{name: t, lora: 'example:style'}]\n"
    bad.write_text(loras + "width: 100\n")
    assert main(["grid", str(bad), "--out", str(tmp_path / "r")]) == 2  # before the model or any file
    assert "width: must be a multiple of 8 on SDXL (the VAE's scale), not 100" in capsys.readouterr().err
    bad.write_text(loras + "alpha: [1.0, .nan]\n")  # a varied setting: every value is checked
    assert main(["grid", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "alpha: must be a finite number, not nan" in capsys.readouterr().err
    assert main(["grid", str(spec_file), "--steps", "0", "--out", str(tmp_path / "r")]) == 2
    assert "steps: must be at least 1, not 0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"version": 1, "spec": {"other": True}}))
    assert main(["grid", str(spec_file), "--out", str(run)]) == 2
    assert "holds another grid" in capsys.readouterr().err


def test_bootstrap_ci():
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    mean, low, high = bootstrap_ci([0.0, 1.0, math.nan, 2.0, 3.0])
    assert mean == 1.5 and 0.0 <= low < 1.5 < high <= 3.0
    assert all(math.isnan(v) for v in bootstrap_ci([math.nan]))


def test_a_grid_varies_fusion_settings(tmp_path, tiny_dir):
    """Lists of fusion settings multiply the grid; each image's folder names the settings that vary
    and its metadata carries them; a setting given once stays out of the folder names."""
    spec = {
        "base": str(tiny_dir),
        "subjects": [{"name": "dog", "lora": "example:subject"}],
        "styles": [{"name": "wc", "lora": "example:style"}],
        "methods": ["est", "merge"],
        "alpha": [1.0, 2.5],
        "route": ["attention", "blocks"],
        "other_weights": "merge",
        "beta": 0.4,
        "steps": 2,
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    parsed = GridSpec.from_dict(spec)
    assert parsed.labels()[:2] == ["est+route=attention+alpha=1", "est+route=attention+alpha=2.5"]  # declared order
    assert len(jobs(parsed)) == 2 * 2 * 2
    run = tmp_path / "run"
    assert main(["grid", str(tmp_path / "spec.yaml"), "--out", str(run)]) == 0
    assert pngs(run) == sorted(f"images/dog/wc/{label}/p0-seed0.png" for label in parsed.labels())
    meta = json.loads((run / "images/dog/wc/est+route=blocks+alpha=2.5/p0-seed0.json").read_text())
    settings = meta["settings"]
    assert (settings["alpha"], settings["route"], settings["other_weights"], settings["beta"]) == (
        2.5,
        "blocks",
        "merge",
        0.4,
    )
    assert meta["grid"]["variant"] == [["route", "blocks"], ["alpha", 2.5], ["beta", 0.4], ["other_weights", "merge"]]
    low, high = (
        np.asarray(Image.open(run / f"images/dog/wc/est+route=attention+alpha={a}/p0-seed0.png")) for a in (1, 2.5)
    )
    assert not np.array_equal(low, high)  # alpha moves the flips: other images
    assert main(["grid", str(tmp_path / "spec.yaml"), "--out", str(run)]) == 0  # resumes: nothing left


@pytest.mark.slow
def test_a_toy_grid_is_scored_offline_by_the_toy_scorer(tmp_path):
    """`estlora eval` on a grid on the toy base: the toy scorer by default (no CLIP or DINO asked for),
    per method and per pair, each value as the scorer itself says of the image."""
    from estlora.toy.scorer import load_scorer, predict

    spec = {
        "base": "toy",
        "subjects": [{"name": "heart", "lora": "toy:heart", "token": "sks"}],
        "styles": [{"name": "outline", "lora": "toy:outline", "token": "szn"},
                   {"name": "dots", "lora": "toy:checker", "token": "szn", "class": "checker"}],
        "prompts": ["a {subject} shape in {style} style"],
        "seeds": [0, 1, 2],
        "methods": ["subject", "composite"],
        "steps": 4,
        "beta": 0.5,
    }  # fmt: skip
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    run = tmp_path / "run"
    assert main(["grid", str(tmp_path / "spec.yaml"), "--out", str(run)]) == 0
    assert main(["eval", str(run)]) == 0
    rows = list(csv.DictReader((run / "scores.csv").open()))
    assert len(rows) == 12
    scorer = load_scorer()
    for row in rows:
        label = predict(scorer, [Image.open(run / row["path"])])[0]
        style = {"outline": "outline", "dots": "checker"}[row["style"]]
        assert float(row["subject_shown"]) == (label.shape == "heart")
        assert float(row["style_shown"]) == (label.texture == style)
        assert float(row["both_shown"]) == float(row["subject_shown"]) * float(row["style_shown"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["scorer"] == "toy" and set(summary["pairs"]) == {"heart x outline", "heart x dots"}
    chosen = [float(r["both_shown"]) for r in rows if (r["method"], r["style"]) == ("composite", "dots")]
    assert summary["pairs"]["heart x dots"]["composite"]["both_shown"]["mean"] == pytest.approx(np.mean(chosen))
    low, high = summary["methods"]["subject"]["subject_shown"]["ci95"]
    assert low <= summary["methods"]["subject"]["subject_shown"]["mean"] <= high
    report = (run / "report.md").read_text()
    assert "per pair: both shown" in report and "toy scorer" in report
    for name in ("report.html", "report/bars.png", "report/scatter.png", "report/grid-composite.png"):
        assert (run / name).is_file(), name


def test_the_toy_scorer_refuses_an_entry_it_cannot_place(tmp_path):
    from estlora.commands.evaluation import metric_set

    spec = GridSpec.from_dict(
        {"base": "toy", "subjects": [{"name": "dog", "lora": "dog.safetensors"}],
         "styles": [{"name": "outline", "lora": "toy:outline"}]}
    )  # fmt: skip
    with pytest.raises(EstloraError, match="dog.safetensors: subject 'dog' is no toy subject"):
        metric_set(spec, "auto", "clip", "dino", "cpu", 1)
