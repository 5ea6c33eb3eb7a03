"""`estlora grid`: subjects x styles x prompts x seeds x methods (x any fusion setting), resumable, on
one or many processes.

One base pipeline is loaded once per process (one `Session`) and each LoRA once. Every image is one
job with a fixed path; a job is done when its PNG exists (PNGs are written atomically), so a rerun
skips finished images and an interrupted run loses at most the image in flight. `manifest.jsonl`
lists each finished image once. Under `accelerate launch` (or torchrun), the (subject, style, prompt)
groups are dealt out by global rank, so no two processes ever write the same file. On CPUs,
`accelerate launch --multi_gpu --num_processes 2 -m estlora.cli grid ...` starts two processes
(accelerate's `--cpu` mode starts only one without MPI).

Spec (YAML or JSON); every setting of `estlora generate` is a key (`estlora generate -h`), and every
fusion setting may be a list, which the grid varies:

    base: stabilityai/stable-diffusion-xl-base-1.0
    subjects:
      - {name: dog, lora: dog.safetensors, token: sks, class: dog, references: dreambooth/dog}
    styles:
      - {name: watercolor, lora: watercolor.safetensors, token: szn, class: watercolor, references: styledrop/wc.png}
    prompts: ["a {subject} in {style} style"]   # {subject} = "sks dog", {style} = "szn"
    seeds: [0, 1]
    methods: [est, merge]
    steps: 30
    scheduler: default      # or euler-a, dpm++2m-karras, ...; timestep_spacing: trailing
    other_weights: ignore   # or merge: the LoRAs' weights outside the routed linears, statically
    alpha: [1.0, 1.5]       # varied: images/<subject>/<style>/est+alpha=1.0/..., est+alpha=1.5/...
    route: [attention, blocks]
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

from ..config import FusionConfig, ModelConfig, SamplingConfig, settings_of
from ..errors import EstloraError
from ..outputs import write_text
from ..session import Request, Session

SPEC_VERSION = 1
MANIFEST = "manifest.jsonl"
# Grid keys that are not settings, and settings a grid takes as lists of its own.
GRID_KEYS = ("subjects", "styles", "prompts", "seeds", "methods")
PER_JOB = {"seed", "num_images", "method"}  # given by `seeds` and `methods`
VARIED = tuple(item.name for item in settings_of(FusionConfig) if item.name != "method")


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
    prompts: list[str] = field(default_factory=lambda: ["a {subject} in {style} style"])
    seeds: list[int] = field(default_factory=lambda: [0])
    methods: list[str] = field(default_factory=lambda: ["est"])
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    fusion: dict[str, list] = field(default_factory=dict)  # fusion setting -> the values the grid takes

    @classmethod
    def from_dict(cls, data: dict, where: str = "spec") -> GridSpec:
        """A spec from its flat keys (as the YAML file and run.json hold them); every value is checked."""
        settings = {item.name for group in (ModelConfig, SamplingConfig) for item in settings_of(group)} - PER_JOB
        unknown = set(data) - set(GRID_KEYS) - settings - set(VARIED)
        if unknown:
            raise EstloraError(where, f"unknown grid settings: {', '.join(sorted(unknown))}")
        entries = {}
        for key in ("subjects", "styles"):
            if not data.get(key):
                raise EstloraError(where, f"the grid needs at least one entry in '{key}'")
            entries[key] = [_entry(item, where) for item in data[key]]
        names = [e.name for e in entries["subjects"] + entries["styles"]]
        if len(set(names)) != len(names):
            raise EstloraError(where, "subject and style names must be unique")
        fusion = {name: data[name] if isinstance(data[name], list) else [data[name]] for name in VARIED if name in data}
        for values in itertools.product(*fusion.values()):  # every combination is a valid config
            FusionConfig(**dict(zip(fusion, values, strict=True)))
        for method in data.get("methods", ["est"]):
            FusionConfig(method=method)
        return cls(
            **entries,
            **{key: list(data[key]) for key in ("prompts", "seeds", "methods") if key in data},
            model=ModelConfig.from_mapping(data),
            sampling=SamplingConfig.from_mapping(data),
            fusion=fusion,
        )

    def to_dict(self) -> dict:
        """The flat keys `from_dict` reads (run.json holds these)."""
        data = {
            "subjects": [dataclasses.asdict(e) for e in self.subjects],
            "styles": [dataclasses.asdict(e) for e in self.styles],
            "prompts": self.prompts,
            "seeds": self.seeds,
            "methods": self.methods,
        }
        for group in (self.model, self.sampling):
            data |= {
                item.name: getattr(group, item.name) for item in settings_of(type(group)) if item.name not in PER_JOB
            }
        return data | self.fusion

    def variants(self) -> list[tuple[tuple[str, object], ...]]:
        """Every combination of the varied fusion settings (one empty one when none vary)."""
        return [tuple(zip(self.fusion, values, strict=True)) for values in itertools.product(*self.fusion.values())]

    def labels(self) -> list[str]:
        """The image folders of one pair: a method, and the varied settings that are not a single value."""
        return list(dict.fromkeys(label(m, v, self) for m in self.methods for v in self.variants()))

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


def label(method: str, variant: tuple, spec: GridSpec | None = None) -> str:
    """`est`, or `est+alpha=1.0+route=blocks` for the settings the grid varies over more than one value."""
    shown = [(k, v) for k, v in variant if spec is None or len(spec.fusion[k]) > 1]
    return "+".join([method, *(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown)])


def _entry(item: dict, where: str) -> Entry:
    item = dict(item)
    if "class" in item:
        item["class_word"] = item.pop("class")
    if "name" not in item or "lora" not in item:
        raise EstloraError(where, f"every subject/style needs a name and a lora: {item}")
    return Entry(**{k: (str(v) if v is not None else None) for k, v in item.items()})


def load_spec(path: str | os.PathLike, overrides: dict | None = None) -> GridSpec:
    """A spec file, with `overrides` (flat keys, the command line's) on top."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise EstloraError(path, f"cannot read the grid spec ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise EstloraError(path, "the grid spec must be a mapping (YAML or JSON object)")
    folder = path.parent  # relative paths in a spec are relative to the spec file
    for key in ("subjects", "styles"):
        data[key] = [_entry_relative_to(item, folder) for item in data.get(key) or []]
    for key in ("base", "base_config", "vae"):
        if key in data:
            data[key] = _relative_to(data[key], folder)
    return GridSpec.from_dict({**data, **(overrides or {})}, str(path))


def _entry_relative_to(item, folder: Path):
    if not isinstance(item, dict):
        return item  # from_dict says what is wrong with it
    return {**item, **{key: _relative_to(item[key], folder) for key in ("lora", "references") if key in item}}


def _relative_to(value: str | None, folder: Path) -> str | None:
    if value is None or str(value).startswith(("example:", "toy:")) or Path(str(value)).is_absolute():
        return value
    candidate = folder / str(value)
    return str(candidate) if candidate.exists() else value  # else: a hub id (or toy)


@dataclass(frozen=True)
class Job:
    subject: str
    style: str
    prompt_index: int
    method: str
    seed: int
    variant: tuple[tuple[str, object], ...] = ()  # the varied fusion settings of this image
    label: str = ""  # its folder: the method, and the varied settings with more than one value

    @property
    def relpath(self) -> str:
        return (
            f"images/{self.subject}/{self.style}/{self.label or self.method}/p{self.prompt_index}-seed{self.seed}.png"
        )

    @property
    def group(self) -> tuple:
        return self.subject, self.style, self.prompt_index

    def record(self) -> dict:
        return {**dataclasses.asdict(self), "variant": [list(pair) for pair in self.variant], "path": self.relpath}

    @classmethod
    def from_record(cls, entry: dict) -> Job:
        variant = tuple(tuple(pair) for pair in entry.get("variant", []))
        fields = ("subject", "style", "prompt_index", "method", "seed")
        return cls(*(entry[name] for name in fields), variant, entry.get("label") or entry["method"])


def jobs(spec: GridSpec) -> list[Job]:
    """Every image of the grid, ordered so that one (pair, prompt) group is contiguous, and within it
    one (method, variant): the fusion is configured once per run of seeds."""
    return [
        Job(subject.name, style.name, p, method, seed, variant, label(method, variant, spec))
        for subject in spec.subjects
        for style in spec.styles
        for p in range(len(spec.prompts))
        for method in spec.methods
        for variant in spec.variants()
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
    line = json.dumps(job.record()) + "\n"
    fd = os.open(run_dir / MANIFEST, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def run_record(spec: GridSpec) -> dict:
    """What run.json holds: the spec, so that a rerun can tell its own grid from another."""
    return {"version": SPEC_VERSION, "spec": spec.to_dict()}


def check_run_dir(spec: GridSpec, run_dir: Path) -> bool:
    """Whether `run_dir` already holds this grid (False: a new run); raises if it holds another one."""
    record = run_record(spec)
    path = run_dir / "run.json"
    if not path.exists():
        return False
    existing = json.loads(path.read_text())
    with contextlib.suppress(EstloraError, TypeError, AttributeError, ValueError):  # unreadable: another grid
        # settings added since it was written take their defaults
        existing["spec"] = GridSpec.from_dict(existing.get("spec"), str(path)).to_dict()
    if existing != json.loads(json.dumps(record)):
        raise EstloraError(run_dir, "holds another grid (run.json differs); use a new --out folder")
    return True


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


def request_for(spec: GridSpec, job: Job) -> Request:
    entries = {e.name: e for e in spec.subjects + spec.styles}
    subject, style = entries[job.subject], entries[job.style]
    return Request(
        subject=subject.lora,
        style=style.lora,
        prompt=spec.prompt(spec.prompts[job.prompt_index], subject, style),
        fusion=FusionConfig(method=job.method, **dict(job.variant)),
        sampling=spec.sampling,
    )


def run_grid(spec: GridSpec, run_dir: str | os.PathLike, device: str = "auto", progress: bool = True) -> int:
    """Render this process's missing images; returns how many it rendered."""
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    rank, world, launched_device = distributed()
    known = check_run_dir(spec, run_dir)
    mine = share(jobs(spec), rank, world)
    todo = [job for job in mine if not (run_dir / job.relpath).exists()]
    session = None
    if todo:  # LoRAs, settings and base are checked (and the base loaded) before anything is written
        model = dataclasses.replace(spec.model, device=launched_device or device)
        session = Session.open(model, check=request_for(spec, todo[0]), report=lambda _: None)
    if not known:
        write_text(run_dir / "run.json", json.dumps(run_record(spec), indent=2) + "\n")
    recorded = {e["path"] for e in manifest_entries(run_dir)}
    for job in mine:  # finished before an interruption, but not yet recorded
        if (run_dir / job.relpath).exists() and job.relpath not in recorded:
            _record(run_dir, job)
    if session is None:
        return 0

    entries = {e.name: e for e in spec.subjects + spec.styles}
    bar = tqdm(total=len(todo), desc=f"grid (process {rank + 1}/{world})", disable=not progress)
    try:
        for (_, _, prompt_index, _, _), run in groupby(todo, key=lambda j: (*j.group, j.method, j.variant)):
            run = list(run)
            prepared = session.configure(request_for(spec, run[0]))
            for job in run:
                image = session.render(prepared, job.seed, f"{job.subject} x {job.style} {job.label}")
                neutral = spec.prompt(
                    spec.prompts[prompt_index], entries[job.subject], entries[job.style], neutral=True
                )
                grid = {**job.record(), "neutral_prompt": neutral}
                del grid["path"]
                session.save(prepared, image, run_dir / job.relpath, job.seed, extra={"grid": grid})
                _record(run_dir, job)
                bar.update()
    finally:
        bar.close()
        session.close()
    return len(todo)
