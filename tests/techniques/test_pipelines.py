"""The techniques inside tiny diffusers pipelines (Wan: separate cond/uncond calls in the contexts "cond" and
"uncond"; CogVideoX: one batched call), called with ``prompt_embeds`` as a user would, with
``pipe.transformer = graphpass.optimize(pipe.transformer, schedule)``: the final latents equal those of the
same pipeline with diffusers' hook (First Block Cache, MagCache) or with the module-level TeaCache reference
(within 1e-5 relative), and every context skips the same calls."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, apply_first_block_cache, apply_mag_cache

import graphpass
from graphpass.techniques.first_block_cache import FirstBlockCache
from graphpass.techniques.magcache import FLUX_MAG_RATIOS, MagCache
from graphpass.techniques.teacache import TeaCache
from technique_helpers import TeaCacheReference, rel_err

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
from tiny_pipelines import cogvideox, wan  # noqa: E402  (the pipeline tests' tiny pipelines)

STEPS = 10
#: cogvideox-rope: CogVideoX with rotary embeddings (written in place into the attention's q/k inside the blocks).
PIPES = {"wan": wan, "cogvideox": cogvideox, "cogvideox-rope": lambda: cogvideox(rope=True)}


def _record_hook_decisions(transformer, leader: str) -> dict[str, list[str]]:
    """Per context, "C"/"R" of every call, read from the diffusers hook's state right after the call (the
    pipeline resets the hooks when it ends)."""
    blocks = transformer.blocks if hasattr(transformer, "blocks") else transformer.transformer_blocks
    hook = blocks[0]._diffusers_hook.get_hook(leader)
    forward = transformer.forward
    decisions: dict[str, list[str]] = {}

    def recording(*args, **kwargs):
        out = forward(*args, **kwargs)
        state = hook.state_manager.get_state()
        decisions.setdefault(hook.state_manager._context.name, []).append("C" if state.should_compute else "R")
        return out

    transformer.forward = recording
    return decisions


def _schedules():
    mag = dict(threshold=0.1, max_skip_steps=3, retention_ratio=0.2, num_inference_steps=STEPS,
               mag_ratios=FLUX_MAG_RATIOS)
    return {
        "fbc": (FirstBlockCache(0.1), lambda tr: (apply_first_block_cache(tr, FirstBlockCacheConfig(0.1)),
                                                  _record_hook_decisions(tr, "fbc_leader_block_hook"))[1]),
        "magcache": (MagCache(**mag), lambda tr: (apply_mag_cache(tr, MagCacheConfig(**mag)),
                                                  _record_hook_decisions(tr, "mag_cache_leader_block_hook"))[1]),
        "teacache": (TeaCache(threshold=0.1, num_inference_steps=STEPS),
                     lambda tr: TeaCacheReference(tr, [1.0, 0.0], 0.1, STEPS).decisions),
    }


@pytest.mark.parametrize("technique, pipe", [(t, p) for t in ("fbc", "magcache", "teacache") for p in ("wan", "cogvideox")]
                         + [("fbc", "cogvideox-rope"), ("magcache", "cogvideox-rope")])
def test_pipeline_equals_hook(pipe, technique):
    schedule, apply_reference = _schedules()[technique]
    ref_case = PIPES[pipe]()
    ref_decisions = apply_reference(ref_case.pipe.transformer)
    expected = ref_case.run(steps=STEPS)

    case = PIPES[pipe]()
    case.pipe.transformer = graphpass.optimize(case.pipe.transformer, schedule)
    got = case.run(steps=STEPS)
    opt = case.pipe.transformer
    contexts = sorted(ref_decisions)
    assert contexts == (["cond", "uncond"] if pipe == "wan" else [next(iter(ref_decisions))])
    for ctx in contexts:
        assert opt.decisions(ctx) == "".join(ref_decisions[ctx])
    assert any("R" in opt.decisions(ctx) for ctx in contexts)
    assert rel_err(got, expected) <= 1e-5
