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

import functools
import re

import pytest
import torch

import graphpass
from graphpass import PAB
from graphpass.errors import GraphpassError
from graphpass.passes.capture import capture
from graphpass.passes.tag import tag_attention
from graphpass.runtime.executor import OptimizedModel
from reference_pab import ReferencePAB
from zoo import ZOO, ZooCase

STEPS = [float(t) for t in range(981, 0, -50)]  # 20 falling timesteps
RTOL = 1e-5
ATTENTION_KINDS = ("spatial", "temporal", "cross", "joint", "text", "other")
#: Broadcast ranges per kind for the PAB test: co-prime-ish so the kinds reuse at different steps.
RANGES = {"spatial": 2, "temporal": 3, "cross": 4, "joint": 2, "text": 3, "other": 3}

SUPPORTED = [n for n, c in ZOO.items() if c.unsupported is None]
UNSUPPORTED = [n for n, c in ZOO.items() if c.unsupported is not None]


def _leaf(case: ZooCase, out) -> torch.Tensor:
    leaves = out if isinstance(out, (tuple, list)) else (out.sample if hasattr(out, "sample") else out,)
    return leaves[case.out_index]


def _loop(case: ZooCase, call, kwargs, timesteps=STEPS) -> list[torch.Tensor]:
    """Call once per timestep, feeding x - 0.1 * eps (cut to the latent's shape) back as the video input."""
    kw = dict(kwargs)
    x = kw[case.video_input]
    outs = []
    with torch.no_grad():
        for t in timesteps:
            kw[case.video_input] = x
            kw[case.timestep_arg] = torch.full_like(kwargs[case.timestep_arg], t)
            eps = _leaf(case, call(**kw))
            outs.append(eps)
            if eps.dim() == x.dim():  # the prediction may cover part of the input (i2v: latents + condition)
                common = tuple(slice(0, min(a, b)) for a, b in zip(x.shape, eps.shape))
                x = x.clone()
                x[common] -= 0.1 * eps[common]
    return outs


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-12)) for x, y in zip(a, b))


@functools.lru_cache(maxsize=None)
def captured(name: str):
    """(model, capture, regions) of a zoo case, once per session (tests must not change the model)."""
    case = ZOO[name]
    model = case.build()
    cap = capture(model, case.kwargs())
    return model, cap, tag_attention(cap, video_input=case.video_input)


def _attention_kinds(case: ZooCase) -> dict[str, str]:
    return {p: k for p, (k, _) in case.kinds.items() if k in ATTENTION_KINDS}


@pytest.mark.parametrize("name", SUPPORTED)
def test_never_reusing_schedule_is_bit_identical(name):
    case = ZOO[name]
    model, cap, regions = captured(name)
    kind = next(iter(_attention_kinds(case).values()))
    opt = OptimizedModel(model, cap, regions, PAB(**{kind: 2}, window=(2000, 3000)))
    eager = _loop(case, model, case.kwargs())
    got = _loop(case, opt, case.kwargs())
    assert all(torch.equal(a, b) for a, b in zip(got, eager))


@pytest.mark.parametrize("name", SUPPORTED)
def test_tags_match_the_kinds_read_from_the_source(name):
    case = ZOO[name]
    _, _, regions = captured(name)
    tagged = {r.path: r.kind for r in regions}
    expected = _attention_kinds(case)
    got = {p: k for p, k in tagged.items() if k != "mlp"}
    assert got == expected, {p: (got.get(p), expected.get(p)) for p in set(got) | set(expected)
                             if got.get(p) != expected.get(p)}
    mlp_expected = {p for p, (k, _) in case.kinds.items() if k == "mlp"}
    assert {p for p, k in tagged.items() if k == "mlp"} <= mlp_expected


@pytest.mark.parametrize("name", SUPPORTED)
def test_pab_equals_the_reference_for_every_kind(name):
    case = ZOO[name]
    model, cap, regions = captured(name)
    modules = _attention_kinds(case)
    ranges = {k: RANGES[k] for k in set(modules.values())}
    schedule = PAB(**ranges, window=(0, 1000))
    opt = OptimizedModel(model, cap, regions, schedule)
    opt.plan(STEPS)
    got = _loop(case, opt, case.kwargs())
    ref = ReferencePAB(model, modules, ranges, window=(0, 1000), timestep_arg=case.timestep_arg)
    try:
        want = _loop(case, ref, case.kwargs())
    finally:
        ref.restore()
    assert _rel(got, want) <= RTOL
    trace = opt.state().trace
    for i, (_, phase) in enumerate(trace):
        assert set(phase.reused) == {p for p, reused in ref.steps[i].items() if reused}, f"step {i}"
    assert sum(len(ph.reused) for _, ph in trace) > 0


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_models_get_a_clear_error(name):
    case = ZOO[name]
    with pytest.raises(GraphpassError, match=case.unsupported):
        graphpass.optimize(case.build(), "pab246", example_kwargs=case.kwargs())


ONNX_CASES = [n for n in SUPPORTED if not ZOO[n].extra.get("onnx_skip")]


@pytest.mark.slow
@pytest.mark.parametrize("name", ONNX_CASES)
def test_onnx_export_of_a_pab_plan_matches(name, tmp_path):
    pytest.importorskip("onnxruntime")
    case = ZOO[name]
    model, cap, regions = captured(name)
    modules = _attention_kinds(case)
    ranges = {k: RANGES[k] for k in set(modules.values())}
    steps = STEPS[:4]
    opt = OptimizedModel(model, cap, regions, PAB(**ranges, window=(0, 1000)))
    opt.plan(steps)
    want = _loop(case, opt, case.kwargs(), steps)
    try:
        folder = graphpass.export(opt, tmp_path / "artefact", format="onnx", single_file=True)
    except GraphpassError as e:  # an op that does not lower: the error must name it
        assert re.search(r"aten\.|op", str(e)), str(e)
        pytest.xfail(f"ONNX export refused with: {str(e).splitlines()[0]}")
    runner = graphpass.load(folder, backend="onnxruntime")
    got = _loop(case, runner, case.kwargs(), steps)
    assert max(float((a - b).abs().max()) for a, b in zip(got, want)) <= 1e-4
