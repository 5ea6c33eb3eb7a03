"""Fusion plans: the closed-form flip, s* wrapping, baselines, one-sided projections, caching, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from conftest import random_lora
from estlora import plan as P
from estlora.cli import main
from estlora.config import FusionConfig
from estlora.errors import SettingError
from estlora.families import family_named
from estlora.score_cache import cached_pair_scores

SHAPES = {
    f"down_blocks.1.attentions.0.transformer_blocks.{i}.attn{a}.to_{p}": (24, 16)
    for i in range(3)
    for a in (1, 2)
    for p in ("q", "k")
}


LAYERS = family_named("sdxl").ordered(SHAPES)


@pytest.fixture(scope="module")
def pair():
    return random_lora(SHAPES, rank=4, alpha=2.0, seed=1, name="c"), random_lora(
        SHAPES, rank=8, alpha=8.0, seed=2, name="s"
    )


def scores_of(energy_pairs, present=None):
    energy = torch.tensor(energy_pairs, dtype=torch.float64)
    present = torch.ones(len(energy_pairs), 2, dtype=torch.bool) if present is None else torch.tensor(present)
    return P.PairScores([f"l{i}" for i in range(len(energy_pairs))], present, energy, l1=energy, topk=energy)


@pytest.mark.parametrize("steps", [7, 30, 50])
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.9])
def test_flip_step_is_closed_form(pair, steps, beta):
    config = FusionConfig(method="est", beta=beta)
    scores = P.pair_scores(*pair, LAYERS)
    plan = P.build_plan(scores, config, steps)
    for i, (e_c, e_s) in enumerate(zip(plan.energy_subject, plan.energy_style, strict=True)):
        p_star = (e_c / (plan.gamma * e_s) - beta) / config.alpha
        flip = min(max(math.ceil(p_star * steps), 0), steps)  # first step with i / N >= p*
        expected = torch.tensor([1.0, 0.0]).repeat(steps, 1)
        expected[flip:] = torch.tensor([0.0, 1.0])
        assert torch.equal(plan.weights[:, i], expected), (i, p_star)


def test_energies_in_plan_are_scaled(pair):
    from estlora.scores import energy

    plan = P.build_plan(P.pair_scores(*pair, LAYERS), FusionConfig(beta=0.5), 10)
    name = plan.layers[0]
    f = pair[0].projections[name]
    assert plan.energy_subject[0] == energy(f.down, f.up, f.scale)
    raw = P.build_plan(P.pair_scores(*pair, LAYERS, raw=True), FusionConfig(beta=0.5, raw_energy=True), 10)
    assert raw.energy_subject[0] == pytest.approx(plan.energy_subject[0] / 0.5**2)  # s_c = 2 / 4


def test_pattern_s_star_wraps():
    # alpha 1.5, beta 1.125, N = 8: scale = 1.125, 1.3125, then wraps: 0, 0.1875, 0.375, 0.5625, 0.75, 0.9375
    scores = scores_of([[0.5, 1.0]])  # E_c / gamma = 0.5 with gamma 1: subject iff 0.5 > scale
    config = FusionConfig(beta=1.125, pattern="s*")
    weights = P.plan_est(scores, config, 8, gamma=1.0)
    assert weights[:, 0, 0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    assert weights[:, 0, 1].tolist() == [1, 1, 0, 0, 0, 1, 1, 1]


def test_ties_go_to_style():
    scores = scores_of([[2.0, 1.0]])  # E_c / gamma = 1, scale(p) = 1.5 p + 0.25: equals 1 at p = 0.5
    weights = P.plan_est(scores, FusionConfig(beta=0.25), 4, gamma=2.0)
    assert weights[:, 0, 0].tolist() == [1, 1, 0, 0]


def test_one_sided_projections_use_their_lora():
    scores = scores_of([[1.0, 0.0], [0.0, 1.0], [100.0, 1.0]], present=[[True, False], [False, True], [True, True]])
    config = FusionConfig(beta=0.5, subject_scale=0.8, style_scale=1.2)
    weights = P.plan_est(scores, config, 5, gamma=1.0)
    assert torch.equal(weights[:, 0], torch.tensor([0.8, 0.0]).repeat(5, 1))
    assert torch.equal(weights[:, 1], torch.tensor([0.0, 1.2]).repeat(5, 1))
    assert torch.equal(weights[:, 2], torch.tensor([0.8, 0.0]).repeat(5, 1))


def test_klora_gates_on_topk():
    scores = scores_of([[1.0, 1.0]])
    scores.topk = torch.tensor([[10.0, 1.0]], dtype=torch.float64)  # top-k says subject, energy would not
    config = FusionConfig(method="klora")
    assert config.effective_beta == 0.5
    assert P.plan_klora(scores, config, 4, gamma=1.0)[:, 0, 0].tolist() == [1, 1, 1, 1]
    assert P.plan_est(scores, config, 4, gamma=1.0)[:, 0, 0].tolist() == [1, 1, 0, 0]  # 1 > 1.5 p + 0.5 iff p < 1/3
    assert FusionConfig(method="klora", pattern="s*").effective_beta == 1.275


def test_klora_plan_from_real_factors(pair):
    from estlora.scores import topk_sum

    config = FusionConfig(method="klora")
    scores = P.pair_scores(*pair, LAYERS, need_topk=True)
    name = scores.layers[2]
    k = pair[0].projections[name].rank * pair[1].projections[name].rank
    f = pair[0].projections[name]
    assert scores.topk[2, 0] == topk_sum(f.down, f.up, f.scale, k)
    plan = P.build_plan(scores, config, 10)
    s_c, s_s = scores.topk[2].tolist()
    scale = 1.5 * torch.arange(10, dtype=torch.float64) / 10 + 0.5
    assert plan.weights[:, 2, 0].tolist() == [float(s_c / plan.gamma > s_s * x) for x in scale.tolist()]


def test_merge_switch_and_single():
    scores = scores_of([[1.0, 1.0], [1.0, 0.0]], present=[[True, True], [True, False]])
    config = FusionConfig(method="merge", subject_scale=0.75, style_scale=0.5, switch_every=5)
    merge = P.plan_merge(scores, config, 3, None)
    assert merge[:, 0].tolist() == [[0.75, 0.5]] * 3
    assert merge[:, 1].tolist() == [[0.75, 0.0]] * 3
    switch = P.plan_switch(scores, config, 12, None)
    assert switch[:, 0, 0].tolist() == [0.75] * 5 + [0.0] * 5 + [0.75] * 2
    assert switch[:, 0, 1].tolist() == [0.0] * 5 + [0.5] * 5 + [0.0] * 2
    assert switch[5:10, 1].abs().sum() == 0  # the style's turn, and this projection has no style LoRA
    subject = P.METHOD_FUNCTIONS["subject"](scores, config, 2, None)
    assert subject[:, :, 0].tolist() == [[0.75, 0.75]] * 2 and subject[:, :, 1].abs().sum() == 0
    style = P.METHOD_FUNCTIONS["style"](scores, config, 2, None)
    assert style[:, :, 1].tolist() == [[0.5, 0.0]] * 2 and style[:, :, 0].abs().sum() == 0


def test_gamma_rules(pair):
    scores = P.pair_scores(*pair, LAYERS)
    ratios = (scores.l1[:, 0] / scores.l1[:, 1]).tolist()
    from estlora.scores import gamma_reference

    assert scores.gamma("reference") == gamma_reference(ratios)
    assert scores.gamma("energy") == pytest.approx(float(scores.energy[:, 0].sum() / scores.energy[:, 1].sum()))


def test_bad_config():
    with pytest.raises(SettingError, match="method: must be one of est, klora"):
        FusionConfig(method="zip")
    with pytest.raises(SettingError, match="pattern"):
        FusionConfig(pattern="t")
    with pytest.raises(SettingError, match="route: must be one of attention, blocks"):
        FusionConfig(route="everything")
    for name in ("alpha", "beta", "subject_scale", "style_scale"):  # a NaN would poison every weight of the plan
        flag = name.replace("_", "-")
        with pytest.raises(SettingError, match=f"{flag}: must be a finite number, not nan"):
            FusionConfig(**{name: float("nan")})
    with pytest.raises(SettingError, match="beta: must be a finite number, not inf"):
        FusionConfig(beta=float("inf"))
    with pytest.raises(SettingError, match="switch-every: must be at least 1, not 0"):
        FusionConfig(switch_every=0)
    with pytest.raises(SettingError, match="alpha: pattern s\\* needs alpha > 0"):
        FusionConfig(pattern="s*", alpha=0.0)
    assert FusionConfig(alpha=2).alpha == 2.0 and isinstance(FusionConfig(alpha=2).alpha, float)
    with pytest.raises(SettingError, match="raw-energy: must be true or false"):
        FusionConfig(raw_energy="yes")


@pytest.mark.parametrize(
    "order", [("klora",), ("est", "klora"), ("klora", "est")], ids=["klora", "est-then-klora", "klora-then-est"]
)
def test_scores_are_cached(pair, monkeypatch, order):
    """Each score is computed once per pair, whichever methods asked for it first (each adds to the entry)."""
    from estlora import cache

    monkeypatch.setenv("ESTLORA_CACHE", str(cache.cache_dir() / "-".join(order)))
    first = {method: cached_pair_scores(*pair, LAYERS, FusionConfig(method=method)) for method in order}

    def fail(*args, **kwargs):
        raise AssertionError("recomputed a cached score")

    monkeypatch.setattr(P.S, "l1_norm", fail)
    monkeypatch.setattr(P.S, "topk_sum", fail)
    for method in ("est", "klora", "est"):
        config = FusionConfig(method=method)
        second = cached_pair_scores(*pair, LAYERS, config)
        assert torch.equal(second.l1, first[order[0]].l1)
        assert torch.equal(second.topk, first["klora"].topk)
        assert P.build_plan(second, config, 9).hash() == P.build_plan(first["klora"], config, 9).hash()


def test_cli_json(tmp_path, capsys):
    png = tmp_path / "plan.png"
    assert (
        main(
            ["plan", "example:subject", "example:style", "--steps", "12", "--beta", "0.75", "--json", "--png", str(png)]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert {"method", "steps", "alpha", "beta", "gamma", "pattern", "layers"} <= set(report)
    assert (report["method"], report["steps"], report["beta"], report["pattern"]) == ("est", 12, 0.75, "s")
    assert len(report["layers"]) == 560
    names = [layer["name"] for layer in report["layers"]]
    assert "up_blocks.0.attentions.1.transformer_blocks.3.attn2.to_out.0" in names
    for layer in report["layers"]:
        assert len(layer["weights"]) == 12
        assert all(pair in ([1.0, 0.0], [0.0, 1.0]) for pair in layer["weights"])
        assert layer["energy_subject"] > 0 and layer["energy_style"] > 0
    assert Image.open(png).size[1] > 560


def test_cli_summary(capsys):
    assert (
        main(["plan", "example:subject", "example:style", "--steps", "10", "--method", "switch", "--switch-every", "3"])
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("method switch, 10 steps, route attention")
    assert "560 projections: 560 alternating (3 changes)" in out
