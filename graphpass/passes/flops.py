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

aten = torch.ops.aten

_FREE = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
         aten.transpose.int, aten.t.default, aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default,
         aten.flatten.using_ints, aten.slice.Tensor, aten.select.int, aten.chunk.default, aten.split.Tensor,
         aten.unbind.int, aten.contiguous.default, aten.clone.default, aten.detach.default, aten.alias.default,
         aten._assert_tensor_metadata.default, aten.to.dtype, aten.dropout.default, aten.unflatten.int,
         aten.split_with_sizes.default, aten.cat.default, aten.stack.default, aten.repeat.default,
         aten.repeat_interleave.self_int, aten.arange.start, aten.arange.default, aten.lift_fresh_copy.default,
         aten.embedding.default, aten.zeros.default, aten.ones.default, aten.full.default}


def _shape(x) -> tuple[int, ...] | None:
    v = x.meta.get("val") if isinstance(x, fx.Node) else x
    if isinstance(v, torch.Tensor):
        return tuple(int(s) for s in v.shape)
    return None


def node_flops(node: fx.Node) -> int:
    if node.op != "call_function":
        return 0
    t = node.target
    if t in _FREE:
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
    if t in (aten.scaled_dot_product_attention.default, aten._scaled_dot_product_flash_attention_for_cpu.default):
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
