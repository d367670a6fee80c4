"""Sanity checks of the ``misc`` zoo family (not of graphpass): every case builds, runs eagerly on one thread
within its time budget, is deterministic bit for bit, and its ``kinds`` table names real modules that the
forward really calls and covers every attention and feed-forward module of the model.

    cd <repo> && python -m pytest tests/zoo/test_cases_misc.py -q
"""
from __future__ import annotations

import time

import pytest
import torch
from diffusers.models.attention import AttentionModuleMixin, FeedForward
from diffusers.models.attention_processor import Attention

from zoo.misc import CASES

torch.set_num_threads(1)

KINDS = {"spatial", "temporal", "cross", "joint", "text", "other", "mlp"}
# One eager forward of a tiny case must stay well under a second (measured: 2-40 ms on one thread).
BUDGET_S = 0.5


def _prediction(case, out) -> torch.Tensor:
    return out[case.out_index]


def _forward(case, model) -> torch.Tensor:
    with torch.no_grad():
        return _prediction(case, model(**case.kwargs()))


def _is_attention_or_ffn(module: torch.nn.Module) -> bool:
    """diffusers' attention and feed-forward building blocks, recognised by class (not by what graphpass
    finds)."""
    return isinstance(module, (Attention, AttentionModuleMixin, FeedForward))


@pytest.fixture(params=CASES, ids=lambda c: c.name)
def case(request):
    return request.param


def test_runs_eager_with_a_finite_prediction(case):
    out = _forward(case, case.build())
    assert out.shape[0] == 2, "batch 2: one batched classifier-free-guidance call"
    assert torch.isfinite(out).all()
    assert out.abs().sum() > 0


def test_declared_arguments_are_in_the_call(case):
    """video_input and timestep_arg name tensor arguments; return_dict=False as the pipelines pass it, so the
    output is a tuple whose out_index leaf is the prediction."""
    kwargs = case.kwargs()
    assert isinstance(kwargs[case.video_input], torch.Tensor)
    assert isinstance(kwargs[case.timestep_arg], torch.Tensor)
    assert kwargs["return_dict"] is False
    with torch.no_grad():
        out = case.build()(**kwargs)
    assert isinstance(out, tuple) and isinstance(out[case.out_index], torch.Tensor)


def test_prediction_has_the_latent_layout(case):
    """The prediction has the video input's shape, or the declared ``extra["prediction_shape"]`` (Latte's
    learned variance, ConsisID's image-latent channels)."""
    expected = case.extra.get("prediction_shape", tuple(case.kwargs()[case.video_input].shape))
    assert tuple(_forward(case, case.build()).shape) == tuple(expected)


def test_deterministic_bit_for_bit(case):
    a = _forward(case, case.build())
    b = _forward(case, case.build())
    assert torch.equal(a, b)


def test_forward_within_budget(case):
    model = case.build()
    _forward(case, model)  # warm-up: first-call allocations and lazy imports
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        _forward(case, model)
        times.append(time.perf_counter() - t0)
    assert min(times) < BUDGET_S, f"{case.name}: {min(times):.3f}s"


def test_kinds_are_known_and_paths_exist(case):
    modules = dict(case.build().named_modules())
    for path, (kind, reason) in case.kinds.items():
        assert kind in KINDS, (path, kind)
        assert reason.strip(), path
        assert path in modules, f"{case.name}: {path} is not a module"


def test_kinds_cover_every_attention_and_feed_forward(case):
    """Every diffusers Attention / attention-module / FeedForward is either listed or inside a listed module."""
    listed = tuple(case.kinds)
    for path, module in case.build().named_modules():
        if _is_attention_or_ffn(module):
            assert path in case.kinds or path.startswith(tuple(p + "." for p in listed)), (
                f"{case.name}: {type(module).__name__} at {path} has no kind")


def test_every_listed_module_is_called(case):
    model = case.build()
    calls = {path: 0 for path in case.kinds}
    modules = dict(model.named_modules())

    def counter(path):
        def hook(module, args, output):
            calls[path] += 1
        return hook

    handles = [modules[p].register_forward_hook(counter(p)) for p in case.kinds]
    try:
        _forward(case, model)
    finally:
        for h in handles:
            h.remove()
    assert not [p for p, n in calls.items() if n == 0], f"{case.name}: never called"


def test_case_names_are_unique():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
