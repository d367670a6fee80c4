"""Graph rewrites applied to a phase graph before ONNX export: ops whose ONNX lowering is wrong or
does not run, replaced by equivalent ops that lower well.

Each rule is data (:class:`Rewrite`): the ATen ops it looks at (``pattern``), a ``check`` on one node
(is this node one the lowering gets wrong?) and a ``rewrite`` that replaces it, in place, by ops that
compute the same values bit for bit. :func:`rewrite_for_onnx` applies every rule to a copy of the graph
(the phase graph itself keeps serving eager calls) and returns how often each rule fired.

    >>> gm2, fired = rewrite_for_onnx(pg.gm)
    >>> fired
    {'keep-tiny-constant': 2, 'bool-where-as-uint8': 0, 'drop-noop-squeeze': 0}

The rules, and the model code that needs them:

* ``keep-tiny-constant``: ``1 / (k @ q + 1e-15)`` (SANA-Video's linear attention). The exporter's
  optimizer removes ``Add(x, c)`` as a no-op when ``c`` is a scalar within 1e-8 of 0 (and likewise
  ``Sub``; ``Mul``/``Div`` by a scalar within 1e-5 relative of 1), so a row of zeros divides by 0 and
  the output turns NaN under ONNX Runtime. The scalar becomes a one-element tensor, which those
  optimizer rules do not match.
* ``bool-where-as-uint8``: ``mask.masked_fill(idx, False)`` on a boolean mask (HunyuanVideo's text
  mask) lowers to ``Where`` on booleans, which ONNX Runtime's CPU provider does not implement. The
  select runs on uint8 and is cast back.
* ``drop-noop-squeeze``: ``x.squeeze(1)`` where dimension 1 is not of size 1 is a no-op in PyTorch but an
  error in ONNX's ``Squeeze`` (Allegro, LTX-2). Such dimensions are dropped from the op (the op
  itself when none is left).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

aten = torch.ops.aten

#: Tolerances of the exporter optimizer's no-op rules (onnxscript ``rewriter.rules.common._no_op``, whose
#: constant patterns match with ``math.isclose(rel_tol=1e-5, abs_tol=1e-8)``).
NOOP_REL_TOL = 1e-5
NOOP_ABS_TOL = 1e-8


@dataclass(frozen=True)
class Rewrite:
    """One rule: nodes calling an op of ``pattern`` for which ``check(node)`` holds are replaced by
    ``rewrite(graph, node)`` (which inserts the new nodes and redirects the node's users)."""

    name: str
    pattern: frozenset
    check: Callable[[fx.Node], bool]
    rewrite: Callable[[fx.Graph, fx.Node], None]
    why: str


def _val(a) -> torch.Tensor | None:
    """The example value (``meta["val"]``) of an FX argument, if it is a tensor node."""
    v = a.meta.get("val") if isinstance(a, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _replace(graph: fx.Graph, node: fx.Node, new: fx.Node) -> None:
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


# --- keep-tiny-constant -----------------------------------------------------------------------------
#: op -> the scalar value the optimizer treats as the identity of that op.
_IDENTITY = {aten.add.Tensor: 0.0, aten.sub.Tensor: 0.0, aten.mul.Tensor: 1.0, aten.div.Tensor: 1.0}


def _tiny_scalar_at(node: fx.Node) -> int | None:
    """Position of a float scalar operand that the optimizer would take for the op's identity without being
    it (``x + 1e-15``; ``x * (1 + 1e-7)``), next to a floating tensor of rank >= 1; else None.

    >>> # add(x, 1e-15) -> 1;  add(x, 1e-3) -> None;  add(x, 0.0) -> None (a real no-op)
    """
    ident = _IDENTITY[node.target]
    positions = (1,) if node.target in (aten.sub.Tensor, aten.div.Tensor) else (1, 0)
    for pos in positions:
        c, other = node.args[pos], node.args[1 - pos]
        t = _val(other)
        if (isinstance(c, float) and not isinstance(c, bool) and t is not None and t.is_floating_point()
                and t.dim() >= 1 and c != ident
                and math.isclose(c, ident, rel_tol=NOOP_REL_TOL, abs_tol=NOOP_ABS_TOL)):
            return pos
    return None


def _keep_tiny_constant(graph: fx.Graph, node: fx.Node) -> None:
    pos = _tiny_scalar_at(node)
    t = _val(node.args[1 - pos])
    with graph.inserting_before(node):
        # new_full: the tensor's dtype and device, whatever device the graph runs on
        const = graph.call_function(aten.new_full.default, (node.args[1 - pos], [1], node.args[pos]))
        const.meta["val"] = t.new_full([1], node.args[pos])
    args = list(node.args)
    args[pos] = const
    node.args = tuple(args)


# --- bool-where-as-uint8 -----------------------------------------------------------------------------
_SELECTS = frozenset({aten.where.self, aten.masked_fill.Scalar, aten.masked_fill.Tensor})


def _selects_bools(node: fx.Node) -> bool:
    out = _val(node)
    return out is not None and out.dtype == torch.bool


def _bool_where_as_uint8(graph: fx.Graph, node: fx.Node) -> None:
    """``where(c, a, b)`` -> ``where(c, a.to(u8), b.to(u8)).to(bool)``; ``masked_fill(x, m, v)`` likewise with
    ``x`` (and a tensor ``v``) cast. The condition/mask stays boolean."""
    def u8(a):
        if not isinstance(a, fx.Node):
            return int(bool(a))
        n = graph.call_function(aten._to_copy.default, (a,), {"dtype": torch.uint8})
        n.meta["val"] = _val(a).to(torch.uint8)
        return n

    with graph.inserting_before(node):
        if node.target == aten.where.self:
            args = (node.args[0], u8(node.args[1]), u8(node.args[2]))
        else:
            args = (u8(node.args[0]), node.args[1], u8(node.args[2]))
        sel = graph.call_function(node.target, args)
        sel.meta["val"] = _val(node).to(torch.uint8)
        back = graph.call_function(aten._to_copy.default, (sel,), {"dtype": torch.bool})
    _replace(graph, node, back)


# --- drop-noop-squeeze -----------------------------------------------------------------------------
def _squeezed_dims(node: fx.Node) -> list[int]:
    """The dims a ``squeeze.dim``/``squeeze.dims`` node names, made non-negative."""
    rank = _val(node.args[0]).dim()
    dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
    return [d % rank if rank else 0 for d in dims]


def _has_noop_squeeze(node: fx.Node) -> bool:
    x = _val(node.args[0])
    if x is None or x.dim() == 0:
        return False
    return any(isinstance(x.shape[d], int) and x.shape[d] != 1 for d in _squeezed_dims(node))


def _drop_noop_squeeze(graph: fx.Graph, node: fx.Node) -> None:
    x = _val(node.args[0])
    keep = [d for d in _squeezed_dims(node) if not (isinstance(x.shape[d], int) and x.shape[d] != 1)]
    if not keep:
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
        return
    with graph.inserting_before(node):
        new = graph.call_function(aten.squeeze.dims, (node.args[0], keep))
    _replace(graph, node, new)


RULES: tuple[Rewrite, ...] = (
    Rewrite("keep-tiny-constant", frozenset(_IDENTITY), lambda n: _tiny_scalar_at(n) is not None,
            _keep_tiny_constant,
            "the exporter's optimizer drops Add/Sub of a scalar within 1e-8 of 0 (Mul/Div within 1e-5 of 1) as a "
            "no-op; 1 / (x + 1e-15) then divides by zero"),
    Rewrite("bool-where-as-uint8", _SELECTS, _selects_bools, _bool_where_as_uint8,
            "ONNX Runtime (CPU) has no Where kernel for booleans"),
    Rewrite("drop-noop-squeeze", frozenset({aten.squeeze.dim, aten.squeeze.dims}), _has_noop_squeeze,
            _drop_noop_squeeze,
            "ONNX Squeeze fails on a dimension whose size is not 1, where torch.squeeze leaves it"),
)


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with a copy of ``gm``'s graph and the same parameters and buffers (not copied)."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph)


def apply_rewrites(gm: fx.GraphModule, rules: tuple[Rewrite, ...] | None = None) -> dict[str, int]:
    """Apply ``rules`` (default: :data:`RULES`, read at the call) to ``gm`` in place, one pass per rule in
    order; returns how often each fired."""
    rules = RULES if rules is None else rules
    fired = {r.name: 0 for r in rules}
    for rule in rules:
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target in rule.pattern and rule.check(node):
                rule.rewrite(gm.graph, node)
                fired[rule.name] += 1
    if any(fired.values()):
        gm.graph.lint()
        gm.recompile()
    return fired


def rewrite_for_onnx(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, int]]:
    """A copy of ``gm`` (sharing its weights) with every rule of :data:`RULES` applied, and the counts.

    >>> gm2, fired = rewrite_for_onnx(phase.gm)      # phase.gm is left as it was
    """
    out = copy_graph_module(gm)
    return out, apply_rewrites(out)


# --- ops that do not lower -------------------------------------------------------------------------
_NO_LOWERING = re.compile(r"No ONNX function found for <OpOverload\(op='([\w.]+)', overload='(\w+)'\)>\.?"
                          r"(?: Failure message: ([^\n]*))?")


def _is_complex(a) -> bool:
    v = _val(a)
    return v is not None and v.is_complex()


def _where(node: fx.Node) -> str:
    """``module path (Type)`` of a node, from the capture's module stack; ``top level`` outside any module."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "the top level of the model"
    path, t = list(stack.values())[-1]
    tname = t if isinstance(t, str) else t.__qualname__
    return f"module {path or '<root>'} ({tname.rsplit('.', 1)[-1]})"


def unlowered_op_error(gm: torch.nn.Module, e: BaseException) -> str | None:
    """If exporting ``gm`` failed because an op has no ONNX lowering, a message naming the op, the module that
    calls it and what to do; else None. Reads the exporter's dispatch error from ``e``'s cause chain.

    >>> unlowered_op_error(gm, err)
    "aten.linalg_qr.default has no ONNX lowering (called in module motion_encoder (WanAnimateMotionEncoder)); ..."
    """
    chain, c = [], e
    while c is not None and len(chain) < 8:
        chain.append(str(c))
        c = c.__cause__ or c.__context__
    found = next((m for m in (_NO_LOWERING.search(s) for s in chain) if m), None)
    if found is None:
        return None
    op, overload, reason = found.group(1), found.group(2), (found.group(3) or "").strip()
    complex_input = "complex" in reason
    target = f"{op}.{overload}"
    graph_nodes = gm.graph.nodes if isinstance(gm, fx.GraphModule) else ()
    nodes = [n for n in graph_nodes if n.op == "call_function" and str(n.target) == target
             and (not complex_input or any(_is_complex(a) for a in n.args))]
    where = f" (called in {_where(nodes[0])})" if nodes else ""
    if complex_input:
        return (f"{target} on a complex tensor has no ONNX lowering{where}: ONNX has no complex tensors. Export a "
                f"model whose rotary embeddings use real cos/sin tables, or serve it with graphpass.optimize "
                f"(eager or inductor)")
    return (f"{target} has no ONNX lowering{where}. Export a model without this op (or with the op replaced by "
            f"one ONNX has), or serve it with graphpass.optimize (eager or inductor)")
