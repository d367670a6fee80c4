"""In-place writes inside attention: dead-code elimination reads writes by the memory they touch.

Wan applies rotary embeddings with ``out = torch.empty_like(x); out[..., 0::2] = ...``; export keeps the
writes (``copy_`` into slices of ``out``). When the attention is reused, nothing reads ``out`` any more, so
its writes are dead and the region must vanish from the phase graph. Writes that someone still reads, and
writes into inputs or parameters, stay.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from graphpass import PAB
from graphpass.passes.capture import capture
from graphpass.passes.specialise import eliminate_dead_code
from capture_helpers import WAN_MODULES, check_never_reusing, check_pab_reference, wan

aten = torch.ops.aten


class Rope(nn.Module):
    """Writes its result into a fresh tensor, like Wan's rotary embedding; ``keep`` adds a write into a
    buffer (state the caller sees)."""

    def __init__(self, keep: bool = False):
        super().__init__()
        self.keep = keep
        self.register_buffer("count", torch.zeros(1))

    def forward(self, x, y):
        out = torch.empty_like(x)
        out[..., 0::2] = x[..., 0::2] * 2
        out[..., 1::2] = x[..., 1::2] * 3
        if self.keep:
            self.count.add_(1)
        return y + 1, out.sum()


def _graph(keep: bool) -> fx.Graph:
    x, y = torch.randn(2, 4), torch.randn(3)
    gm = capture(Rope(keep), dict(x=x, y=y)).gm
    return gm


def _ops(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_dead_writes_go_with_their_tensor():
    gm = _graph(keep=False)
    assert _ops(gm).count(aten.copy_.default) == 2
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((out.args[0][0],),)  # drop the reader of `out`: its writes are now dead
    eliminate_dead_code(gm.graph)
    gm.recompile()
    assert _ops(gm) == [aten.add.Tensor]
    x, y = torch.randn(2, 4), torch.randn(3)
    assert torch.equal(gm(x, y)[0], y + 1)


def test_read_writes_and_state_writes_stay():
    gm = _graph(keep=False)
    eliminate_dead_code(gm.graph)  # `out` is read by the sum: both writes stay
    gm.recompile()
    assert _ops(gm).count(aten.copy_.default) == 2
    x, y = torch.randn(2, 4), torch.randn(3)
    want = x[..., 0::2].sum() * 2 + x[..., 1::2].sum() * 3
    assert torch.allclose(gm(x, y)[1], want)

    gm = _graph(keep=True)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((out.args[0][0],),)
    eliminate_dead_code(gm.graph)
    assert _ops(gm).count(aten.add_.Tensor) == 1  # the buffer's update is seen by the caller
    assert aten.copy_.default not in _ops(gm)


def test_wan_captures_and_never_reusing_equals_eager():
    check_never_reusing(wan(), PAB(joint=2, cross=3, mlp=3, window=(2000, 3000)))


def test_wan_pab_matches_reference():
    opt = check_pab_reference(wan(), WAN_MODULES, PAB(joint=2, cross=4, mlp=3, window=(100, 800)))
    reused = {p for _, ph in opt.state().trace for p in ph.reused}
    assert {"blocks.0.attn1", "blocks.1.attn1"} <= reused
    # The phase that reuses every joint attention runs none of their rotary writes.
    ph = next(ph for _, ph in opt.state().trace if {"blocks.0.attn1", "blocks.1.attn1"} <= set(ph.reused))
    pg = opt.phase_graph(ph)
    assert pg.attention_ops() == sum(1 for p, k in WAN_MODULES.items() if k == "cross" and p not in ph.reused)
    assert not any(n.target == aten.copy_.default for n in pg.gm.graph.nodes)
