"""Reusing the new kinds and the attention written without SDPA: graphpass against the module-level
reference PAB (tests/reference_pab.py) over a 20-step loop, and what vanishes from the phase graphs."""
from __future__ import annotations

import functools
from collections import Counter

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import graphpass
import tiny_video_dits as dits
from conftest import run_loop
from graphpass import PAB
from graphpass.passes.capture import module_path
from graphpass.passes.flops import node_flops
from graphpass.passes.specialize import specialize_phase
from graphpass.passes.tag import tag_attention
from graphpass.runtime.executor import OptimizedModel
from graphpass.schedules.base import Action, Phase
from handwritten_models import HAND_KINDS, build_hand, hand_kwargs
from reference_pab import ReferencePAB

TOL = 1e-5
STEPS = [float(t) for t in range(951, 0, -50)]  # 20 steps, 951 ... 1: enters and leaves the window
aten = torch.ops.aten


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


_OPTIMIZED: dict[str, graphpass.OptimizedModel] = {}


def _optimized(name: str, build, kwargs, schedule: PAB) -> graphpass.OptimizedModel:
    """``graphpass.optimize`` of the model ``build`` makes, once per module and name (the first call's
    arguments stand): only the reference comparisons run it; the graph tests read its capture."""
    if name not in _OPTIMIZED:
        _OPTIMIZED[name] = graphpass.optimize(build(), schedule, example_kwargs=kwargs())
    return _OPTIMIZED[name]


def _against_reference(name, build, kwargs, modules: dict[str, str], schedule: PAB):
    """Outputs of graphpass and of the reference PAB (same seeded weights) over STEPS, eager outputs, the
    reference, and the optimized model."""
    kw = kwargs()
    ref = ReferencePAB(build(), modules, {k: schedule.range_of(k) for k in set(modules.values())},
                       window=schedule.window)
    ref_outs = run_loop(ref, kw, STEPS)
    eager = run_loop(build(), kw, STEPS)
    opt = _optimized(name, build, kwargs, schedule)
    got = run_loop(opt, kw, STEPS)
    return got, ref_outs, eager, ref, opt


def _check_trace(opt, ref):
    for i, (_, phase) in enumerate(opt.state().trace):
        assert set(phase.reused) == {p for p, reused in ref.steps[i].items() if reused}, f"step {i}"


#: Every kind of the hand-written model reused (text included: the schedule names it).
HAND_SCHEDULE = PAB(spatial=2, temporal=3, cross=4, joint=2, mlp=3, text=2)


def test_hand_written_attention_reuse_matches_reference():
    """Every kind of the hand-written model, text included because the schedule names it."""
    modules = {p: k for p, (k, _) in HAND_KINDS.items()}
    got, ref_outs, eager, ref, opt = _against_reference("hand", build_hand, hand_kwargs, modules, HAND_SCHEDULE)
    assert _max_diff(got, ref_outs) <= TOL
    assert _max_diff(got, eager) > 1e-4  # reuse changed the result
    assert ref.reused["text"] > 0 and ref.reused["joint"] > 0
    _check_trace(opt, ref)


def test_presets_never_reuse_text_or_other(hand_capture):
    """The published and family presets leave the refiner (text) computing at every step. One capture
    serves the three presets (what ``graphpass.optimize`` builds on it, without hoisting, which decides
    nothing about reuse)."""
    model, cap = hand_capture
    regions = tag_attention(cap)
    kw = hand_kwargs()
    for name in ("pab246", "latte", "open-sora"):
        opt = OptimizedModel(model, cap, regions, PAB.preset(name))
        run_loop(opt, kw, STEPS)
        reused = {p for _, ph in opt.state().trace for p in ph.reused}
        assert reused and "refiner" not in reused, name
    for name in ("wan", "hunyuanvideo", "ltx2", "mochi", "sana-video", "allegro", "ltx-video", "skyreels-v2"):
        assert not PAB.preset(name).kinds() & {"text", "other"}, name


@pytest.fixture(scope="module")
def hand_capture():
    """(a fresh hand-written model, the capture of the reference comparison's optimized model)."""
    return build_hand(), _optimized("hand", build_hand, hand_kwargs, HAND_SCHEDULE).captured


def test_hand_written_attention_kinds(hand_capture):
    """Module by module against the kinds read from the code (HAND_KINDS says why); no SDPA in the graph."""
    _, cap = hand_capture
    assert not any(n.target == aten.scaled_dot_product_attention.default for n in cap.gm.graph.nodes)
    regions = {r.path: r for r in tag_attention(cap)}
    assert {p: r.kind for p, r in regions.items()} == {p: k for p, (k, _) in HAND_KINDS.items()}
    forms = {p: r.form for p, r in regions.items() if r.kind != "mlp"}
    assert forms["blocks.0.spatial_attn"] == forms["blocks.0.temporal_attn"] == forms["refiner"] == "softmax"
    assert forms["blocks.0.linear_attn"] == forms["blocks.1.linear_attn"] == "linear"
    # the bmm attention reads (B*16*heads, 3, d) tensors; its layout is recovered as (B*16, heads, 3, d)
    assert regions["blocks.0.temporal_attn"].attention_shape == (2 * 16, 2, 3, 8)
    for r in regions.values():
        assert not r.reason.startswith("by name"), r


def _ops_under(gm, path):
    """Tensor ops recorded under ``path`` (size arithmetic of a batch-free capture reads shapes, not data,
    and belongs to no region)."""
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function"
                   and any(p == path for p, _ in module_path(n))
                   and not isinstance(n.meta.get("val"), (int, torch.SymInt)))


def test_reused_linear_and_bmm_attention_vanish_from_the_phase_graph(hand_capture):
    _, cap = hand_capture
    regions = tag_attention(cap)
    reused = ["blocks.0.linear_attn", "blocks.0.temporal_attn", "blocks.1.spatial_attn"]
    pg = specialize_phase(cap, regions, Phase.of({p: Action.REUSE for p in reused}))
    full = Counter(n.target for n in cap.gm.graph.nodes if n.op == "call_function")
    left = Counter(n.target for n in pg.gm.graph.nodes if n.op == "call_function")
    for p in reused:
        assert _ops_under(cap.gm, p) and not _ops_under(pg.gm, p), p
    # LinearAttention.forward: 3 matmuls (K^T V, Q . sum K, Q (K^T V)) and 2 relus; MatmulAttention: 2 matmuls
    # and a softmax; BmmAttention: 2 bmms and a softmax
    assert full[aten.matmul.default] - left[aten.matmul.default] == 3 + 2
    assert full[aten.relu.default] - left[aten.relu.default] == 2
    assert full[aten.bmm.default] - left[aten.bmm.default] == 2
    assert full[aten._softmax.default] + full[aten.softmax.int] - left[aten._softmax.default] \
        - left[aten.softmax.int] == 2


def test_linear_attention_region_counts_its_products(hand_capture):
    """The region's matrix-product FLOPs equal torch's FlopCounterMode on one eager call of the module."""
    model, cap = hand_capture
    region = next(r for r in tag_attention(cap) if r.path == "blocks.1.linear_attn")
    seen = {}
    module = model.blocks[1].linear_attn
    handle = module.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(**hand_kwargs())
    handle.remove()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(seen["x"])
    products = {aten.matmul.default, aten.bmm.default, aten.linear.default, aten.addmm.default, aten.mm.default}
    nodes = {n.name: n for n in cap.gm.graph.nodes}
    assert sum(node_flops(nodes[n]) for n in region.nodes if nodes[n].target in products) \
        == counter.get_total_flops()
    assert region.flops > counter.get_total_flops()  # plus the elementwise ops (relu, sum, division)


@functools.lru_cache(maxsize=None)
def _diffusers_case(name: str):
    """(build, kwargs) of a model of ``tiny_video_dits``: ``build()`` gives a fresh model of the same seeded
    weights; both are the same objects at every call, so ``_optimized`` builds once per name."""
    make = getattr(dits, name)
    return (lambda: make()[0]), make()[1]


#: The reference comparison's schedule of each diffusers model: every new kind the model has, reused.
NEW_KINDS = {"hunyuan_video": PAB(joint=2, text=2), "ltx2": PAB(joint=2, cross=4, other=2),
             "sana_video": PAB(joint=2, cross=3)}


@pytest.mark.parametrize("name, modules, schedule", [
    ("hunyuan_video", dits.HUNYUAN_KINDS, NEW_KINDS["hunyuan_video"]),
    ("ltx2", dits.LTX2_KINDS, NEW_KINDS["ltx2"]),
    ("sana_video", dits.SANA_KINDS, NEW_KINDS["sana_video"]),
])
def test_new_kinds_on_diffusers_models_match_reference(name, modules, schedule):
    got, ref_outs, eager, ref, opt = _against_reference(name, *_diffusers_case(name), modules, schedule)
    assert _max_diff(got, ref_outs) <= TOL
    assert _max_diff(got, eager) > 1e-5
    for kind in schedule.kinds():
        assert ref.reused[kind] > 0, kind
    _check_trace(opt, ref)


def test_sana_linear_attention_region_vanishes_with_its_rotary_writes():
    """SanaLinearAttnProcessor3_0 writes its rotary embedding into ``empty_like`` buffers in place (two
    writes for the queries, two for the keys: ``slice_scatter`` once captured) and multiplies three times
    (the normaliser K-sum . Q, V K^T, then (V K^T) Q). Reusing the region removes all of it."""
    opt = _optimized("sana_video", *_diffusers_case("sana_video"), NEW_KINDS["sana_video"])
    cap, regions = opt.captured, tag_attention(opt.captured)  # the regions as tagged, before any schedule
    path = "transformer_blocks.0.attn1"
    pg = specialize_phase(cap, regions, Phase.of({path: Action.REUSE}))
    full = Counter(n.target for n in cap.gm.graph.nodes if n.op == "call_function")
    left = Counter(n.target for n in pg.gm.graph.nodes if n.op == "call_function")
    write = aten.slice_scatter.default
    assert _ops_under(cap.gm, path)[write] == 4 and not _ops_under(pg.gm, path)
    assert full[write] - left[write] == 4
    assert full[aten.matmul.default] - left[aten.matmul.default] == 3
    assert full[aten.empty_like.default] - left[aten.empty_like.default] == 2
    region = next(r for r in regions if r.path == path)
    # the phase graph's FLOPs drop by at least the region's (more when an input of the region, such as its
    # modulated norm, had no other reader), and the region's count holds its three products
    assert pg.flops <= sum(node_flops(n) for n in cap.gm.graph.nodes) - region.flops
    products = [n for n in cap.gm.graph.nodes if n.name in set(region.nodes) and n.target == aten.matmul.default]
    assert len(products) == 3 and region.flops > sum(node_flops(n) for n in products) > 0
