"""graphpass on every diffusers video transformer of the zoo (tests/zoo/<family>.py), against references.

For each case (one capture shared by its tests):

* capture succeeds (or, for a case marked ``unsupported``, fails with the clear error it names);
* a schedule that never reuses gives outputs bit-identical to eager over a 20-step loop;
* tags equal the kinds written in the case from reading the model's source, module by module;
* PAB over a 20-step loop, reusing every kind the model has, equals the module-level reference
  (tests/reference_pab.py) within 1e-5 relative, with the same reuse decisions;
* static ONNX export of the PAB plan runs in onnxruntime within 1e-4 of graphpass's eager outputs (a model
  with an op that does not lower gets a clear error naming it: the test then records it).
"""
from __future__ import annotations

import os
import re

import pytest
import torch

import graphpass
from graphpass import PAB
from graphpass.errors import GraphpassError
from graphpass.runtime.executor import OptimizedModel
from reference_pab import ReferencePAB
from zoo import ZOO
from zoo._harness import RANGES, RTOL, STEPS, SUPPORTED, UNSUPPORTED, attention_kinds, captured, loop, rel

@pytest.mark.parametrize("name", SUPPORTED)
def test_never_reusing_schedule_is_bit_identical(name):
    case = ZOO[name]
    model, cap, regions = captured(name)
    kind = next(iter(attention_kinds(case).values()))
    opt = OptimizedModel(model, cap, regions, PAB(**{kind: 2}, window=(2000, 3000)))
    eager = loop(case, model, case.kwargs())
    got = loop(case, opt, case.kwargs())
    assert all(torch.equal(a, b) for a, b in zip(got, eager))


@pytest.mark.parametrize("name", SUPPORTED)
def test_tags_match_the_kinds_read_from_the_source(name):
    case = ZOO[name]
    _, _, regions = captured(name)
    tagged = {r.path: r.kind for r in regions}
    expected = attention_kinds(case)
    got = {p: k for p, k in tagged.items() if k != "mlp"}
    assert got == expected, {p: (got.get(p), expected.get(p)) for p in set(got) | set(expected)
                             if got.get(p) != expected.get(p)}
    mlp_expected = {p for p, (k, _) in case.kinds.items() if k == "mlp"}
    assert {p for p, k in tagged.items() if k == "mlp"} <= mlp_expected


@pytest.mark.parametrize("name", SUPPORTED)
def test_pab_equals_the_reference_for_every_kind(name):
    case = ZOO[name]
    model, cap, regions = captured(name)
    modules = attention_kinds(case)
    ranges = {k: RANGES[k] for k in set(modules.values())}
    schedule = PAB(**ranges, window=(0, 1000))
    opt = OptimizedModel(model, cap, regions, schedule)
    opt.plan(STEPS)
    got = loop(case, opt, case.kwargs())
    ref = ReferencePAB(model, modules, ranges, window=(0, 1000), timestep_arg=case.timestep_arg)
    try:
        want = loop(case, ref, case.kwargs())
    finally:
        ref.restore()
    assert rel(got, want) <= RTOL
    trace = opt.state().trace
    for i, (_, phase) in enumerate(trace):
        assert set(phase.reused) == {p for p, reused in ref.steps[i].items() if reused}, f"step {i}"
    assert sum(len(ph.reused) for _, ph in trace) > 0


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_models_get_a_clear_error(name):
    case = ZOO[name]
    with pytest.raises(GraphpassError, match=case.unsupported):
        graphpass.optimize(case.build(), "pab246", example_kwargs=case.kwargs())


#: One case per family in the default run (ONNX export takes seconds per phase); GRAPHPASS_ZOO_ONNX=all runs
#: every case (docs/models.md records all of them, see tests/zoo/coverage.py).
ONNX_FAMILIES = ("latte", "cogvideox-2b", "wan", "hunyuan-video", "ltx-video", "mochi", "allegro", "cosmos",
                 "easyanimate", "kandinsky6-video", "anyflow", "joyimage-edit")
ONNX_CASES = SUPPORTED if os.environ.get("GRAPHPASS_ZOO_ONNX") == "all" else [
    n for n in ONNX_FAMILIES if n in SUPPORTED]


@pytest.mark.slow
@pytest.mark.parametrize("name", ONNX_CASES)
def test_onnx_export_of_a_pab_plan_matches(name, tmp_path):
    pytest.importorskip("onnxruntime")
    case = ZOO[name]
    model, cap, regions = captured(name)
    modules = attention_kinds(case)
    ranges = {k: RANGES[k] for k in set(modules.values())}
    steps = STEPS[:4]
    opt = OptimizedModel(model, cap, regions, PAB(**ranges, window=(0, 1000)))
    opt.plan(steps)
    want = loop(case, opt, case.kwargs(), steps)
    try:
        folder = graphpass.export(opt, tmp_path / "artefact", format="onnx")
    except GraphpassError as e:  # an op that does not lower: the error must name it
        assert re.search(r"aten\.|op", str(e)), str(e)
        pytest.xfail(f"ONNX export refused with: {str(e).splitlines()[0]}")
    runner = graphpass.load(folder, backend="onnxruntime")
    got = loop(case, runner, case.kwargs(), steps)
    assert max(float((a - b).abs().max()) for a, b in zip(got, want)) <= 1e-4
