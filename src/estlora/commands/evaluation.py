"""`estlora eval RUN_DIR`: score a finished grid and write scores.csv, summary.json and a report.

Per image, by one of two metric sets (`MetricSet`):
- CLIP/DINO (any real base): style similarity (CLIP image-image to the style references), subject
  similarity (DINO CLS and CLIP image-image to the subject references) and text alignment (CLIP
  text-image with the prompt whose trigger tokens are replaced by class words);
- the toy scorer (a grid on the toy base, offline; `estlora.toy.evaluation`): subject shown, style
  shown, both, and the scorer's probabilities of each.
Per method and per (subject, style) pair: means with 95% percentile bootstrap intervals. The report
shows the image grid per method (rows subjects, columns styles), per-method bars, a per-pair table
and the subject-vs-style scatter, the trade-off picture of this field.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from ..config import METRIC_SETS
from ..errors import EstloraError
from ..outputs import atomic_path, write_text
from .grid import Entry, GridSpec, Job, manifest_entries


class MetricSet:
    """What a grid is scored by: metric names with their labels, which two the scatter plots, the one
    the per-pair table shows, and `score` for one (subject, style) pair's images."""

    labels: dict[str, str]
    scatter: tuple[str, str]  # (x, y): style, subject
    headline: str
    description: str  # for the report: "CLIP `...`, DINO `...`"
    record: dict  # what summary.json says the scores were made with

    def score(self, images: list, prompts: list[str], subject: Entry, style: Entry) -> dict[str, list[float]]:
        raise NotImplementedError


class ClipDino(MetricSet):
    """The field's metrics (`estlora.metrics`): CLIP and DINO against each entry's reference images."""

    labels = {
        "style_clip": "style similarity (CLIP-I to style refs)",
        "subject_dino": "subject similarity (DINO to subject refs)",
        "subject_clip": "subject similarity (CLIP-I to subject refs)",
        "text_clip": "text alignment (CLIP-T)",
    }
    scatter = ("style_clip", "subject_dino")
    headline = "subject_dino"

    def __init__(self, spec: GridSpec, clip_model: str, dino_model: str, device: str, batch_size: int):
        from ..metrics import Scorer, load_reference_images

        self.scorer = Scorer(clip_model, dino_model, device, batch_size)
        self.description = f"CLIP `{clip_model}`, DINO `{dino_model}`"
        self.record = {"clip_model": clip_model, "dino_model": dino_model}
        self.refs = {
            e.name: self.scorer.embed_refs(load_reference_images(e.references))
            for e in spec.subjects + spec.styles
            if e.references
        }

    def score(self, images, prompts, subject, style):
        refs = self.refs
        placeholder = next(iter(refs.values()), None) or self.scorer.embed_refs(images[:1])
        scores = self.scorer.score(
            images, prompts, refs.get(subject.name, placeholder), refs.get(style.name, placeholder)
        )
        for metric in scores:  # NaN where the entry has no references
            owner = subject if metric.startswith("subject") else style if metric.startswith("style") else None
            if owner is not None and owner.name not in refs:
                scores[metric] = [math.nan] * len(images)
        return scores


def metric_set(spec: GridSpec, name: str, clip_model: str, dino_model: str, device: str, batch_size: int) -> MetricSet:
    """`auto`: the toy scorer for a grid on the toy base (CLIP and DINO know nothing of it), else CLIP/DINO."""
    if name not in METRIC_SETS:
        raise EstloraError(None, f"unknown metric set {name!r} (choose from {', '.join(METRIC_SETS)})")
    if name == "toy" or (name == "auto" and spec.model.base == "toy"):
        from ..toy.evaluation import ToyMetrics

        return ToyMetrics(spec)
    return ClipDino(spec, clip_model, dino_model, device, batch_size)


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


def score_run(run_dir: Path, spec: GridSpec, finished: list[Job], metrics: MetricSet) -> list[dict]:
    """One row per finished image with its metrics, scored one (subject, style) pair at a time, in batches."""
    from itertools import groupby

    from PIL import Image
    from tqdm.auto import tqdm

    entries = {e.name: e for e in spec.subjects + spec.styles}
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
        scores = metrics.score(images, prompts, subject, style)
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
            rows.append(row | {metric: scores[metric][i] for metric in metrics.labels})
        bar.update(len(jobs))
    bar.close()
    return rows


def summarise(rows: list[dict], methods: list[str], metrics: list[str]) -> dict:
    """Per method: the image count and each metric's mean with its 95% interval."""
    summary = {}
    for method in methods:
        chosen = [r for r in rows if r["method"] == method]
        summary[method] = {"n": len(chosen)}
        for metric in metrics:
            mean, low, high = bootstrap_ci([r[metric] for r in chosen])
            summary[method][metric] = {"mean": mean, "ci95": [low, high]}
    return summary


def by_pair(rows: list[dict], methods: list[str], metrics: list[str]) -> dict:
    """The same per (subject, style) pair: {"subject x style": {method: ...}}."""
    pairs = sorted({(r["subject"], r["style"]) for r in rows})
    return {
        f"{subject} x {style}": summarise(
            [r for r in rows if (r["subject"], r["style"]) == (subject, style)], methods, metrics
        )
        for subject, style in pairs
    }


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


def plots(rows: list[dict], summary: dict, methods: list[str], metrics: MetricSet):
    """(bars, scatter) as PNG bytes: per-method means with 95% intervals; subject vs style per image."""
    try:
        import matplotlib
    except ImportError:
        raise EstloraError(None, "the evaluation figures need matplotlib: pip install 'estlora[eval]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = metrics.labels
    fig, axes = plt.subplots(1, len(labels), figsize=(4 * len(labels), 3.6))
    for ax, metric in zip(axes, labels, strict=True):
        means = [summary[m][metric]["mean"] for m in methods]
        lows = [summary[m][metric]["mean"] - summary[m][metric]["ci95"][0] for m in methods]
        highs = [summary[m][metric]["ci95"][1] - summary[m][metric]["mean"] for m in methods]
        ax.bar(methods, means, yerr=[lows, highs], capsize=4, color="#5b8cc0")
        ax.set_title(labels[metric], fontsize=9)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    bars = _png(fig)

    x, y = metrics.scatter
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for method in methods:
        chosen = [r for r in rows if r["method"] == method]
        ax.scatter([r[x] for r in chosen], [r[y] for r in chosen], alpha=0.35, s=14)
        ax.scatter(
            [summary[method][x]["mean"]],
            [summary[method][y]["mean"]],
            s=90,
            marker="X",
            edgecolors="black",
            label=method,
            color=ax.collections[-1].get_facecolor()[0],
        )
    ax.set_xlabel(labels[x])
    ax.set_ylabel(labels[y])
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


def evaluate(
    run_dir: str | Path,
    clip_model: str,
    dino_model: str,
    device: str = "cpu",
    batch_size: int = 16,
    metrics: str = "auto",
) -> Path:
    """Score the run and write scores.csv, summary.json, report.md, report.html and figures into it."""
    run_dir = Path(run_dir)
    spec, finished = load_run(run_dir)
    finished.sort(key=lambda j: (j.subject, j.style, j.label, j.prompt_index, j.seed))
    scorer = metric_set(spec, metrics, clip_model, dino_model, device, batch_size)
    rows = score_run(run_dir, spec, finished, scorer)
    methods = [m for m in spec.labels() if any(r["method"] == m for r in rows)]
    names = list(scorer.labels)
    summary, pairs = summarise(rows, methods, names), by_pair(rows, methods, names)

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(run_dir / "scores.csv", text.getvalue())
    record = {**scorer.record, "images": len(rows), "methods": summary, "pairs": pairs}
    write_text(run_dir / "summary.json", json.dumps(record, indent=2))
    report_dir = run_dir / "report"
    bars, scatter = plots(rows, summary, methods, scorer)
    _write_bytes(report_dir / "bars.png", bars)
    _write_bytes(report_dir / "scatter.png", scatter)
    for method in methods:
        with atomic_path(report_dir / f"grid-{method}.png") as staging:
            image_grid(run_dir, spec, method, set(finished)).save(staging, format="PNG")
    tables = _tables(summary, pairs, methods, scorer)
    intro = f"{len(rows)} images; {scorer.description}; means with 95% bootstrap intervals."
    write_text(run_dir / "report.md", _markdown(tables, intro, methods))
    write_text(run_dir / "report.html", _html(tables, intro, methods))
    return run_dir / "report.md"


def _cell(stats: dict) -> str:
    if math.isnan(stats["mean"]):
        return "n/a"
    return f"{stats['mean']:.4f} [{stats['ci95'][0]:.4f}, {stats['ci95'][1]:.4f}]"


def _tables(summary: dict, pairs: dict, methods: list[str], metrics: MetricSet) -> list[tuple[str, list[list[str]]]]:
    """(title, rows) of the report's tables: per method, then the headline metric per pair."""
    labels = metrics.labels
    overall = [["method", "images", *labels.values()]]
    overall += [[m, str(summary[m]["n"]), *[_cell(summary[m][k]) for k in labels]] for m in methods]
    per_pair = [["pair", *methods]]
    per_pair += [[pair, *[_cell(stats[m][metrics.headline]) for m in methods]] for pair, stats in pairs.items()]
    return [("per method", overall), (f"per pair: {labels[metrics.headline]}", per_pair)]


def _markdown(tables, intro: str, methods: list[str]) -> str:
    lines = ["# estlora evaluation", "", intro, ""]
    for title, table in tables:
        lines += [f"## {title}", "", "| " + " | ".join(table[0]) + " |", "|" + " --- |" * len(table[0])]
        lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
        lines.append("")
    lines += ["![per-method means](report/bars.png)", "", "![subject vs style](report/scatter.png)", ""]
    for method in methods:
        lines += [f"## {method}", "", f"![{method} grid](report/grid-{method}.png)", ""]
    return "\n".join(lines)


def _html(tables, intro: str, methods: list[str]) -> str:
    from html import escape

    def table_html(table):
        head = "".join(f"<th>{escape(c)}</th>" for c in table[0])
        body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in table[1:])
        return f"<table><tr>{head}</tr>{body}</table>"

    sections = "".join(f"<h2>{escape(title)}</h2>{table_html(table)}" for title, table in tables)
    grids = "".join(f"<h2>{escape(m)}</h2><img src='report/grid-{escape(m)}.png'>" for m in methods)
    return (
        f"<!doctype html><meta charset='utf-8'><title>estlora evaluation</title>"
        f"<style>body{{font-family:sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:4px 8px}}"
        f"table{{border-collapse:collapse}}</style><h1>estlora evaluation</h1>"
        f"<p>{escape(intro.replace('`', ''))}</p>{sections}"
        f"<p><img src='report/bars.png'></p><p><img src='report/scatter.png'></p>{grids}\n"
    )
