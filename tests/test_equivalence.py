"""graphpass outputs against eager and against a plain module-level PAB (tests/reference_pab.py).

For each tiny model (VDT-tiny, diffusers Latte, diffusers CogVideoX), over a 50-step DDIM-spaced loop
(981, 961, ..., 1) whose every step feeds its output back into the next input:

* a schedule whose window no timestep enters never reuses: outputs are bit-identical to eager;
* PAB schedules match the reference, which broadcasts the outputs of the attention modules named below
  (paths and kinds written here by hand, not taken from graphpass's tagging), both with a plan made up
  front and step by step;
* the attention ops graphpass executes (SDPA nodes of the phase graphs it ran, and SDPA calls counted at
  run time) equal the attention module calls the reference computed.
"""
from __future__ import annotations

import pytest
import torch

import graphpass
from graphpass import PAB
from conftest import DDIM_50, make_case, run_loop
from reference_pab import ReferencePAB, SDPACounter

# Outputs must match the reference exactly in practice (the same kernels run on the same tensors);
# the tolerance only allows for an op being fused differently in a graph.
ATOL = 1e-6

#: Attention (and MLP) modules of each tiny model with their kind, written from the model code.
MODULES = {
    "vdt": {f"blocks.{i}.{name}": kind for i in range(2)
            for name, kind in (("spatial_attn", "spatial"), ("temporal_attn", "temporal"),
                               ("cross_attn", "cross"), ("mlp", "mlp"))},
    "latte": {**{f"transformer_blocks.{i}.attn1": "spatial" for i in range(2)},
              **{f"transformer_blocks.{i}.attn2": "cross" for i in range(2)},
              **{f"temporal_transformer_blocks.{i}.attn1": "temporal" for i in range(2)}},
    "cogvideox": {f"transformer_blocks.{i}.attn1": "joint" for i in range(2)},
}

#: A PAB schedule per model: the published presets, and PAB246 with MLP broadcast for VDT.
SCHEDULES = {
    "vdt": PAB.preset("pab246", mlp=3, window=(100, 800)),
    "latte": PAB.preset("latte"),
    "cogvideox": PAB.preset("cogvideox"),
}

#: Attention modules are those whose kind is not "mlp"; each call of one runs exactly one SDPA.
def _attention_paths(name):
    return {p for p, k in MODULES[name].items() if k != "mlp"}


def _never_reuse(name) -> PAB:
    kind = "joint" if name == "cogvideox" else "spatial"
    return PAB(**{kind: 2}, window=(2000, 3000))  # no timestep of the loop is inside the window


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("name", ["vdt", "latte", "cogvideox"])
def test_never_reusing_schedule_equals_eager(name):
    case = make_case(name)
    kw = case.kwargs()
    eager = run_loop(case.model, kw, DDIM_50[:12])
    opt = graphpass.optimize(case.model, _never_reuse(name), example_kwargs=kw)
    got = run_loop(opt, kw, DDIM_50[:12])
    assert len(got) == len(eager) == 12
    for i, (e, g) in enumerate(zip(eager, got)):
        assert g.shape == e.shape
        # Bit-identical: the captured graph runs the same aten ops in the same order as eager.
        assert torch.equal(g, e), f"step {i}: max diff {float((g - e).abs().max())}"
    assert all(ph.actions == () for _, ph in opt.state().trace)  # every step ran the compute-all phase
    assert opt.cache_nbytes == 0


def _reference_run(name, schedule, kw, timesteps):
    case_model = make_case(name).model
    ranges = {k: schedule.range_of(k) for k in ("spatial", "temporal", "cross", "joint", "mlp")}
    ref = ReferencePAB(case_model, MODULES[name], ranges, window=schedule.window)
    with SDPACounter() as sdpa:
        outs = run_loop(ref, kw, timesteps)
    ref.restore()
    return outs, ref, sdpa.count


@pytest.mark.parametrize("name", ["vdt", "latte", "cogvideox"])
def test_pab_matches_reference(name):
    sched = SCHEDULES[name]
    case = make_case(name)
    kw = case.kwargs()
    ref_outs, ref, ref_sdpa = _reference_run(name, sched, kw, DDIM_50)
    attn = _attention_paths(name)
    ref_attn_calls = sum(1 for step in ref.steps for p, reused in step.items() if p in attn and not reused)
    assert ref_sdpa == ref_attn_calls  # the reference ran one SDPA per computed attention module call
    assert sum(ref.reused.values()) > 0  # the schedule really skips work on this loop

    eager = run_loop(case.model, kw, DDIM_50)
    opt = graphpass.optimize(case.model, sched, example_kwargs=kw)
    for mode in ("step-by-step", "planned"):
        opt.reset()
        if mode == "planned":
            plan = opt.plan(DDIM_50)
            assert len(plan) == len(DDIM_50)
        with SDPACounter() as sdpa:
            got = run_loop(opt, kw, DDIM_50)
        diff = _max_diff(got, ref_outs)
        assert diff <= ATOL, f"{mode}: max |graphpass - reference| = {diff}"
        # Reuse changes the result (so the comparison above is not eager against eager).
        assert _max_diff(got, eager) > 1e-4

        # Skipped work: per step, what graphpass reused is what the reference reused, region by region.
        trace = opt.state().trace
        assert [t for t, _ in trace] == DDIM_50
        for i, (_, phase) in enumerate(trace):
            assert set(phase.reused) == {p for p, reused in ref.steps[i].items() if reused}, f"{mode}, step {i}"
        # Attention ops executed = SDPA nodes of the phase graphs run = the reference's computed calls.
        graph_sdpa = sum(opt.phase_graph(ph).attention_ops() for _, ph in trace)
        assert graph_sdpa == ref_attn_calls, mode
        assert sdpa.count == ref_attn_calls, mode
        full = len(DDIM_50) * len(attn)
        assert graph_sdpa < full


# --- more schedules: MLP broadcast on every model, per-kind windows, gated reuse -----------------------------

#: MODULES plus the MLP regions of the diffusers models (FeedForward modules ``ff``).
MODULES_WITH_MLP = {
    "vdt": MODULES["vdt"],
    "latte": {**MODULES["latte"], **{f"{b}.{i}.ff": "mlp" for i in range(2)
                                     for b in ("transformer_blocks", "temporal_transformer_blocks")}},
    "cogvideox": {**MODULES["cogvideox"], **{f"transformer_blocks.{i}.ff": "mlp" for i in range(2)}},
}

VARIANTS = [
    ("vdt", PAB(spatial=3, temporal=5, cross=7, mlp=4, window=(150, 900), windows={"cross": (50, 700)})),
    ("latte", PAB(spatial=2, temporal=3, cross=6, mlp=5, window=(100, 800))),
    ("cogvideox", PAB(joint=3, mlp=2, window=(100, 850), windows={"mlp": (300, 600)})),
]


@pytest.mark.parametrize("name,sched", VARIANTS, ids=[n for n, _ in VARIANTS])
def test_pab_variants_match_reference(name, sched):
    case = make_case(name)
    kw = case.kwargs()
    ranges = {k: sched.range_of(k) for k in ("spatial", "temporal", "cross", "joint", "mlp")}
    ref = ReferencePAB(case.model, MODULES_WITH_MLP[name], ranges, window=sched.window, windows=sched.windows)
    ref_outs = run_loop(ref, kw, DDIM_50)
    ref.restore()
    assert ref.reused["mlp"] > 0
    opt = graphpass.optimize(case.model, sched, example_kwargs=kw)
    for mode in ("step-by-step", "planned"):
        opt.reset()
        if mode == "planned":
            opt.plan(DDIM_50)
        got = run_loop(opt, kw, DDIM_50)
        assert _max_diff(got, ref_outs) <= ATOL, mode
        for i, (_, phase) in enumerate(opt.state().trace):
            assert set(phase.reused) == {p for p, reused in ref.steps[i].items() if reused}, f"{mode}, step {i}"


@pytest.fixture(scope="module")
def latte_planned():
    """Latte optimized for its PAB preset with a plan for DDIM_50, shared by the tests that leave the plan
    (each starts with ``reset()``: a fresh generation, as after optimize)."""
    case = make_case("latte")
    return case.model, case.kwargs, graphpass.optimize(case.model, PAB.preset("latte"),
                                                       example_kwargs=case.kwargs(), timesteps=DDIM_50)


def test_plan_for_other_timesteps_falls_back_to_step_by_step(latte_planned):
    """A plan made for 50 steps does not apply to a 25-step generation: it runs step by step, still PAB."""
    model, make_kwargs, opt = latte_planned
    opt.reset()
    ts = [float(i * 40 + 1) for i in range(25)][::-1]
    ref = ReferencePAB(model, MODULES["latte"], {"spatial": 2, "temporal": 3, "cross": 6})
    ref_outs = run_loop(ref, make_kwargs(), ts)
    ref.restore()
    assert _max_diff(run_loop(opt, make_kwargs(), ts), ref_outs) <= ATOL


def test_generation_leaving_the_plan_midway_stays_safe(latte_planned):
    """Timesteps that follow the plan for 9 steps and then leave it: the executor goes on step by step. A
    reuse whose tensors the plan did not keep computes instead, so every reuse is one the reference makes
    and nothing is read from an empty cache."""
    model, make_kwargs, opt = latte_planned
    opt.reset()
    ts = DDIM_50[:9] + [float(t) for t in range(790, 0, -30)]
    ref = ReferencePAB(model, MODULES["latte"], {"spatial": 2, "temporal": 3, "cross": 6})
    run_loop(ref, make_kwargs(), ts)
    ref.restore()
    outs = run_loop(opt, make_kwargs(), ts)
    assert all(torch.isfinite(o).all() for o in outs)
    trace = opt.state().trace
    assert len(trace) == len(ts)
    for i, (_, phase) in enumerate(trace):
        assert set(phase.reused) <= {p for p, reused in ref.steps[i].items() if reused}, f"step {i}"
    assert sum(len(ph.reused) for _, ph in trace) > 0


def test_reuse_gated_differs_from_raw_reuse_and_keeps_the_gate_stale(vdt_tiny):
    """reuse_gated=True caches gate*output (the gate of the storing step); the default re-applies the
    current gate. Both are PAB; they differ exactly because VDT's gates depend on the timestep."""
    model, make_kwargs = vdt_tiny
    sched = PAB.preset("pab246", window=(100, 800))
    raw = graphpass.optimize(model, sched, example_kwargs=make_kwargs(), timesteps=DDIM_50)
    gated = graphpass.optimize(model, sched, example_kwargs=make_kwargs(), timesteps=DDIM_50, reuse_gated=True)
    a, b = run_loop(raw, make_kwargs(), DDIM_50), run_loop(gated, make_kwargs(), DDIM_50)
    # Same decisions, same skipped attention; different cached values once reuse starts.
    assert [ph.reused for _, ph in raw.state().trace] == [ph.reused for _, ph in gated.state().trace]
    first_reuse = next(i for i, (_, ph) in enumerate(raw.state().trace) if ph.reused)
    assert _max_diff(a[:first_reuse], b[:first_reuse]) == 0.0
    assert _max_diff(a, b) > 1e-5
