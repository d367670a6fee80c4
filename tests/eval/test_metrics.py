"""PSNR / SSIM against closed-form values and an independent SSIM (tests/eval_tools/reference_metrics.py)."""

import math

import pytest
import torch

from eval_tools.reference_metrics import reference_ssim
from graphpass.eval.metrics import psnr, ssim


def _video(seed=0, shape=(8, 3, 32, 32)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 1.6 - 0.8


def test_psnr_identical_is_inf():
    v = _video()
    assert psnr(v, v) == math.inf


def test_psnr_of_uniform_noise_matches_analytic():
    # uniform noise on [-a, a] has MSE a^2 / 3  ->  PSNR = 10 log10(4 / (a^2 / 3))
    v = _video(shape=(4, 3, 128, 128))
    a = 0.1
    g = torch.Generator().manual_seed(1)
    noisy = v + (torch.rand(v.shape, generator=g) * 2 - 1) * a
    assert psnr(noisy, v) == pytest.approx(10 * math.log10(4 / (a * a / 3)), abs=0.05)


def test_psnr_of_gaussian_noise_matches_analytic():
    v = _video(shape=(4, 3, 128, 128))
    sigma = 0.05
    g = torch.Generator().manual_seed(2)
    noisy = v + sigma * torch.randn(v.shape, generator=g)
    assert psnr(noisy, v) == pytest.approx(10 * math.log10(4 / sigma ** 2), abs=0.05)


def test_psnr_of_constant_offset_is_exact():
    v = _video()
    assert psnr(v + 0.02, v) == pytest.approx(10 * math.log10(4 / 0.02 ** 2), abs=1e-4)  # float32 input rounding


def test_ssim_identical_is_one_and_degrades_with_noise():
    v = _video()
    assert ssim(v, v) == pytest.approx(1.0, abs=1e-12)
    g = torch.Generator().manual_seed(3)
    s_small = ssim(v + 0.05 * torch.randn(v.shape, generator=g), v)
    s_big = ssim(v + 0.5 * torch.randn(v.shape, generator=g), v)
    assert 1.0 > s_small > s_big


def test_ssim_constant_images_with_offset_matches_luminance_term():
    # constant frames: sigma terms vanish, SSIM = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)
    x = torch.full((2, 3, 16, 16), 0.3)
    y = torch.full((2, 3, 16, 16), -0.2)
    c1 = (0.01 * 2) ** 2
    expected = (2 * 0.3 * -0.2 + c1) / (0.3 ** 2 + 0.2 ** 2 + c1)
    assert ssim(x, y) == pytest.approx(expected, rel=1e-6)


def test_batches_and_shape_errors():
    a, b = _video(0, (2, 4, 3, 16, 16)), _video(1, (2, 4, 3, 16, 16))
    assert psnr(a, b) == pytest.approx([psnr(a[0], b[0]), psnr(a[1], b[1])])
    # each video's SSIM against an independent implementation (explicit windows, centred moments)
    assert ssim(a, b) == pytest.approx([reference_ssim(a[0], b[0]), reference_ssim(a[1], b[1])], abs=1e-10)
    noisy = (a + 0.1 * torch.randn(a.shape, generator=torch.Generator().manual_seed(4))).clamp(-1, 1)
    assert ssim(noisy, a) == pytest.approx([reference_ssim(noisy[i], a[i]) for i in range(2)], abs=1e-10)
    small = a[..., :7, :9]  # frames under 11 pixels: the window shrinks to 7
    assert ssim(small, b[..., :7, :9]) == pytest.approx([reference_ssim(small[i], b[i, ..., :7, :9])
                                                         for i in range(2)], abs=1e-10)
    with pytest.raises(ValueError):
        psnr(a, b[:, :2])
