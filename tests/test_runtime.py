"""The executor's state: generations, cache contexts, cache memory, shared parameters."""
from __future__ import annotations

import pytest
import torch

import graphpass
from conftest import DDIM_50, first, make_case, run_loop, step
from graphpass import Action, CacheStore, PAB
from reference_pab import ReferencePAB

#: Latte's attention modules and their kinds, written from the diffusers model code.
LATTE_MODULES = {**{f"transformer_blocks.{i}.attn1": "spatial" for i in range(2)},
                 **{f"transformer_blocks.{i}.attn2": "cross" for i in range(2)},
                 **{f"temporal_transformer_blocks.{i}.attn1": "temporal" for i in range(2)}}


def _equal(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def latte():
    case = make_case("latte")
    return case, graphpass.optimize(case.model, PAB.preset("latte"), example_kwargs=case.kwargs())


@pytest.mark.parametrize("planned", [False, True], ids=["step-by-step", "planned"])
def test_two_generations_are_identical(latte, planned):
    case, opt = latte
    opt.reset()
    if planned:
        opt.plan(DDIM_50)
    one = run_loop(opt, case.kwargs(), DDIM_50)
    st = opt.state()
    assert st.counter == 50 and len(st.trace) == 50
    # the second generation starts at t=981 > 1: counter, trace and cache restart without reset()
    two = run_loop(opt, case.kwargs(), DDIM_50)
    assert st.counter == 50 and [t for t, _ in st.trace] == DDIM_50
    assert _equal(one, two)
    assert any(ph.reused for _, ph in st.trace)  # PAB was active: the equality is not trivial
    kw = dict(case.kwargs(), timestep=torch.full((2,), 981, dtype=torch.int64))
    restarted = first(opt(**kw))
    assert st.counter == 1 and len(st.trace) == 1
    # the restart holds what a reset() model holds after the same call, and computes what the model computes
    held = opt.cache_nbytes
    opt.reset()
    fresh = first(opt(**kw))
    assert held == opt.cache_nbytes and torch.equal(restarted, fresh)
    assert torch.allclose(restarted, first(case.model(**kw)), atol=1e-6)
    if planned:
        assert held == 0  # 981 is outside the window and the plan's next step reuses nothing
    opt._plan = None


def test_with_schedule_runs_the_new_schedule_hoisted_like_optimize(latte):
    """The same capture under another schedule keeps the step-invariant hoisting optimize set up: its outputs
    and its prologue runs equal a fresh graphpass.optimize with that schedule."""
    case, opt = latte
    other = PAB(spatial=3, temporal=2, window=(100, 900))
    again = opt.with_schedule(other)
    fresh = graphpass.optimize(case.model, other, example_kwargs=case.kwargs())
    assert fresh.hoisting is not None and again.hoisting is opt.hoisting
    steps = DDIM_50[:12]
    assert _equal(run_loop(again, case.kwargs(), steps), run_loop(fresh, case.kwargs(), steps))
    assert again.state().hoisted.runs == fresh.state().hoisted.runs == 1  # one prologue run per generation


def test_reset_mid_generation(latte):
    case, opt = latte
    opt.reset()
    full = run_loop(opt, case.kwargs(), DDIM_50)
    # stop inside the window, with tensors cached and the counter at 20
    run_loop(opt, case.kwargs(), DDIM_50[:20])
    assert opt.state().counter == 20 and opt.cache_nbytes > 0
    opt.reset()
    assert opt.state().counter == 0 and opt.cache_nbytes == 0 and opt.state().trace == []
    assert _equal(run_loop(opt, case.kwargs(), DDIM_50), full)


def test_a_generation_that_continues_below_the_last_timestep_is_the_same_generation(latte):
    """Without reset(), a call whose timestep is not above the last continues the generation: a loop over
    the first half, then one over the second half (from where the first stopped), gives the outputs of one
    50-step generation of the module-level reference PAB (tests/reference_pab.py); a fresh generation over
    the second half alone does not."""
    case, opt = latte
    ref = ReferencePAB(case.model, LATTE_MODULES, {"spatial": 2, "temporal": 3, "cross": 6})
    try:
        expected = run_loop(ref, case.kwargs(), DDIM_50)
    finally:
        ref.restore()
    opt.reset()
    kw = case.kwargs()
    head = run_loop(opt, kw, DDIM_50[:25])
    assert opt.state().counter == 25
    x = kw["hidden_states"]
    for out in head:
        x = step(x, out)
    tail = run_loop(opt, dict(kw, hidden_states=x), DDIM_50[25:])
    assert opt.state().counter == 50
    assert max(float((a - b).abs().max()) for a, b in zip(head + tail, expected)) <= 1e-6
    opt.reset()  # the same second half as a generation of its own: its counter starts at 0
    alone = run_loop(opt, dict(kw, hidden_states=x), DDIM_50[25:])
    assert max(float((a - b).abs().max()) for a, b in zip(alone, expected[25:])) > 1e-4


def test_cond_and_uncond_contexts_do_not_mix(latte):
    """Separate cond/uncond calls (unbatched classifier-free guidance), interleaved step by step, each in its
    own cache context, give what two separate single-context generations give."""
    case, opt = latte
    cond = case.kwargs()
    uncond = dict(cond, encoder_hidden_states=torch.zeros_like(cond["encoder_hidden_states"]))
    opt.reset()
    alone_c = run_loop(opt, cond, DDIM_50)
    opt.reset()
    alone_u = run_loop(opt, uncond, DDIM_50)
    assert not _equal(alone_c, alone_u)

    opt.reset()
    xc, xu, got_c, got_u = cond["hidden_states"], uncond["hidden_states"], [], []
    with torch.no_grad():
        for t in DDIM_50:
            ts = torch.full((2,), t, dtype=torch.int64)
            with opt.cache_context("cond"):
                oc = opt(**dict(cond, hidden_states=xc, timestep=ts))
            with opt.cache_context("uncond"):
                ou = opt(**dict(uncond, hidden_states=xu, timestep=ts))
            got_c.append(first(oc))
            got_u.append(first(ou))
            xc, xu = step(xc, oc), step(xu, ou)
    assert _equal(got_c, alone_c) and _equal(got_u, alone_u)
    assert opt.state("cond").counter == opt.state("uncond").counter == 50
    assert opt.state().counter == 0  # the default context was not touched

    # the same interleaving in one context would mix them (the uncond call reusing the cond call's
    # attention): the second call at one timestep warns, naming the fix
    opt.reset()
    ts = torch.full((2,), DDIM_50[0], dtype=torch.int64)
    with torch.no_grad():
        opt(**dict(cond, timestep=ts))
        with pytest.warns(UserWarning, match="cache_context"):
            opt(**dict(uncond, timestep=ts))


def _bytes_per_step(opt, kwargs):
    held = []
    kw = dict(kwargs)
    x = kw["hidden_states"]
    with torch.no_grad():
        for t in DDIM_50:
            out = opt(**dict(kw, hidden_states=x, timestep=torch.full_like(kw["timestep"], t)))
            held.append(opt.cache_nbytes)
            x = step(x, out)
    return held


def test_cache_memory_follows_the_window(latte):
    case, opt = latte
    by_path = {r.path: r for r in opt.regions}
    inside = [i for i, t in enumerate(DDIM_50) if 100 < t < 800]
    below = [i for i, t in enumerate(DDIM_50) if t <= 100]

    opt.reset()
    lazy = _bytes_per_step(opt, case.kwargs())
    lazy_peak = opt.state().cache.peak_nbytes

    opt.reset()
    plan = opt.plan(DDIM_50)
    planned = _bytes_per_step(opt, case.kwargs())
    planned_peak = opt.state().cache.peak_nbytes
    opt._plan = None

    for held in (lazy, planned):
        assert all(held[i] == 0 for i in below)  # dropped when the window closes
    assert all(lazy[i] > 0 for i in inside[:-1])
    # planned: after each step the cache holds exactly the outputs the next step reuses (after the last
    # reuse of a run, e.g. step 11 before step 12 recomputes every region, it holds nothing)
    for i in range(len(DDIM_50) - 1):
        nxt = plan.phases[i + 1]
        assert planned[i] == sum(by_path[p].exit_bytes for p in nxt.reused), f"step {i}"
    assert sum(planned[i] > 0 for i in inside) > len(inside) // 2
    # step by step stores above the window too (the next call might fall inside it); the plan knows better
    assert planned[0] == 0 < lazy[0]
    assert sum(planned) < sum(lazy)
    assert 0 < planned_peak <= lazy_peak
    assert planned_peak == sum(r.exit_bytes for r in opt.regions if r.kind in ("spatial", "temporal", "cross"))


def test_cache_store_counts_storages():
    c = CacheStore()
    base = torch.zeros(2, 53, 16)
    c.put("a:0", base[:, :5])
    c.put("a:1", base[:, 5:])
    assert c.nbytes == base.numel() * 4  # two views of one base count it once
    c.put("b:0", torch.ones(10))
    assert c.nbytes == base.numel() * 4 + 40 and len(c) == 3 and "b:0" in c
    c.put("b:0", torch.ones(20))  # replacing frees the old tensor
    assert c.nbytes == base.numel() * 4 + 80
    c.drop("a:0")
    assert c.nbytes == base.numel() * 4 + 80  # a:1 keeps the base alive
    c.drop("a:1")
    c.drop("missing")
    assert c.nbytes == 80 and c.peak_nbytes == base.numel() * 4 + 80
    with pytest.raises(KeyError, match="no entry 'a:0'.*b:0"):
        c.get("a:0")
    c.clear()
    assert c.nbytes == 0 and c.peak_nbytes == 0 and c.keys() == []


def test_cogvideox_joint_exits_are_views_of_one_output():
    case = make_case("cogvideox")
    opt = graphpass.optimize(case.model, PAB.preset("cogvideox"), example_kwargs=case.kwargs(), timesteps=DDIM_50)
    run_loop(opt, case.kwargs(), DDIM_50[:11])  # t=761, odd call: reuse; the next call stores
    st = opt.state()
    assert opt.current_plan.phases[10].action("transformer_blocks.0.attn1") == Action.STORE
    text, video = st.cache.get("transformer_blocks.0.attn1:0"), st.cache.get("transformer_blocks.0.attn1:1")
    assert text.untyped_storage().data_ptr() == video.untyped_storage().data_ptr()
    assert opt.cache_nbytes == 2 * text.untyped_storage().nbytes()  # two blocks


@pytest.mark.parametrize("name", ["vdt", "latte", "cogvideox"])
def test_parameters_are_shared_not_copied(name):
    case = make_case(name)
    model = case.model
    opt = graphpass.optimize(model, "cogvideox" if name == "cogvideox" else "pab246", example_kwargs=case.kwargs(),
                             timesteps=DDIM_50)
    own = {n: p for n, p in model.named_parameters()} | {n: b for n, b in model.named_buffers()}
    for ph in opt.current_plan.distinct():
        gm = opt.phase_graph(ph).gm
        tensors = list(gm.named_parameters()) + list(gm.named_buffers())
        assert tensors
        for n, p in tensors:
            assert n.startswith("model.") and p.data_ptr() == own[n[len("model."):]].data_ptr(), n
    # a weight changed in place on the model changes the optimized model's output
    kw = case.kwargs()
    before = first(opt(**kw)).clone()
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    opt.reset()
    assert not torch.equal(first(opt(**kw)), before)
    assert torch.equal(first(opt(**kw)), first(model(**kw)))


def test_inspect_cli_writes_graphs(tmp_path, capsys):
    """``graphpass inspect --model vdt-tiny --out DIR`` reports the regions and writes every phase graph."""
    from graphpass.cli import main

    assert main(["inspect", "--model", "vdt-tiny", "--steps", "10", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    py, dot = sorted(tmp_path.glob("*.py")), sorted(tmp_path.glob("*.dot"))
    assert py and [p.stem for p in py] == [p.stem for p in dot]
    assert f"wrote {len(py)} phase graphs" in out and "regions (8)" in out
    assert all("def forward" in p.read_text() for p in py)
    assert all(p.read_text().lstrip().startswith("digraph") for p in dot)
    # the compute-all phase still runs attention; the phase that reuses every region runs none
    sdpa = [p.read_text().count("scaled_dot_product_attention.default(") for p in py]
    assert max(sdpa) == 6 and min(sdpa) == 0
