"""Property tests: random PAB schedules and random residual-reuse decision sequences on tiny models, each
checked against the module-level references (tests/reference_pab.py, tests/adacache/adacache_helpers.py).

One capture per model is shared by every example; hypothesis draws the schedule, not the model.
"""
from __future__ import annotations

import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import captured_case, make_case, run_loop
from graphpass import PAB, FrozenAdaCache
from graphpass.runtime.executor import OptimizedModel
from reference_pab import ReferencePAB

sys.path.insert(0, str(Path(__file__).parent / "adacache"))
from adacache_helpers import residual_model, run_reference  # noqa: E402

TS = [float(t) for t in range(981, 0, -80)]  # 13 steps
MODULES = {f"blocks.{i}.{name}": kind for i in range(2)
           for name, kind in (("spatial_attn", "spatial"), ("temporal_attn", "temporal"),
                              ("cross_attn", "cross"), ("mlp", "mlp"))}
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


_range = st.one_of(st.none(), st.integers(1, 5))
_bound = st.integers(0, 1000)


@st.composite
def pab_schedules(draw):
    ranges = {k: draw(_range) for k in ("spatial", "temporal", "cross", "mlp")}
    if not any((r or 1) > 1 for r in ranges.values()):
        ranges["spatial"] = 2
    windows = {}
    for k in ranges:
        lo, hi = sorted(draw(st.tuples(_bound, _bound)))
        if lo < hi and draw(st.booleans()):
            windows[k] = (lo, hi)
    lo, hi = sorted(draw(st.tuples(_bound, _bound)))
    return PAB(**ranges, window=(lo, hi + (lo == hi)), windows=windows)


@SETTINGS
@given(schedule=pab_schedules(), planned=st.booleans())
def test_random_pab_schedules_equal_the_reference(schedule, planned):
    case, cap, regions = captured_case("vdt")
    opt = OptimizedModel(case.model, cap, regions, schedule)
    if planned:
        opt.plan(TS)
    got = run_loop(opt, case.kwargs(), TS)
    ranges = {k: schedule.range_of(k) for k in ("spatial", "temporal", "cross", "mlp")}
    windows = {k: schedule.window_of(k) for k in ranges}
    ref = ReferencePAB(case.model, MODULES, ranges, window=schedule.window, windows=windows)
    try:
        want = run_loop(ref, case.kwargs(), TS)
    finally:
        ref.restore()
    assert max(float((a - b).abs().max()) for a, b in zip(got, want)) <= 1e-6
    for i, (_, phase) in enumerate(opt.state().trace):
        assert set(phase.reused) == {p for p, r in ref.steps[i].items() if r}


decision_strings = st.lists(st.sampled_from("CR"), min_size=len(TS) - 1, max_size=len(TS) - 1).map(
    lambda ds: "C" + "".join(ds))


@SETTINGS
@given(decisions=decision_strings, name=st.sampled_from(["vdt", "latte"]))
def test_random_decision_sequences_equal_the_residual_reference(decisions, name):
    opt = residual_model(name, FrozenAdaCache(decisions), TS)
    case = make_case(name)
    got = run_loop(opt, case.kwargs(), TS)
    want = run_reference(make_case(name).model, case.kwargs(), TS, decisions)
    assert max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, want)) <= 1e-5
    assert opt.decisions() == decisions
