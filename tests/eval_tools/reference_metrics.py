"""PSNR and SSIM written for the tests, independently of graphpass.eval.metrics: explicit windows, centred
moments, scipy's Gaussian. Slow (NumPy loops over frames); for the tests' tiny videos only.

SSIM is that of Wang et al. 2004 (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, valid windows only),
per channel, averaged over channels and windows, then over frames; videos are (F, C, H, W) in [-1, 1].

    >>> v = torch.zeros(2, 3, 16, 16)
    >>> reference_ssim(v, v)
    1.0
"""
from __future__ import annotations

import math

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from scipy.signal.windows import gaussian


def reference_psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean over frames of 10 log10(range^2 / MSE) (inf for identical frames)."""
    out = []
    for x, y in zip(a.double().numpy(), b.double().numpy()):
        mse = float(np.mean((x - y) ** 2))
        out.append(math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse))
    return float(np.mean(out))


def _ssim_plane(x: np.ndarray, y: np.ndarray, data_range: float, size: int, sigma: float) -> float:
    g = gaussian(size, sigma)
    w = np.outer(g, g) / np.outer(g, g).sum()
    wx, wy = sliding_window_view(x, (size, size)), sliding_window_view(y, (size, size))  # (h', w', s, s)
    mx = (wx * w).sum(axis=(-1, -2))
    my = (wy * w).sum(axis=(-1, -2))
    dx, dy = wx - mx[..., None, None], wy - my[..., None, None]
    vx, vy = (w * dx * dx).sum(axis=(-1, -2)), (w * dy * dy).sum(axis=(-1, -2))
    cxy = (w * dx * dy).sum(axis=(-1, -2))
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


def reference_ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, size: int = 11,
                   sigma: float = 1.5) -> float:
    """SSIM of two videos (F, C, H, W); the window shrinks to the frame (odd) for frames under 11 pixels."""
    size = min(size, a.shape[-1], a.shape[-2])
    size -= 1 - size % 2
    frames = []
    for x, y in zip(a.double().numpy(), b.double().numpy()):
        frames.append(np.mean([_ssim_plane(xc, yc, data_range, size, sigma) for xc, yc in zip(x, y)]))
    return float(np.mean(frames))
