"""Helpers of the AdaCache tests: captures shared by all tests of a session (``conftest.captured_case``), and
plain module-level implementations of residual reuse written independently of graphpass's passes.

The reference wraps every transformer block's ``forward``: on a compute step the block runs and its residual
(output - input) is kept; on a reuse step the block returns its input plus the kept residual. This is what
AdaCache does per block in the reference code (there split into an attention and a cross+MLP residual, whose
sum is the block residual). The second reference keeps the outputs of the attention/MLP modules instead, so
the block's gates and skip adds still run with the current step's conditioning.
"""
from __future__ import annotations

import inspect
from typing import Sequence

import torch

from conftest import captured_case as captured  # noqa: F401 (the AdaCache tests import it from here)
from conftest import first, step
from graphpass.runtime.adaptive import ResidualModel


def residual_model(name: str, schedule, timesteps: Sequence[float] | None = None,
                   dynamic: bool = False) -> ResidualModel:
    """What ``graphpass.optimize(model, schedule, timesteps=..., dynamic=..., hoist=False)`` returns, on the
    session's capture."""
    case, cap, regions = captured(name, dynamic)
    opt = ResidualModel(case.model, cap, regions, schedule)
    if timesteps is not None:
        opt.plan(timesteps)
    return opt


class BlockResidualReuse:
    """Wrap the blocks of ``model`` named ``block_paths``; set ``reuse`` before each call.

    A block returns one hidden state (``x -> x + f(x)``) or a tuple of them, the i-th carrying on the block's
    i-th argument (CogVideoX and HunyuanVideo blocks: ``(hidden_states, encoder_hidden_states, temb, ...) ->
    (hidden_states, encoder_hidden_states)``, called with positional or keyword arguments). A compute step
    keeps each one's residual (output - input); a reuse step returns each input plus its kept residual.
    """

    def __init__(self, model: torch.nn.Module, block_paths: Sequence[str]):
        self.model = model
        self.reuse = False
        self.cache: dict[str, tuple[torch.Tensor, ...]] = {}
        for path in block_paths:
            block = model.get_submodule(path)
            block.forward = self._wrap(path, block.forward)

    def _wrap(self, path, forward):
        signature = inspect.signature(forward)

        def wrapped(*args, **kwargs):
            inputs = list(signature.bind(*args, **kwargs).arguments.values())
            if self.reuse:
                outs = tuple(x + r for x, r in zip(inputs, self.cache[path]))
                return outs if len(outs) > 1 else outs[0]
            out = forward(*args, **kwargs)
            outs = out if isinstance(out, tuple) else (out,)
            self.cache[path] = tuple(o - x for o, x in zip(outs, inputs))
            return out

        return wrapped


def block_paths(model: torch.nn.Module) -> list[str]:
    """Names of the transformer blocks: the entries of the model's ``blocks`` / ``transformer_blocks`` /
    ``temporal_transformer_blocks`` module lists, in call order (Latte alternates spatial and temporal)."""
    if hasattr(model, "blocks"):
        return [f"blocks.{i}" for i in range(len(model.blocks))]
    return [p for i in range(len(model.transformer_blocks))
            for p in (f"transformer_blocks.{i}", f"temporal_transformer_blocks.{i}")]


def run_reference(model: torch.nn.Module, kwargs: dict, timesteps: Sequence[float], decisions: str,
                  unit: str = "residual", blocks: Sequence[str] | None = None) -> list[torch.Tensor]:
    """Like ``conftest.run_loop`` with block residuals (``unit="residual"``; of ``blocks``, by default
    :func:`block_paths`) or, for VDT, attention/MLP outputs (``unit="outputs"``) reused on the steps marked 'R'
    in ``decisions``."""
    ref = BlockResidualReuse(model, blocks or block_paths(model)) if unit == "residual" else ModuleOutputReuse(
        model, vdt_sublayers(model))
    kw = dict(kwargs)
    x = kw["hidden_states"]
    outs = []
    with torch.no_grad():
        for t, d in zip(timesteps, decisions):
            ref.reuse = d == "R"
            kw["hidden_states"] = x
            kw["timestep"] = torch.full_like(kwargs["timestep"], t)
            out = model(**kw)
            outs.append(first(out))
            x = step(x, out)
    return outs


def vdt_sublayers(model: torch.nn.Module) -> list[str]:
    """The attention and MLP modules of a VDT's blocks (their gates and skip adds live in the block)."""
    return [f"blocks.{i}.{name}" for i in range(len(model.blocks))
            for name in ("spatial_attn", "temporal_attn", "cross_attn", "mlp")]


class ModuleOutputReuse:
    """Wrap modules: on a compute step they run and their output is kept; on a reuse step they return the
    kept output (what cache_unit="outputs" does to every attention/MLP region)."""

    def __init__(self, model: torch.nn.Module, paths: Sequence[str]):
        self.reuse = False
        self.cache: dict[str, torch.Tensor] = {}
        for path in paths:
            module = model.get_submodule(path)
            module.forward = self._wrap(path, module.forward)

    def _wrap(self, path, forward):
        def wrapped(*args, **kwargs):
            if self.reuse:
                return self.cache[path]
            out = self.cache[path] = forward(*args, **kwargs)
            return out

        return wrapped
