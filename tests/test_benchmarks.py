"""The benchmark scripts run (tiny model, one short repeat), so the GPU run is not the first to find them broken."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run(script: str, *args: str, model: str = "tiny") -> str:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--model", model, *args],
        capture_output=True,
        text=True,
        cwd=BENCHMARKS,
        timeout=900,  # a correctness check, not a timing: tracing a UNet takes minutes on a slow host
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_generation_benchmark(tmp_path):
    out = tmp_path / "generation.json"
    said = run("generation.py", "--repeats", "2", "--steps", "2", "--json", str(out))
    results = json.loads(out.read_text())
    configs = "none single fused merge est est-merged est-merged-first klora composite research".split()
    assert list(results["configs"]) == configs
    assert results["repeats"] == 2 and results["projections"] == 560
    for config in results["configs"].values():
        assert len(config["times_s"]) == 2 and config["min_s"] <= config["median_s"]
    single = results["configs"]["single"]["median_s"]
    assert results["est_vs"]["single"] == results["configs"]["est"]["median_s"] / single
    assert "repeat 2/2" in said and f"est / single: {results['est_vs']['single']:.3f}" in said
    merged = results["configs"]["est-merged"]["median_s"] / results["configs"]["none"]["median_s"]
    assert results["est_merged_vs_none"] == merged and f"est merged / none: {merged:.3f}" in said
    first = results["configs"]["est-merged-first"]["median_s"] / results["configs"]["none"]["median_s"]
    assert results["est_merged_first_vs_none"] == first and f"first image / none: {first:.3f}" in said
    assert f"composite / single: {results['composite_vs_single']:.3f}" in said


@pytest.mark.slow
def test_memory_benchmark(tmp_path):
    out = tmp_path / "memory.json"
    said = run("memory.py", "--steps", "1", "--configs", "single,est", "--json", str(out))
    results = json.loads(out.read_text())["results"]
    assert [r["config"] for r in results] == ["single", "est"]
    assert all(r["peak_mib"] > 100 and r["kind"] == "CPU peak RSS" for r in results)
    assert "vs single 1.000" in said


@pytest.mark.slow
def test_compile_benchmark(tmp_path):
    """With the tracing-only backend: every compiled UNet builds one graph and none after."""
    out = tmp_path / "compile.json"
    said = run("compile.py", "--backend", "eager", "--repeats", "1", "--steps", "3", "--json", str(out))
    results = json.loads(out.read_text())
    assert list(results["configs"]) == ["single eager", "est eager", "single compiled", "est compiled"]
    assert results["distinct_plan_rows"] > 1
    assert [c["graphs"] for c in results["configs"].values()] == [0, 0, 1, 1]
    assert results["recompiled_graphs_after_first_runs"] == 0
    assert "graphs compiled after the first runs: 0" in said


@pytest.mark.slow
def test_the_benchmarks_run_on_flux1(tmp_path):
    """The FLUX.1 path of generation and memory (the GPU run's FLUX phases): FLUX.1's real widths with
    one block of each kind, and the tiny FLUX.1."""
    out = tmp_path / "generation.json"
    args = ["--blocks", "1,1", "--dtype", "fp32", "--size", "32", "--tokens", "8", "--steps", "1", "--repeats", "1"]
    said = run("generation.py", *args, "--configs", "single,est", "--json", str(out), model="flux1")
    results = json.loads(out.read_text())
    assert results["projections"] == 20 and list(results["configs"]) == ["single", "est"]
    assert "est / single" in said
    out = tmp_path / "memory.json"
    run("memory.py", "--steps", "1", "--configs", "single,est", "--json", str(out), model="tiny-flux1")
    assert [r["config"] for r in json.loads(out.read_text())["results"]] == ["single", "est"]


@pytest.mark.slow
def test_lora_recipe_trains_with_the_settings_changed_and_scores_the_lora(tmp_path):
    """Two steps of a changed recipe: the LoRA is trained under that recipe into --work and scored."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "lora_recipe.py"), "checker", "--set", "steps=2", "prior=0.25",
         "--seeds", "1", "--work", str(tmp_path)],
        capture_output=True, text=True, cwd=BENCHMARKS, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out" / "loras" / "checker.safetensors").is_file()
    assert "checker with {'steps': 2, 'batch': 16, 'lr': 0.004, 'rank': 8, 'prior': 0.25" in done.stdout
    assert "own " in done.stdout and "base kept " in done.stdout
    refused = subprocess.run(
        [sys.executable, str(BENCHMARKS / "lora_recipe.py"), "checker", "--set", "stpes=2", "--work", str(tmp_path)],
        capture_output=True, text=True, cwd=BENCHMARKS,
    )  # fmt: skip
    assert refused.returncode == 2 and "no such recipe setting: stpes" in refused.stderr
