"""graphpass on every diffusers video transformer of the zoo (tests/zoo/<family>.py), against references.

For each case (one capture shared by its tests):

* capture succeeds (or, for a case marked ``unsupported``, fails with the clear error it names);
* a schedule that never reuses gives outputs bit-identical to eager over a 20-step loop;
* tags equal the kinds written in the case from reading the model's source, module by module;
* PAB over a 20-step loop, reusing every kind the model has, equals the module-level reference
  (tests/reference_pab.py) within 1e-5 relative, with the same reuse decisions;
* AdaCache: an always-compute decision sequence equals eager bit for bit, and a fixed sequence with reuse
  steps equals a module-level block-residual reference (tests/adacache/adacache_helpers.py) within 1e-5;
* static ONNX export of the PAB plan runs in onnxruntime within 1e-4 of graphpass's eager outputs (a model
  with an op that does not lower gets a clear error naming it: the test then records it).
"""
from __future__ import annotations

import os
import re
import warnings

import pytest
import torch

import graphpass
from graphpass import PAB, FrozenAdaCache
from graphpass.errors import GraphpassError
from graphpass.runtime.adaptive import ResidualModel
from graphpass.runtime.executor import OptimizedModel
from zoo import ZOO
from zoo._harness import (RANGES, RTOL, STEPS, SUPPORTED, UNSUPPORTED, ChainResidualReuse, attention_kinds,
                          captured, eager_loop, loop, rel, run_pab, top_blocks)

SHORT = tuple(STEPS[:10])  # never-reusing and residual runs: 10 steps; PAB runs all 20


@pytest.mark.parametrize("name", SUPPORTED)
def test_never_reusing_schedule_is_bit_identical(name):
    case = ZOO[name]
    model, cap, regions = captured(name)
    kind = next(iter(attention_kinds(case).values()))
    opt = OptimizedModel(model, cap, regions, PAB(**{kind: 2}, window=(2000, 3000)))
    # the loop is sequential: the first steps of the shared 10-step eager run are a 5-step eager run
    got = loop(case, opt, case.kwargs(), SHORT[:5])
    assert len(got) == 5 and all(torch.equal(a, b) for a, b in zip(got, eager_loop(name, SHORT)))


@pytest.mark.parametrize("name", SUPPORTED)
def test_tags_match_the_kinds_read_from_the_source(name):
    case = ZOO[name]
    if case.extra.get("tags_differ"):
        pytest.skip(f"tagging differs from the source, documented in the case: {case.extra['tags_differ']}")
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
    if case.extra.get("tags_differ"):
        pytest.skip(f"tagging differs from the source, documented in the case: {case.extra['tags_differ']}")
    opt, got, ref, want = run_pab(name)
    assert rel(got, want) <= RTOL
    trace = opt.state().trace
    for i, (_, phase) in enumerate(trace):
        assert set(phase.reused) == {p for p, reused in ref.steps[i].items() if reused}, f"step {i}"
    assert sum(len(ph.reused) for _, ph in trace) > 0


#: Runs, but the per-block reference does something else: modules between blocks add to the hidden state (face
#: adapter, perceiver cross-attention, VACE hints), so graphpass's reused span residual includes them while a
#: per-block reference recomputes them. tests/zoo/test_adapter_adacache.py checks these against a chain reference.
ADACACHE_OTHER_REFERENCE = {"wan-animate", "consisid", "wan-vace"}
DECISIONS = "CCRCRRCCRC"  # over the first 10 steps


@pytest.mark.parametrize("name", SUPPORTED)
def test_adacache_always_compute_equals_eager(name):
    case = ZOO[name]
    model, cap, regions = captured(name)
    opt = ResidualModel(model, cap, regions, FrozenAdaCache("C" * len(SHORT)))
    eager = eager_loop(name, SHORT)
    assert all(torch.equal(a, b) for a, b in zip(loop(case, opt, case.kwargs(), SHORT), eager))


@pytest.mark.parametrize("name", [n for n in SUPPORTED if n not in ADACACHE_OTHER_REFERENCE])
def test_adacache_decisions_equal_the_block_residual_reference(name):
    case = ZOO[name]
    if case.extra.get("tags_differ"):
        pytest.skip(f"tagging differs from the source, documented in the case: {case.extra['tags_differ']}")
    model, cap, regions = captured(name)
    opt = ResidualModel(model, cap, regions, FrozenAdaCache(DECISIONS))
    opt.plan(SHORT)
    got = loop(case, opt, case.kwargs(), SHORT)
    fresh = case.build()  # the reference wraps block forwards: not the captured model
    ref = ChainResidualReuse(fresh, top_blocks(fresh, case))
    calls = iter(DECISIONS)

    def reference(**kw):
        ref.reuse = next(calls) == "R"
        return fresh(**kw)

    want = loop(case, reference, case.kwargs(), SHORT)
    assert rel(got, want) <= case.extra.get("adacache_rtol", (RTOL, ""))[0]
    assert rel(got, eager_loop(name, SHORT)) > 1e-4  # reuse changed the outputs: the check can fail


@pytest.mark.parametrize("name", [n for n in SUPPORTED if "adacache_rtol" in ZOO[n].extra])
def test_a_looser_adacache_tolerance_is_the_models_own_sensitivity(name):
    """A case compared with a tolerance above 1e-5 must amplify rounding by itself: eager, fed an input changed
    by 2e-7 relative (the rounding of summing block residuals in another order), moves by more than 1e-5 over
    the same loop."""
    case = ZOO[name]
    model, _, _ = captured(name)
    kw = case.kwargs()
    nudged = dict(kw, **{case.video_input: kw[case.video_input] * (1 + 2e-7)})
    assert rel(loop(case, model, nudged, SHORT), eager_loop(name, SHORT)) > RTOL


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_models_get_a_clear_error(name):
    case = ZOO[name]
    with pytest.raises(GraphpassError, match=case.unsupported):
        opt = graphpass.optimize(case.build(), PAB(joint=2, window=(2000, 3000)), example_kwargs=case.kwargs())
        opt(**case.kwargs())  # some inputs are refused at the call (timestep forms)


#: One case per family in the default run (ONNX export takes seconds per phase), plus SANA-Video, whose export
#: gave NaN under ONNX Runtime until the exporter's optimizer was kept from dropping its "+ 1e-15";
#: GRAPHPASS_ZOO_ONNX=all runs every case (docs/models.md records all of them, see tests/zoo/coverage.py).
ONNX_FAMILIES = ("latte", "cogvideox-2b", "cogvideox-rope", "wan", "cosmos", "kandinsky6-video", "sana-video")
#: Models with an op ONNX cannot express: the export names the op and the module calling it.
ONNX_UNLOWERED = {
    # RoPE frequencies as complex numbers (torch.polar), split per axis
    "anyflow": r"aten\.split_with_sizes\.default on a complex tensor has no ONNX lowering \(called in module rope "
               r"\(AnyFlowRotaryPosEmbed\)\): ONNX has no complex tensors",
    "sana-wm": r"aten\.split_with_sizes\.default on a complex tensor has no ONNX lowering \(called in module rope "
               r"\(SanaWMRotaryPosEmbed\)\): ONNX has no complex tensors",
    # the motion encoder orthogonalizes its motion directions with torch.linalg.qr
    "wan-animate": r"aten\.linalg_qr\.default has no ONNX lowering \(called in module motion_encoder "
                   r"\(WanAnimateMotionEncoder\)\)",
}
ONNX_CASES = [n for n in SUPPORTED if n not in ONNX_UNLOWERED] if os.environ.get("GRAPHPASS_ZOO_ONNX") == "all" else [
    n for n in ONNX_FAMILIES if n in SUPPORTED]


def _pab_plan(name: str, steps):
    case = ZOO[name]
    model, cap, regions = captured(name)
    ranges = {k: RANGES[k] for k in set(attention_kinds(case).values())}
    opt = OptimizedModel(model, cap, regions, PAB(**ranges, window=(0, 1000)))
    opt.plan(steps)
    return opt


@pytest.mark.slow
@pytest.mark.parametrize("name", ONNX_CASES)
def test_onnx_export_of_a_pab_plan_matches(name, tmp_path):
    pytest.importorskip("onnxruntime")
    case = ZOO[name]
    steps = STEPS[:2]  # two phases: every region computed and stored, then every region reused
    opt = _pab_plan(name, steps)
    first, second = opt.plan(steps).distinct()
    assert first.stored and not first.reused and second.reused == first.stored and not second.stored
    want = loop(case, opt, case.kwargs(), steps)
    # verify=False: this test runs the loaded artefact against eager itself
    folder = graphpass.export(opt, tmp_path / "artefact", format="onnx", verify=False)
    runner = graphpass.load(folder, backend="onnxruntime")
    got = loop(case, runner, case.kwargs(), steps)
    assert max(float((a - b).abs().max()) for a, b in zip(got, want)) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ONNX_UNLOWERED))
def test_onnx_export_names_the_op_that_does_not_lower(name, tmp_path):
    pytest.importorskip("onnxruntime")
    opt = _pab_plan(name, STEPS[:2])
    with warnings.catch_warnings(record=True) as seen, \
            pytest.raises(graphpass.UnloweredOpError, match=ONNX_UNLOWERED[name]):
        warnings.simplefilter("always")
        graphpass.export(opt, tmp_path / "artefact", format="onnx")
    # the op is in every layout: no per-phase retry after the single file fails on it (a single file that
    # fails earlier, as Sana-WM's switch graph in torch.export, is retried and per phase meets the op)
    retries = [str(w.message) for w in seen if "one file per phase" in str(w.message)]
    assert not [m for m in retries if re.search(ONNX_UNLOWERED[name], m)]
    assert not (tmp_path / "artefact").exists()


def test_export_refuses_a_model_that_branches_on_values(tmp_path):
    """HunyuanVideo-1.5 branches on ``torch.all(image_embeds == 0)``: graphpass fixes the value and checks it on
    every call, which exported phase files could not do, so export refuses before touching the folder."""
    model, cap, regions = captured("hunyuan-video15")
    assert cap.value_checks
    opt = OptimizedModel(model, cap, regions, PAB(joint=2, window=(0, 1000)))
    opt.plan(STEPS[:3])
    with pytest.raises(graphpass.ArtefactError, match=r"transformer_hunyuan_video15\.py:\d+ if is_t2v"):
        graphpass.export(opt, tmp_path / "out")
    assert not (tmp_path / "out").exists()
