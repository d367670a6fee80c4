"""PAB schedule search: the schedule it returns meets its target when measured again independently."""
from __future__ import annotations

import json

import pytest
import torch
from tools_models import vdt_workload

import graphpass
from graphpass.errors import InputError
from graphpass.eval.metrics import psnr
from graphpass.eval.search import PYRAMID, SearchConfig, SearchError, search
from graphpass.models.sampler import sample
from graphpass.schedules.base import Phase

SEEDS = [0, 1]
STEPS = 8


@pytest.fixture(scope="module")
def workload():
    torch.set_num_threads(1)
    wl = vdt_workload(STEPS)
    wl.cached_baseline = wl.baseline(SEEDS, progress=False)
    return wl


def remeasure(wl, schedule):
    """Mean PSNR over SEEDS and ideal FLOP speedup of ``schedule``, with a fresh graphpass.optimize and the
    sampler called directly (nothing shared with the search but the model)."""
    opt = graphpass.optimize(wl.model, schedule, example_kwargs=wl.example_kwargs, timesteps=wl.timesteps)
    values = []
    for s in SEEDS:
        kw = dict(labels=wl.labels(s), num_steps=STEPS, seed=s, progress=False)
        values.append(psnr(sample(opt, **kw)[0], sample(wl.model, **kw)[0]))
    plan = opt.current_plan
    ideal = len(plan) * opt.phase_graph(Phase()).flops / sum(opt.phase_graph(ph).flops for ph in plan.phases)
    return sum(values) / len(values), ideal


def check_pyramid(schedule):
    ranges = [schedule.range_of(k) for k in PYRAMID]
    assert ranges == sorted(ranges), f"{schedule} breaks cross >= temporal >= spatial"


def test_min_psnr_search_meets_its_target(workload, tmp_path):
    target = 60.0
    res = search(workload, SearchConfig(min_psnr=target, max_evals=8), SEEDS, baseline=workload.cached_baseline,
                 progress=False)
    path = res.save(tmp_path / "schedule.json")
    sched = graphpass.schedule_from_json(path)  # the file loads as a schedule despite its "measured" figures
    assert sched == res.schedule and sched.kinds()
    check_pyramid(sched)
    p, ideal = remeasure(workload, sched)
    assert p >= target
    assert p == pytest.approx(res.measurement.psnr, abs=1e-6)
    assert ideal == pytest.approx(res.measurement.ideal_speedup, rel=1e-9) and ideal > 1.0
    d = json.loads(path.read_text())["measured"]
    assert d["target"] == {"min_psnr": target} and 1 <= len(d["evaluated"]) <= 8
    # the answer is the fastest (ideal FLOPs) of the sampled schedules that keep the PSNR
    ok = [e for e in d["evaluated"] if e["psnr"] is None or e["psnr"] >= target]
    assert max(e["ideal_speedup"] for e in ok) == pytest.approx(ideal, rel=1e-9)
    for e in d["evaluated"]:
        check_pyramid(graphpass.PAB.from_dict({k: v for k, v in e["schedule"].items() if k != "type"}))


def test_ideal_speedup_search_reaches_it_with_the_best_psnr(workload):
    res = search(workload, SearchConfig(speedup=1.15, speedup_metric="ideal", max_evals=10), SEEDS,
                 baseline=workload.cached_baseline, progress=False)
    p, ideal = remeasure(workload, res.schedule)
    assert ideal >= 1.15
    assert p == pytest.approx(res.measurement.psnr, abs=1e-6)
    reaching = [e for e in res.evaluated if e["ideal_speedup"] >= 1.15]
    assert max(e["psnr"] for e in reaching) == pytest.approx(p, abs=1e-6)


def test_unreachable_target_is_an_error(workload):
    with pytest.raises(SearchError, match="no PAB schedule"):
        # one sampled candidate that misses the target is all the error needs
        search(workload, SearchConfig(min_psnr=1e4, max_evals=1), SEEDS, baseline=workload.cached_baseline,
               progress=False)


@pytest.mark.parametrize("kw", [{}, {"min_psnr": 30, "speedup": 1.4}, {"speedup": 0.9},
                                {"min_psnr": 30, "speedup_metric": "flops"}, {"min_psnr": 30, "fracs": (0.5, 0.1)}])
def test_config_errors(kw):
    with pytest.raises(InputError):
        SearchConfig(**kw)
