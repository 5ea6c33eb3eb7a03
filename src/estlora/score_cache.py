"""A pair's scores on disk: the dense passes (L1 norms, top-k sums) of two full-sized LoRAs take seconds,
and every later plan of the same pair, in any process, reuses them.

Keyed by both files' sha256, the routed projections (a hash of their names, in plan order) and the
raw-energy setting; an entry is completed in place when a later method needs a score it lacks.
"""

from __future__ import annotations

import hashlib
import json

import torch

from . import cache
from .config import FusionConfig
from .plan import PairScores, needs, pair_scores
from .updates import Lora

SCORES_VERSION = 2  # 2: keyed by the routed projections too (route sets)


def _scores_to_json(scores: PairScores) -> dict:
    def listed(t):
        return None if t is None else t.tolist()

    return {
        "layers": scores.layers,
        "present": listed(scores.present),
        "energy": listed(scores.energy),
        "l1": listed(scores.l1),
        "topk": listed(scores.topk),
        "raw": scores.raw,
    }


def _scores_from_json(value: dict) -> PairScores:
    def tensor(v, dtype=torch.float64):
        return None if v is None else torch.tensor(v, dtype=dtype)

    return PairScores(
        value["layers"],
        tensor(value["present"], torch.bool),
        tensor(value["energy"]),
        tensor(value["l1"]),
        tensor(value["topk"]),
        value["raw"],
    )


def cached_pair_scores(subject: Lora, style: Lora, layers: list[str], config: FusionConfig) -> PairScores:
    """PairScores over `layers` from the disk cache, computing only what is missing. A DoRA's scores
    depend on the base it is bound to, which the key does not name: those are computed afresh."""
    if "dora" in subject.kinds or "dora" in style.kinds:
        return pair_scores(subject, style, layers, config.raw_energy, **needs(config))
    key = {
        "v": SCORES_VERSION,
        "subject": subject.sha256,
        "style": style.sha256,
        "layers": hashlib.sha256(json.dumps(layers).encode()).hexdigest()[:16],
        "raw": config.raw_energy,
    }
    stored = cache.read("scores", key)
    cached = _scores_from_json(stored) if stored else None

    def held(scores: PairScores | None) -> tuple | None:
        return None if scores is None else (scores.l1 is not None, scores.topk is not None)

    before = held(cached)  # taken now: pair_scores completes `cached` in place
    scores = pair_scores(subject, style, layers, config.raw_energy, **needs(config), cached=cached)
    if held(scores) != before:
        cache.write("scores", key, _scores_to_json(scores))
    return scores


def covers(scores: PairScores, config: FusionConfig) -> bool:
    """Whether `scores` hold everything `config`'s method needs."""
    need = needs(config)
    return (
        scores.raw == config.raw_energy
        and (scores.l1 is not None or not need["need_l1"])
        and (scores.topk is not None or not need["need_topk"])
    )
