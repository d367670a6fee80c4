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

import re
from dataclasses import dataclass

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
    """Remove nodes whose results nobody reads; returns how many were removed."""
    before = len(graph.nodes)
    graph.eliminate_dead_code(is_impure_node=is_impure)
    return before - len(graph.nodes)


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


def cache_input_name(key: str) -> str:
    return "cache_" + re.sub(r"\W", "_", key)


def specialise_phase(captured: CapturedGraph, regions: list[Region], phase: Phase) -> PhaseGraph:
    src = captured.gm
    known = {r.path for r in regions}
    unknown = {p for p, _ in phase.actions} - known
    if unknown:  # requires: the phase speaks only of regions of this graph
        raise GraphpassError(f"phase names regions the graph does not have: {sorted(unknown)}")

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    user_outputs = None
    for node in src.graph.nodes:
        if node.op == "output":
            user_outputs = node.args[0]
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    by_name = {n.name: env[n] for n in src.graph.nodes if n in env}
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
            replaced[old] = ph
            cache_inputs.append(key)

    outs = [fx.node.map_arg(o, lambda n: replaced.get(env[n], env[n])) for o in user_outputs]
    cache_outputs: list[str] = []
    for r in regions:
        if phase.action(r.path) == Action.STORE:
            outs.extend(by_name[e] for e in r.exits)
            cache_outputs.extend(r.cache_keys)
    graph.output(tuple(outs))
    eliminate_dead_code(graph)

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
