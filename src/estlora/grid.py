"""`estlora grid`: subjects x styles x prompts x seeds x methods, resumable, on one or many processes.

One base pipeline is loaded once per process and each LoRA once. Every image is one job with a
fixed path; a job is done when its PNG exists (PNGs are written atomically), so a rerun skips
finished images and an interrupted run loses at most the image in flight. `manifest.jsonl` lists
each finished image once. Under `accelerate launch` (or torchrun), the (subject, style, prompt)
groups are dealt out by global rank, so no two processes ever write the same file. On CPUs,
`accelerate launch --multi_gpu --num_processes 2 -m estlora.cli grid ...` starts two processes
(accelerate's `--cpu` mode starts only one without MPI).

Spec (YAML or JSON):

    base: stabilityai/stable-diffusion-xl-base-1.0
    subjects:
      - {name: dog, lora: dog.safetensors, token: sks, class: dog, references: dreambooth/dog}
    styles:
      - {name: watercolor, lora: watercolor.safetensors, token: szn, class: watercolor, references: styledrop/wc.png}
    prompts: ["a {subject} in {style} style"]   # {subject} = "sks dog", {style} = "szn"
    seeds: [0, 1]
    methods: [est, merge]
    steps: 30
    scheduler: default      # or euler-a, dpm++2m-karras, ... (estlora generate -h); timestep_spacing: trailing
    other_weights: ignore   # or merge: the LoRAs' feed-forward / conv / text-encoder weights, statically
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from itertools import groupby
from pathlib import Path

from .discrepancy import DEFAULT_DINO
from .errors import EstloraError
from .generate import Request, metadata, render, save_image
from .outputs import write_text

SPEC_VERSION = 1
MANIFEST = "manifest.jsonl"


@dataclass(frozen=True)
class Entry:
    """A subject or a style: its LoRA, trigger token, class word and reference images."""

    name: str
    lora: str
    token: str = ""
    class_word: str = ""
    references: str | None = None


@dataclass
class GridSpec:
    subjects: list[Entry]
    styles: list[Entry]
    base: str = "stabilityai/stable-diffusion-xl-base-1.0"
    base_config: str | None = None  # for a single-file base: the diffusers SDXL folder or id with its configs
    vae: str | None = None  # replaces the base's VAE
    prompts: list[str] = field(default_factory=lambda: ["a {subject} in {style} style"])
    seeds: list[int] = field(default_factory=lambda: [0])
    methods: list[str] = field(default_factory=lambda: ["est"])
    negative_prompt: str | None = None
    steps: int = 30
    scheduler: str = "default"
    timestep_spacing: str | None = None
    guidance: float = 5.0
    guidance_rescale: float = 0.0
    width: int | None = None
    height: int | None = None
    beta: float | None = None  # None: measured per (pair, prompt) for est
    beta_probe_steps: int | None = None
    dino_model: str = DEFAULT_DINO
    dtype: str = "auto"
    other_weights: str = "ignore"  # LoRA weights outside the attention projections: ignore or merge

    @classmethod
    def from_dict(cls, data: dict, where: str = "spec") -> GridSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise EstloraError(where, f"unknown grid settings: {', '.join(sorted(unknown))}")
        data = dict(data)
        for key in ("subjects", "styles"):
            if not data.get(key):
                raise EstloraError(where, f"the grid needs at least one entry in '{key}'")
            data[key] = [_entry(item, where) for item in data[key]]
        names = [e.name for e in data["subjects"] + data["styles"]]
        if len(set(names)) != len(names):
            raise EstloraError(where, "subject and style names must be unique")
        from .plan import METHODS, OTHER_WEIGHTS

        bad = [m for m in data.get("methods", []) if m not in METHODS]
        if bad:
            raise EstloraError(where, f"unknown methods {bad}; choose from {', '.join(METHODS)}")
        if data.get("other_weights", "ignore") not in OTHER_WEIGHTS:
            raise EstloraError(where, f"other_weights must be one of {', '.join(OTHER_WEIGHTS)}")
        return cls(**data)

    def prompt(self, template: str, subject: Entry, style: Entry, neutral: bool = False) -> str:
        """The prompt, or with neutral=True the same with class words instead of trigger tokens (for CLIP-T)."""
        if neutral:
            values = {"subject": subject.class_word or subject.name, "style": style.class_word or style.name}
        else:
            values = {
                "subject": " ".join(filter(None, [subject.token, subject.class_word])) or subject.name,
                "style": style.token or style.name,
            }
        values.update(
            subject_token=subject.token,
            subject_class=subject.class_word,
            style_token=style.token,
            style_class=style.class_word,
        )
        return " ".join(template.format(**values).split())


def _entry(item: dict, where: str) -> Entry:
    item = dict(item)
    if "class" in item:
        item["class_word"] = item.pop("class")
    if "name" not in item or "lora" not in item:
        raise EstloraError(where, f"every subject/style needs a name and a lora: {item}")
    return Entry(**{k: (str(v) if v is not None else None) for k, v in item.items()})


def load_spec(path: str | os.PathLike) -> GridSpec:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise EstloraError(path, f"cannot read the grid spec ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise EstloraError(path, "the grid spec must be a mapping (YAML or JSON object)")
    spec = GridSpec.from_dict(data, str(path))
    base_dir = path.parent  # relative paths in a spec are relative to the spec file
    for key in ("subjects", "styles"):
        setattr(spec, key, [_entry_relative_to(e, base_dir) for e in getattr(spec, key)])
    for key in ("base", "base_config", "vae"):
        setattr(spec, key, _relative_to(getattr(spec, key), base_dir))
    return spec


def _relative_to(value: str | None, folder: Path) -> str | None:
    if value is None or value.startswith(("example:", "toy:")) or Path(value).is_absolute():
        return value
    candidate = folder / value
    return str(candidate) if candidate.exists() else value  # else: a hub id (or toy)


def _entry_relative_to(entry: Entry, folder: Path) -> Entry:
    lora, references = _relative_to(entry.lora, folder), _relative_to(entry.references, folder)
    return Entry(entry.name, lora, entry.token, entry.class_word, references)


@dataclass(frozen=True)
class Job:
    subject: str
    style: str
    prompt_index: int
    method: str
    seed: int

    @property
    def relpath(self) -> str:
        return f"images/{self.subject}/{self.style}/{self.method}/p{self.prompt_index}-seed{self.seed}.png"

    @property
    def group(self) -> tuple:
        return self.subject, self.style, self.prompt_index


def jobs(spec: GridSpec) -> list[Job]:
    """Every image of the grid, ordered so that one (pair, prompt) group is contiguous."""
    return [
        Job(subject.name, style.name, p, method, seed)
        for subject in spec.subjects
        for style in spec.styles
        for p in range(len(spec.prompts))
        for method in spec.methods
        for seed in spec.seeds
    ]


def share(all_jobs: list[Job], rank: int, world: int) -> list[Job]:
    """This process's jobs: whole (pair, prompt) groups dealt round-robin, so beta is measured once."""
    groups = list(dict.fromkeys(job.group for job in all_jobs))
    mine = {g for i, g in enumerate(groups) if i % world == rank}
    return [job for job in all_jobs if job.group in mine]


def manifest_entries(run_dir: Path) -> list[dict]:
    path = run_dir / MANIFEST
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _record(run_dir: Path, job: Job) -> None:
    # One short line per write with O_APPEND: concurrent processes never interleave within a line.
    line = json.dumps({**asdict(job), "path": job.relpath}) + "\n"
    fd = os.open(run_dir / MANIFEST, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def prepare_run_dir(spec: GridSpec, run_dir: Path) -> None:
    """Write run.json, or check that an existing run directory holds this same grid."""
    record = {"version": SPEC_VERSION, "spec": asdict(spec)}
    path = run_dir / "run.json"
    if path.exists():
        existing = json.loads(path.read_text())
        with contextlib.suppress(EstloraError, TypeError, AttributeError):  # unreadable: another grid
            # settings added since it was written take their defaults
            existing["spec"] = asdict(GridSpec.from_dict(existing.get("spec"), str(path)))
        if existing != json.loads(json.dumps(record)):
            raise EstloraError(run_dir, "holds another grid (run.json differs); use a new --out folder")
        return
    write_text(path, json.dumps(record, indent=2) + "\n")


def distributed() -> tuple[int, int, str | None]:
    """(global rank, world size, device) from the launcher's environment; (0, 1, None) when alone.

    `accelerate launch` (multi-GPU, or multi-process on CPU with `--multi_gpu`) and torchrun set RANK,
    WORLD_SIZE and LOCAL_RANK. The grid needs no collective operations, so no process group is made.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    import torch

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def run_grid(spec: GridSpec, run_dir: str | os.PathLike, device: str = "auto", progress: bool = True) -> int:
    """Render this process's missing images; returns how many it rendered."""
    from tqdm.auto import tqdm

    from .fusion import fuse
    from .lora import load_lora
    from .pipelines import load_pipeline

    run_dir = Path(run_dir)
    _request(spec, spec.subjects[0], spec.styles[0], spec.prompts[0])  # settings out of range: refused before any write
    rank, world, launched_device = distributed()
    run_dir.mkdir(parents=True, exist_ok=True)
    prepare_run_dir(spec, run_dir)
    mine = share(jobs(spec), rank, world)
    recorded = {e["path"] for e in manifest_entries(run_dir)}
    for job in mine:  # finished before an interruption, but not yet recorded
        if (run_dir / job.relpath).exists() and job.relpath not in recorded:
            _record(run_dir, job)
    todo = [job for job in mine if not (run_dir / job.relpath).exists()]
    if not todo:
        return 0

    entries = {e.name: e for e in spec.subjects + spec.styles}
    pipe = load_pipeline(spec.base, launched_device or device, spec.dtype, config=spec.base_config, vae=spec.vae)
    from .fusion import unet_projection_shapes

    shapes = unet_projection_shapes(pipe.unet)
    loras = {}

    def lora(name: str):
        if name not in loras:
            loras[name] = load_lora(entries[name].lora, shapes, spec.base)
        return loras[name]

    bar = tqdm(total=len(todo), desc=f"grid (process {rank + 1}/{world})", disable=not progress)
    for (subject, style), pair_jobs in groupby(todo, key=lambda j: (j.subject, j.style)):
        with fuse(
            pipe, lora(subject), lora(style), method="est", beta=spec.beta, other_weights=spec.other_weights
        ) as fusion:
            for prompt_index, prompt_jobs in groupby(pair_jobs, key=lambda j: j.prompt_index):
                template = spec.prompts[prompt_index]
                request = _request(spec, entries[subject], entries[style], template)
                beta = spec.beta
                prompt_jobs = list(prompt_jobs)
                if beta is None and any(j.method == "est" for j in prompt_jobs):
                    from .generate import measure_beta

                    beta = measure_beta(fusion, request).beta
                planned = None
                for job in prompt_jobs:  # methods are contiguous: re-plan once per method, not per image
                    if job.method != planned:
                        measured = job.method == "est" and spec.beta is None
                        fusion.set(
                            method=job.method,
                            beta=beta if job.method == "est" else spec.beta,
                            beta_source="measured" if measured else None,
                        )
                        planned = job.method
                    image = render(fusion, request, job.seed, f"{job.subject} x {job.style} {job.method}")
                    meta = metadata(request, fusion, job.seed)
                    meta["grid"] = {
                        **asdict(job),
                        "neutral_prompt": spec.prompt(template, entries[subject], entries[style], neutral=True),
                    }
                    save_image(image, run_dir / job.relpath, meta)
                    _record(run_dir, job)
                    bar.update()
    bar.close()
    return len(todo)


def _request(spec: GridSpec, subject: Entry, style: Entry, template: str) -> Request:
    return Request(
        subject=subject.lora,
        style=style.lora,
        prompt=spec.prompt(template, subject, style),
        base=spec.base,
        base_config=spec.base_config,
        vae=spec.vae,
        negative_prompt=spec.negative_prompt,
        steps=spec.steps,
        scheduler=spec.scheduler,
        timestep_spacing=spec.timestep_spacing,
        guidance=spec.guidance,
        guidance_rescale=spec.guidance_rescale,
        width=spec.width,
        height=spec.height,
        beta=spec.beta,
        beta_probe_steps=spec.beta_probe_steps,
        dino_model=spec.dino_model,
        dtype=spec.dtype,
        other_weights=spec.other_weights,
    )
