"""Sanity checks of the Wan-family zoo cases (tests/zoo/wan.py), not of graphpass.

For every case: it builds and runs eagerly to a finite video-shaped prediction, two builds give the same
output bit for bit, one forward stays within the time budget on one thread, every ``kinds`` path names a
module of the model, and every one of those modules is really called by the forward (forward hooks).

    pytest tests/zoo/test_cases_wan.py -q
"""
from __future__ import annotations

import time

import pytest
import torch
from diffusers.models.attention import AttentionModuleMixin

from zoo.wan import CASES

#: One eager forward of a zoo model must stay well under a second (best of 3, one thread).
FORWARD_BUDGET_S = 0.5

_BY_NAME = {c.name: c for c in CASES}


@pytest.fixture(params=sorted(_BY_NAME), scope="module")
def case(request):
    return _BY_NAME[request.param]


def _prediction(case, out) -> list[torch.Tensor]:
    """The prediction tensors of one call: one tensor, or one per sample for list outputs (Animate-2)."""
    pred = out[case.out_index]
    return list(pred) if isinstance(pred, (list, tuple)) else [pred]


def _video_hw(video) -> tuple[int, int]:
    first = video[0] if isinstance(video, list) else video
    return tuple(first.shape[-2:])


def test_case_classes_are_the_requested_ones():
    """Every class of this family has at least one case, and each case's model is of its declared class."""
    wanted = {"WanTransformer3DModel", "WanVACETransformer3DModel", "WanAnimateTransformer3DModel",
              "WanAnimate2Transformer3DModel", "SkyReelsV2Transformer3DModel", "ChronoEditTransformer3DModel",
              "HeliosTransformer3DModel", "AnyFlowTransformer3DModel", "AnyFlowFARTransformer3DModel",
              "MotifVideoTransformer3DModel"}
    assert {c.cls for c in CASES} == wanted
    for c in CASES:
        assert type(c.build()).__name__ == c.cls, c.name


def test_builds_and_runs(case):
    model = case.build()
    assert not model.training
    kwargs = case.kwargs()
    with torch.no_grad():
        preds = _prediction(case, model(**kwargs))
    hw = _video_hw(kwargs[case.video_input])
    for p in preds:
        assert torch.isfinite(p).all(), case.name
        assert tuple(p.shape[-2:]) == hw, (case.name, p.shape)
        assert p.float().std() > 0, f"{case.name}: constant prediction"


def test_deterministic(case):
    outs = []
    for _ in range(2):
        with torch.no_grad():
            outs.append(_prediction(case, case.build()(**case.kwargs())))
    assert len(outs[0]) == len(outs[1])
    for a, b in zip(*outs):
        assert torch.equal(a, b), case.name


def test_forward_budget(case):
    model = case.build()
    with torch.no_grad():
        model(**case.kwargs())  # first call: lazy tables, flex attention warm-up
        times = []
        for _ in range(3):
            kwargs = case.kwargs()
            t0 = time.perf_counter()
            model(**kwargs)
            times.append(time.perf_counter() - t0)
    assert min(times) < FORWARD_BUDGET_S, f"{case.name}: {min(times):.3f}s"


def test_kinds_paths_exist(case):
    modules = dict(case.build().named_modules())
    missing = [p for p in case.kinds if p not in modules]
    assert not missing, f"{case.name}: no such modules {missing}"
    assert {k for k, _ in case.kinds.values()} <= {"spatial", "temporal", "cross", "joint", "mlp", "text", "other"}
    assert all(reason for _, reason in case.kinds.values())


def test_kinds_modules_are_called(case):
    model = case.build()
    modules = dict(model.named_modules())
    calls = {p: 0 for p in case.kinds}

    def counter(path):
        def hook(module, args, output):
            calls[path] += 1
        return hook

    handles = [modules[p].register_forward_hook(counter(p)) for p in case.kinds]
    try:
        with torch.no_grad():
            model(**case.kwargs())
    finally:
        for h in handles:
            h.remove()
    silent = [p for p, n in calls.items() if n == 0]
    assert not silent, f"{case.name}: never called {silent}"


def test_every_attention_module_has_a_kind(case):
    """No attention module of the model is left out of ``kinds`` (diffusers attention modules all derive
    from ``AttentionModuleMixin``)."""
    attention = [name for name, m in case.build().named_modules() if isinstance(m, AttentionModuleMixin)]
    assert attention, case.name
    missing = [a for a in attention if a not in case.kinds]
    assert not missing, f"{case.name}: attention modules without a kind {missing}"
