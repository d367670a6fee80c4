"""FLOP counting from the shapes recorded on captured nodes (meta["val"]); nothing is run.

Matrix products count 2*M*N*K, attention 4*B*H*Lq*Lk*D (QK^T and PV), convolutions 2*out*(Cin/groups)*kernel,
and every other op one FLOP per output element (so reshapes and views count nothing).

>>> graph_flops(captured.gm)            # whole graph
>>> node_flops(node)                    # one node
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from .ops import ATTENTION, ZERO_FLOP, aten



def _shape(x) -> tuple[int, ...] | None:
    v = x.meta.get("val") if isinstance(x, fx.Node) else x
    if isinstance(v, torch.Tensor):
        return tuple(int(s) for s in v.shape)
    return None


def node_flops(node: fx.Node) -> int:
    if node.op != "call_function":
        return 0
    t = node.target
    if t in ZERO_FLOP:
        return 0
    if t == aten.linear.default:
        x, w = _shape(node.args[0]), _shape(node.args[1])
        return 2 * math.prod(x[:-1]) * x[-1] * w[0]
    if t in (aten.mm.default, aten.addmm.default):
        a, b = (node.args[0], node.args[1]) if t == aten.mm.default else (node.args[1], node.args[2])
        a, b = _shape(a), _shape(b)
        return 2 * a[0] * a[1] * b[1]
    if t in (aten.bmm.default, aten.matmul.default, aten.baddbmm.default):
        out = _shape(node)
        a = _shape(node.args[1] if t == aten.baddbmm.default else node.args[0])
        return 2 * math.prod(out) * a[-1]
    if t in ATTENTION:
        q, k = _shape(node.args[0]), _shape(node.args[1])
        return 4 * math.prod(q[:-1]) * k[-2] * q[-1]
    if t in (aten.conv2d.default, aten.conv3d.default, aten.conv1d.default, aten.convolution.default):
        out, w = _shape(node), _shape(node.args[1])
        return 2 * math.prod(out) * math.prod(w[1:])  # w[1] is already Cin / groups
    if t == aten.einsum.default:
        eq = node.args[0].replace(" ", "")
        ins, _ = eq.split("->")
        sizes: dict[str, int] = {}
        for spec, arg in zip(ins.split(","), node.args[1]):
            for ch, s in zip(spec, _shape(arg) or ()):
                sizes[ch] = s
        return 2 * math.prod(sizes.values())
    out = _shape(node)
    return math.prod(out) if out is not None else 0


def graph_flops(gm: fx.GraphModule) -> int:
    return sum(node_flops(n) for n in gm.graph.nodes)
