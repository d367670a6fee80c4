"""The residual passes: finding the chain of blocks, the metric site, the metric formulas and the phase graphs."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from adacache_helpers import captured
from graphpass import ScheduleError, TaggingError
from graphpass.passes.residuals import (find_block_span, find_metric_site, region_residual,
                                        residual_stats, specialize_residual_phase)
from graphpass.schedules.adacache import ResidualPhase
from graphpass.schedules.base import Action, Phase


@pytest.fixture(params=["vdt", "latte"])
def captured_case(request):
    return captured(request.param)


def test_metric_formula_on_known_tensors():
    prev = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.5, 0.0]])
    now = torch.tensor([[1.0, -1.0, 1.0], [0.5, 0.5, 0.0]])
    stats = residual_stats(now, prev, batch=2)
    # sample 0: |0| + |1| + |-2| = 3 over |1| + |2| + |3| = 6; sample 1 unchanged
    assert stats.shape == (1, 2)
    assert stats[0].tolist() == pytest.approx([0.5, 0.0])
    # a zero cached residual: equal -> 0, different -> huge (reuse only when nothing changed)
    z = torch.zeros(1, 4)
    assert residual_stats(z, z, batch=1).item() == 0.0
    assert residual_stats(torch.ones(1, 4), z, batch=1).item() > 1e30


def test_motion_formula_on_known_tensors():
    # one sample, frames on axis 1: frame values 0, 1, 1 (two elements each)
    r = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]])
    stats = residual_stats(r, r, batch=1, frame_layout=(1, 3, 2), strides=(1,))
    # |f1 - f0| + |f2 - f1| = 2 over (|f1| + |f2|) + (|f0| + |f1|) = 4 + 2
    assert stats[1].item() == pytest.approx(2 / 6)
    # stride 2 compares frames 2 and 0: 2 / (2 + 0); the score averages the strides
    stats = residual_stats(r, r, batch=1, frame_layout=(1, 3, 2), strides=(1, 2))
    assert stats[1].item() == pytest.approx((2 / 6 + 2 / 2) / 2)
    assert stats[0].item() == 0.0


def test_span_covers_every_block(captured_case):
    case, cap, regions = captured_case
    span = find_block_span(cap, regions)
    if case.name == "vdt":
        assert span.blocks == ["blocks.0", "blocks.1"]
    else:  # spatial and temporal blocks alternate; the chain starts and ends in the spatial layout (B*F, T, D)
        assert span.blocks == ["transformer_blocks.0", "temporal_transformer_blocks.0", "transformer_blocks.1",
                               "temporal_transformer_blocks.1"]
        assert span.spec.shape == (2 * 3, 16, 16)
    nodes = {n.name: n for n in cap.gm.graph.nodes}
    assert nodes[span.input].meta["val"].shape == nodes[span.output].meta["val"].shape


def test_metric_site_default_and_errors(captured_case):
    case, cap, regions = captured_case
    span = find_block_span(cap, regions)
    site = find_metric_site(cap, span, regions, None, video_batch=2, frames=3 if case.name == "latte" else 4)
    # published default: the temporal attention of the middle block, measured after its gate
    want = "blocks.0.temporal_attn" if case.name == "vdt" else "temporal_transformer_blocks.0.attn1"
    assert (site.path, site.kind) == (want, "region")
    node = {n.name: n for n in cap.gm.graph.nodes}[site.node]
    assert node.target == torch.ops.aten.mul.Tensor  # gate * attention output
    assert site.frame_layout is not None and site.frame_layout[1] == (3 if case.name == "latte" else 4)
    blk = find_metric_site(cap, span, regions, 1, video_batch=2, frames=None)
    assert (blk.path, blk.kind) == (span.blocks[1], "block")
    with pytest.raises(ScheduleError, match="names no block or region"):
        find_metric_site(cap, span, regions, "blocks.9.nothing", video_batch=2, frames=None)
    with pytest.raises(ScheduleError, match="chain has"):
        find_metric_site(cap, span, regions, 17, video_batch=2, frames=None)


def test_phase_graphs(captured_case):
    case, cap, regions = captured_case
    span = find_block_span(cap, regions)
    site = find_metric_site(cap, span, regions, None, video_batch=2, frames=3 if case.name == "latte" else 4)
    flat = cap.flatten_call(case.kwargs())
    want = cap.gm(*flat)
    store = specialize_residual_phase(cap, span, ResidualPhase(Phase.of({span.path: Action.STORE}).actions, "store"),
                                      site)
    outs = store.gm(*flat)
    assert store.cache_outputs == [span.residual_key, site.residual_key]
    torch.testing.assert_close(outs[0], want[0], rtol=0, atol=0)
    reuse = specialize_residual_phase(cap, span, Phase.of({span.path: Action.REUSE}))
    assert reuse.cache_inputs == [span.residual_key] and reuse.attention_ops() == 0
    # the same inputs and their own residual give the same output with the blocks skipped
    torch.testing.assert_close(reuse.gm(*flat, outs[1])[0], want[0], rtol=1e-6, atol=1e-6)
    # what a reuse step still runs: everything outside the blocks plus one add
    full = specialize_residual_phase(cap, span, Phase())
    assert reuse.flops <= full.flops - span.flops + math.prod(span.spec.shape)
    measure = specialize_residual_phase(
        cap, span, ResidualPhase(Phase.of({span.path: Action.STORE}).actions, "measure"), site, strides=(1,))
    assert measure.cache_inputs == [site.residual_key]
    m = measure.gm(*flat, outs[2] * 2)  # cached residual twice the current one: distance 1/2
    assert m[-1].shape == (2, 2)
    torch.testing.assert_close(m[-1][0], torch.full((2,), 0.5))


def test_region_residual_of_a_joint_region_is_its_video_part():
    _, cap, regions = captured("cogvideox")
    joint = next(r for r in regions if r.kind == "joint")  # returns (video, text): 48 and 5 tokens
    node = region_residual(cap.gm, joint)
    assert node.target == torch.ops.aten.mul.Tensor and tuple(node.meta["val"].shape) == (2, 48, 16)
    # a region whose output reaches no add is refused, naming the block to measure on instead
    _, cap, regions = captured("vdt")
    temporal = next(r for r in regions if r.path == "blocks.0.temporal_attn")
    video_input = next(n for n in cap.gm.graph.nodes if n.op == "placeholder")  # patch-embedded, never added
    with pytest.raises(TaggingError, match="measure on its block instead"):
        region_residual(cap.gm, dataclasses.replace(temporal, exits=[video_input.name]))


class _FillsABuffer(torch.nn.Module):
    """Wan's rotary pattern: a buffer from ``empty_like`` filled in place, half by half, then read; and an
    in-place write into the input, which the caller sees."""

    def forward(self, x, y):
        buf = torch.empty_like(x)
        buf[:, 0::2] = x[:, 0::2] * 2
        buf[:, 1::2] = x[:, 1::2] * 3
        y[:, :1] = 0.0
        return buf + 1, x * 5


def _writes_left(graph) -> int:
    """In-place ops (``copy_``, ``fill_``): their schema marks the first argument as written."""
    infos = [n.target._schema.arguments[0].alias_info for n in graph.nodes
             if isinstance(n.target, torch._ops.OpOverload) and n.target._schema.arguments]
    return sum(info is not None and info.is_write for info in infos)


