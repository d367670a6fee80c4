"""The model zoo: tiny random configs of every diffusers video transformer (``*Transformer3DModel``).

Each family module in this package (``tests/zoo/<family>.py``) defines ``CASES: list[ZooCase]``; they are
collected here by module discovery, so adding a family is adding a file. Every case is seeded and small
enough that one forward runs well under a second on one CPU thread.

``kinds`` is written by reading the model's source, never from what graphpass reports: for every
attention (and MLP) module, its kind and the reason, e.g.::

    "blocks.0.attn1": ("joint", "WanTransformerBlock.attn1: self-attention over all video tokens (F*H*W)"),
    "blocks.0.attn2": ("cross", "attn2 takes encoder_hidden_states (text) as keys/values"),

Kinds: ``spatial``, ``temporal``, ``cross``, ``joint`` (one sequence of all video tokens, with or without
text tokens concatenated), ``mlp``, ``text`` (attention over text/conditioning tokens only), ``other``
(attention over no video tokens of its own: audio streams, reference/identity features...).

    >>> from zoo import ZOO
    >>> case = ZOO["wan"]
    >>> model = case.build(); out = model(**case.kwargs())
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class ZooCase:
    """One tiny diffusers video transformer and how to call it.

    name: short unique id ("wan", "cogvideox-rope", ...).
    cls: the diffusers class name (``WanTransformer3DModel``).
    build: returns the seeded model in eval mode (same weights on every call).
    kwargs: returns one call's keyword arguments (batch 2, fresh tensors, same values each time), as the
        model's pipeline would pass them (``return_dict=False`` included).
    kinds: module path -> (kind, reason read from the model's source), for every attention and MLP module
        graphpass should find. Paths are as in ``model.named_modules()``.
    video_input: the argument holding the latent video.
    timestep_arg: the argument holding the timestep.
    out_index: which output leaf is the denoiser's prediction (0 for ``return_dict=False`` tuples).
    unsupported: if graphpass cannot serve this model, a regex of the clear error it must raise, and why.
    notes: anything a reader of docs/models.md should know (e.g. "static H/W: fixed position table").
    """

    name: str
    cls: str
    build: Callable[[], torch.nn.Module]
    kwargs: Callable[[], dict[str, Any]]
    kinds: dict[str, tuple[str, str]]
    video_input: str = "hidden_states"
    timestep_arg: str = "timestep"
    out_index: int = 0
    unsupported: str | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _discover() -> dict[str, ZooCase]:
    cases: dict[str, ZooCase] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith(("_", "test")) or info.name == "coverage":  # not family modules
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        for c in getattr(mod, "CASES", ()):
            if c.name in cases:
                raise ValueError(f"zoo case {c.name!r} defined twice")
            cases[c.name] = c
    return cases


ZOO: dict[str, ZooCase] = _discover()
