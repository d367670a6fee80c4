"""backend="inductor": one torch.compile per phase graph, no recompiles over a sampling loop, same outputs.

Compiling on CPU costs seconds per graph, so the plan has 8 steps, all inside the window, and 2 distinct
phases (PAB spatial=2: compute and store, reuse).
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import graphpass
from graphpass import PAB
from graphpass.exporters.backends import InductorRunner
from conftest import make_case, run_loop

ATOL = 1e-4
STEPS = [981.0 - 120 * i for i in range(8)]
SCHEDULE = PAB(spatial=2, window=(0, 1000))


def test_inductor_compiles_each_phase_once_and_matches_eager():
    case = make_case("vdt")
    kw = case.kwargs()
    eager = run_loop(graphpass.optimize(case.model, SCHEDULE, example_kwargs=kw, timesteps=STEPS), kw, STEPS)
    opt = graphpass.optimize(case.model, SCHEDULE, example_kwargs=kw, timesteps=STEPS, backend="inductor")
    phases = opt.current_plan.distinct()
    assert [ph.label() for ph in phases] == ["store 2", "reuse 2"]
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):  # any recompile raises
        first = run_loop(opt, kw, STEPS)
        graphs_after_first = counters["stats"]["unique_graphs"]
        opt.reset()
        second = run_loop(opt, kw, STEPS)  # a second generation reuses the compiled phases
    assert graphs_after_first == len(phases)  # one graph per phase, each compiled once
    assert counters["stats"]["unique_graphs"] == len(phases)
    assert set(opt._runners) == set(phases)
    # CPU inputs: plain Inductor, no CUDA graphs
    assert all(isinstance(r, InductorRunner) and r.mode == "default" for r in opt._runners.values())
    for outs in (first, second):
        assert max(float((a - b).abs().max()) for a, b in zip(outs, eager)) <= ATOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs (mode='reduce-overhead') need a CUDA GPU")
def test_inductor_uses_cuda_graphs_on_cuda():
    case = make_case("vdt")
    model = case.model.cuda()
    kw = {k: v.cuda() for k, v in case.kwargs().items()}
    eager = run_loop(graphpass.optimize(model, SCHEDULE, example_kwargs=kw, timesteps=STEPS), kw, STEPS)
    opt = graphpass.optimize(model, SCHEDULE, example_kwargs=kw, timesteps=STEPS, backend="inductor")
    outs = run_loop(opt, kw, STEPS)
    assert all(r.mode == "reduce-overhead" for r in opt._runners.values())
    assert max(float((a - b).abs().max()) for a, b in zip(outs, eager)) <= 1e-3
