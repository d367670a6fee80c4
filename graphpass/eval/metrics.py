"""Pixel fidelity of an optimized sampler's output against the baseline's.

Both metrics take videos (F, C, H, W) or batches (B, F, C, H, W) with values in
[-1, 1] (data range 2), compute per frame, average over frames, and return one
float per video (a float for a single video, a list for a batch).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DATA_RANGE = 2.0


def _as_batch(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() == 4:
        return a[None].double(), b[None].double(), True
    if a.dim() == 5:
        return a.double(), b.double(), False
    raise ValueError(f"expected (F, C, H, W) or (B, F, C, H, W), got {tuple(a.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = DATA_RANGE):
    """Mean over frames of 10 log10(range^2 / MSE); identical frames give inf."""
    x, y, single = _as_batch(a, b)
    mse = ((x - y) ** 2).flatten(2).mean(-1)  # (B, F)
    with torch.no_grad():
        per_frame = torch.where(mse == 0, torch.full_like(mse, math.inf),
                                10 * torch.log10(data_range ** 2 / mse.clamp_min(1e-300)))
    out = [float(v) for v in per_frame.mean(dim=1)]
    return out[0] if single else out


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(g ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = DATA_RANGE, win_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03):
    """SSIM of Wang et al. 2004: 11x11 Gaussian window (sigma 1.5), valid region,
    computed per channel and averaged, then averaged over frames."""
    x, y, single = _as_batch(a, b)
    bsz, f, c, h, w = x.shape
    win = min(win_size, h, w)
    if win % 2 == 0:
        win -= 1
    kernel = _gaussian_window(win, sigma)[None, None].repeat(c, 1, 1, 1)
    x = x.reshape(bsz * f, c, h, w)
    y = y.reshape(bsz * f, c, h, w)

    def filt(z):
        return F.conv2d(z, kernel, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x ** 2
    syy = filt(y * y) - mu_y ** 2
    sxy = filt(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    per_frame = s.flatten(1).mean(-1).reshape(bsz, f)
    out = [float(v) for v in per_frame.mean(dim=1)]
    return out[0] if single else out
