"""The pass's rules on small modules written for them: what is hoisted, what stays per step and why.

Each module's outputs are checked against eager over calls whose latent and timestep change, so a value
wrongly hoisted (stale at the second call) fails.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import graphpass
from graphpass import PAB
from graphpass.errors import InputError
from graphpass.passes.capture import capture
from graphpass.passes.hoist import Hoisting, per_step_inputs
from graphpass.runtime.executor import OptimizedModel

torch.set_num_threads(1)


class CrossAttn(nn.Module):
    """q from the latent, k and v from the text. ``v`` is written in place with a per-step value (a
    mean of the latent), the text reaches the output through a view, and ``noise`` is drawn every call."""

    def __init__(self, noise: bool = False, count: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.noise, self.count = noise, count
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, hidden_states, timestep, text):
        q = self.q(hidden_states) * timestep[:, None, None]
        k = self.k(text)
        v = self.v(text)
        v.add_(hidden_states.mean())  # a per-step write: v must stay in the step graph
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v) + text.view(2, 3, 8)[:, :1]
        if self.noise:
            out = out + torch.rand_like(text)[:, :1]
        if self.count:
            self.calls.add_(1)  # a write into a buffer the caller sees
        return out


def _kwargs(i: int = 0):
    g = torch.Generator().manual_seed(i)
    return dict(hidden_states=torch.randn(2, 4, 8, generator=g), timestep=torch.full((2,), 900.0 - 100 * i),
                text=torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(99)))


def _optimized(model, per_step=("hidden_states", "timestep")) -> OptimizedModel:
    cap = capture(model, _kwargs())
    opt = OptimizedModel(model, cap, [], PAB(spatial=2))
    opt.hoisting = Hoisting.of(cap, set(per_step))
    return opt


def _check_calls(model, opt, seeded=False):
    text = _kwargs()["text"]
    for i in range(4):
        kw = dict(_kwargs(i), text=text)  # the same text tensor at every step, as a sampler passes it
        if seeded:
            torch.manual_seed(i)
        want = model(**{k: v.clone() for k, v in kw.items()})
        if seeded:
            torch.manual_seed(i)
        with torch.no_grad():
            got = opt(**kw)
        assert torch.equal(got, want), f"call {i}: max diff {float((got - want).abs().max())}"


def _hoisted_sources(opt):
    return sorted(v.source for v in opt.hoisting.values_info().values())


def test_only_values_free_of_per_step_writes_are_hoisted():
    model = CrossAttn()
    opt = _optimized(model)
    # k is hoisted; v is written with a per-step value in place; text.view costs nothing: both stay
    assert _hoisted_sources(opt) == ["k"]
    _check_calls(model, opt)
    assert opt.state().hoisted.runs == 1


def test_random_values_are_not_hoisted():
    model = CrossAttn(noise=True)
    opt = _optimized(model)
    assert _hoisted_sources(opt) == ["k"]  # rand_like(text) depends only on the text, but is drawn per call
    _check_calls(model, opt, seeded=True)


def test_graph_writing_into_its_buffers_is_not_hoisted():
    model = CrossAttn(count=True)
    assert _optimized(model).hoisting is None  # the prologue would have to replay the caller-visible write


def test_per_step_text_is_not_hoisted():
    opt = _optimized(CrossAttn(), per_step=("hidden_states", "timestep", "text"))
    assert opt.hoisting is None


def test_step_inputs_names_unknown_argument():
    cap = capture(CrossAttn(), _kwargs())
    with pytest.raises(InputError, match=r"step_inputs names 'txt'.*\['hidden_states', 'timestep', 'text'\]"):
        per_step_inputs(cap, "hidden_states", "timestep", ["txt"])


def test_optimize_hoist_option():
    from conftest import make_case

    case = make_case("latte")
    kw = case.kwargs()
    assert graphpass.optimize(case.model, PAB.preset("latte"), example_kwargs=kw).hoisting is not None
    assert graphpass.optimize(case.model, PAB.preset("latte"), example_kwargs=kw, hoist=False).hoisting is None
    per_step_text = graphpass.optimize(case.model, PAB.preset("latte"), example_kwargs=kw,
                                       step_inputs=["encoder_hidden_states"])
    # only the timestep's frequency table is left step-invariant
    assert _hoisted_sources(per_step_text) == ["adaln_single.emb.time_proj"]


def test_optimized_on_first_call_hoists_too():
    from conftest import make_case, run_loop

    case = make_case("latte")
    lazy = graphpass.optimize(case.model, PAB.preset("latte"))  # what a pipeline gets: captured on first call
    got = run_loop(lazy, case.kwargs(), [981.0, 961.0, 941.0])
    assert lazy.hoisting is not None and lazy.state().hoisted.runs == 1
    want = run_loop(case.model, case.kwargs(), [981.0, 961.0, 941.0])
    assert all(torch.equal(g, w) for g, w in zip(got, want))  # outside PAB's window: the full graph
