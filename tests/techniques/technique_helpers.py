"""Helpers of the technique tests: tiny diffusers Wan and CogVideoX transformers (2 layers), a denoising loop
called as a diffusers pipeline calls its transformer, and diffusers' own hooks with their per-call decisions.

The loop: ``with model.cache_context(name): eps = model(hidden_states=x, timestep=t, encoder_hidden_states=c,
return_dict=False)[0]`` per step and per context, then an Euler-like update of ``x``. With ``cfg="batched"``
one call carries cond and uncond samples (batch 2); with ``cfg="separate"`` they are two calls in the contexts
"cond" and "uncond", combined by a guidance scale.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import diffusers
import torch

from conftest import make_case

torch.set_num_threads(1)

#: Timesteps of a 12-step flow-matching-like loop on the 0..1000 scale.
TIMESTEPS = [1000.0 - i * 1000.0 / 12 for i in range(12)]
GUIDANCE = 3.0


def wan():
    """A 2-layer WanTransformer3DModel and the keyword arguments of one call (batch 2)."""
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32).eval()
    g = torch.Generator().manual_seed(2)
    kw = dict(hidden_states=torch.randn(2, 4, 3, 8, 8, generator=g), timestep=torch.full((2,), 1000.0),
              encoder_hidden_states=torch.randn(2, 5, 16, generator=g), return_dict=False)
    return model, kw


def cogvideox():
    """conftest's 2-layer CogVideoXTransformer3DModel (float timestep) and one call's keyword arguments."""
    case = make_case("cogvideox")
    kw = case.kwargs()
    kw["timestep"] = kw["timestep"].float()
    return case.model, kw


MODELS: dict[str, Callable] = {"wan": wan, "cogvideox": cogvideox}


def denoise(model, kw: dict, timesteps: Sequence[float] = TIMESTEPS, cfg: str = "batched",
            after_call: Callable[[str], None] | None = None) -> list[torch.Tensor]:
    """The guided noise prediction of every step. ``after_call(context)`` runs after each model call (to
    read a hook's state)."""
    x = kw["hidden_states"][:1]
    text = kw["encoder_hidden_states"]
    outs = []

    def call(name, latents, cond):
        with model.cache_context(name):
            t = torch.full((latents.shape[0],), t_now)
            out = model(hidden_states=latents, timestep=t, encoder_hidden_states=cond, return_dict=False)[0]
        if after_call is not None:
            after_call(name)
        return out

    with torch.no_grad():
        for t_now in timesteps:
            if cfg == "batched":
                both = call("cond_uncond", torch.cat([x, x]), text)
                cond, uncond = both[:1], both[1:]
            else:
                cond, uncond = call("cond", x, text[:1]), call("uncond", x, text[1:])
            eps = uncond + GUIDANCE * (cond - uncond)
            outs.append(eps)
            x = x - 0.08 * eps
    return outs


def hooked(model, apply: Callable, config, leader: str):
    """A copy of ``model`` with diffusers' hook applied, and ``decisions``: per context the list of
    per-call compute flags read from the leader hook's state."""
    m = copy.deepcopy(model)
    apply(m, config)
    blocks = m.blocks if hasattr(m, "blocks") else m.transformer_blocks
    hook = blocks[0]._diffusers_hook.get_hook(leader)
    decisions: dict[str, list[str]] = {}

    def after_call(name):
        state = hook.state_manager._state_cache[name]
        decisions.setdefault(name, []).append("C" if state.should_compute else "R")

    return m, decisions, after_call


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())
