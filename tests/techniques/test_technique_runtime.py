"""Step-cache techniques at run time: an always-compute setting equals eager, frozen forms equal the adaptive
run and export to ONNX, JSON round trips, presets and errors (host reads: test_host_reads.py)."""
from __future__ import annotations

import pytest
import torch

import graphpass
from diffusers.hooks.mag_cache import nearest_interp
from graphpass import FrozenAdaCache, ScheduleError, schedule_from_json
from graphpass.techniques.first_block_cache import FirstBlockCache, FrozenFirstBlockCache
from graphpass.techniques.magcache import HUNYUAN_720P_MAG_RATIOS, FrozenMagCache, MagCache, resample
from graphpass.techniques.teacache import COEFFICIENTS, TeaCache
from technique_helpers import TIMESTEPS, captured, compiled, denoise, rel_err

N = len(TIMESTEPS)


@pytest.mark.parametrize("schedule", [FirstBlockCache(0.0), TeaCache(threshold=0.0, num_inference_steps=N),
                                      MagCache(mag_ratios=[1.0], max_skip_steps=0, num_inference_steps=N)],
                         ids=["fbc", "teacache", "magcache"])
def test_always_compute_equals_eager(schedule):
    model, kw, _, _ = captured("wan", 2)
    expected = denoise(model, kw)  # diffusers' cache_context without hooks does nothing
    opt = compiled("wan", schedule)
    got = denoise(opt, kw)
    assert opt.decisions("cond_uncond") == "C" * N
    assert max(rel_err(a, b) for a, b in zip(got, expected)) <= 1e-6


@pytest.mark.parametrize("schedule", [FirstBlockCache(0.1), TeaCache(threshold=0.15, num_inference_steps=N),
                                      MagCache(mag_ratios=[1.0] * 6 + [0.98] * 6, num_inference_steps=N)],
                         ids=["fbc", "teacache", "magcache"])
def test_frozen_form_replays_and_exports_to_onnx(tmp_path, schedule):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model, kw, _, _ = captured("wan", 2)
    opt = compiled("wan", schedule)
    adaptive = denoise(opt, kw)
    frozen = opt.freeze("cond_uncond")
    assert isinstance(frozen, {FirstBlockCache: FrozenFirstBlockCache, TeaCache: FrozenAdaCache,
                               MagCache: FrozenMagCache}[type(schedule)])
    replay = opt.with_schedule(frozen)  # the same capture, as graphpass.optimize(model, frozen, ...) would make
    replay.plan(TIMESTEPS)
    replayed = denoise(replay, kw)
    assert replay.decisions("cond_uncond") == opt.decisions("cond_uncond") == frozen.decisions
    assert max(rel_err(a, b) for a, b in zip(replayed, adaptive)) <= 1e-6
    # The default (checked single file) for one technique; the others write one file per phase (verify=False:
    # this test runs the loaded artefact against the replay itself), which is cheaper to export.
    folder = graphpass.export(replay, tmp_path / "artefact", verify=isinstance(schedule, MagCache))
    loaded = graphpass.load(folder, threads=1)
    onnx_outs = denoise(loaded, kw)
    assert max(float((a - b).abs().max()) for a, b in zip(onnx_outs, replayed)) <= 1e-4


def test_adaptive_model_refuses_export_and_says_freeze(tmp_path):
    opt = compiled("wan", FirstBlockCache(0.1))
    with pytest.raises(graphpass.ArtefactError, match="freeze"):
        graphpass.export(opt, tmp_path / "x", timesteps=TIMESTEPS)


@pytest.mark.parametrize("schedule", [
    FirstBlockCache(0.07), FirstBlockCache.preset("paraattention"), FrozenFirstBlockCache("CCRRC"), FrozenMagCache("CRC"),
    MagCache.preset("hunyuanvideo-720p", num_inference_steps=30), MagCache(calibrate=True, num_inference_steps=7),
    TeaCache.preset("hunyuanvideo"), TeaCache(threshold=0.2, coefficients=[2.0, 0.5], num_inference_steps=9)])
def test_json_round_trip(schedule):
    again = schedule_from_json(schedule.to_json())
    assert again == schedule and type(again) is type(schedule)
    assert getattr(again, "decisions", None) == getattr(schedule, "decisions", None)


def test_presets_hold_published_values():
    assert TeaCache.preset("flux").coefficients[0] == 4.98651651e+02 and TeaCache.preset("flux").threshold == 0.25
    assert set(COEFFICIENTS) >= {"hunyuanvideo", "cogvideox-5b", "wan2.1-t2v-1.3b", "latte", "mochi", "ltx"}
    hv = MagCache.preset("hunyuanvideo-720p")
    assert hv.mag_ratios == HUNYUAN_720P_MAG_RATIOS and len(hv.mag_ratios) == hv.num_inference_steps == 50
    assert (hv.threshold, hv.max_skip_steps, hv.retention_ratio) == (0.24, 6, 0.2)
    # resampling as diffusers' MagCacheConfig does
    for n in (1, 7, 10, 28, 49):
        assert resample(HUNYUAN_720P_MAG_RATIOS, n) == nearest_interp(torch.tensor(HUNYUAN_720P_MAG_RATIOS), n).tolist()


@pytest.mark.parametrize("make, message", [
    (lambda: FirstBlockCache(-0.1), r"threshold=-0.1 must be a finite number >= 0"),
    (lambda: FirstBlockCache.preset("nope"), r"unknown FirstBlockCache preset 'nope'; known: default"),
    (lambda: MagCache(), r"MagCache needs mag_ratios.*calibrate=True"),
    (lambda: MagCache(mag_ratios=[1.0, -2.0]), r"finite ratios > 0"),
    (lambda: MagCache(mag_ratios=[1.0], retention_ratio=1.5), r"retention_ratio=1.5 must be a fraction"),
    (lambda: MagCache(mag_ratios=[1.0], max_skip_steps=-1), r"max_skip_steps=-1 must be an integer >= 0"),
    (lambda: TeaCache(coefficients="abc"), r"coefficients='abc': give the rescaling polynomial"),
    (lambda: TeaCache(num_inference_steps=0), r"num_inference_steps=0 must be an integer >= 1 or None"),
    (lambda: FrozenFirstBlockCache("RC"), r"start with a reuse"),
    (lambda: schedule_from_json('{"type": "TeaCache", "thresh": 1}'), r"unknown fields \['thresh'\]"),
])
def test_errors_name_the_problem_and_the_fix(make, message):
    with pytest.raises(ScheduleError, match=message):
        make()
