"""The bench table: every method has a row with every field, and the figures agree with each other."""
from __future__ import annotations

import json

import pytest
import torch
from tools_models import vdt_workload

from graphpass.cli import main
from graphpass.eval.bench import FIELDS, available_methods, bench, pareto_front, plot_bench
from graphpass.eval.harness import Workload
from graphpass.errors import InputError

SEEDS = [0]


def check_rows(res, methods, wl):
    assert [r["method"] for r in res.rows] == list(methods)
    base = res.row("baseline")
    assert base["speedup"] == 1.0 and base["psnr"] is None and base["cache_peak_bytes"] == 0
    all_exits = sum(r.exit_bytes for r in wl.regions)
    for r in res.rows:
        assert {"method", "schedule", "status", *FIELDS} <= set(r)
        if r["status"] != "ok":
            continue
        assert r["speedup"] == pytest.approx(base["sec_per_video"] / r["sec_per_video"], rel=1e-9)
        assert r["cpu_speedup"] == pytest.approx(base["cpu_sec_per_video"] / r["cpu_sec_per_video"], rel=1e-9)
        assert 0 < r["ssim"] <= 1.0
        if r["method"].startswith("pab"):
            assert r["ideal_speedup"] > 1.0
            assert r["psnr"] is not None and r["psnr"] > 0
            assert 0 < r["cache_peak_bytes"] <= all_exits  # at most every region's outputs at once


@pytest.fixture(scope="module")
def vdt_result():
    torch.set_num_threads(1)
    wl = vdt_workload(6)
    wl.physics = True
    methods = available_methods(wl)
    return wl, methods, bench(wl, SEEDS, methods, progress=False)


def test_vdt_bench_has_every_method_and_field(vdt_result, tmp_path):
    wl, methods, res = vdt_result
    assert {"baseline", "graphpass-noreuse", "pab246", "pab357", "pab579", "pab-open-sora"} <= set(methods)
    assert not any(m.startswith("diffusers-") for m in methods)  # hooks apply to diffusers models only
    check_rows(res, methods, wl)
    noreuse = res.row("graphpass-noreuse")
    assert noreuse["ideal_speedup"] == 1.0 and noreuse["cache_peak_bytes"] == 0
    assert noreuse["psnr"] is None or noreuse["psnr"] > 100  # the captured graph computes what the model does
    # more reuse, more FLOPs saved: the published pyramid presets are ordered
    ideal = [res.row(m)["ideal_speedup"] for m in ("pab246", "pab357", "pab579")]
    assert ideal == sorted(ideal) and len(set(ideal)) == 3
    for r in res.rows:
        assert r["status"] != "ok" or 0.0 <= r["physics"] <= 1.0  # physics applies to VDT models
    d = json.loads(res.save(tmp_path / "bench.json").read_text())
    assert [r["method"] for r in d["rows"]] == methods and d["seeds"] == SEEDS
    assert plot_bench(res, tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert res.markdown().count("\n") == len(methods) + 1


def test_latte_bench_runs_diffusers_hooks_like_graphpass(tmp_path):
    torch.set_num_threads(1)
    wl = Workload.from_name("latte-tiny", num_steps=12)
    methods = ["baseline", "pab-latte", "diffusers-pab", "diffusers-fbc"]
    res = bench(wl, SEEDS, methods, progress=False)
    check_rows(res, methods, wl)
    ours, theirs = res.row("pab-latte"), res.row("diffusers-pab")
    assert theirs["status"] == "ok" and theirs["ideal_speedup"] is None and theirs["cache_peak_bytes"] is None
    # same schedule (ranges 2/3/6, window (100, 800)), both caching the raw attention output: same videos
    assert theirs["psnr"] == pytest.approx(ours["psnr"], abs=0.05)
    fbc = res.row("diffusers-fbc")  # runs, or says why not
    assert fbc["status"] == "ok" or fbc["status"].startswith("n/a: diffusers fbc hook fails")


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
