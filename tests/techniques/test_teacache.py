"""TeaCache against a module-level reference of the published algorithm (technique_helpers.TeaCacheReference)
over a 12-step guided loop on tiny Wan and CogVideoX transformers: outputs within 1e-5 relative and the same
calls reused, with the identity and with a published polynomial, batched and separate guidance."""
from __future__ import annotations

import copy

import pytest

from graphpass.techniques.teacache import COEFFICIENTS, TeaCache
from technique_helpers import TIMESTEPS, TeaCacheReference, captured, compiled, denoise, rel_err

N = len(TIMESTEPS)
CONTEXTS = {"batched": ["cond_uncond"], "separate": ["cond", "uncond"]}


def _check(name, cfg, coefficients, threshold):
    model, kw, _, _ = captured(name, 2)
    ref_model = copy.deepcopy(model)
    ref = TeaCacheReference(ref_model, coefficients, threshold, N)
    expected = denoise(ref_model, kw, cfg=cfg)
    opt = compiled(name, TeaCache(threshold=threshold, coefficients=coefficients, num_inference_steps=N), cfg)
    got = denoise(opt, kw, cfg=cfg)
    for ctx in CONTEXTS[cfg]:
        assert opt.decisions(ctx) == "".join(ref.decisions[ctx])
        assert "R" in opt.decisions(ctx) and opt.decisions(ctx).count("C") > 2
        assert opt.decisions(ctx)[0] == opt.decisions(ctx)[-1] == "C"  # forced first and last calls
    assert max(rel_err(a, b) for a, b in zip(got, expected)) <= 1e-5
    return opt


@pytest.mark.parametrize("cfg", ["batched", "separate"])
@pytest.mark.parametrize("name", ["wan", "cogvideox"])
def test_teacache_equals_reference(name, cfg):
    _check(name, cfg, [1.0, 0.0], 0.15)


@pytest.mark.parametrize("name, preset, threshold", [("wan", "wan2.1-t2v-1.3b", 0.3),
                                                     ("cogvideox", "cogvideox1.5-5b", 0.1)])
def test_teacache_published_polynomial_equals_reference(name, preset, threshold):
    opt = _check(name, "batched", COEFFICIENTS[preset][0], threshold)
    # the records hold the raw distances; the policy summed the polynomial of them
    recs = opt.records("cond_uncond")
    assert recs and all(r.value > 0 for r in recs)
