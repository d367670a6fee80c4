"""Change analysis on a model whose region outputs are known functions of the timestep."""
from __future__ import annotations

import json

import pytest
import torch
from tools_models import COEF, known_output, known_workload

from graphpass.errors import InputError
from graphpass.eval.analyze import ChangeAnalysis, RecordAll, analyze, median3, plot_analysis, stable_window
from graphpass.schedules.base import Action


@pytest.fixture(scope="module")
def result():
    torch.set_num_threads(1)
    wl = known_workload(num_steps=10)
    return wl, analyze(wl, seeds=[0, 1], progress=False)


def expected(kind, timesteps):
    a = [known_output(kind, t) for t in timesteps]
    mse = [(a[s] - a[s - 1]) ** 2 for s in range(1, len(a))]
    rel = [abs(a[s] - a[s - 1]) / abs(a[s - 1]) for s in range(1, len(a))]
    return mse, rel


def test_recorded_change_matches_the_closed_form(result):
    wl, a = result
    assert a.timesteps == wl.timesteps and len(a.steps) == 9
    assert {(r["path"], r["kind"]) for r in a.regions} == {("spatial_attn", "spatial"), ("temporal_attn", "temporal"),
                                                           ("cross_attn", "cross")}
    for r in a.regions:
        mse, rel = expected(r["kind"], wl.timesteps)
        assert len(r["mse"]) == len(r["rel_l1"]) == 9
        assert r["mse"] == pytest.approx(mse, rel=1e-6, abs=1e-14)
        assert r["rel_l1"] == pytest.approx(rel, rel=1e-6, abs=1e-12)
        # one region per kind: the kind's mean is that region's curve
        assert a.curve(r["kind"]) == r["rel_l1"] and a.curve(r["kind"], "mse") == r["mse"]


def test_change_is_u_shaped_and_ordered_by_the_pyramid(result):
    _, a = result
    for k in COEF:
        c = a.curve(k)
        m = c.index(min(c))
        assert 0 < m < len(c) - 1  # smallest in the middle
        assert all(x >= y for x, y in zip(c[:m], c[1:m + 1]))  # falls to the minimum...
        assert all(x <= y for x, y in zip(c[m:], c[m + 1:]))  # ...then rises
    for s in range(len(a.steps)):  # spatial changes most, cross least, at every step
        assert a.curve("spatial")[s] > a.curve("temporal")[s] > a.curve("cross")[s]


def test_stable_window_follows_the_rule_and_covers_the_middle(result):
    wl, a = result
    for k in COEF:
        _, rel = expected(k, wl.timesteps)
        w = a.stable_window(k)
        rel = median3(rel)
        thr = min(rel) + 0.25 * (max(rel) - min(rel))
        assert w.threshold == pytest.approx(thr, rel=1e-6)
        stable = [s for s in a.steps if rel[s - 1] <= thr]
        assert stable == list(range(w.first_step, w.last_step + 1))  # one run here: all stable steps
        assert 1 < w.first_step <= w.last_step < len(wl.timesteps) - 1
        lo, hi = w.window
        inside = [s for s, t in enumerate(wl.timesteps) if lo < t < hi]
        assert inside == stable  # a PAB window (lo, hi) reuses exactly on the stable steps


def test_stable_window_rule_on_a_constructed_curve():
    ts = [900.0, 800, 700, 600, 500, 400, 300, 200, 100]
    curve = [5, 4, 1, 1, 1, 3, 1, 6]  # change at steps 1..8
    assert median3(curve) == [4.5, 4, 1, 1, 1, 1, 3, 3.5]  # the lone 3 at step 6 is smoothed away
    w = stable_window(curve, ts, 0.25)  # threshold 1 + 0.25 * 3.5 = 1.875
    assert w.threshold == 1.875
    assert (w.first_step, w.last_step) == (3, 6) and w.window == (200.0, 700.0)
    assert stable_window(curve, ts, 1.0).window == (0.0, 900.0)  # every step after the first
    tie = stable_window([4, 4, 1, 1, 4, 4, 0.5, 0.5, 4, 4], ts + [0.0, -1.0], 0.2)  # two runs of 2: lower wins
    assert (tie.first_step, tie.last_step) == (7, 8)
    with pytest.raises(InputError):
        stable_window(curve, ts, 1.5)
    with pytest.raises(InputError):
        stable_window(curve[:3], ts, 0.25)


def test_recording_stores_every_region_at_every_step(result):
    wl, _ = result
    plan = RecordAll().plan(wl.regions, wl.timesteps)
    assert len(plan.distinct()) == 1
    assert all(plan.phases[0].action(r.path) == Action.STORE for r in wl.regions)


def test_json_round_trip_and_plot(result, tmp_path):
    _, a = result
    a.save(tmp_path / "a.json")
    d = json.loads((tmp_path / "a.json").read_text())
    assert set(d["kinds"]) == set(COEF) and all("stable" in v for v in d["kinds"].values())
    b = ChangeAnalysis.load(tmp_path / "a.json")
    assert b.kinds == a.kinds and b.regions == a.regions and b.stable_window("cross") == a.stable_window("cross")
    png = plot_analysis(a, tmp_path / "a.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_too_few_steps_is_an_error():
    with pytest.raises(InputError, match="at least 3"):
        analyze(known_workload(num_steps=2), seeds=[0], progress=False)
