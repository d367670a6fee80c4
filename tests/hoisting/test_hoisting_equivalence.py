"""Hoisting is lossless: over full sampling loops, outputs are bit-identical to those computed without it.

For each tiny model (VDT-tiny, diffusers Latte, Wan, CogVideoX):

* a schedule that never reuses runs the full graph every step, with its step-invariant values computed
  once: outputs equal eager bit for bit over 20 steps;
* with PAB (the published presets) the outputs equal those of the same PAB without hoisting bit for bit,
  and those of the module-level reference PAB (tests/reference_pab.py) within 1e-5 relative;
* AdaCache on VDT: same outputs and the same compute/reuse decisions with and without hoisting.
"""
from __future__ import annotations

import pytest
import torch

import graphpass
from graphpass import PAB, AdaCache
from conftest import DDIM_50, run_loop
from hoisting_helpers import STEPS_20, for_schedule, model_case, optimized
from reference_pab import ReferencePAB

MODELS = ("vdt", "latte", "wan", "cogvideox")

#: Attention (and MLP) modules of each model with their kind, from the model code (for the reference PAB).
MODULES = {
    "vdt": {f"blocks.{i}.{name}": kind for i in range(2)
            for name, kind in (("spatial_attn", "spatial"), ("temporal_attn", "temporal"),
                               ("cross_attn", "cross"), ("mlp", "mlp"))},
    "latte": {**{f"transformer_blocks.{i}.attn1": "spatial" for i in range(2)},
              **{f"transformer_blocks.{i}.attn2": "cross" for i in range(2)},
              **{f"temporal_transformer_blocks.{i}.attn1": "temporal" for i in range(2)}},
    "wan": {f"blocks.{i}.{name}": kind for i in range(2)
            for name, kind in (("attn1", "joint"), ("attn2", "cross"), ("ffn", "mlp"))},
    "cogvideox": {f"transformer_blocks.{i}.attn1": "joint" for i in range(2)},
}

SCHEDULES = {
    "vdt": PAB.preset("pab246", mlp=3, window=(100, 800)),
    "latte": PAB.preset("latte"),
    "wan": PAB(joint=2, cross=3, window=(100, 800)),
    "cogvideox": PAB.preset("cogvideox"),
}


def _never_reuse(name) -> PAB:
    kind = "joint" if name in ("cogvideox", "wan") else "spatial"
    return PAB(**{kind: 2}, window=(2000, 3000))  # no timestep of the loop is inside the window


def _assert_identical(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"step {i}: max diff {float((g - w).abs().max())}"


@pytest.mark.parametrize("name", MODELS)
def test_hoisted_full_graph_equals_eager(name):
    case = model_case(name)
    kw = case.kwargs()
    eager = run_loop(case.model, kw, STEPS_20)
    assert optimized(name).hoisting is not None  # on by default: every model has step-invariant work
    opt = for_schedule(optimized(name), _never_reuse(name))
    got = run_loop(opt, kw, STEPS_20)
    _assert_identical(got, eager)
    sg = opt.hoisting.step_graph(opt.phase_graph(opt.state().trace[0][1]))
    assert sg.hoisted_inputs and sg.flops < opt.phase_graph(sg.phase).flops  # the steps ran less
    assert opt.state().hoisted.runs == 1  # one generation, one context


@pytest.mark.parametrize("name", MODELS)
def test_hoisted_pab_equals_pab_and_reference(name):
    case = model_case(name)
    kw = case.kwargs()
    schedule = SCHEDULES[name]
    opt = for_schedule(optimized(name), schedule)
    plain = for_schedule(optimized(name), schedule, hoist=False)
    want = run_loop(plain, kw, STEPS_20)
    got = run_loop(opt, kw, STEPS_20)
    _assert_identical(got, want)
    assert [ph for _, ph in opt.state().trace] == [ph for _, ph in plain.state().trace]
    assert any(ph.reused for _, ph in opt.state().trace)  # PAB really reused on this loop

    ranges = {k: schedule.range_of(k) for k in ("spatial", "temporal", "cross", "joint", "mlp")}
    ref = ReferencePAB(model_case(name).model, MODULES[name], ranges, window=schedule.window)
    reference = run_loop(ref, kw, STEPS_20)
    rel = max(float((g - r).abs().max()) / float(r.abs().max()) for g, r in zip(got, reference))
    assert rel <= 1e-5, f"max relative |graphpass - reference| = {rel}"


def test_hoisted_pab_with_plan_over_50_steps_equals_pab():
    case = model_case("latte")
    kw = case.kwargs()
    opt = for_schedule(optimized("latte"), PAB.preset("latte"), timesteps=DDIM_50)
    plain = for_schedule(optimized("latte"), PAB.preset("latte"), timesteps=DDIM_50, hoist=False)
    _assert_identical(run_loop(opt, kw, DDIM_50), run_loop(plain, kw, DDIM_50))
    st = opt.state()
    assert st.hoisted.runs == 1
    assert st.hoisted.values == {}  # freed after the plan's last step


def test_hoisted_adacache_equals_adacache():
    case = model_case("vdt")
    kw = case.kwargs()
    steps = DDIM_50[:20]
    opt = for_schedule(optimized("vdt"), AdaCache.preset("fast"), timesteps=steps)
    plain = for_schedule(optimized("vdt"), AdaCache.preset("fast"), timesteps=steps, hoist=False)
    _assert_identical(run_loop(opt, kw, steps), run_loop(plain, kw, steps))
    assert opt.decisions() == plain.decisions()
    assert "R" in opt.decisions()  # reuse steps skip the blocks, and with them the hoisted K/V's readers
    reuse = next(ph for _, ph in opt.state().trace if ph.reused)
    assert opt.hoisting.step_graph(opt.phase_graph(reuse)).attention_ops() == 0


def test_dynamic_capture_hoists_rotary_tables_of_each_size():
    """With ``dynamic=True`` Wan computes its rotary tables from the latent's sizes (``sym_size``): sizes are
    fixed within a generation (another size starts a new one), so the tables are hoisted and recomputed for
    a generation of another size."""
    case = model_case("wan")
    kw = case.kwargs()
    opt = graphpass.optimize(case.model, _never_reuse("wan"), example_kwargs=kw, dynamic=True)
    assert opt.captured.dynamic_dims["hidden_states"].keys() >= {2, 3, 4}  # frames, height, width free
    assert [v.source for v in opt.hoisting.values_info().values()].count("rope") > 0
    for gen, shape in enumerate([(2, 4, 3, 8, 8), (2, 4, 5, 8, 12)]):
        call = dict(kw, hidden_states=torch.randn(*shape, generator=torch.Generator().manual_seed(5)))
        _assert_identical(run_loop(opt, call, STEPS_20[:6]), run_loop(case.model, call, STEPS_20[:6]))
        assert opt.state().hoisted.runs == gen + 1
