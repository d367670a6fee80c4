"""The runtime says when caching would silently do nothing or do the wrong thing.

* samplers whose timesteps rise: every call looks like a new generation, nothing is reused: warned once,
  and ``timestep_order="rising"`` serves them (checked against the falling run on mirrored timesteps);
* a plan whose timesteps do not follow the optimized model's order is refused;
* per-token timesteps (a clean conditioning frame at 0 beside noisy tokens) step at the noisiest token;
* a non-finite timestep is refused.
"""
from __future__ import annotations

import pytest
import torch

import graphpass
from graphpass import PAB
from conftest import DDIM_50, make_case, run_loop
from reference_pab import ReferencePAB

VDT_MODULES = {f"blocks.{i}.{name}": kind for i in range(2)
               for name, kind in (("spatial_attn", "spatial"), ("temporal_attn", "temporal"), ("cross_attn", "cross"))}


@pytest.fixture(scope="module")
def vdt():
    case = make_case("vdt")
    return case, graphpass.optimize(case.model, PAB(spatial=2, temporal=3, window=(100, 800)),
                                    example_kwargs=case.kwargs())


def test_rising_timesteps_warn_that_nothing_is_reused(vdt):
    case, opt = vdt
    opt.reset()
    with pytest.warns(UserWarning, match="timestep_order='rising'"):
        run_loop(opt, case.kwargs(), DDIM_50[::-1][:8])
    assert sum(opt.phase_calls.values()) > 0 and all(not ph.reused for _, ph in opt.state().trace)


def test_rising_order_serves_a_rising_sampler():
    """With timestep_order="rising" a generation over rising timesteps is one generation; PAB then reuses
    by its window and counter like the reference (whose new-generation rule is mirrored by feeding it the
    same calls: the reference resets only when the timestep goes up, so it sees one generation too when
    given the falling order of the same counters)."""
    case = make_case("vdt")
    ts = [float(t) for t in range(150, 750, 40)]  # rising, all inside the window (100, 800)
    opt = graphpass.optimize(case.model, PAB(spatial=2, temporal=3, window=(100, 800)),
                             example_kwargs=case.kwargs(), timestep_order="rising")
    got = run_loop(opt, case.kwargs(), ts)
    ref = ReferencePAB(case.model, VDT_MODULES, {"spatial": 2, "temporal": 3})
    ref.last_t = None
    outs = []
    kw = case.kwargs()
    x = kw["hidden_states"]
    with torch.no_grad():
        for t in ts:  # drive the reference by hand: one generation, counter 0.. over the rising timesteps
            ref.t = t
            ref.steps.append({})
            out = case.model(**dict(kw, hidden_states=x, timestep=torch.full_like(kw["timestep"], t)))
            ref.counter += 1
            outs.append(out)
            x = x - 0.1 * out
    ref.restore()
    assert max(float((a - b).abs().max()) for a, b in zip(got, outs)) <= 1e-6
    assert opt.state().counter == len(ts)
    assert sum(1 for _, ph in opt.state().trace if ph.reused) == sum(1 for s in ref.steps if any(s.values()))


def test_plan_against_the_order_is_refused(vdt):
    _, opt = vdt
    with pytest.raises(graphpass.InputError, match="rise at step 1"):
        opt.plan(DDIM_50[::-1])


def test_per_token_timesteps_step_at_the_noisiest_token(vdt):
    case, opt = vdt
    opt.reset()
    kw = case.kwargs()
    per_sample = opt(**dict(kw, timestep=torch.full((2,), 500.0)))
    opt.reset()
    assert opt._timestep({"timestep": torch.tensor([[0.0, 500.0, 500.0], [0.0, 500.0, 500.0]])}) == 500.0
    with pytest.raises(graphpass.InputError, match="one per sample"):
        opt._timestep({"timestep": torch.tensor([[0.0, 500.0], [0.0, 400.0]])})
    assert per_sample is not None


def test_non_finite_timestep_is_refused(vdt):
    case, opt = vdt
    with pytest.raises(graphpass.InputError, match="non-finite"):
        opt(**dict(case.kwargs(), timestep=torch.full((2,), float("nan"))))
