"""Named workloads for the command line and benchmarks: a model plus one real call's inputs.

>>> model, kwargs, timesteps = example_call("vdt-tiny", batch=2, num_steps=10)
>>> sorted(kwargs)
['cond_mask', 'encoder_hidden_states', 'hidden_states', 'timestep']
"""
from __future__ import annotations

from typing import Any

import torch

from .errors import GraphpassError

WORKLOADS = ("vdt-s", "vdt-tiny", "latte-tiny")


def load_model(name: str) -> torch.nn.Module:
    """The model of a workload: shipped weights for ``vdt-s``, seeded random weights otherwise."""
    if name.startswith("vdt-"):
        from . import models

        if name not in models.CONFIGS:
            raise GraphpassError(f"unknown model {name!r}; known: {', '.join(WORKLOADS)}")
        if models.weights_path(name).is_file() or name == "vdt-s":
            return models.load(name)
        return randomise_zero_init(models.create(name))
    if name == "latte-tiny":
        from diffusers import LatteTransformer3DModel

        torch.manual_seed(0)
        return LatteTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                       num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=16,
                                       caption_channels=16, num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                                       video_length=4).eval()
    raise GraphpassError(f"unknown model {name!r}; known: {', '.join(WORKLOADS)}")


def randomise_zero_init(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """Give adaLN-Zero's zero-initialised parameters small random values, so a random-weight model's
    attention actually reaches its output (with zeros every block is the identity and the output is 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def vdt_example_kwargs(model: torch.nn.Module, batch: int = 2, timestep: float = 981.0) -> dict[str, Any]:
    """One call of a VDT model as the sampler makes it (batch 2 = one video with batched guidance)."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(batch, cfg.num_frames, cfg.in_channels, cfg.image_size, cfg.image_size,
                                          generator=g),
                timestep=torch.full((batch,), float(timestep)),
                encoder_hidden_states=torch.zeros(batch, cfg.cond_len, dtype=torch.long),
                cond_mask=torch.zeros(batch, cfg.num_frames))


def example_call(name: str, batch: int = 2, num_steps: int = 50) -> tuple[torch.nn.Module, dict[str, Any], list[float]]:
    """(model, example keyword arguments of one call, the sampler's timesteps for ``num_steps``)."""
    from .models.sampler import ddim_timesteps

    model = load_model(name)
    timesteps = [float(t) for t in ddim_timesteps(num_steps)]
    g = torch.Generator().manual_seed(0)
    if name.startswith("vdt-"):
        kwargs = vdt_example_kwargs(model, batch, timesteps[0])
    else:
        kwargs = dict(hidden_states=torch.randn(batch, 4, 4, 8, 8, generator=g),
                      timestep=torch.full((batch,), int(timesteps[0]), dtype=torch.long),
                      encoder_hidden_states=torch.randn(batch, 5, 16, generator=g), return_dict=False)
    return model, kwargs, timesteps
