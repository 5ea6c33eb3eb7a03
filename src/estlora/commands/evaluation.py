"""`estlora eval RUN_DIR`: score a finished grid and write scores.csv, summary.json and a report.

Per image: style similarity (CLIP image-image to the style references), subject similarity (DINO
CLS and CLIP image-image to the subject references) and text alignment (CLIP text-image with the
prompt whose trigger tokens are replaced by class words). Per method: means with 95% percentile
bootstrap intervals. The report shows the image grid per method (rows subjects, columns styles),
per-method bars and the subject-vs-style scatter, the trade-off picture of this field.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from ..errors import EstloraError
from ..outputs import atomic_path, write_text
from .grid import GridSpec, Job, manifest_entries

METRICS = ("style_clip", "subject_dino", "subject_clip", "text_clip")
LABELS = {
    "style_clip": "style similarity (CLIP-I to style refs)",
    "subject_dino": "subject similarity (DINO to subject refs)",
    "subject_clip": "subject similarity (CLIP-I to subject refs)",
    "text_clip": "text alignment (CLIP-T)",
}


def bootstrap_ci(values: list[float], resamples: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its 95% percentile-bootstrap interval, NaNs left out."""
    data = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if data.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    return float(data.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def load_run(run_dir: Path) -> tuple[GridSpec, list[Job]]:
    try:
        record = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        raise EstloraError(run_dir, "not a grid run folder (no readable run.json)") from None
    spec = GridSpec.from_dict(record["spec"], str(run_dir / "run.json"))
    seen, finished = set(), []
    for entry in manifest_entries(run_dir):
        job = Job.from_record(entry)
        if job not in seen and (run_dir / job.relpath).exists():
            seen.add(job)
            finished.append(job)
    if not finished:
        raise EstloraError(run_dir, "no finished images in this run")
    return spec, finished


def score_run(run_dir: Path, spec: GridSpec, finished: list[Job], scorer) -> list[dict]:
    """One row per finished image with its four metrics (NaN where references are missing).

    Images are scored one (subject, style) pair at a time, in batches, against references that are
    embedded once per entry.
    """
    from itertools import groupby

    from PIL import Image
    from tqdm.auto import tqdm

    from ..metrics import load_reference_images

    entries = {e.name: e for e in spec.subjects + spec.styles}
    refs = {name: scorer.embed_refs(load_reference_images(e.references)) for name, e in entries.items() if e.references}
    rows = []
    bar = tqdm(total=len(finished), desc="scoring")
    for (subject_name, style_name), jobs in groupby(finished, key=lambda j: (j.subject, j.style)):
        jobs = list(jobs)
        subject, style = entries[subject_name], entries[style_name]
        images = []
        for job in jobs:
            with Image.open(run_dir / job.relpath) as image:
                images.append(image.convert("RGB"))
        prompts = [spec.prompt(spec.prompts[j.prompt_index], subject, style, neutral=True) for j in jobs]
        placeholder = next(iter(refs.values()), None) or scorer.embed_refs(images[:1])
        scores = scorer.score(images, prompts, refs.get(subject_name, placeholder), refs.get(style_name, placeholder))
        for i, (job, prompt) in enumerate(zip(jobs, prompts, strict=True)):
            row = {
                "subject": job.subject,
                "style": job.style,
                "method": job.label,
                "prompt_index": job.prompt_index,
                "seed": job.seed,
                "path": job.relpath,
                "neutral_prompt": prompt,
            }
            for metric in METRICS:
                missing = (
                    subject_name not in refs
                    if metric.startswith("subject")
                    else (style_name not in refs if metric.startswith("style") else False)
                )
                row[metric] = math.nan if missing else scores[metric][i]
            rows.append(row)
        bar.update(len(jobs))
    bar.close()
    return rows


def summarise(rows: list[dict], methods: list[str]) -> dict:
    summary = {}
    for method in methods:
        chosen = [r for r in rows if r["method"] == method]
        summary[method] = {"n": len(chosen)}
        for metric in METRICS:
            mean, low, high = bootstrap_ci([r[metric] for r in chosen])
            summary[method][metric] = {"mean": mean, "ci95": [low, high]}
    return summary


def image_grid(run_dir: Path, spec: GridSpec, method: str, finished: set, cell: int = 160):
    """Rows subjects, columns styles (first prompt, first seed that exists), labelled."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=14)
    label_w, label_h = 120, 24
    grid = Image.new("RGB", (label_w + cell * len(spec.styles), label_h + cell * len(spec.subjects)), "white")
    draw = ImageDraw.Draw(grid)
    for c, style in enumerate(spec.styles):
        draw.text((label_w + c * cell + 4, 4), style.name, fill="black", font=font)
    for r, subject in enumerate(spec.subjects):
        draw.text((4, label_h + r * cell + cell // 2), subject.name, fill="black", font=font)
        for c, style in enumerate(spec.styles):
            job = next(
                (
                    j
                    for j in sorted(finished, key=lambda j: (j.prompt_index, j.seed))
                    if (j.subject, j.style, j.label) == (subject.name, style.name, method)
                ),
                None,
            )
            if job is None:
                continue
            with Image.open(run_dir / job.relpath) as image:
                grid.paste(image.convert("RGB").resize((cell, cell)), (label_w + c * cell, label_h + r * cell))
    return grid


def plots(rows: list[dict], summary: dict, methods: list[str]):
    """(bars, scatter) as PNG bytes: per-method means with 95% intervals; subject vs style per image."""
    try:
        import matplotlib
    except ImportError:
        raise EstloraError(None, "the evaluation figures need matplotlib: pip install 'estlora[eval]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.6))
    for ax, metric in zip(axes, METRICS, strict=True):
        means = [summary[m][metric]["mean"] for m in methods]
        lows = [summary[m][metric]["mean"] - summary[m][metric]["ci95"][0] for m in methods]
        highs = [summary[m][metric]["ci95"][1] - summary[m][metric]["mean"] for m in methods]
        ax.bar(methods, means, yerr=[lows, highs], capsize=4, color="#5b8cc0")
        ax.set_title(LABELS[metric], fontsize=9)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    bars = _png(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for method in methods:
        chosen = [r for r in rows if r["method"] == method]
        ax.scatter([r["style_clip"] for r in chosen], [r["subject_dino"] for r in chosen], alpha=0.35, s=14)
        ax.scatter(
            [summary[method]["style_clip"]["mean"]],
            [summary[method]["subject_dino"]["mean"]],
            s=90,
            marker="X",
            edgecolors="black",
            label=method,
            color=ax.collections[-1].get_facecolor()[0],
        )
    ax.set_xlabel(LABELS["style_clip"])
    ax.set_ylabel(LABELS["subject_dino"])
    ax.set_title("subject vs style (dots: images, crosses: method means)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return bars, _png(fig)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as staging:
        staging.write_bytes(data)


def evaluate(run_dir: str | Path, clip_model: str, dino_model: str, device: str = "cpu", batch_size: int = 16) -> Path:
    """Score the run and write scores.csv, summary.json, report.md, report.html and figures into it."""
    from ..metrics import Scorer

    run_dir = Path(run_dir)
    spec, finished = load_run(run_dir)
    finished.sort(key=lambda j: (j.subject, j.style, j.label, j.prompt_index, j.seed))
    rows = score_run(run_dir, spec, finished, Scorer(clip_model, dino_model, device, batch_size))
    methods = [m for m in spec.labels() if any(r["method"] == m for r in rows)]
    summary = summarise(rows, methods)

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(run_dir / "scores.csv", text.getvalue())
    write_text(
        run_dir / "summary.json",
        json.dumps(
            {"clip_model": clip_model, "dino_model": dino_model, "images": len(rows), "methods": summary}, indent=2
        ),
    )
    report_dir = run_dir / "report"
    bars, scatter = plots(rows, summary, methods)
    _write_bytes(report_dir / "bars.png", bars)
    _write_bytes(report_dir / "scatter.png", scatter)
    for method in methods:
        with atomic_path(report_dir / f"grid-{method}.png") as staging:
            image_grid(run_dir, spec, method, set(finished)).save(staging, format="PNG")
    write_text(run_dir / "report.md", _markdown(summary, methods, len(rows), clip_model, dino_model))
    write_text(run_dir / "report.html", _html(summary, methods, len(rows), clip_model, dino_model))
    return run_dir / "report.md"


def _table(summary: dict, methods: list[str]) -> list[list[str]]:
    def cell(stats):
        return (
            "n/a"
            if math.isnan(stats["mean"])
            else (f"{stats['mean']:.4f} [{stats['ci95'][0]:.4f}, {stats['ci95'][1]:.4f}]")
        )

    header = ["method", "images", *[LABELS[m] for m in METRICS]]
    return [header] + [[m, str(summary[m]["n"]), *[cell(summary[m][k]) for k in METRICS]] for m in methods]


def _markdown(summary, methods, images, clip_model, dino_model) -> str:
    table = _table(summary, methods)
    lines = [
        "# estlora evaluation",
        "",
        f"{images} images; CLIP `{clip_model}`, DINO `{dino_model}`; means with 95% bootstrap intervals.",
        "",
        "| " + " | ".join(table[0]) + " |",
        "|" + " --- |" * len(table[0]),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    lines += ["", "![per-method means](report/bars.png)", "", "![subject vs style](report/scatter.png)", ""]
    for method in methods:
        lines += [f"## {method}", "", f"![{method} grid](report/grid-{method}.png)", ""]
    return "\n".join(lines)


def _html(summary, methods, images, clip_model, dino_model) -> str:
    from html import escape

    table = _table(summary, methods)
    head = "".join(f"<th>{escape(c)}</th>" for c in table[0])
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in table[1:])
    grids = "".join(f"<h2>{escape(m)}</h2><img src='report/grid-{escape(m)}.png'>" for m in methods)
    return (
        f"<!doctype html><meta charset='utf-8'><title>estlora evaluation</title>"
        f"<style>body{{font-family:sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:4px 8px}}"
        f"table{{border-collapse:collapse}}</style><h1>estlora evaluation</h1>"
        f"<p>{images} images; CLIP <code>{escape(clip_model)}</code>, DINO <code>{escape(dino_model)}</code>; "
        f"means with 95% bootstrap intervals.</p><table><tr>{head}</tr>{body}</table>"
        f"<p><img src='report/bars.png'></p><p><img src='report/scatter.png'></p>{grids}\n"
    )
