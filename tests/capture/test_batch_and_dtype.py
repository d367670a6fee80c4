"""The batch is free in every capture (pipelines switch guidance on and off), and a timestep of another
dtype is cast when the cast is exact.

A model that fixes its batch (here: a per-sample buffer) keeps it static and says so.
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import graphpass
from graphpass import PAB
from graphpass.errors import InputError
from graphpass.passes.capture import capture
from conftest import run_loop
from capture_helpers import STEPS_20, WAN_MODULES, check_pab_reference, wan


def _wan_kwargs(batch: int, dtype=torch.float32, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, 3, 8, 8, generator=g), timestep=torch.full((batch,), 500, dtype=dtype),
                encoder_hidden_states=torch.randn(batch, 5, 16, generator=g), return_dict=False)


@functools.lru_cache(maxsize=None)
def _wan_never_reusing() -> graphpass.OptimizedModel:
    """Wan optimized once per module with a schedule that never reuses (no step of these loops is in its
    window). Each test runs whole generations on it (a generation starts where the timestep goes back up),
    as a caller reusing one optimized model does; its capture serves the PAB comparison."""
    return graphpass.optimize(wan().build(), PAB(joint=2, window=(2000, 3000)), example_kwargs=wan().kwargs())


def test_static_capture_frees_the_batch_only():
    cap = _wan_never_reusing().captured
    b = cap.dynamic_dims["hidden_states"][0]
    assert cap.dynamic_dims == {"hidden_states": {0: b}, "timestep": {0: b}, "encoder_hidden_states": {0: b}}
    assert not cap.dynamic
    with pytest.raises(InputError, match=r"dimension\(s\) \[2\] are static.*free dimensions: \[0\].*dynamic=True"):
        cap.flatten_call(dict(_wan_kwargs(2), hidden_states=torch.randn(2, 4, 5, 8, 8)))


@pytest.mark.parametrize("batch", [1, 3])
def test_other_batch_never_reusing_equals_eager(batch):
    model = wan().build()
    opt = _wan_never_reusing()
    kw = _wan_kwargs(batch)
    for g, e in zip(run_loop(opt, kw, STEPS_20[:4]), run_loop(model, kw, STEPS_20[:4])):
        assert g.shape[0] == batch and torch.equal(g, e)


def test_pab_at_another_batch_matches_reference():
    opt = check_pab_reference(wan(), WAN_MODULES, PAB(joint=2, cross=4, mlp=3, window=(100, 800)),
                              kw=_wan_kwargs(3), on=_wan_never_reusing())
    assert opt.state().shapes[0] == (3, 4, 3, 8, 8)


class PerSample(nn.Module):
    """Adds a learned offset per sample: the batch is fixed by the buffer's shape."""

    def __init__(self):
        super().__init__()
        self.offset = nn.Parameter(torch.randn(2, 1, 4, 4, 4))
        self.proj = nn.Linear(4, 4)

    def forward(self, hidden_states, timestep):
        return self.proj(hidden_states + self.offset) * timestep[:, None, None, None, None]


def test_model_that_fixes_the_batch_keeps_it_static():
    torch.manual_seed(0)
    cap = capture(PerSample().eval(), dict(hidden_states=torch.randn(2, 1, 4, 4, 4), timestep=torch.ones(2)))
    assert "hidden_states" not in cap.dynamic_dims
    with pytest.raises(InputError, match=r"argument 'hidden_states' has shape \(3, 1, 4, 4, 4\).*dimension\(s\) "
                                         r"\[0\] are static"):
        cap.flatten_call(dict(hidden_states=torch.randn(3, 1, 4, 4, 4), timestep=torch.ones(3)))


def test_integer_timestep_on_a_float_capture_equals_eager():
    model = wan().build()
    opt = _wan_never_reusing()
    kw = _wan_kwargs(2, dtype=torch.int64)
    got = run_loop(opt, kw, STEPS_20[:3])
    want = run_loop(model, _wan_kwargs(2, dtype=torch.float32), STEPS_20[:3])
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_float_timestep_on_an_integer_capture():
    from capture_helpers import cogvideox_rope

    case = cogvideox_rope()
    model = case.build()
    cap = capture(model, case.kwargs())  # int64 timestep
    kw = dict(case.kwargs(), timestep=torch.full((2,), 500.0))
    flat = cap.flatten_call(kw)
    assert flat[1].dtype == torch.int64 and flat[1].tolist() == [500, 500]
    assert torch.equal(cap.unflatten_outputs(cap.gm(*flat))[0], model(**case.kwargs())[0])
    with pytest.raises(InputError, match=r"'timestep' has dtype torch.float32 but was captured as torch.int64, and "
                                         r"its values do not survive the cast exactly"):
        cap.flatten_call(dict(kw, timestep=torch.full((2,), 500.5)))
    with pytest.raises(InputError, match="do not survive"):  # 2**24 + 1 has no float32
        capture(nn.Linear(1, 1), dict(input=torch.ones(1, 1, 1))).flatten_call(
            dict(input=torch.full((1, 1, 1), 2 ** 24 + 1, dtype=torch.int64)))
