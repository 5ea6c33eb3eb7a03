"""Scores against direct dense computations, and gamma on hand-built cases."""

from __future__ import annotations

import math

import pytest
import torch

from estlora import scores as S
from estlora.updates import LoraFactors


def factors(out=48, inp=40, rank=6, alpha=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return LoraFactors(torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g), alpha)


def scale(f, raw=False):
    return 1.0 if raw else f.alpha / f.rank


def dense(f, raw=False):
    return scale(f, raw) * f.up.double() @ f.down.double()


def energy(f, raw=False):
    return S.energy(f.down, f.up, scale(f, raw))


def l1_norm(f, raw=False):
    return S.l1_norm(f.down, f.up, scale(f, raw))


@pytest.mark.parametrize("raw", [False, True])
def test_energy_is_squared_frobenius_norm(raw):
    f = factors()
    assert f.alpha != f.rank
    assert energy(f, raw) == pytest.approx(float((dense(f, raw) ** 2).sum()), rel=1e-6)


def test_raw_energy_differs_by_scale_squared():
    f = factors(rank=8, alpha=2.0)
    assert energy(f) == pytest.approx(energy(f, raw=True) * (2.0 / 8) ** 2, rel=1e-12)


def test_energy_of_large_factors():
    f = factors(out=1280, inp=2048, rank=64, alpha=32.0, seed=3)
    assert energy(f) == pytest.approx(float((dense(f) ** 2).sum()), rel=1e-5)
    assert l1_norm(f) == pytest.approx(float(dense(f).abs().sum()), rel=1e-5)


@pytest.mark.parametrize("chunk", [1 << 22, 40, 97])  # one chunk; one row per chunk; uneven chunks
def test_l1_norm_matches_dense(monkeypatch, chunk):
    monkeypatch.setattr(S, "CHUNK_ELEMENTS", chunk)
    f = factors()
    for raw in (False, True):
        assert l1_norm(f, raw) == pytest.approx(float(dense(f, raw).abs().sum()), rel=1e-6)


@pytest.mark.parametrize("chunk", [1 << 22, 40, 97])
@pytest.mark.parametrize("k", [1, 36, 500, 48 * 40, 10_000])  # k past the number of entries: all of them
def test_topk_sum_matches_dense(monkeypatch, chunk, k):
    monkeypatch.setattr(S, "CHUNK_ELEMENTS", chunk)
    f = factors()
    values = dense(f).abs().flatten().sort(descending=True).values
    assert S.topk_sum(f.down, f.up, scale(f), k) == pytest.approx(float(values[:k].sum()), rel=1e-6)


def test_gamma_reference_drops_outliers():
    # mean 3.25, 3 x mean = 9.75: the 10 is dropped, gamma is the mean of the rest
    assert S.gamma_reference([1.0, 1.0, 1.0, 10.0]) == 1.0
    # mean 3, nothing at or above 9
    assert S.gamma_reference([2.0, 4.0]) == 3.0
    # a ratio exactly 3 x the mean is dropped too (>=)
    ratios = [1.0] * 8 + [4.0]  # mean 4/3, 3 x mean = 4: dropped
    assert S.gamma_reference(ratios) == 1.0
    # a style projection with a zero update gives an infinite ratio: left out
    assert S.gamma_reference([2.0, math.inf, 4.0]) == 3.0


def test_gamma_energy():
    assert S.gamma_energy([1.0, 2.0], [3.0, 1.0]) == 0.75
