"""Sanity checks of the hunyuan_ltx zoo cases (of the zoo itself, not of graphpass).

For each case: it builds and runs eagerly to a finite output; two builds give the same output bit for bit; one
forward stays within the time budget on one thread; every ``kinds`` path exists in ``model.named_modules()``; every
path in ``kinds`` is really called during the forward (forward hooks); and every attention or feed-forward module
the forward calls is listed in ``kinds``, so the table is complete.

    cd /work/wt/zoo-hy && python -m pytest tests/zoo/test_cases_hunyuan_ltx.py -q
"""
from __future__ import annotations

import time
import warnings

import pytest
import torch

from zoo import ZooCase
from zoo.hunyuan_ltx import CASES

torch.set_num_threads(1)

#: One eager forward must take well under a second on one thread; the best of 3 must stay under this.
FORWARD_BUDGET_S = 0.25
KINDS = {"spatial", "temporal", "cross", "joint", "mlp", "text", "other"}


def _leaf(case: ZooCase, out) -> torch.Tensor:
    return out[case.out_index] if isinstance(out, (tuple, list)) else out


def _run(case: ZooCase, model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Kandinsky 6 SR warns that flex attention runs eagerly
        return _leaf(case, model(**case.kwargs()))


def _is_region_module(module: torch.nn.Module) -> bool:
    """Attention or feed-forward modules by class name (``Attention``, ``LTXAttention``, ``MochiAttentionPool``,
    ``FeedForward``, ``Kandinsky5FeedForward``...): the modules ``kinds`` must cover when called."""
    name = type(module).__name__.lower()
    return "attention" in name or name.endswith("feedforward")


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request) -> ZooCase:
    return request.param


def test_names_unique_and_kinds_valid(case):
    assert [c.name for c in CASES].count(case.name) == 1
    bad = {p: k for p, (k, _) in case.kinds.items() if k not in KINDS}
    assert not bad, f"unknown kinds {bad}"
    assert all(reason.strip() for _, reason in case.kinds.values())
    assert type(case.build()).__name__ == case.cls


def test_runs_eager_finite(case):
    out = _run(case, case.build())
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.abs().sum() > 0


def test_deterministic_two_builds(case):
    a, b = _run(case, case.build()), _run(case, case.build())
    assert torch.equal(a, b), f"{case.name}: two builds differ by {(a - b).abs().max():.3g}"


def test_forward_time_budget(case):
    model = case.build()
    _run(case, model)  # warm-up
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        _run(case, model)
        times.append(time.perf_counter() - t0)
    assert min(times) < FORWARD_BUDGET_S, f"{case.name}: forward {min(times) * 1e3:.0f} ms"


def test_kinds_paths_exist(case):
    modules = dict(case.build().named_modules())
    missing = [p for p in case.kinds if p not in modules]
    assert not missing, f"{case.name}: kinds paths not in named_modules(): {missing}"


def test_kinds_paths_called_and_complete(case):
    """Every path in kinds runs in the forward, and every attention/feed-forward module that runs is in kinds."""
    model = case.build()
    called: set[str] = set()
    handles = [m.register_forward_hook(lambda mod, args, out, p=p: called.add(p))
               for p, m in model.named_modules() if p in case.kinds or _is_region_module(m)]
    try:
        _run(case, model)
    finally:
        for h in handles:
            h.remove()
    not_called = sorted(set(case.kinds) - called)
    assert not not_called, f"{case.name}: kinds paths never called: {not_called}"
    unlisted = sorted(called - set(case.kinds))
    assert not unlisted, f"{case.name}: called attention/feed-forward modules missing from kinds: {unlisted}"
