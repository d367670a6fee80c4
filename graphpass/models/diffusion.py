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


def _h(w: torch.Tensor) -> torch.Tensor:
    """(1 - w) log(1 - w) + w as its series (w <= 0.02 here, 4 terms are exact to ~1e-10)."""
    w2 = w * w
    return w2 * (0.5 + w * (1.0 / 6 + w * (1.0 / 12 + w * (1.0 / 20))))


def alpha_bar_coefficients(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(alpha_bar(t)) and sqrt(1 - alpha_bar(t)) for float timesteps, in closed form.

    log alpha_bar(t) = sum_{i<=t} log(1 - beta_i) is evaluated with the midpoint rule (error ~1e-8
    for linear betas), so it matches ``alphas_cumprod()`` at integer t to float32 precision and
    needs no lookup table: the graph holds only elementwise ops on the timestep.
    """
    delta = (BETA_END - BETA_START) / (NUM_TRAIN_TIMESTEPS - 1)
    t = t.float()
    wa = BETA_START - 0.5 * delta
    log_ab = (_h(torch.full_like(t, wa)) - _h(BETA_START + (t + 0.5) * delta)) / delta
    return torch.exp(0.5 * log_ab), torch.sqrt(-torch.expm1(log_ab))
