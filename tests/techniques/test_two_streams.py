"""MagCache and First Block Cache on a model whose text tokens leave the chain of blocks and change its output
(two CogVideoX blocks; the output adds a projection of the mean text token to every video token): diffusers' MagCache
returns the text tokens a reuse step gets unchanged, its First Block Cache adds a text residual; graphpass
does the same, within 1e-5 relative over a 12-step loop, with the same calls skipped."""
from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path

import torch
from diffusers.hooks.hooks import CacheContext
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, apply_first_block_cache, apply_mag_cache

from graphpass.passes.capture import capture
from graphpass.passes.tag import tag_attention
from graphpass.runtime.executor import OptimizedModel
from graphpass.techniques.first_block_cache import FirstBlockCache
from graphpass.techniques.magcache import FLUX_MAG_RATIOS, MagCache
from technique_helpers import TIMESTEPS, rel_err

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adacache"))
from test_multistream import TwoStreamDiT, _two_stream_kwargs  # noqa: E402  (the multi-stream tests' model)

N = len(TIMESTEPS)


class TextReadingDiT(TwoStreamDiT):
    """:class:`TwoStreamDiT` whose output depends on the text tokens leaving the blocks."""

    def forward(self, hidden_states, encoder_hidden_states, timestep):
        h, e = self.proj_in(hidden_states), self.text_in(encoder_hidden_states)
        temb = self.time_embedding(self.time_proj(timestep))
        for block in self.transformer_blocks:
            h, e = block(h, e, temb)
        return (self.proj_out(self.norm_out(h) + e.mean(1, keepdim=True)),)


def _loop(model, kw, leader=None, context="cond_uncond"):
    """Outputs of a loop feeding ``x - 0.1 * out`` back; with ``leader``, also the hook's per-call decisions."""
    hook = model.transformer_blocks[0]._diffusers_hook.get_hook(leader) if leader else None
    x, outs, decisions = kw["hidden_states"], [], []
    with torch.no_grad():
        for t in TIMESTEPS:
            if hook is not None:
                hook.state_manager.set_context(CacheContext(context))
            with _maybe_context(model, context):
                out = model(hidden_states=x, encoder_hidden_states=kw["encoder_hidden_states"],
                            timestep=torch.full((2,), t))[0]
            if hook is not None:
                decisions.append("C" if hook.state_manager.get_state().should_compute else "R")
            outs.append(out)
            x = x - 0.1 * out
    return outs, "".join(decisions)


def _maybe_context(model, name):
    """graphpass's cache context; the plain module has none (the loop sets the hook's context itself)."""
    return model.cache_context(name) if isinstance(model, OptimizedModel) else contextlib.nullcontext()


def _check(schedule, apply, config, leader):
    model, kw = TextReadingDiT(), _two_stream_kwargs()
    cap = capture(model, kw)
    opt = OptimizedModel(model, cap, tag_attention(cap), schedule)
    assert len(opt.span.streams) == 2  # video and text tokens leave the chain
    hooked = copy.deepcopy(model)
    apply(hooked, config)
    expected, hook_decisions = _loop(hooked, kw, leader)
    got, _ = _loop(opt, kw)
    assert opt.decisions("cond_uncond") == hook_decisions and "R" in hook_decisions
    assert max(rel_err(a, b) for a, b in zip(got, expected)) <= 1e-5


def test_magcache_passes_text_tokens_through_like_diffusers():
    config = dict(threshold=0.1, max_skip_steps=3, retention_ratio=0.2, num_inference_steps=N,
                  mag_ratios=FLUX_MAG_RATIOS)
    _check(MagCache(**config), apply_mag_cache, MagCacheConfig(**config), "mag_cache_leader_block_hook")


def test_first_block_cache_keeps_a_text_residual_like_diffusers():
    _check(FirstBlockCache(0.3), apply_first_block_cache, FirstBlockCacheConfig(0.3), "fbc_leader_block_hook")
