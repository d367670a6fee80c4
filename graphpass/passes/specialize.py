"""Rewrite a captured graph into the graph of one schedule phase.

For a :class:`~graphpass.schedules.Phase`:

* every *reused* region's exits are replaced by new inputs (the cached tensors, named ``cache_<path>_<i>``),
  so nothing of the region, nor anything only it needed, remains after dead-code elimination;
* every *stored* region's exits are appended to the graph outputs, after the model's own outputs;
* parameters are read from the captured module by attribute: phase graphs share weights with the model.

Worked example (a model whose only reused region is ``blocks.0.temporal_attn``)::

    >>> pg = specialize_phase(captured, regions, Phase.of({"blocks.0.temporal_attn": Action.REUSE}))
    >>> pg.cache_inputs, pg.cache_outputs
    (['blocks.0.temporal_attn:0'], [])
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.fx as fx

from ..errors import GraphpassError
from ..schedules.base import Action, Phase
from .capture import CapturedGraph
from .flops import graph_flops
from .tag import Region

aten = torch.ops.aten
# Ops export marks impure that are pure in inference: attention (dropout seed) and export's metadata asserts.
# Export's checks of what it assumed about sizes that depend on values (``nonzero``'s count >= 0, two such
# counts equal before a ``stack``) hold for every run of the model's code: an op whose sizes disagree raises
# by itself, as in eager. They go with the values they check.
_PURE_IN_INFERENCE = {aten.scaled_dot_product_attention.default, aten._assert_tensor_metadata.default,
                      aten.dropout.default, aten._assert_scalar.default,
                      aten.sym_constrain_range_for_size.default}


def is_impure(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _PURE_IN_INFERENCE:
        return False
    return node.is_impure()


def _schema_args(node: fx.Node):
    """(schema argument, value) pairs of an ATen call; empty for other nodes."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        return []
    return [(a, node.args[i] if i < len(node.args) else node.kwargs.get(a.name))
            for i, a in enumerate(schema.arguments)]


def _nodes_in(value) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(value, out.append)
    return out


def storage_bases(graph: fx.Graph) -> dict[fx.Node, frozenset[fx.Node]]:
    """For every node, the nodes whose freshly made tensors its result may share memory with.

    A view (``slice``, ``view``, ``transpose``; ``getitem`` of a ``split``) or an in-place op returns memory
    of its aliased argument; any other ATen op returns a new tensor (its own base). Ops without a schema are
    assumed to alias every input, which only keeps more alive.

        >>> # out = empty_like(x); s = slice(out, -1, 0, None, 2); copy_(s, y)
        >>> bases[s] == bases[out] == {out}
        True
    """
    bases: dict[fx.Node, frozenset[fx.Node]] = {}
    for n in graph.nodes:
        if n.op == "call_function" and n.target is operator.getitem:
            bases[n] = bases[n.args[0]] if isinstance(n.args[0], fx.Node) else frozenset([n])
            continue
        schema = getattr(n.target, "_schema", None)
        if n.op != "call_function" or schema is None:
            bases[n] = frozenset([n]).union(*(bases[a] for a in n.all_input_nodes))
            continue
        aliased = [m for a, v in _schema_args(n) if a.alias_info is not None for m in _nodes_in(v)]
        bases[n] = frozenset().union(*(bases[m] for m in aliased)) if aliased else frozenset([n])
    return bases


def _writes(node: fx.Node, bases) -> frozenset[fx.Node]:
    """The bases an in-place op writes into (``copy_(slice(out), y)`` writes into ``out``'s base)."""
    return frozenset().union(*(bases[m] for a, v in _schema_args(node)
                               if a.alias_info is not None and a.alias_info.is_write for m in _nodes_in(v)))


def in_place_writers(graph: fx.Graph) -> tuple[dict[fx.Node, frozenset[fx.Node]], dict[fx.Node, list[fx.Node]]]:
    """(:func:`storage_bases` of every node, the in-place writes into each base in graph order): whoever reads
    a tensor depends on the writes into its memory, although no graph edge says so."""
    bases = storage_bases(graph)
    writers: dict[fx.Node, list[fx.Node]] = {}
    for n in graph.nodes:
        for b in _writes(n, bases):
            writers.setdefault(b, []).append(n)
    return bases, writers


def live_nodes(graph: fx.Graph) -> set[fx.Node]:
    """The nodes the graph's outputs and side effects need, reading in-place writes by their memory.

    A write into a tensor the graph made itself (``out = empty_like(x); out[..., 0::2] = a``, exported as
    ``copy_`` into a ``slice`` of ``out``) is live only while some live node reads that memory; a write into
    an input or a parameter is always live (the caller sees it). Least fixpoint: a write is kept only when a
    kept reader needs it, so writes that only each other touch go together.

        >>> # out = empty_like(x); copy_(slice(out), a); copy_(slice(out), b); y = out.float(); return (z,)
        >>> # y is unused: y, both copies, both slices and out are dead (plain DCE keeps them: copy_ is impure)
    """
    bases, writers = in_place_writers(graph)
    written = {w for ws in writers.values() for w in ws}
    # writes into memory the graph did not make (or might not have made) are always live
    external = [w for b, ws in writers.items() if b.op != "call_function" for w in ws]
    roots = [n for n in graph.nodes if (n.op in ("placeholder", "output")
                                        or (n not in written and is_impure(n)))] + external
    live: set[fx.Node] = set()
    todo = list(roots)
    while todo:
        n = todo.pop()
        if n in live:
            continue
        live.add(n)
        for a in n.all_input_nodes:
            todo.append(a)
            for b in bases[a]:  # reading a tensor reads every write into its memory
                todo.extend(writers.get(b, ()))
    return live


def eliminate_dead_code(graph: fx.Graph) -> int:
    """Remove the nodes that neither the outputs nor a side effect need (see :func:`live_nodes`); returns how
    many were removed."""
    live = live_nodes(graph)
    dead = [n for n in graph.nodes if n not in live]
    for n in reversed(dead):
        graph.erase_node(n)
    return len(dead)


@dataclass
class PhaseGraph:
    """The graph of one phase. Inputs: the capture's inputs, then ``cache_inputs``; outputs: the capture's
    output leaves (``num_user_outputs``), then ``cache_outputs``."""

    phase: Phase
    gm: fx.GraphModule
    cache_inputs: list[str]
    cache_outputs: list[str]
    num_user_outputs: int
    flops: int

    @property
    def node_count(self) -> int:
        return sum(1 for n in self.gm.graph.nodes if n.op not in ("placeholder", "output"))

    def attention_ops(self) -> int:
        return sum(1 for n in self.gm.graph.nodes if n.op == "call_function"
                   and n.target == aten.scaled_dot_product_attention.default)


def written_through(node: fx.Node, ignore: frozenset[fx.Node] | set[fx.Node] = frozenset()) -> bool:
    """Whether an op (other than those in ``ignore``) writes in place to ``node``'s tensor, directly or
    through a view of it. Export keeps in-place ops (``a.mul_(gate)`` is ``aten.mul_``), so a cached tensor
    fed to one would be changed for every later step that reads it."""
    todo, seen = [node], {node}
    while todo:
        n = todo.pop()
        for user in n.users:
            if user.op == "call_function" and user.target is operator.getitem and user not in seen:
                seen.add(user)  # an element of split/unbind/chunk: a view
                todo.append(user)
                continue
            schema = getattr(user.target, "_schema", None)
            if user.op != "call_function" or schema is None:
                continue
            for i, arg in enumerate(schema.arguments):
                val = user.args[i] if i < len(user.args) else user.kwargs.get(arg.name)
                if val is n and arg.alias_info is not None and arg.alias_info.is_write and user not in ignore:
                    return True
            if any(r.alias_info is not None for r in schema.returns) and user not in seen:
                seen.add(user)  # a view of the tensor (or the tensor itself, returned by an in-place op)
                todo.append(user)
    return False


def _clone_before_first_user(graph: fx.Graph, node: fx.Node, users: set[fx.Node]) -> fx.Node:
    first = next(n for n in graph.nodes if n in users)
    with graph.inserting_before(first):
        copy = graph.call_function(aten.clone.default, (node,))
    copy.meta["val"] = node.meta.get("val")
    return copy


def copy_graph(gm: fx.GraphModule) -> tuple[fx.Graph, dict[str, fx.Node], list]:
    """A copy of ``gm``'s graph without its output node: (graph, copied node by original name, output
    values mapped onto the copy). Passes rewrite the copy and add their own output node."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    outputs = None
    for node in gm.graph.nodes:
        if node.op == "output":
            outputs = node.args[0]
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    return graph, {n.name: env[n] for n in gm.graph.nodes if n in env}, [
        fx.node.map_arg(o, lambda n: env[n]) for o in outputs]


def cache_input_name(key: str) -> str:
    return "cache_" + re.sub(r"\W", "_", key)


def specialize_phase(captured: CapturedGraph, regions: list[Region], phase: Phase, *,
                     passes: Sequence[Callable[[fx.Graph], object]] = ()) -> PhaseGraph:
    """``passes`` run on the rewritten graph after dead-code elimination and before the checks, for removals
    plain DCE cannot prove safe (e.g. :func:`~graphpass.passes.elide.elide_collectives`)."""
    src = captured.gm
    known = {r.path for r in regions}
    unknown = {p for p, _ in phase.actions} - known
    if unknown:  # requires: the phase speaks only of regions of this graph
        raise GraphpassError(f"phase names regions the graph does not have: {sorted(unknown)}")

    graph, by_name, user_outputs = copy_graph(src)
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]

    cache_inputs: list[str] = []
    replaced: dict[fx.Node, fx.Node] = {}
    for r in regions:
        if phase.action(r.path) != Action.REUSE:
            continue
        inside = {by_name[n] for n in r.nodes}
        for key, exit_name in zip(r.cache_keys, r.exits):
            old = by_name[exit_name]
            with graph.inserting_after(last_input):
                ph = graph.placeholder(cache_input_name(key))
            ph.meta["val"] = old.meta.get("val")
            ph.meta["graphpass_cache_key"] = key
            last_input = ph
            old.replace_all_uses_with(ph, delete_user_cb=lambda user: user not in inside)
            if written_through(ph):  # the cached tensor must stay as stored: the graph mutates a copy
                users = set(ph.users)
                copy = _clone_before_first_user(graph, ph, users)
                ph.replace_all_uses_with(copy, delete_user_cb=lambda user: user in users)
            replaced[old] = ph
            cache_inputs.append(key)

    outs = [fx.node.map_arg(o, lambda n: replaced.get(n, n)) for o in user_outputs]
    cache_outputs: list[str] = []
    for r in regions:
        if phase.action(r.path) == Action.STORE:
            inside = {by_name[n] for n in r.nodes}
            for e in r.exits:
                node = by_name[e]
                if written_through(node, ignore=inside):
                    # store the value the region produced, before the block changes it in place
                    node = _clone_before_first_user(graph, node, set(node.users) - inside)
                outs.append(node)
            cache_outputs.extend(r.cache_keys)
    graph.output(tuple(outs))
    eliminate_dead_code(graph)
    for extra in passes:
        extra(graph)

    # ensures: nothing of a reused region survives (it would mean the region was not cut at its exits)
    alive = set(graph.nodes)
    for r in regions:
        if phase.action(r.path) == Action.REUSE:
            left = [n for n in r.nodes if by_name[n] in alive]
            if left:
                raise GraphpassError(f"reused region {r.path} still has live nodes {left[:3]} after rewriting")
    graph.lint()
    gm = fx.GraphModule(src, graph, class_name="PhaseGraph")
    return PhaseGraph(phase=phase, gm=gm, cache_inputs=cache_inputs, cache_outputs=cache_outputs,
                      num_user_outputs=len(user_outputs), flops=graph_flops(gm))
