"""The one noise schedule shared by training and sampling.

DDPM linear betas (1e-4 .. 0.02) over 1000 steps, epsilon prediction. Keeping
it in one place guarantees the sampler inverts exactly what was trained.
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02


def betas() -> torch.Tensor:
    return torch.linspace(BETA_START, BETA_END, NUM_TRAIN_TIMESTEPS, dtype=torch.float64)


def alphas_cumprod() -> torch.Tensor:
    """alpha_bar[t] for integer t in [0, 1000), float64."""
    return torch.cumprod(1.0 - betas(), dim=0)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0) for integer timesteps t (B,)."""
    ab = alphas_cumprod().to(x0.device)[t.long()].to(x0.dtype)
    ab = ab.reshape(-1, *([1] * (x0.dim() - 1)))
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise
