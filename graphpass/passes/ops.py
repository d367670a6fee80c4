"""The op taxonomy every pass shares: which aten ops only move data, which change only the dtype, which
split or join tensors, which multiply matrices and which are attention.

One home, so that counting FLOPs, tagging attention, walking residual streams and sharding a graph agree
on what an op is; a pass composes the sets it needs (e.g. ``LAYOUT | CASTS``) instead of listing ops again.

    >>> aten.permute.default in LAYOUT, aten.type_as.default in CASTS, aten.bmm.default in MATMUL
    (True, True, True)
    >>> aten.add.Tensor in ZERO_FLOP
    False
"""
from __future__ import annotations

import torch

aten = torch.ops.aten

#: Ops that change a tensor's shape by reinterpreting its elements in order (no data movement between them).
RESHAPES = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
                      aten.unflatten.int})
#: Ops that insert or drop a size-1 dim.
UNIT_DIMS = frozenset({aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default})
#: Ops that reorder dims.
PERMUTES = frozenset({aten.permute.default, aten.transpose.int, aten.t.default})
#: Ops whose result holds the same values in the same layout as their input (a copy, an alias, inference
#: dropout).
COPIES = frozenset({aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
                    aten.dropout.default, aten.lift_fresh_copy.default})
#: Ops that change at most the dtype (``type_as``'s second argument only supplies it).
CASTS = frozenset({aten.to.dtype, aten._to_copy.default, aten.type_as.default})
#: Ops that only re-lay out data: no arithmetic, every element of the output is an element of the input.
LAYOUT = RESHAPES | UNIT_DIMS | PERMUTES | COPIES | {aten.expand.default}
#: Ops returning several pieces of one tensor.
SPLITS = frozenset({aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int})
#: Ops returning one piece of a tensor.
SLICES = frozenset({aten.slice.Tensor, aten.select.int})
#: Ops joining or repeating tensors.
JOINS = frozenset({aten.cat.default, aten.stack.default, aten.repeat.default, aten.repeat_interleave.self_int})
#: Ops creating a tensor from sizes or an index table.
CONSTRUCTORS = frozenset({aten.arange.start, aten.arange.default, aten.zeros.default, aten.ones.default,
                          aten.full.default, aten.embedding.default})
#: Ops producing nothing the graph computes with (checks kept by the exporter).
CHECKS = frozenset({aten._assert_tensor_metadata.default})

#: Matrix products and convolutions: the ops whose FLOPs dominate a transformer.
MATMUL = frozenset({aten.linear.default, aten.mm.default, aten.addmm.default, aten.bmm.default, aten.matmul.default,
                    aten.baddbmm.default, aten.einsum.default, aten.conv1d.default, aten.conv2d.default,
                    aten.conv3d.default, aten.convolution.default})
#: Projections: a matrix product with a weight (the Q/K/V and output projections of attention).
LINEAR = frozenset({aten.linear.default, aten.addmm.default})
#: Products of two activations (attention written by hand: ``q @ k^T`` then ``p @ v``).
PRODUCTS = frozenset({aten.matmul.default, aten.bmm.default})
#: Fused attention as models call it (what tagging looks for).
SDPA = frozenset({aten.scaled_dot_product_attention.default})
#: Fused attention, also in its decomposed CPU kernel form.
ATTENTION = SDPA | {aten._scaled_dot_product_flash_attention_for_cpu.default}
SOFTMAX = frozenset({aten.softmax.int, aten._softmax.default, aten._safe_softmax.default})

#: Ops counted as free by the FLOP model (data movement only).
ZERO_FLOP = LAYOUT | {aten.to.dtype} | SPLITS | SLICES | JOINS | CONSTRUCTORS | CHECKS

__all__ = ["aten", "RESHAPES", "UNIT_DIMS", "PERMUTES", "COPIES", "CASTS", "LAYOUT", "SPLITS", "SLICES", "JOINS",
           "CONSTRUCTORS", "CHECKS", "MATMUL", "LINEAR", "PRODUCTS", "SDPA", "ATTENTION", "SOFTMAX", "ZERO_FLOP"]
