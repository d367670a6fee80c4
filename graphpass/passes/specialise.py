"""Rewrite a captured graph into the graph of one schedule phase.

For a :class:`~graphpass.schedules.Phase`:

* every *reused* region's exits are replaced by new inputs (the cached tensors, named ``cache_<path>_<i>``),
  so nothing of the region, nor anything only it needed, remains after dead-code elimination;
* every *stored* region's exits are appended to the graph outputs, after the model's own outputs;
* parameters are read from the captured module by attribute: phase graphs share weights with the model.

Worked example (a model whose only reused region is ``blocks.0.temporal_attn``)::

    >>> pg = specialise_phase(captured, regions, Phase.of({"blocks.0.temporal_attn": Action.REUSE}))
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
_PURE_IN_INFERENCE = {aten.scaled_dot_product_attention.default, aten._assert_tensor_metadata.default,
                      aten.dropout.default}


def is_impure(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _PURE_IN_INFERENCE:
        return False
    return node.is_impure()


def eliminate_dead_code(graph: fx.Graph) -> int:
    """Remove nodes whose results nobody reads, and scratch buffers written in place that nobody reads
    (:func:`dead_scratch`); returns how many were removed."""
    before = len(graph.nodes)
    while True:
        graph.eliminate_dead_code(is_impure_node=is_impure)
        dead = dead_scratch(graph)
        if not dead:
            return before - len(graph.nodes)
        for n in reversed([n for n in graph.nodes if n in dead]):
            graph.erase_node(n)


# Fresh allocations: a write into one (or into a view of one) changes no tensor anyone else holds.
_FRESH = {aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
          aten.empty.memory_format, aten.zeros.default, aten.ones.default, aten.full.default}


def _writes(node: fx.Node, target: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        return False
    return any(a.alias_info is not None and a.alias_info.is_write and i < len(node.args) and node.args[i] is target
               for i, a in enumerate(schema.arguments))


def _is_view_of(node: fx.Node, target: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return (node.op == "call_function" and schema is not None and bool(node.args) and node.args[0] is target
            and not _writes(node, target) and any(r.alias_info is not None for r in schema.returns))


def dead_scratch(graph: fx.Graph) -> set[fx.Node]:
    """Fresh buffers that are only viewed and written in place, never read, with those views and writes.

    Export keeps in-place writes (``out[..., 0::2] = x`` is ``aten.copy_`` into a slice of an ``empty_like``),
    and plain DCE keeps every write. Once whatever read the buffer is gone (e.g. a reused region's rotary
    embedding), the buffer and its writes are dead too.
    """
    dead: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op != "call_function" or n.target not in _FRESH:
            continue
        group, todo, read = {n}, [n], False
        while todo and not read:
            x = todo.pop()
            for u in x.users:
                if u in group:
                    continue
                if _is_view_of(u, x):
                    group.add(u)
                    todo.append(u)
                elif _writes(u, x) and not u.users:
                    group.add(u)
                else:
                    read = True
                    break
        if not read:
            dead |= group
    return dead


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


def specialise_phase(captured: CapturedGraph, regions: list[Region], phase: Phase, *,
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
