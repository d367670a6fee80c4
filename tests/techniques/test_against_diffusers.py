"""First Block Cache and MagCache against diffusers' own hooks with the same config, over a 12-step guided
loop on tiny Wan and CogVideoX transformers (2 layers), called as a diffusers pipeline calls its transformer:
each step's guided prediction within 1e-5 relative, and the same calls skipped (read from the hooks' state).
MagCache's calibration gives diffusers' ratios."""
from __future__ import annotations

import contextlib
import io

import pytest
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, apply_first_block_cache, apply_mag_cache

from graphpass.techniques.first_block_cache import FirstBlockCache
from graphpass.techniques.magcache import MagCache
from technique_helpers import TIMESTEPS, captured, compiled, denoise, hooked, rel_err

N = len(TIMESTEPS)
#: Thresholds at which the tiny models' first-block distances fall on both sides (both decisions occur).
FBC_THRESHOLDS = {"wan": 0.1, "cogvideox": 0.2}
CONTEXTS = {"batched": ["cond_uncond"], "separate": ["cond", "uncond"]}


@pytest.mark.parametrize("cfg", ["batched", "separate"])
@pytest.mark.parametrize("name", ["wan", "cogvideox"])
def test_first_block_cache_equals_diffusers_hook(name, cfg):
    model, kw, _, _ = captured(name, 2)
    thr = FBC_THRESHOLDS[name]
    hook_model, hook_decisions, after_call = hooked(model, apply_first_block_cache, FirstBlockCacheConfig(thr),
                                                    "fbc_leader_block_hook")
    expected = denoise(hook_model, kw, cfg=cfg, after_call=after_call)
    opt = compiled(name, FirstBlockCache(thr), cfg)
    got = denoise(opt, kw, cfg=cfg)
    for ctx in CONTEXTS[cfg]:
        assert opt.decisions(ctx) == "".join(hook_decisions[ctx])
        assert "R" in opt.decisions(ctx) and opt.decisions(ctx).count("C") > 1
    assert max(rel_err(a, b) for a, b in zip(got, expected)) <= 1e-5


def _diffusers_calibration(model, kw):
    """The ratios diffusers' calibrating MagCache hook records (it prints them at the end of a generation)."""
    hook_model, _, after_call = hooked(model, apply_mag_cache, MagCacheConfig(calibrate=True, num_inference_steps=N),
                                       "mag_cache_leader_block_hook")
    blocks = hook_model.blocks if hasattr(hook_model, "blocks") else hook_model.transformer_blocks
    tail = blocks[-1]._diffusers_hook.get_hook("mag_cache_block_hook")
    ratios = []
    record = tail._perform_calibration_step

    def keep(state, residual):
        record(state, residual)
        ratios.append(state.calibration_ratios[-1])

    tail._perform_calibration_step = keep
    with contextlib.redirect_stdout(io.StringIO()):
        denoise(hook_model, kw, cfg="batched", after_call=after_call)
    return ratios


@pytest.mark.parametrize("name", ["wan", "cogvideox"])
def test_magcache_calibration_and_generation_equal_diffusers_hook(name):
    model, kw, _, _ = captured(name, 2)
    expected_ratios = _diffusers_calibration(model, kw)
    cal = compiled(name, MagCache(calibrate=True, num_inference_steps=N))
    denoise(cal, kw, cfg="batched")
    ratios = cal.records("cond_uncond")
    assert len(ratios) == len(expected_ratios) == N
    assert ratios == pytest.approx(expected_ratios, rel=1e-5)
    assert cal.decisions("cond_uncond") == "C" * N and cal.metric_reads == 0

    for cfg in ("batched", "separate"):
        config = dict(threshold=0.06, max_skip_steps=2, retention_ratio=0.2, num_inference_steps=N,
                      mag_ratios=ratios)
        hook_model, hook_decisions, after_call = hooked(model, apply_mag_cache, MagCacheConfig(**config),
                                                        "mag_cache_leader_block_hook")
        expected = denoise(hook_model, kw, cfg=cfg, after_call=after_call)
        opt = compiled(name, MagCache(**config), cfg)
        got = denoise(opt, kw, cfg=cfg)
        for ctx in CONTEXTS[cfg]:
            assert opt.decisions(ctx) == "".join(hook_decisions[ctx]) == opt.schedule.decisions
        assert "R" in opt.schedule.decisions
        assert max(rel_err(a, b) for a, b in zip(got, expected)) <= 1e-5
        assert opt.metric_reads == 0  # a table: nothing is read from the device


def test_magcache_published_table_resampled_like_diffusers():
    """FLUX's 28-entry table on a 12-step loop: diffusers resamples it inside its config; the decisions of
    graphpass's rule on its own resampling equal the hook's on the tiny Wan."""
    model, kw, _, _ = captured("wan", 2)
    config = dict(threshold=0.1, max_skip_steps=3, retention_ratio=0.2, num_inference_steps=N)
    schedule = MagCache.preset("flux", **config)
    hook_model, hook_decisions, after_call = hooked(
        model, apply_mag_cache, MagCacheConfig(mag_ratios=list(schedule.mag_ratios), **config),
        "mag_cache_leader_block_hook")
    expected = denoise(hook_model, kw, cfg="batched", after_call=after_call)
    opt = compiled("wan", schedule)
    got = denoise(opt, kw, cfg="batched")
    assert opt.decisions("cond_uncond") == "".join(hook_decisions["cond_uncond"])
    assert "R" in opt.decisions("cond_uncond")
    assert max(rel_err(a, b) for a, b in zip(got, expected)) <= 1e-5
