"""DDIM sampler: calling convention, determinism, conditioning frames."""

import pytest
import torch

from graphpass.models import create
from graphpass.models.sampler import ddim_timesteps, sample


def _model():
    m = create("vdt-tiny")
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


def test_timesteps_descending_leading_spacing():
    ts = ddim_timesteps(50)
    assert ts[:3] == [981, 961, 941] and ts[-1] == 1 and len(ts) == 50
    assert ddim_timesteps(10)[0] == 901
    with pytest.raises(ValueError):
        ddim_timesteps(0)


def test_one_batched_keyword_call_per_step():
    m = _model()
    calls = []

    def spy(**kw):
        calls.append(kw)
        return m(**kw)

    labels = torch.tensor([[2, 5, 9, 1, 1, 1, 1]])
    sample(spy, labels=labels, num_steps=4, seed=0, progress=False, shape=(4, 3, 16, 16))
    assert len(calls) == 4
    assert [float(c["timestep"][0]) for c in calls] == [float(t) for t in ddim_timesteps(4)]
    for c in calls:
        assert set(c) == {"hidden_states", "timestep", "encoder_hidden_states", "cond_mask"}
        assert c["hidden_states"].shape[0] == 2 and c["timestep"].dtype == torch.float32
        assert c["timestep"].shape == (2,)
        assert torch.equal(c["encoder_hidden_states"][1], torch.zeros(7, dtype=torch.long))


def test_same_seed_same_video():
    m = _model()
    labels = torch.tensor([[3, 5, 9, 7, 10, 1, 1]])
    a = sample(m, labels=labels, num_steps=5, seed=11, progress=False)
    b = sample(m, labels=labels, num_steps=5, seed=11, progress=False)
    c = sample(m, labels=labels, num_steps=5, seed=12, progress=False)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (1, 4, 3, 16, 16) and a.abs().max() <= 1


def test_given_frames_are_kept():
    m = _model()
    cond = torch.rand(1, 4, 3, 16, 16) * 2 - 1
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    out = sample(m, labels=torch.ones(1, 7, dtype=torch.long), cond_frames=cond, cond_mask=mask, num_steps=3,
                 progress=False)
    assert torch.equal(out[:, :2], cond[:, :2])
    with pytest.raises(ValueError):
        sample(m, labels=torch.ones(1, 7, dtype=torch.long), cond_mask=mask, num_steps=3, progress=False)


def test_eta_adds_seeded_noise():
    """eta=1 (DDPM-like) is reproducible by seed, differs from deterministic DDIM, and eta is range-checked."""
    m = _model()
    labels = torch.tensor([[2, 5, 9, 1, 1, 1, 1]])
    kw = dict(labels=labels, num_steps=5, progress=False)
    a = sample(m, seed=4, eta=1.0, **kw)
    assert torch.equal(a, sample(m, seed=4, eta=1.0, **kw))
    assert not torch.equal(a, sample(m, seed=5, eta=1.0, **kw))
    ddim = sample(m, seed=4, **kw)
    assert float((a - ddim).abs().max()) > 1e-2
    assert torch.equal(ddim, sample(m, seed=4, eta=0.0, **kw))
    with pytest.raises(ValueError, match="eta must be in"):
        sample(m, seed=4, eta=1.5, **kw)
