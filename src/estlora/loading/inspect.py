"""`estlora inspect`: what a LoRA file holds, as a person reads it and as a script reads it."""

from __future__ import annotations

import json
from collections import Counter

from ..families import family_named
from ..updates import Lora
from .lora import base_guess

TRAINING_LABELS = {
    "title": "title",
    "trained_on": "trained on",
    "architecture": "made for",
    "trigger": "trigger",
    "top_tags": "top tags",
}


def training_info(metadata: dict[str, str], tags: int = 5) -> dict[str, str]:
    """What the trainer wrote into the header (kohya `ss_*` keys, Stability's `modelspec.*`): the
    title, the base it was trained on, and the trigger words, the first thing a user of a
    downloaded LoRA needs to know. Trainers without a trigger phrase leave the training captions'
    most frequent tags, which for DreamBooth LoRAs is the instance prompt ("sks dog")."""
    info = {}
    for name, keys in (
        ("title", ("modelspec.title", "ss_output_name")),
        ("trained_on", ("ss_sd_model_name",)),
        ("architecture", ("modelspec.architecture", "ss_base_model_version")),
        ("trigger", ("modelspec.trigger_phrase",)),
    ):
        value = next((metadata[k].strip() for k in keys if metadata.get(k, "").strip()), None)
        if value:
            info[name] = value
    counts: Counter = Counter()
    try:
        for dataset in json.loads(metadata.get("ss_tag_frequency", "{}")).values():
            counts.update({str(tag).strip(): int(n) for tag, n in dataset.items()})
    except (ValueError, TypeError, AttributeError):  # written by hand or by another tool: not ours to refuse
        pass
    top = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:tags]
    if top:
        info["top_tags"] = ", ".join(f"{tag} ({n})" for tag, n in top if tag)
    return info


KIND_LABELS = {"lora": "LoRA", "lokr": "LyCORIS LoKr", "loha": "LyCORIS LoHa", "dora": "DoRA"}


def per_route(lora: Lora) -> dict[str, int]:
    """How many of the LoRA's projections each route set of its family routes."""
    family = family_named(lora.family)
    return {route: sum(family.in_route(m, route) for m in lora.projections) for route in family.route_sets}


def report(lora: Lora) -> dict:
    """The JSON `estlora inspect --json` prints."""
    family = family_named(lora.family)
    routes = per_route(lora)
    return {
        "file": str(lora.path),
        "sha256": lora.sha256,
        "layout": lora.layout,
        "family": family.name,
        "base_model": base_guess(lora),
        "attention_projections": routes.get("attention", 0),
        "routes": routes,
        "kinds": dict(sorted(lora.kinds.items())),
        "units": lora.units(),
        "ranks": {str(k): v for k, v in sorted(lora.ranks.items())},
        "alphas": {f"{k:g}": v for k, v in sorted(lora.alphas.items())},
        "training": training_info(lora.metadata),
        "other_tensors": len(lora.other),
        "other_modules": family.other_modules(lora.other),
        "notes": list(lora.notes),
        "projections": {
            name: {
                "kind": f.kind,
                "rank": f.rank,
                "alpha": f.alpha,
                "scale": f.scale,
                "in": f.in_features,
                "out": f.out_features,
            }
            | ({"unit": f.unit} if f.unit else {})
            for name, f in lora.projections.items()
        },
    }


def summary(lora: Lora) -> str:
    """The human-readable report `estlora inspect` prints."""
    family = family_named(lora.family)

    def counted(counter) -> str:
        return ", ".join(f"{_fmt(k)} ({n})" for k, n in sorted(counter.items()))

    routes = per_route(lora)
    lines = [
        f"file:        {lora.path}",
        f"sha256:      {lora.sha256}",
        f"layout:      {lora.layout}",
        f"base model:  {base_guess(lora)} (guessed from shapes; model family {family.label})",
        f"attention projections: {routes.get('attention', 0)}",
        "per route:   "
        + ", ".join(f"{route} {n}" for route, n in routes.items())
        + f" (default {family.default_route})",
        f"kinds:       {counted(Counter({KIND_LABELS[k]: n for k, n in lora.kinds.items()}))}",
        f"ranks:       {counted(lora.ranks)}"
        + (" (LoKr, LoHa: the bound on delta W's rank)" if lora.kinds.keys() - {"lora"} else ""),
        f"alphas:      {counted(lora.alphas)}",
        f"scales:      {counted(Counter(round(f.scale, 6) for f in lora.projections.values()))}",
    ]
    by_block = Counter(family.block_of(name) for name in lora.projections)
    lines.append(
        "per block:   " + ", ".join(f"{b} ({n})" for b, n in sorted(by_block.items(), key=lambda x: family.order(x[0])))
    )
    lines += [
        f"unit:        {unit} does not split into its linears ({', '.join(m.rpartition('.')[2] for m in members)}):"
        " gated as one unit"
        for unit, members in lora.units().items()
    ]
    lines += [f"{TRAINING_LABELS[k] + ':':<12} {v}" for k, v in training_info(lora.metadata).items()]
    others = family.other_modules(lora.other)
    kept = counted(others) if others else "none"
    lines.append(
        f"other keys:  {len(lora.other)} tensors kept, routed by no plan (--other-weights merge applies them "
        f"statically): {kept}"
    )
    return "\n".join(lines + list(lora.notes))


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
