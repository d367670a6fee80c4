"""The synthetic physics world: determinism and the laws it claims to obey."""

import numpy as np
import torch

from graphpass.models.physics import (LABEL_LEN, PhysicsDataset, PhysicsParams, TOKEN, decode_label, generate,
                                      make_batch)


def test_same_seed_same_video_different_seed_different_video():
    a, b, c = generate(7), generate(7), generate(8)
    assert torch.equal(a.video, b.video)
    assert np.array_equal(a.positions, b.positions)
    assert torch.equal(a.labels, b.labels)
    assert not torch.equal(a.video, c.video)


def test_video_shape_and_range():
    v = generate(0).video
    assert v.shape == (16, 3, 32, 32)
    assert v.dtype == torch.float32
    assert v.min() >= -1 and v.max() <= 1


def test_balls_stay_in_bounds():
    p = PhysicsParams()
    for seed in range(50):
        pos = generate(seed).positions
        assert (pos >= p.radius - 1e-6).all() and (pos <= p.size - p.radius + 1e-6).all(), seed


def test_vertical_acceleration_is_gravity_between_bounces():
    p = PhysicsParams()
    checked = 0
    for seed in range(30):
        item = generate(seed)
        for b, bounces in enumerate(item.bounces):
            y = item.positions[:, b, 1]
            for f in range(1, 15):
                # second difference over frames f-1, f, f+1 is exact only if no bounce in (f-1, f+1)
                if any(f - 1 < tb < f + 1 for tb in bounces):
                    continue
                assert abs(y[f + 1] - 2 * y[f] + y[f - 1] - p.gravity) < 1e-6, (seed, b, f)
                checked += 1
    assert checked > 500


def test_balls_bounce_off_the_floor():
    assert any(len(b) > 0 for s in range(20) for b in generate(s).bounces)


def test_label_encodes_count_colours_and_direction():
    item = generate(3)
    ids = item.labels
    assert ids.shape == (LABEL_LEN,) and ids.dtype == torch.long
    n = len(item.colors)
    assert int(ids[0]) == TOKEN[["one", "two", "three"][n - 1]]
    assert (ids != 0).all(), "0 is reserved for the null token"
    text = decode_label(ids)
    for k in range(1, 1 + 2 * n, 2):
        assert int(ids[k + 1]) in (TOKEN["left"], TOKEN["right"])
    direction_right = item.velocities[0, :, 0] > 0
    assert text.count("right") == int(direction_right.sum())


def test_batch_and_dataset_agree():
    videos, labels = make_batch([5, 6])
    ds = PhysicsDataset(10, base_seed=5)
    assert len(ds) == 10
    v1, l1 = ds[1]
    assert torch.equal(videos[1], v1) and torch.equal(labels[1], l1)
    assert videos.shape == (2, 16, 3, 32, 32)
