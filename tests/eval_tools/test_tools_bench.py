"""The bench table: every method has a row with every field; timings come from a fake clock with known costs,
quality and FLOP figures are checked against measures taken here, outside the bench."""
from __future__ import annotations

import json
import math

import pytest
import torch
from reference_metrics import reference_psnr, reference_ssim
from tools_models import vdt_workload
from torch.utils.flop_counter import FlopCounterMode

from graphpass import PAB
from graphpass.cli import main
from graphpass.eval import harness
from graphpass.eval import bench as bench_module
from graphpass.eval.bench import (CALIBRATED, FIELDS, BenchResult, available_methods, bench, pareto_front,
                                  plot_bench)
from graphpass.eval.harness import ComputeAll, Workload
from graphpass.errors import InputError

SEEDS = [0]
#: Seconds (wall, CPU) per video the fake clock charges the two baseline runs: the table keeps the faster.
BASELINE_RUNS = [(10.0, 5.0), (8.0, 4.5)]


class FakeClock:
    """Stands in for the harness's ``time`` module: every sampled video advances the wall and CPU clocks by
    the cost of the run in progress, so every timing in the table is known in advance. Baseline runs cost
    :data:`BASELINE_RUNS`; the j-th measured method costs (8 / (j + 2), 4.5 / (j + 3)) per video, so its
    speedups must come out as exactly j + 2 (wall) and j + 3 (CPU)."""

    def __init__(self):
        self.wall = self.cpu = 0.0
        self.cost = (0.0, 0.0)
        self.baseline_runs = 0
        self.expected: list[tuple[float, float]] = []  # (wall, CPU) speedup of each measured method, in order

    def perf_counter(self) -> float:
        return self.wall

    def process_time(self) -> float:
        return self.cpu

    def install(self, mp: pytest.MonkeyPatch, wl: Workload) -> None:
        generate, baseline, measure = wl.generate, wl.baseline, wl.measure

        def timed_generate(*a, **k):
            video = generate(*a, **k)
            self.wall += self.cost[0]
            self.cpu += self.cost[1]
            return video

        def timed_baseline(*a, **k):
            self.cost = BASELINE_RUNS[self.baseline_runs]
            self.baseline_runs += 1
            return baseline(*a, **k)

        def timed_measure(*a, **k):
            j = len(self.expected)
            self.cost = (8.0 / (j + 2), 4.5 / (j + 3))
            m = measure(*a, **k)
            self.expected.append((j + 2.0, j + 3.0))
            return m

        mp.setattr(harness, "time", self)
        mp.setattr(wl, "generate", timed_generate)
        mp.setattr(wl, "baseline", timed_baseline)
        mp.setattr(wl, "measure", timed_measure)


def check_rows(res, methods, wl, clock: FakeClock):
    assert [r["method"] for r in res.rows] == list(methods)
    base = res.row("baseline")
    assert base["speedup"] == 1.0 and base["psnr"] is None and base["cache_peak_bytes"] == 0
    assert clock.baseline_runs == 2  # timed before and after the methods, keeping the faster run
    assert (base["sec_per_video"], base["cpu_sec_per_video"]) == pytest.approx((8.0, 4.5), rel=1e-12)  # sums of fake seconds
    all_exits = sum(r.exit_bytes for r in wl.regions)
    measured = [r for r in res.rows if r["status"] == "ok" and r["method"] != "baseline"]
    assert [(r["speedup"], r["cpu_speedup"]) for r in measured] == [
        pytest.approx(e, rel=1e-12) for e in clock.expected]
    for r in res.rows:
        assert {"method", "schedule", "status", *FIELDS} <= set(r)
        if r["status"] == "ok" and r["method"].startswith("pab"):
            assert 0 < r["cache_peak_bytes"] <= all_exits  # at most every region's outputs at once


def sample_once(wl: Workload, fn) -> torch.Tensor:
    """The video of seed 0 sampled with ``fn``, outside the bench."""
    return wl.generate(fn, SEEDS[0])


def flop_ratio(wl: Workload, fn) -> float:
    """Baseline FLOPs over ``fn``'s for one video, as torch's own FlopCounterMode counts them (matmuls and
    attention only, so a few percent off graphpass's count, which includes every op)."""
    def count(f):
        with FlopCounterMode(display=False) as m:
            wl.generate(f, SEEDS[0])
        return m.get_total_flops()

    return count(wl.model) / count(fn)


@pytest.fixture(scope="module")
def vdt_result():
    torch.set_num_threads(1)
    wl = vdt_workload(6)
    wl.physics = True
    methods = available_methods(wl)
    clock = FakeClock()
    with pytest.MonkeyPatch.context() as mp:
        clock.install(mp, wl)
        res = bench(wl, SEEDS, methods, progress=False)
    return wl, methods, res, clock


def test_vdt_bench_has_every_method_and_field(vdt_result, tmp_path):
    wl, methods, res, clock = vdt_result
    assert {"baseline", "graphpass-noreuse", "pab246", "pab357", "pab579", "pab-open-sora"} <= set(methods)
    assert not any(m.startswith("diffusers-") for m in methods)  # hooks apply to diffusers models only
    assert all(res.row(m)["status"] == "ok" for m in CALIBRATED)  # FBC, MagCache, TeaCache and their sweeps
    check_rows(res, methods, wl, clock)
    noreuse = res.row("graphpass-noreuse")
    assert noreuse["ideal_speedup"] == 1.0 and noreuse["cache_peak_bytes"] == 0
    # the captured graph computes what the model does: PSNR as measured here, outside the bench
    base = sample_once(wl, wl.model)
    same = reference_psnr(sample_once(wl, wl.optimize(ComputeAll())), base)
    assert same > 100 and (noreuse["psnr"] is None if same == math.inf else noreuse["psnr"] == pytest.approx(same))
    # more reuse, more FLOPs saved: the published pyramid presets are ordered
    ideal = [res.row(m)["ideal_speedup"] for m in ("pab246", "pab357", "pab579")]
    assert ideal == sorted(ideal) and len(set(ideal)) == 3
    for r in res.rows:
        assert r["status"] != "ok" or 0.0 <= r["physics"] <= 1.0  # physics applies to VDT models
    d = json.loads(res.save(tmp_path / "bench.json").read_text())
    assert [r["method"] for r in d["rows"]] == methods and d["seeds"] == SEEDS
    assert plot_bench(res, tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert res.markdown().count("\n") == len(methods) + 1


def test_vdt_bench_quality_and_flops_match_independent_measures(vdt_result):
    """pab246's PSNR, SSIM and ideal speedup against the same video sampled here and measured with the
    tests' own PSNR/SSIM (tests/eval_tools/reference_metrics.py) and torch's FlopCounterMode."""
    wl, _, res, _ = vdt_result
    row = res.row("pab246")
    opt = wl.optimize(PAB.preset("pab246"))
    video, base = sample_once(wl, opt), sample_once(wl, wl.model)
    assert row["psnr"] == pytest.approx(reference_psnr(video, base), abs=1e-9)
    assert row["ssim"] == pytest.approx(reference_ssim(video, base), abs=1e-9)
    assert row["ssim"] < 1.0 and row["psnr"] < 100  # reuse did change the video: the comparison is not trivial
    opt.reset()
    assert row["ideal_speedup"] == pytest.approx(flop_ratio(wl, opt), rel=0.03)


def test_latte_bench_runs_diffusers_hooks_like_graphpass(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    wl = Workload.from_name("latte-tiny", num_steps=12)
    methods = ["baseline", "pab-latte", "diffusers-pab", "diffusers-fbc"]
    clock = FakeClock()
    clock.install(monkeypatch, wl)
    res = bench(wl, SEEDS, methods, progress=False)
    check_rows(res, methods, wl, clock)
    ours, theirs = res.row("pab-latte"), res.row("diffusers-pab")
    assert theirs["status"] == "ok" and theirs["ideal_speedup"] is None and theirs["cache_peak_bytes"] is None
    # same schedule (ranges 2/3/6, window (100, 800)), both caching the raw attention output: same videos
    assert theirs["psnr"] == pytest.approx(ours["psnr"], abs=0.05)
    # diffusers' first-block cache, tried here directly on the model: the row says what that call says
    fbc_error = first_block_cache_error(wl)
    fbc = res.row("diffusers-fbc")
    if fbc_error is None:
        assert fbc["status"] == "ok" and fbc["psnr"] is not None
    else:
        assert fbc["status"] == f"n/a: diffusers fbc hook fails on {type(wl.model).__name__}: {fbc_error}"


def first_block_cache_error(wl: Workload) -> str | None:
    """The first line of the error diffusers' FirstBlockCache raises on one call of ``wl``'s model, or None."""
    from diffusers import FirstBlockCacheConfig

    wl.model.enable_cache(FirstBlockCacheConfig(threshold=0.05))
    try:
        with wl.model.cache_context("probe"), torch.no_grad():
            wl.model(**wl.example_kwargs)
        return None
    except Exception as e:
        return (str(e).strip().splitlines() or [type(e).__name__])[0]
    finally:
        wl.model.disable_cache()


def test_pareto_front():
    pts = [(40.0, 1.2), (30.0, 1.5), (35.0, 1.1), (25.0, 1.4), (50.0, 1.0)]
    assert pareto_front(pts) == [4, 0, 1]  # (35, 1.1) and (25, 1.4) are beaten


def test_unknown_method_is_an_error():
    with pytest.raises(InputError, match="unknown bench method"):
        bench(vdt_workload(4), SEEDS, ["baseline", "pab9000x"], progress=False)


def test_commands_write_their_files(tmp_path):
    torch.set_num_threads(1)
    common = ["latte-tiny", "--steps", "6", "--seeds", "0", "--quiet"]
    assert main(["analyze", *common, "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "analysis.json").read_text())["model"] == "latte-tiny"
    assert (tmp_path / "a" / "analysis.png").is_file()
    assert main(["search", *common, "--min-psnr", "20", "--max-evals", "3", "--analysis",
                 str(tmp_path / "a" / "analysis.json"), "--out", str(tmp_path / "s.json")]) == 0
    sched = json.loads((tmp_path / "s.json").read_text())
    assert sched["type"] == "PAB" and sched["measured"]["psnr"] >= 20
    assert main(["bench", *common, "--methods", "baseline", "searched", "--schedule", str(tmp_path / "s.json"),
                 "--out", str(tmp_path / "b")]) == 0
    rows = json.loads((tmp_path / "b" / "bench.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["baseline", "searched"] and rows[1]["status"] == "ok"
    assert rows[1]["psnr"] == pytest.approx(sched["measured"]["psnr"], abs=1e-6)  # same schedule, same videos


def test_magcache_and_teacache_rows_are_calibrated_on_a_seed_the_bench_does_not_judge(monkeypatch):
    """The rows' constants come from a run of a seed outside the benched ones, once per technique."""
    wl = vdt_workload(6)  # TeaCache's degree-4 fit needs 5 step pairs
    calls = []
    for name in ("magcache_ratios", "fit_teacache"):
        real = getattr(bench_module, name)

        def spy(workload, seed, *a, _real=real, _name=name, **k):
            calls.append((_name, seed))
            return _real(workload, seed, *a, **k)

        monkeypatch.setattr(bench_module, name, spy)
    res = bench(wl, [0, 1], ["baseline", "magcache", "magcache-0.12", "teacache", "teacache-0.05"], progress=False)
    assert sorted(calls) == [("fit_teacache", [2]), ("magcache_ratios", 2)]
    assert all(r["status"] == "ok" for r in res.rows)


def test_best_at_a_quality_floor_is_the_fastest_row_that_reaches_it():
    rows = [{"method": "baseline", "status": "ok", "psnr": None, "cpu_speedup": 1.0, "ideal_speedup": 1.0},
            {"method": "exact", "status": "ok", "psnr": math.inf, "cpu_speedup": 0.9, "ideal_speedup": 1.0},
            {"method": "mild", "status": "ok", "psnr": 33.0, "cpu_speedup": 1.4, "ideal_speedup": 2.5},
            {"method": "edge", "status": "ok", "psnr": 30.0, "cpu_speedup": 1.6, "ideal_speedup": 1.7},
            {"method": "rough", "status": "ok", "psnr": 26.0, "cpu_speedup": 3.0, "ideal_speedup": 3.5},
            {"method": "broken", "status": "n/a: no chain", "psnr": None, "cpu_speedup": None}]
    res = BenchResult("m", [0], 10, 1, rows=rows)
    assert res.best_at(30)["method"] == "edge"  # the floor is inclusive; the baseline row does not compete
    assert res.best_at(1000)["method"] == "exact"  # lossless: PSNR inf
    assert res.best_at(30, "ideal_speedup")["method"] == "mild"
    assert res.best_at(25)["method"] == "rough"
    assert res.best_at(34)["method"] == "exact"
    assert BenchResult("m", [0], 10, 1, rows=rows[3:]).best_at(34) is None
    with pytest.raises(InputError, match="best_at speed"):
        res.best_at(30, "psnr")
