"""Fusion plans: for every routed projection and every denoising step, the weights (w_subject, w_style).

A plan is pure data computed before sampling from the two LoRAs' static scores (no model, no
diffusers, no files). Each method is a function with one signature,
`(scores, config, steps, gamma) -> weights` with weights of shape (steps, projections, 2); the
runtime only looks rows up.

Methods:
- `est`: EST-LoRA (Zhang & Xiong 2025, arXiv 2508.02165): apply the subject LoRA where
  E_c / gamma > E_s * scale(p_i), else the style LoRA, E = ||delta W||_F^2, scale(p) = alpha p + beta
  (pattern `s`) or (alpha p + beta) mod alpha (pattern `s*`), p_i = i / N.
- `klora`: K-LoRA (Ouyang et al., CVPR 2025, arXiv 2502.18461): the same gate with S = sum of the
  k = rank_c * rank_s largest |delta W| entries and a hand-set beta.
- `merge`: direct merge, both LoRAs everywhere at (w_c, w_s), what diffusers `set_adapters` does.
- `switch`: LoRA Switch (Zhong et al. 2024, arXiv 2402.16843): the whole LoRA alternates every k steps.
- `composite`: LoRA Composite (the same paper): both LoRAs at every step, but each in a denoiser pass
  of its own, the passes' predictions averaged (`FusionConfig.separate_passes`; the runtime does it).
- `subject`, `style`: one LoRA alone, the two references.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from . import scores as S
from .config import FusionConfig
from .errors import SettingError
from .updates import Lora, Update

# ---------------------------------------------------------------- static scores of a pair


@dataclass
class PairScores:
    """Per-projection scores of both LoRAs, in plan order; column 0 subject, column 1 style.

    Absent projections have zero scores and `present` False. l1 and topk need the dense delta W and
    are filled only when a method needs them. `units` are the groups of rows gated as one (the members
    of a fused linear whose update does not split, `Lora.units`); derived from the LoRAs, not cached.
    """

    layers: list[str]
    present: torch.Tensor  # (L, 2) bool
    energy: torch.Tensor  # (L, 2) float64
    l1: torch.Tensor | None = None
    topk: torch.Tensor | None = None
    raw: bool = False
    units: list[list[int]] = field(default_factory=list)

    def by_unit(self, table: torch.Tensor) -> torch.Tensor:
        """Per-projection scores where each unit's members carry the unit's sum (the energy of a
        fused update is the sum over its row slices): the gate then decides for the unit as a whole."""
        table = table.clone()
        for members in self.units:
            table[members] = table[members].sum(dim=0)
        return table

    def shared(self) -> torch.Tensor:
        return self.present.all(dim=1)

    def gamma(self, rule: str) -> float:
        shared = self.shared()
        if rule == "energy":
            return S.gamma_energy(self.energy[shared, 0].tolist(), self.energy[shared, 1].tolist())
        ratios = [c / s if s > 0 else math.inf for c, s in self.l1[shared].tolist()]
        return S.gamma_reference(ratios)


def pair_scores(
    subject: Lora,
    style: Lora,
    layers: list[str],
    raw: bool = False,
    need_l1: bool = True,
    need_topk: bool = False,
    cached: PairScores | None = None,
) -> PairScores:
    """Compute (or complete a cached) PairScores for the two LoRAs over `layers`, the routed projections
    in the order the plan's rows follow (the model family's, `ModelFamily.ordered`)."""
    loras = (subject, style)
    present = torch.tensor([[name in lora.projections for lora in loras] for name in layers], dtype=torch.bool)

    def scale(update: Update) -> float:
        # raw: the research code's form, B @ A without alpha / rank (identical when alpha == rank).
        return 1.0 if raw else update.scale

    def table(score: Callable[[str, Update], float]) -> torch.Tensor:
        return torch.tensor(
            [[score(n, lora.projections[n]) if n in lora.projections else 0.0 for lora in loras] for n in layers],
            dtype=torch.float64,
        )

    result = cached or PairScores(layers, present, table(lambda n, f: S.energy_of(f, scale(f))), raw=raw)
    result.units = units_of(loras, layers)
    if need_l1 and result.l1 is None:
        result.l1 = table(lambda n, f: S.l1_of(f, scale(f)))
    if need_topk and result.topk is None:
        result.topk = _topk_table(loras, layers, result.units, scale)
    return result


def units_of(loras: tuple[Lora, Lora], layers: list[str]) -> list[list[int]]:
    """Row groups gated as one: each fused linear of either LoRA that does not split (a FLUX.1 qkv
    LoKr), as the indices of its members among `layers`; groups that overlap are joined."""
    index = {name: i for i, name in enumerate(layers)}
    groups: list[set[int]] = []
    for lora in loras:
        for members in lora.units().values():
            group = {index[m] for m in members if m in index}
            for other in [g for g in groups if g & group]:
                groups.remove(other)
                group |= other
            if len(group) > 1:
                groups.append(group)
    return sorted(sorted(g) for g in groups)


def _topk_table(loras: tuple[Lora, Lora], layers: list[str], units: list[list[int]], scale) -> torch.Tensor:
    """K-LoRA's S per projection, k = rank_c * rank_s (a one-sided projection needs none); a unit's
    members all carry the top-k of the unit's entries, k from the units' largest ranks."""
    groups = {i: members for members in units for i in members}
    out = torch.zeros(len(layers), 2, dtype=torch.float64)
    for i in range(len(layers)):
        members = [layers[j] for j in groups.get(i, [i])]
        if i in groups and i != groups[i][0]:
            out[i] = out[groups[i][0]]
            continue
        ranks = [max((lora.projections[m].rank for m in members if m in lora.projections), default=0) for lora in loras]
        if not all(ranks):
            continue
        for column, lora in enumerate(loras):
            updates = [lora.projections[m] for m in members if m in lora.projections]
            out[i, column] = S.topk_of(updates, [scale(u) for u in updates], ranks[0] * ranks[1])
    return out


# ---------------------------------------------------------------- methods


def progress(steps: int) -> torch.Tensor:
    """p_i = i / N for i = 0..N-1: the fraction of sampling done, whatever N is."""
    return torch.arange(steps, dtype=torch.float64) / steps


def time_scale(p: torch.Tensor, alpha: float, beta: float, pattern: str) -> torch.Tensor:
    """EST-LoRA's T factor: alpha p + beta, or for K-LoRA's pattern s*, (alpha p + beta) mod alpha."""
    scale = alpha * p + beta
    return torch.remainder(scale, alpha) if pattern == "s*" else scale


def _one_sided(scores: PairScores, subject_wins: torch.Tensor, config: FusionConfig) -> torch.Tensor:
    """Weights from a (N, L) subject-wins mask; projections in only one LoRA always use that one."""
    only_subject = scores.present[:, 0] & ~scores.present[:, 1]
    only_style = scores.present[:, 1] & ~scores.present[:, 0]
    subject_wins = (subject_wins | only_subject) & ~only_style
    weights = torch.zeros(*subject_wins.shape, 2)
    weights[..., 0] = subject_wins * config.subject_scale
    weights[..., 1] = ~subject_wins * config.style_scale
    return weights


def _gate(scores: PairScores, score: torch.Tensor, config: FusionConfig, steps: int, gamma: float) -> torch.Tensor:
    """The shared rule: subject where score_c / gamma > score_s * scale(p_i); ties go to style."""
    scale = time_scale(progress(steps), config.alpha, config.effective_beta, config.time_pattern)
    subject_wins = (score[:, 0] / gamma)[None, :] > score[:, 1][None, :] * scale[:, None]
    return _one_sided(scores, subject_wins, config)


def plan_est(scores: PairScores, config: FusionConfig, steps: int, gamma: float) -> torch.Tensor:
    """EST-LoRA: the gate on energies E = ||delta W||_F^2 (a unit's: its members' sum)."""
    return _gate(scores, scores.by_unit(scores.energy), config, steps, gamma)


def plan_klora(scores: PairScores, config: FusionConfig, steps: int, gamma: float) -> torch.Tensor:
    """K-LoRA: the gate on top-k sums of |delta W|."""
    return _gate(scores, scores.topk, config, steps, gamma)


def plan_merge(scores: PairScores, config: FusionConfig, steps: int, gamma: float) -> torch.Tensor:
    """Direct merge: every present LoRA at its strength, at every step."""
    weights = scores.present.to(torch.float32) * torch.tensor([config.subject_scale, config.style_scale])
    return weights.expand(steps, -1, -1).clone()


def plan_switch(scores: PairScores, config: FusionConfig, steps: int, gamma: float) -> torch.Tensor:
    """LoRA Switch: subject for k steps, style for k steps, and so on (subject first: it sets layout)."""
    subject_turn = (torch.arange(steps) // config.switch_every) % 2 == 0
    weights = torch.zeros(steps, len(scores.layers), 2)
    weights[subject_turn, :, 0] = scores.present[:, 0].float() * config.subject_scale
    weights[~subject_turn, :, 1] = scores.present[:, 1].float() * config.style_scale
    return weights


def plan_composite(scores: PairScores, config: FusionConfig, steps: int, gamma: float) -> torch.Tensor:
    """LoRA Composite: the merge's weights; the runtime applies each column in its own pass."""
    return plan_merge(scores, config, steps, gamma)


def _alone(scores: PairScores, config: FusionConfig, steps: int, column: int) -> torch.Tensor:
    weights = torch.zeros(steps, len(scores.layers), 2)
    strength = (config.subject_scale, config.style_scale)[column]
    weights[:, :, column] = scores.present[:, column].float() * strength
    return weights


def plan_subject(scores: PairScores, config: FusionConfig, steps: int, gamma: float) -> torch.Tensor:
    """The subject LoRA alone (the reference beta's subject render is made with)."""
    return _alone(scores, config, steps, 0)


def plan_style(scores: PairScores, config: FusionConfig, steps: int, gamma: float) -> torch.Tensor:
    """The style LoRA alone (the reference beta's style render is made with)."""
    return _alone(scores, config, steps, 1)


METHOD_FUNCTIONS: dict[str, Callable] = {
    "est": plan_est,
    "klora": plan_klora,
    "merge": plan_merge,
    "switch": plan_switch,
    "composite": plan_composite,
    "subject": plan_subject,
    "style": plan_style,
}


# ---------------------------------------------------------------- the plan


@dataclass
class Plan:
    config: FusionConfig
    steps: int
    layers: list[str]
    weights: torch.Tensor  # (steps, L, 2) float32
    energy_subject: list[float]
    energy_style: list[float]
    gamma: float | None
    beta: float | None
    beta_source: str  # "given", "measured", "default" (not measured), or "unused"
    hashes: tuple[str, str] = ("", "")
    units: list[list[str]] = field(default_factory=list)  # projections gated as one (`PairScores.units`)

    def flip_steps(self) -> list[int | None]:
        """Per projection, the first step whose choice differs from step 0 (None if it never changes)."""
        changes = (self.weights[1:] != self.weights[:1]).any(dim=2)
        return [int(torch.nonzero(col)[0]) + 1 if col.any() else None for col in changes.T]

    def to_dict(self) -> dict:
        return {
            "method": self.config.method,
            "route": self.config.route,
            "steps": self.steps,
            "alpha": self.config.alpha,
            "beta": self.beta,
            "beta_source": self.beta_source,
            "gamma": self.gamma,
            "gamma_rule": self.config.gamma_rule,
            "pattern": self.config.time_pattern,
            "raw_energy": self.config.raw_energy,
            "subject_scale": self.config.subject_scale,
            "style_scale": self.config.style_scale,
            "switch_every": self.config.switch_every,
            "separate_passes": self.config.separate_passes,
            "other_weights": self.config.other_weights,
            "subject_sha256": self.hashes[0],
            "style_sha256": self.hashes[1],
            "plan_hash": self.hash(),
            "units": self.units,
            "layers": [
                {
                    "name": name,
                    "energy_subject": self.energy_subject[i],
                    "energy_style": self.energy_style[i],
                    "weights": self.weights[:, i].tolist(),
                }
                for i, name in enumerate(self.layers)
            ],
        }

    def hash(self) -> str:
        """Identifies the plan's content: same LoRAs, settings and weights, same hash."""
        digest = hashlib.sha256()
        digest.update(json.dumps([asdict(self.config), self.steps, self.layers, list(self.hashes)]).encode())
        digest.update(self.weights.contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def build_plan(
    scores: PairScores,
    config: FusionConfig,
    steps: int,
    hashes: tuple[str, str] = ("", ""),
    beta_source: str | None = None,
) -> Plan:
    """The (steps x projections) weights of `config.method` for a pair's scores."""
    if steps < 1:
        raise SettingError("steps", f"must be at least 1, not {steps}")
    if scores.raw != config.raw_energy:
        raise ValueError("scores were computed with another raw_energy setting than the config asks")
    gamma = None
    if config.gated:
        gamma = scores.gamma(config.gamma_rule)
    weights = METHOD_FUNCTIONS[config.method](scores, config, steps, gamma)
    if config.gated:
        beta, source = config.effective_beta, beta_source or ("default" if config.beta is None else "given")
    else:
        beta, source = None, "unused"
    return Plan(
        config=config,
        steps=steps,
        layers=list(scores.layers),
        weights=weights,
        energy_subject=scores.energy[:, 0].tolist(),
        energy_style=scores.energy[:, 1].tolist(),
        gamma=gamma,
        beta=beta,
        beta_source=source,
        hashes=hashes,
        units=[[scores.layers[i] for i in members] for members in scores.units],
    )


def needs(config: FusionConfig) -> dict[str, bool]:
    """Which dense-pass scores a config needs: L1 for the reference gamma, top-k for klora."""
    return {
        "need_l1": config.gated and config.gamma_rule == "reference",
        "need_topk": config.method == "klora",
    }
