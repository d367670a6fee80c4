"""Helpers of the hoisting tests: a tiny diffusers Wan beside the conftest models, a counter of the matrix
products that read given weights (measured at dispatch, knowing nothing of graphpass), and a sampling loop
with separate cond/uncond calls.

    >>> case = model_case("wan")
    >>> with WeightReads({"k": case.model.blocks[0].attn2.to_k.weight}) as reads:
    ...     run_loop(case.model, case.kwargs(), [981, 961])
    >>> reads.counts["k"]
    2
"""
from __future__ import annotations

import functools
from collections import Counter
from typing import Sequence

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import graphpass
from conftest import ModelCase, first, make_case, step
from graphpass import PAB
from graphpass.runtime.executor import OptimizedModel

torch.set_num_threads(1)

#: 20 sampler steps on the 0..1000 scale, high to low.
STEPS_20 = [float(t) for t in torch.linspace(981, 1, 20).round()]


def _wan() -> ModelCase:
    """WanTransformer3DModel: cross-attention K/V with RMS norm on K, rotary tables computed from the
    latent's size. hidden_states (B, C, F, H, W) = (2, 4, 3, 8, 8), text (2, 5, 16)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                  rope_max_seq_len=32).eval()

    def kwargs():
        g = torch.Generator().manual_seed(2)
        return dict(hidden_states=torch.randn(2, 4, 3, 8, 8, generator=g), timestep=torch.full((2,), 500.0),
                    encoder_hidden_states=torch.randn(2, 5, 16, generator=g), return_dict=False)

    return ModelCase("wan", model, kwargs)


def model_case(name: str) -> ModelCase:
    """A conftest case ("vdt", "latte", "cogvideox") or "wan"."""
    return _wan() if name == "wan" else make_case(name)


@functools.lru_cache(maxsize=None)
def optimized(name: str) -> OptimizedModel:
    """``graphpass.optimize`` of :func:`model_case` ``(name)`` with its example call (hoisting on, as by
    default), once per test module. Never run it: tests take models of their own schedule on its capture
    with :func:`for_schedule`."""
    case = model_case(name)
    kind = "joint" if name in ("cogvideox", "wan") else "spatial"
    return graphpass.optimize(case.model, PAB(**{kind: 2}), example_kwargs=case.kwargs())


def for_schedule(opt: OptimizedModel, schedule, timesteps: Sequence[float] | None = None,
                 hoist: bool = True) -> OptimizedModel:
    """What ``graphpass.optimize(model, schedule, example_kwargs=..., timesteps=..., hoist=...)`` builds:
    ``opt.with_schedule(schedule)`` (``opt``'s capture, regions and hoisting analysis, fresh run state), its
    hoisting dropped unless ``hoist``, planned for ``timesteps`` if given.

        >>> plain = for_schedule(optimized("latte"), PAB.preset("latte"), hoist=False)
        >>> plain.hoisting is None and plain.state().trace == []
        True
    """
    schedule.check_model({r.kind for r in opt.attention_regions})  # as optimize refuses a kind the model lacks
    twin = opt.with_schedule(schedule)
    if not hoist:
        twin.hoisting = None
    if timesteps is not None:
        twin.plan(timesteps)
    return twin


#: Each model's cross-attention key/value projections, from the model code (None: no cross-attention).
CROSS_KV = {
    "latte": [f"transformer_blocks.{i}.attn2.to_{p}" for i in range(2) for p in "kv"],
    "wan": [f"blocks.{i}.attn2.to_{p}" for i in range(2) for p in "kv"],
    "vdt": [f"blocks.{i}.cross_attn.{p}" for i in range(2) for p in "kv"],
}

_MATMULS = {torch.ops.aten.addmm, torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.matmul,
            torch.ops.aten.linear}


class WeightReads(TorchDispatchMode):
    """Counts, per name, the matrix products whose operands share memory with that weight (one per call of
    a linear layer, whichever way it is dispatched)."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        self._ptrs = {w.untyped_storage().data_ptr(): name for name, w in weights.items()}
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in _MATMULS:
            for a in pytree.tree_leaves((args, kwargs or {})):
                if isinstance(a, torch.Tensor):
                    name = self._ptrs.get(a.untyped_storage().data_ptr())
                    if name is not None:
                        self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def cfg_loop(model_or_opt, kwargs: dict, uncond_text: torch.Tensor, timesteps: Sequence[float],
             contexts: bool) -> list[torch.Tensor]:
    """A classifier-free-guidance loop with separate cond and uncond calls (in cache contexts ``cond`` and
    ``uncond`` when ``contexts``); the next latent steps along ``uncond + 2 * (cond - uncond)``. Returns the
    cond and uncond outputs of every step, in call order."""
    kw = dict(kwargs)
    x = kw["hidden_states"]
    outs = []
    with torch.no_grad():
        for t in timesteps:
            pair = []
            for name, text in (("cond", kwargs["encoder_hidden_states"]), ("uncond", uncond_text)):
                call = dict(kw, hidden_states=x, timestep=torch.full_like(kwargs["timestep"], t),
                            encoder_hidden_states=text)
                if contexts:
                    with model_or_opt.cache_context(name):
                        pair.append(first(model_or_opt(**call)))
                else:
                    pair.append(first(model_or_opt(**call)))
            outs += pair
            x = step(x, (pair[1] + 2 * (pair[0] - pair[1]),))
    return outs
