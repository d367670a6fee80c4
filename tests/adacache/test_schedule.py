"""AdaCache / MoReg / FrozenAdaCache as data: validation, presets, JSON, the codebook and the decision rule."""
from __future__ import annotations

import math

import pytest

import graphpass
from graphpass import AdaCache, FrozenAdaCache, MoReg, ScheduleError, schedule_from_json
from graphpass.schedules.adacache import AdaptiveDecider
from graphpass.schedules.base import Action


@pytest.mark.parametrize("codebook, words", [
    ({}, "empty"),
    ({0.1: 0}, ">= 1"),
    ({0.1: 2.5}, "integer"),
    ({0.1: True}, "integer"),
    ({-0.1: 2}, "> 0"),
    ({math.inf: 2}, "finite"),
    ({"x": 2}, "not a number"),
    ({0.1: 2, 0.2: 3}, "must not grow"),
    ("fast", "dict"),
])
def test_bad_codebooks_raise(codebook, words):
    with pytest.raises(ScheduleError, match=words):
        AdaCache(codebook=codebook)


@pytest.mark.parametrize("kw, words", [
    (dict(always_compute_first=0), "always_compute_first"),
    (dict(always_compute_last=-1), "always_compute_last"),
    (dict(metric_at=-1), "metric_at"),
    (dict(metric_at=""), "metric_at"),
    (dict(moreg="yes"), "MoReg"),
    (dict(cache_unit="blocks"), "cache_unit"),
])
def test_bad_fields_raise(kw, words):
    with pytest.raises(ScheduleError, match=words):
        AdaCache(**kw)


@pytest.mark.parametrize("kw, words", [
    (dict(window=(0, 5)), "1 <= first"),
    (dict(window=(9, 5)), "first <= last"),
    (dict(normaliser=0), "positive"),
    (dict(exponent=-1), "positive"),
    (dict(gradient_factor=-1), ">= 0"),
    (dict(strides=()), "strides"),
    (dict(strides=(0,)), "strides"),
])
def test_bad_moreg_raises(kw, words):
    with pytest.raises(ScheduleError, match=words):
        MoReg(**kw)


def test_frozen_validation():
    with pytest.raises(ScheduleError, match="start with a reuse"):
        FrozenAdaCache("RCC")
    with pytest.raises(ScheduleError, match="'C' \\(compute\\) or 'R'"):
        FrozenAdaCache("CXC")
    assert FrozenAdaCache([True, False, "c", "r"]).decisions == "CRCR"


def test_presets_are_the_published_codebooks():
    assert AdaCache.preset("fast").codebook == {0.08: 6, 0.16: 5, 0.24: 4, 0.32: 3, 0.40: 2, 1.0: 1}
    assert AdaCache.preset("slow").codebook == {0.08: 3, 0.16: 2, 1.0: 1}
    assert AdaCache.preset("100-step").codebook == {0.03: 12, 0.05: 10, 0.07: 8, 0.09: 6, 0.11: 4, 1.0: 3}
    assert AdaCache.preset("default") == AdaCache.preset("100-step")
    assert AdaCache() == AdaCache.preset("fast")
    assert MoReg.for_steps(100).window == (10, 90) and MoReg.for_steps(30).window == (4, 26)
    assert (MoReg().normaliser, MoReg().exponent, MoReg().gradient_factor) == (0.385, 8.0, 10.0)
    with pytest.raises(ScheduleError, match="unknown AdaCache preset"):
        AdaCache.preset("turbo")


def test_codebook_lookup():
    s = AdaCache(codebook={0.40: 2, 0.08: 6, 1.0: 1, 0.16: 5})  # any order; stored sorted
    assert list(s.codebook) == [0.08, 0.16, 0.40, 1.0]
    assert [s.steps_for(c) for c in (0.0, 0.0799, 0.08, 0.3, 0.99, 1.0, 7.0, math.nan)] == [6, 6, 5, 2, 1, 1, 1, 1]


@pytest.mark.parametrize("schedule", [
    AdaCache.preset("slow"),
    AdaCache(codebook={0.05: 4, 0.5: 1}, metric_at="blocks.1.temporal_attn", always_compute_first=3,
             always_compute_last=1, moreg=MoReg(window=(4, 26), normaliser=0.2, strides=(1, 2))),
    AdaCache(metric_at=2, cache_unit="outputs"),
    FrozenAdaCache("CCRRCRC"),
    FrozenAdaCache("CCRRCRC", cache_unit="outputs"),
])
def test_json_round_trip(schedule, tmp_path):
    assert schedule_from_json(schedule.to_json()) == schedule
    schedule.save(tmp_path / "s.json")
    assert schedule_from_json(str(tmp_path / "s.json")) == schedule


def test_json_unknown_field():
    with pytest.raises(ScheduleError, match="unknown fields"):
        schedule_from_json('{"type": "AdaCache", "codebok": [[1.0, 1]]}')


def test_moreg_formula_on_known_numbers():
    mo = MoReg(window=(10, 90))
    # inside the window: m = (0.77 / 0.385) ** 8 = 256; mg = 10 * (256 - 1) / 2 = 1275
    fac, m = mo.factor(0.77, 1.0, k=2, step=10)
    assert m == pytest.approx(256.0) and fac == pytest.approx(256.0 + 1275.0)
    # falling motion: the gradient's magnitude counts
    fac, m = mo.factor(0.385 / 2, 1.0, k=1, step=90)
    assert m == pytest.approx(2 ** -8) and fac == pytest.approx(2 ** -8 + 10 * (1 - 2 ** -8))
    # outside the window m is 1 (the gradient still follows m_prev, as in the reference)
    fac, m = mo.factor(5.0, 3.0, k=4, step=91)
    assert m == 1.0 and fac == pytest.approx(1.0 + 10 * 2 / 4)


def test_decider_follows_the_codebook():
    s = AdaCache(codebook={0.1: 3, 1.0: 1}, always_compute_first=1, always_compute_last=2)
    dec = AdaptiveDecider(s, "S", 12)
    distances = iter([0.05, 0.5, 0.15, 0.05, 0.05])  # per measuring step, one sample
    have_res = have_metric = False
    out = []
    for i in range(12):
        ph = dec.phase(i, have_residual=have_res, have_metric=have_metric)
        dec.begin(i, ph)
        a = ph.action("S")
        out.append("R" if a == Action.REUSE else "C")
        have_res = a == Action.STORE or (a == Action.REUSE and have_res)
        have_metric = have_metric or ph.metric != "none"
        if ph.metric == "measure":
            dec.observe([next(distances)], None)
    # step 0 stores; step 1 measures 0.05/1 -> 3 steps (reuse 2, 3); step 4 measures 0.5/3 -> 1 step;
    # step 5 measures 0.15/1 -> 1; step 6: 0.05 -> 3 (reuse 7, 8, compute 9); 10 and 11 are the computed tail,
    # so step 9's decision does not matter and it does not measure.
    assert "".join(out) == "CCRRCCCRRCCC"
    assert [(r.step, r.k, r.steps) for r in dec.records] == [(1, 1, 3), (4, 3, 1), (5, 1, 1), (6, 1, 3)]
    assert dec.records[1].metric == pytest.approx(0.5 / 3)


def test_decider_takes_the_max_over_samples_and_applies_moreg():
    s = AdaCache(codebook={0.1: 3, 1.0: 1}, moreg=MoReg(window=(1, 100)))
    dec = AdaptiveDecider(s, "S", 30)
    dec.begin(0, dec.phase(0, have_residual=False, have_metric=False))
    dec.begin(1, dec.phase(1, have_residual=True, have_metric=True))
    rec = dec.observe([0.02, 0.08], [0.385, 0.385])  # m = 1 = m_prev: factor 1 for both samples
    assert rec.metric == pytest.approx(0.08) and rec.steps == 3
    dec.begin(4, dec.phase(4, have_residual=True, have_metric=True))
    rec = dec.observe([0.06, 0.03], [0.385, 0.385 * 2 ** (1 / 8)])  # sample 1: m = 2, mg = 10 * 1 / 3
    assert rec.k == 3
    assert rec.metric == pytest.approx(max(0.06 / 3 * 1, 0.03 / 3 * (2 + 10 / 3)))


def test_unknown_step_count_needs_last_zero():
    with pytest.raises(ScheduleError, match="timesteps="):
        AdaptiveDecider(AdaCache(), "S", None)
    AdaptiveDecider(AdaCache(always_compute_last=0), "S", None)


def test_exported_at_top_level():
    assert graphpass.AdaCache is AdaCache and graphpass.MoReg is MoReg and graphpass.FrozenAdaCache is FrozenAdaCache
    assert AdaCache.preset("slow").freeze("CCR") == FrozenAdaCache("CCR")
    assert AdaCache(cache_unit="outputs").freeze("CCR") == FrozenAdaCache("CCR", cache_unit="outputs")
