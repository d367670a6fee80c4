"""Shared pieces of the technique tests: tiny diffusers Wan and CogVideoX transformers (2 layers), a denoising loop
called as a diffusers pipeline calls its transformer, and diffusers' own hooks with their per-call decisions.

The loop: ``with model.cache_context(name): eps = model(hidden_states=x, timestep=t, encoder_hidden_states=c,
return_dict=False)[0]`` per step and per context, then an Euler-like update of ``x``. With ``cfg="batched"``
one call carries cond and uncond samples (batch 2); with ``cfg="separate"`` they are two calls in the contexts
"cond" and "uncond", combined by a guidance scale.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from typing import Callable, Sequence

import diffusers
import torch

from conftest import make_case
from graphpass.passes.capture import capture
from graphpass.passes.tag import tag_attention
from graphpass.runtime.executor import OptimizedModel

torch.set_num_threads(1)

#: Timesteps of a 12-step loop on the 0..1000 scale (whole numbers: exact in float32, as plans compare them).
TIMESTEPS = [1000.0 - i * 80.0 for i in range(12)]
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
    # a cache_context call on the shared model (e.g. an eager reference loop) left diffusers' hook registries on
    # it; copied, they would still point at the shared model's state: start the copy without any
    for module in m.modules():
        module.__dict__.pop("_diffusers_hook", None)
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


class _Probed(Exception):
    """Raised by the reference's pre-hook on the first attention: carries its video-token input."""

    def __init__(self, value):
        self.value = value


class TeaCacheReference:
    """TeaCache as published (ali-vilab/TeaCache), on a diffusers transformer's blocks, per cache context.

    Each call first runs block 0 up to its first attention and takes that attention's ``hidden_states``
    input: the timestep-modulated input ``m`` (Wan: ``norm1(h) * (1 + scale) + shift``; CogVideoX:
    ``norm1(h, text, temb)[0]``). Calls 0 and ``num_steps - 1`` compute and set ``acc = 0``; otherwise
    ``acc += poly(mean|m - m_prev| / mean|m_prev|)`` (numpy-style float64 polynomial, highest power first)
    and the call reuses iff ``acc < threshold``, else computes and sets ``acc = 0``. ``m_prev`` follows every
    call. A reuse returns ``h_in + R`` from block 0 (text tokens unchanged) and the other blocks pass their
    inputs through; a computed call keeps ``R = h_out - h_in`` at the last block.
    """

    def __init__(self, model, coefficients, threshold, num_steps):
        self.coefficients, self.threshold, self.n = list(coefficients), threshold, num_steps
        self.state: dict[str, dict] = {}
        self.context = None
        self.decisions: dict[str, list[str]] = {}
        blocks = list(model.blocks if hasattr(model, "blocks") else model.transformer_blocks)
        self.attn = blocks[0].attn1
        for i, block in enumerate(blocks):
            block.forward = self._wrap(block.forward, i == 0, i == len(blocks) - 1)
        model.cache_context = self.cache_context

    @contextlib.contextmanager
    def cache_context(self, name, **info):  # diffusers' protocol; the published rule counts calls only
        self.context = name
        try:
            yield
        finally:
            self.context = None

    def _probe(self, forward, args, kwargs):
        def grab(module, a, k):
            raise _Probed(a[0] if a else k["hidden_states"])

        handle = self.attn.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            forward(*args, **kwargs)
        except _Probed as p:
            return p.value
        finally:
            handle.remove()
        raise AssertionError("block 0 never called its first attention")

    def _decide(self, st, m) -> bool:
        i = st["cnt"]
        if i == 0 or i == self.n - 1:
            st["acc"], reuse = 0.0, False
        else:
            d = ((m - st["m_prev"]).abs().mean() / st["m_prev"].abs().mean()).item()
            y = 0.0
            for c in self.coefficients:
                y = y * d + c
            st["acc"] += y
            reuse = st["acc"] < self.threshold
            if not reuse:
                st["acc"] = 0.0
        st["m_prev"] = m
        st["cnt"] = (i + 1) % self.n
        return reuse

    def _wrap(self, forward, head, tail):
        signature = inspect.signature(forward)

        def wrapped(*args, **kwargs):
            bound = signature.bind(*args, **kwargs).arguments
            h, text = bound["hidden_states"], bound.get("encoder_hidden_states")
            two = "Cog" in type(forward.__self__).__name__  # CogVideoX blocks return (video, text)
            st = self.state.setdefault(self.context, {"cnt": 0, "acc": 0.0})
            if head:
                st["reuse"] = self._decide(st, self._probe(forward, args, kwargs))
                st["h_in"] = h
                self.decisions.setdefault(self.context, []).append("R" if st["reuse"] else "C")
                if st["reuse"]:
                    out = h + st["R"]
                    return (out, text) if two else out
            if st["reuse"]:
                return (h, text) if two else h
            out = forward(*args, **kwargs)
            if tail:
                st["R"] = (out[0] if two else out) - st["h_in"]
            return out

        return wrapped


@functools.lru_cache(maxsize=None)
def captured(name: str, batch: int):
    """(model, one call's keyword arguments at ``batch``, capture, tagged regions) of a tiny model, captured
    once per pytest process. Do not modify the model: graphs read its parameters."""
    model, kw = MODELS[name]()
    kw = {k: (v[:batch] if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    cap = capture(model, kw)
    return model, kw, cap, tag_attention(cap)


def compiled(name: str, schedule, cfg: str = "batched") -> OptimizedModel:
    """What ``graphpass.optimize(model, schedule, example_kwargs=...)`` returns, on the shared capture for
    the calls of ``denoise(..., cfg=cfg)`` (batch 2 for batched guidance, 1 for separate calls)."""
    model, _, cap, regions = captured(name, 2 if cfg == "batched" else 1)
    return OptimizedModel(model, cap, regions, schedule)
