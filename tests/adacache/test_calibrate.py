"""``graphpass calibrate``: the proposed schedule round-trips and reproduces the speedup it reports."""
from __future__ import annotations

import pytest
import torch

from adacache_helpers import captured, residual_model
from graphpass import AdaCache, GraphpassError, schedule_from_json
from graphpass.cli import build_parser
from graphpass.eval.calibrate import calibrate, labels_for
from graphpass.models.sampler import ddim_timesteps, sample
from reference_pab import SDPACounter

STEPS = 8
TS = [float(t) for t in ddim_timesteps(STEPS)]


def _sdpa_per_call(model, kwargs) -> int:
    """Attention calls of one plain model call (every region computed)."""
    with SDPACounter() as c, torch.no_grad():
        model(**kwargs)
    return c.count


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
    # same seeds, the loaded schedule, sampled here: the steps that ran the attention (counted per call with
    # SDPACounter, not read from the executor) are as many as reported
    opt = residual_model("vdt", loaded, TS)
    cfg = case.model.config
    full, per_call = _sdpa_per_call(case.model, case.kwargs()), []

    def counted(**kw):
        with SDPACounter() as c:
            out = opt(**kw)
        per_call.append(c.count)
        return out

    computed = []
    for s in (0, 1):
        per_call.clear()
        sample(counted, labels=labels_for(case.model, s)[None], num_steps=STEPS, guidance_scale=2.0, seed=s,
               progress=False, shape=(cfg.num_frames, cfg.in_channels, cfg.image_size, cfg.image_size))
        assert len(per_call) == STEPS and set(per_call) <= {0, full}  # a step runs every attention or none
        computed.append(per_call.count(full))
    assert computed == cal.chosen.computed and sum(computed) < 2 * STEPS
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
