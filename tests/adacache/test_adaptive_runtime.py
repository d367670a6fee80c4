"""AdaCache at run time: equivalence with eager and with a module-level residual-reuse reference, the measured
metric against eager residuals, host reads, contexts, freezing and replay."""
from __future__ import annotations

import math

import pytest
import torch

import graphpass
from adacache_helpers import captured, residual_model, run_reference
from conftest import DDIM_50, make_case, run_loop
from graphpass import AdaCache, FrozenAdaCache, MoReg, ScheduleError
from graphpass.schedules.base import Action

TS = DDIM_50[::5]  # 10 steps: 981, 881, ..., 81
ALWAYS = {1.0: 1}  # every distance maps to "compute the next step too"


def _max_diff(xs, ys) -> float:
    return max((a - b).abs().max().item() for a, b in zip(xs, ys))


@pytest.mark.parametrize("name, unit", [("vdt", "residual"), ("latte", "residual"), ("latte", "outputs")])
def test_always_compute_codebook_equals_eager(name, unit):
    case, _, _ = captured(name)
    eager = run_loop(case.model, case.kwargs(), TS)
    opt = residual_model(name, AdaCache(codebook=ALWAYS, moreg=MoReg(window=(1, 10)), cache_unit=unit), TS)
    outs = run_loop(opt, case.kwargs(), TS)
    assert opt.decisions() == "C" * len(TS)
    assert _max_diff(outs, eager) == 0.0
    # it measured at every step whose decision matters (steps 1..6 of 10 with the last 2 always computed)
    assert [r.step for r in opt.records()] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("name, decisions, unit", [("vdt", "CCRRCRCRRC", "residual"),
                                                   ("latte", "CCRRRCRCRC", "residual"),
                                                   ("vdt", "CCRRRCRCRC", "outputs")])
def test_frozen_decisions_equal_module_level_reference(name, decisions, unit):
    case, _, _ = captured(name)
    opt = residual_model(name, FrozenAdaCache(decisions, cache_unit=unit), TS)
    outs = run_loop(opt, case.kwargs(), TS)
    assert opt.decisions() == decisions
    ref = run_reference(make_case(name).model, case.kwargs(), TS, decisions, unit)
    assert _max_diff(outs, ref) < 1e-6
    # and reuse changed the result (the comparison can fail)
    assert _max_diff(outs, run_loop(case.model, case.kwargs(), TS)) > 1e-3
    # the cache holds one residual while reuse is possible and nothing after the last step
    assert len(opt.state().cache) == 0


def test_optimize_entry_point_and_reuse_cost():
    case = make_case("vdt")
    opt = graphpass.optimize(case.model, AdaCache.preset("fast", codebook={10.0: 3}), example_kwargs=case.kwargs(),
                             timesteps=TS)
    assert isinstance(opt, graphpass.OptimizedModel) and opt.regions == [opt.span.region]
    run_loop(opt, case.kwargs(), TS)
    assert opt.decisions() == "CCRRCRRCCC"
    reuse = [pg for ph, pg in opt._phase_graphs.items() if ph.action(opt.span.path) == Action.REUSE]
    full = opt.phase_graph(graphpass.Phase())
    # a reuse step runs what is outside the blocks plus one add of the hidden state's size
    assert len(reuse) == 1 and reuse[0].attention_ops() == 0
    assert reuse[0].flops <= full.flops - opt.span.flops + math.prod(opt.span.spec.shape)
    assert "blocks" in opt.inspect()


def _block_residuals(model, path):
    """Record block ``path``'s residual (output - input) at every call."""
    got = []
    block = model.get_submodule(path)
    block.register_forward_hook(lambda m, args, out: got.append((out - args[0]).detach().clone()))
    return got


def test_measured_metric_matches_eager_residuals():
    case, _, _ = captured("vdt")
    model = make_case("vdt").model
    res = _block_residuals(model, "blocks.1")
    run_loop(model, case.kwargs(), TS)
    opt = residual_model("vdt", AdaCache(codebook=ALWAYS, metric_at="blocks.1", moreg=MoReg(window=(1, 10))), TS)
    run_loop(opt, case.kwargs(), TS)
    assert opt.metric.kind == "block"
    for rec in opt.records():
        now, prev = res[rec.step], res[rec.step - 1]  # always computed: k = 1
        dist = [((now[b] - prev[b]).abs().sum() / prev[b].abs().sum()).item() for b in range(2)]
        assert rec.distance == pytest.approx(dist, rel=1e-5)
        # MoReg motion: frame differences of the residual (B, F, T, D), frames on axis 1
        hi, lo = now[:, 1:], now[:, :-1]
        motion = [((hi[b] - lo[b]).abs().sum() / (hi[b].abs().sum() + lo[b].abs().sum())).item() for b in range(2)]
        assert rec.motion == pytest.approx(motion, rel=1e-5)
    assert all(r.k == 1 for r in opt.records())


def test_one_host_read_per_measuring_step_and_none_after_reuse(monkeypatch):
    case, _, _ = captured("vdt")
    opt = residual_model("vdt", AdaCache(codebook={0.17: 3, 1.0: 1}), TS)
    reads = []
    for name in ("tolist", "item"):
        orig = getattr(torch.Tensor, name)

        def counting(self, *a, _orig=orig, **k):
            reads.append(1)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    per_call = []
    kw = case.kwargs()
    x = kw["hidden_states"]
    with torch.no_grad():
        for t in TS:
            before = len(reads)
            out = opt(**{**kw, "hidden_states": x, "timestep": torch.full_like(kw["timestep"], t)})
            per_call.append(len(reads) - before - 1)  # beyond the core's one read of the timestep
            x = x - 0.1 * out
    monkeypatch.undo()
    phases = [ph for _, ph in opt.state().trace]
    measuring = [i for i, ph in enumerate(phases) if ph.metric == "measure"]
    assert "R" in opt.decisions() and measuring
    # a read happens exactly at the call after each measuring compute step: never after a reuse step
    assert [i for i, n in enumerate(per_call) if n] == [i + 1 for i in measuring]
    assert max(per_call) == 1 and opt.metric_reads == len(measuring) == len(opt.records())
    assert all(phases[i - 1].action(opt.span.path) != Action.REUSE for i, n in enumerate(per_call) if n)


def test_freeze_replays_the_adaptive_run():
    case, _, _ = captured("latte")
    opt = residual_model("latte", AdaCache(codebook={0.2: 3, 1.0: 1}), TS)
    first = run_loop(opt, case.kwargs(), TS)
    decisions = opt.decisions()
    again = run_loop(opt, case.kwargs(), TS)  # a new generation starts from a fresh decision state
    assert opt.decisions() == decisions and _max_diff(first, again) == 0.0
    frozen = opt.schedule.freeze(decisions)
    assert frozen == opt.freeze() and "R" in decisions
    replay = run_loop(residual_model("latte", graphpass.schedule_from_json(frozen.to_json()), TS), case.kwargs(), TS)
    assert _max_diff(replay, first) == 0.0


def test_cache_contexts_decide_separately():
    case, _, _ = captured("vdt")
    sched = AdaCache(codebook={0.17: 3, 1.0: 1})
    kw_c = case.kwargs()
    kw_u = {**case.kwargs(), "encoder_hidden_states": torch.zeros_like(kw_c["encoder_hidden_states"])}
    alone_c = run_loop(residual_model("vdt", sched, TS), kw_c, TS)
    alone_u = run_loop(residual_model("vdt", sched, TS), kw_u, TS)
    opt = residual_model("vdt", sched, TS)
    xc, xu, outs_c, outs_u = kw_c["hidden_states"], kw_u["hidden_states"], [], []
    with torch.no_grad():
        for t in TS:  # interleaved cond / uncond calls, each in its own context
            with opt.cache_context("cond"):
                oc = opt(**{**kw_c, "hidden_states": xc, "timestep": torch.full_like(kw_c["timestep"], t)})
            with opt.cache_context("uncond"):
                ou = opt(**{**kw_u, "hidden_states": xu, "timestep": torch.full_like(kw_u["timestep"], t)})
            outs_c.append(oc)
            outs_u.append(ou)
            xc, xu = xc - 0.1 * oc, xu - 0.1 * ou
    assert _max_diff(outs_c, alone_c) == 0.0 and _max_diff(outs_u, alone_u) == 0.0
    assert "R" in opt.decisions("cond")


def test_errors():
    case, _, _ = captured("vdt")
    opt = residual_model("vdt", AdaCache())  # no timesteps: the last steps cannot be known
    with pytest.raises(ScheduleError, match="timesteps="):
        run_loop(opt, case.kwargs(), TS[:1])
    opt = residual_model("vdt", AdaCache(), TS)
    with pytest.raises(graphpass.InputError, match="opt.plan"):
        run_loop(opt, case.kwargs(), [TS[0], TS[2]])
    with pytest.raises(ScheduleError, match="names no block or region"):
        residual_model("vdt", AdaCache(metric_at="blocks.7"))
    with pytest.raises(ScheduleError, match="below the frame count 4"):
        residual_model("vdt", AdaCache(moreg=MoReg(strides=(1, 4))))



def test_dynamic_capture_at_another_size_equals_reference():
    """On a capture with free frames/height/width (``dynamic=True``), a fixed decision sequence at a size
    other than the example's equals the module-level residual-reuse reference at that size."""
    from test_dynamic import _vdt_kwargs

    decisions = "CCRRCRCRRC"
    case = make_case("vdt")
    opt = graphpass.optimize(case.model, FrozenAdaCache(decisions), example_kwargs=case.kwargs(), timesteps=TS,
                             dynamic=True)
    kw = _vdt_kwargs(6, 20, 12)
    outs = run_loop(opt, kw, TS)
    assert opt.decisions() == decisions and outs[0].shape == (2, 6, 3, 20, 12)
    ref = run_reference(make_case("vdt").model, kw, TS, decisions, "residual")
    assert _max_diff(outs, ref) < 1e-6
    assert _max_diff(outs, run_loop(case.model, kw, TS)) > 1e-3


def test_dynamic_capture_moreg_refuses_another_size_and_plain_metric_serves_it():
    from test_dynamic import _vdt_kwargs

    kw = _vdt_kwargs(6, 20, 12)
    # both schedules on one capture with free sizes (dynamic=True)
    opt = residual_model("vdt", AdaCache(codebook=ALWAYS, moreg=MoReg(window=(1, 10))), TS, dynamic=True)
    with pytest.raises(graphpass.InputError, match="MoReg measures motion over the frames of the captured shapes"):
        run_loop(opt, kw, TS)
    # Without MoReg the metric (an L1 ratio over all of a sample's elements) runs at the new size, and an
    # always-compute codebook equals eager there.
    opt = residual_model("vdt", AdaCache(codebook=ALWAYS, metric_at="blocks.1"), TS, dynamic=True)
    model = make_case("vdt").model
    res = _block_residuals(model, "blocks.1")
    assert _max_diff(run_loop(opt, kw, TS), run_loop(model, kw, TS)) == 0.0
    assert opt.records()
    for rec in opt.records():  # the metric at the new size, against the eager residuals
        now, prev = res[rec.step], res[rec.step - 1]
        dist = [((now[b] - prev[b]).abs().sum() / prev[b].abs().sum()).item() for b in range(2)]
        assert rec.distance == pytest.approx(dist, rel=1e-5)
