"""``graphpass calibrate``: the proposed schedule round-trips and reproduces the speedup it reports."""
from __future__ import annotations

import pytest

from adacache_helpers import captured, residual_model
from graphpass import AdaCache, GraphpassError, schedule_from_json
from graphpass.cli import build_parser
from graphpass.commands.calibrate import calibrate, run_schedule
from graphpass.models.sampler import ddim_timesteps

STEPS = 8
TS = [float(t) for t in ddim_timesteps(STEPS)]


def test_calibrate_reproduces_its_speedup(tmp_path):
    case, _, _ = captured("vdt")
    lines = []
    cal = calibrate(case.model, case.kwargs(), TS, seeds=[0, 1], target_speedup=1.3, codebook="slow", iters=3,
                    log=lines.append)
    assert cal.reached and cal.chosen.speedup >= 1.3
    assert any("distance" in line for line in lines) and len(cal.metrics) == 2
    # the baseline metric was recorded at every step whose decision matters: steps 1 .. n-4 (step 0 has nothing
    # to compare with; step n-3 decides nothing since the last 2 steps always compute)
    assert all(len(m) == STEPS - 4 for m in cal.metrics)
    path = tmp_path / "schedule.json"
    cal.schedule.save(path)
    loaded = schedule_from_json(str(path))
    assert loaded == cal.schedule and isinstance(loaded, AdaCache)
    # same seeds, the loaded schedule: the same steps computed as reported
    _, computed, _ = run_schedule(residual_model("vdt", loaded, TS), case.model, [0, 1], STEPS)
    assert computed == cal.chosen.computed
    assert STEPS * 2 / sum(computed) == pytest.approx(cal.chosen.speedup)
    # the smallest scale that reaches the target: every tried smaller scale was too slow
    assert all(t.speedup < 1.3 for t in cal.trials if t.scale < cal.chosen.scale)


def test_calibrate_arguments():
    case, _, _ = captured("vdt")
    with pytest.raises(GraphpassError, match="exactly one target"):
        calibrate(case.model, case.kwargs(), TS, target_speedup=1.5, target_psnr=30)
    with pytest.raises(GraphpassError, match="unknown codebook"):
        calibrate(case.model, case.kwargs(), TS, target_speedup=1.5, codebook="turbo")
    args = build_parser().parse_args(["calibrate", "--model", "vdt-s", "--steps", "30", "--seeds", "0", "1", "2",
                                      "--target-psnr", "30", "--out", "s.json"])
    assert (args.steps, args.seeds, args.target_psnr, args.target_speedup) == (30, [0, 1, 2], 30.0, None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["calibrate", "--target-psnr", "30", "--target-speedup", "1.5"])
