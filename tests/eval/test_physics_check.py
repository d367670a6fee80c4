"""Physics plausibility separates real physics from noise and broken motion."""

import numpy as np
import pytest
import torch

from graphpass.eval.physics import detect, evaluate, physics_score
from graphpass.models.physics import PhysicsParams, generate, render


def test_detection_finds_generator_balls_at_their_positions():
    item = generate(4)
    det = detect(item.video)
    assert sorted(det) == item.colors
    for b, ci in enumerate(item.colors):
        err = [np.hypot(*(np.array(det[ci][f]) - item.positions[f, b])) for f in det[ci]]
        assert np.median(err) < 0.3


def test_generator_videos_score_high_and_noise_scores_near_zero():
    real = [evaluate(generate(s).video).plausibility for s in range(10)]
    g = torch.Generator().manual_seed(0)
    noise = [evaluate(torch.rand(16, 3, 32, 32, generator=g) * 2 - 1).plausibility for _ in range(5)]
    assert np.mean(real) > 0.8
    assert max(noise) < 0.1
    assert min(real) > max(noise)


def test_teleporting_ball_scores_lower_than_real_motion():
    p = PhysicsParams()
    item = generate(1)
    pos = item.positions.copy()
    rng = np.random.default_rng(0)
    pos[::2] = rng.uniform(p.radius, p.size - p.radius, size=pos[::2].shape)
    frames = render(pos, item.colors, p.size, p.radius)
    broken = torch.from_numpy(frames).permute(0, 3, 1, 2).float() * 2 - 1
    assert evaluate(broken).plausibility < 0.5 * evaluate(item.video).plausibility


def _blank_video(item) -> torch.Tensor:
    """The background alone (no ball): nothing to track, so plausibility 0 by definition."""
    p = PhysicsParams()
    frames = render(item.positions[:, :0], [], p.size, p.radius)
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() * 2 - 1


def test_batch_score_is_mean_of_videos():
    """Against values known without the batch code: a blank video scores 0, copies score as one video,
    so [v, blank, blank, blank] scores exactly a quarter of v, in any order."""
    item = generate(1)
    v, blank = item.video, _blank_video(item)
    assert physics_score(blank) == 0.0
    single = physics_score(v)  # the single-video path (4-D input)
    assert single > 0.5
    assert physics_score(torch.stack([v, v, v])) == pytest.approx(single, abs=1e-12)
    assert physics_score(torch.stack([v, blank, blank, blank])) == pytest.approx(single / 4, abs=1e-12)
    assert physics_score(torch.stack([blank, blank, v, blank])) == pytest.approx(single / 4, abs=1e-12)
