"""Demo plumbing, including the optimized-column hook, on the tiny random model."""

import math

import torch

from graphpass import demo
from graphpass.models import create


def _model():
    m = create("vdt-tiny")
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


def test_baseline_only_when_no_optimize_fn(tmp_path, capsys):
    out = demo.run(tmp_path, num_videos=2, num_steps=2, model=_model())
    assert set(out) == {"baseline", "generator"}
    assert out["baseline"]["psnr"] == math.inf and out["baseline"]["speedup"] == 1.0
    assert (tmp_path / "00_baseline.mp4").is_file() and (tmp_path / "01_side_by_side.gif").is_file()
    assert "optimized" not in capsys.readouterr().out


def test_identity_optimize_fn_matches_baseline(tmp_path):
    calls = []

    def optimize_fn(model):
        def fn(**kw):
            calls.append(sorted(kw))
            return model(**kw)
        return fn

    out = demo.run(tmp_path, num_videos=2, num_steps=2, model=_model(), optimize_fn=optimize_fn, write=False)
    assert out["optimized"]["psnr"] == math.inf and out["optimized"]["ssim"] == 1.0
    assert calls and calls[0] == ["cond_mask", "encoder_hidden_states", "hidden_states", "timestep"]


def test_quality_is_measured_on_generated_frames_only(tmp_path):
    """Given frames are copied into both videos; a changed sampler must not average to PSNR inf."""
    def optimize_fn(model):
        def fn(**kw):
            return model(**kw) * 1.01  # a slightly different sampler
        return fn

    out = demo.run(tmp_path, num_videos=2, num_steps=2, model=_model(), optimize_fn=optimize_fn, write=False)
    assert math.isfinite(out["optimized"]["psnr"]) and out["optimized"]["ssim"] < 1.0


def test_frame_strip_png(tmp_path):
    import imageio.v2 as imageio

    from graphpass.models.video_io import write_frame_strip

    a = -torch.ones(16, 3, 8, 8)
    b = torch.ones(16, 3, 8, 8)
    path = write_frame_strip([a, b], tmp_path / "s.png", frames=(0, 5, 15), scale=2)
    img = imageio.imread(path)
    # 2 rows of 16 px with a 2 px gap; 3 columns of 16 px with 2 px gaps
    assert img.shape == (2 * 16 + 2, 3 * 16 + 2 * 2, 3)
    assert img[0, 0].tolist() == [0, 0, 0] and img[-1, -1].tolist() == [255, 255, 255]
