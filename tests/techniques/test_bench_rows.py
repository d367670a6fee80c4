"""``graphpass bench`` rows of the techniques and of diffusers' own hooks, on a tiny diffusers Wan saved as a
model folder: every row runs; graphpass's TaylorSeer and diffusers' TaylorSeer hook (same config, same
modules) give the same videos; a model a technique does not fit gets a row saying why."""
from __future__ import annotations

import json

import pytest
import torch

from graphpass.cli import main
from graphpass.eval.bench import DIFFUSERS_HOOKS, available_methods, bench
from graphpass.eval.harness import Workload
from technique_loops import tiny

torch.set_num_threads(1)
METHODS = ["baseline", "taylorseer", "diffusers-taylorseer", "easycache-0.2", "diffusers-magcache",
           "diffusers-fastercache", "diffusers-fbc"]


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    model, _ = tiny("wan")
    path = tmp_path_factory.mktemp("wan") / "transformer"
    model.save_pretrained(path)
    return str(path)


def test_rows_run_and_taylorseer_matches_the_hook(wan_folder, tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", wan_folder, "--steps", "8", "--seeds", "0", "--quiet", "--methods", *METHODS,
                 "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads((out / "bench.json").read_text())["rows"]}
    assert list(rows) == METHODS and all(r["status"] == "ok" for r in rows.values())
    gp, hook = rows["taylorseer"], rows["diffusers-taylorseer"]
    assert gp["psnr"] == pytest.approx(hook["psnr"], abs=1e-3) and gp["psnr"] < 80  # same videos, not the baseline's
    assert gp["ideal_speedup"] > 1.2  # predicted calls skip the attention modules
    assert rows["easycache-0.2"]["psnr"] < 80 and rows["diffusers-magcache"]["psnr"] < 80
    table = (out / "bench.md").read_text()
    assert all(f"| {m} |" in table for m in METHODS) and (out / "bench.png").stat().st_size > 0
    wl = Workload.from_name(wan_folder, num_steps=8)
    assert {f"diffusers-{k}" for k in DIFFUSERS_HOOKS} <= set(available_methods(wl))


def test_a_technique_that_does_not_fit_gets_a_row_saying_why():
    wl = Workload.from_name("latte-tiny", num_steps=4)  # predicts noise and variance: 8 channels for 4
    res = bench(wl, seeds=[0], methods=["easycache"], progress=False)
    assert res.row("easycache")["status"].startswith("n/a: EasyCache reuses the model's output")
