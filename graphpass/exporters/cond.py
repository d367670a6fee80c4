"""One graph for every phase: each switchable region becomes ``cond(reuse, cached, compute)``.

The single-file export layout. Starting from the captured graph, every region that some phase of the plan
reuses is cut out into its own subgraph and replaced by a :class:`RegionSwitch`::

    exits = cond(reuse_flag, lambda *a: tuple(c.clone() for c in cached), region_subgraph, operands)

so the graph takes, after the model's inputs, one boolean ``reuse.<path>`` per switchable region and the
cached tensors of those regions (``cache.<key>``), and returns, after the model's outputs, every
switchable region's exits (``cache.<key>.next``): the runtime keeps those the phase stores. ``cond`` (the
operator behind ``torch.cond``) exports to ONNX ``If`` (TensorRT ``IIfConditional``), so only the chosen
branch runs.

    >>> sw = build_switch_graph(opt.captured, opt.regions, opt.current_plan)
    >>> sw.switch_paths[:2]
    ['blocks.0.spatial_attn', 'blocks.0.temporal_attn']
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._higher_order_ops.cond import cond_op

from ..errors import GraphpassError
from ..passes.capture import CapturedGraph
from ..passes.specialize import eliminate_dead_code
from ..passes.tag import Region
from ..schedules.base import Plan


class RegionSwitch(torch.nn.Module):
    """Runs a region's subgraph, or returns clones of its cached exits, depending on a boolean tensor.

    Call: ``switch(reuse, *cached_exits, *region_inputs)`` -> tuple of the region's exits.

    The ``cond`` operator is called directly, with the body's weights as operands, rather than through
    ``torch.cond``: outside a compiler, ``torch.cond`` hands each branch to Dynamo to check it (seconds per
    region when torch.export traces the graph), and lifts the weights the branch reads into operands; our
    branches are FX graphs already, so tracing them as they are gives the same ``cond`` node without Dynamo.

        >>> switch = RegionSwitch(body, num_exits=1)          # body: x -> (x @ w,)
        >>> switch(torch.tensor(True), cached, x)[0].equal(cached)
        True
    """

    def __init__(self, body: fx.GraphModule, num_exits: int):
        super().__init__()
        self.body = body
        self.num_exits = num_exits
        # every tensor the body reads from itself: passed as operands, as a branch may not close over tensors
        self.weight_names = [t for t in dict.fromkeys(n.target for n in body.graph.nodes if n.op == "get_attr")
                             if isinstance(_fetch(body, t), torch.Tensor)]

    def forward(self, reuse: torch.Tensor, *operands: torch.Tensor):
        n, k = self.num_exits, len(self.weight_names)
        weights = tuple(_fetch(self.body, name) for name in self.weight_names)

        def reuse_fn(*ops):
            return tuple(c.clone() for c in ops[k:k + n])  # a branch may not alias its inputs

        def compute_fn(*ops):
            return tuple(torch.func.functional_call(self.body, dict(zip(self.weight_names, ops[:k])), ops[k + n:]))

        return cond_op(reuse, reuse_fn, compute_fn, weights + tuple(operands))


@dataclass
class SwitchGraph:
    """gm: inputs = the capture's inputs, one bool per ``switch_paths``, the tensors of ``cache_keys``;
    outputs = the capture's output leaves, then the tensors of ``cache_keys`` (recomputed or cloned)."""

    gm: fx.GraphModule
    switch_paths: list[str]
    cache_keys: list[str]
    num_user_outputs: int


def _region_body(src: fx.GraphModule, nodes: list[fx.Node], exits: list[fx.Node]) -> tuple[fx.GraphModule,
                                                                                          list[fx.Node]]:
    """The region as a GraphModule over its external (non-attribute) inputs; returns it and those inputs."""
    inside = set(nodes)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    ext: list[fx.Node] = []

    def arg(n: fx.Node) -> fx.Node | int | float | bool:
        if n in env:
            return env[n]
        val = n.meta.get("val")
        if isinstance(val, (int, float, bool)):  # a size the capture fixed (shapes are static): a constant of
            return val                           # the body, since torch.cond takes tensor operands only
        if n.op == "get_attr":  # weights stay attributes of the body
            env[n] = graph.node_copy(n)
        else:
            env[n] = graph.placeholder(f"in_{len(ext)}")
            env[n].meta["val"] = n.meta.get("val")
            ext.append(n)
        return env[n]

    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside:
                arg(a)
        env[n] = graph.node_copy(n, lambda a: env[a] if a in env else arg(a))
    graph.output(tuple(env[e] for e in exits))
    eliminate_dead_code(graph)
    graph.lint()
    return fx.GraphModule(src, graph, class_name="RegionBody"), ext


def build_switch_graph(captured: CapturedGraph, regions: list[Region], plan: Plan) -> SwitchGraph:
    """Replace every region that some phase of ``plan`` reuses by a :class:`RegionSwitch`."""
    src = captured.gm
    reused = {p for ph in plan.distinct() for p in ph.reused}
    switched = [r for r in regions if r.path in reused]
    if not switched:
        raise GraphpassError("the plan reuses no region: a single-file export would be the plain model; export "
                             "per phase (single_file=False) or use a schedule whose window covers the timesteps")
    by_name = {n.name: n for n in src.graph.nodes}
    owner: dict[fx.Node, Region] = {}
    for r in switched:
        for name in r.nodes:
            owner[by_name[name]] = r

    attrs: dict[str, object] = {}  # qualified name -> module or tensor, for the new GraphModule
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = [n for n in src.graph.nodes if n.op == "placeholder"]
    for n in placeholders:
        env[n] = graph.node_copy(n)
    flags = [graph.placeholder(f"reuse_{i}") for i in range(len(switched))]
    caches: list[list[fx.Node]] = []
    for i, r in enumerate(switched):
        row = []
        for j, spec in enumerate(r.exit_specs):
            ph = graph.placeholder(f"cache_{i}_{j}")
            ph.meta["val"] = torch.empty(spec.shape, dtype=spec.dtype, device="meta")
            row.append(ph)
        caches.append(row)

    # Region bodies and their external inputs, emitted as soon as every external input exists.
    pending = []
    for i, r in enumerate(switched):
        nodes = [by_name[n] for n in r.nodes]
        exits = [by_name[e] for e in r.exits]
        body, ext = _region_body(src, nodes, exits)
        name = f"graphpass_switch_{i}"
        attrs[name] = RegionSwitch(body, len(exits))
        pending.append((i, name, exits, ext))
    emitted: set[int] = set()

    def flush():
        for i, name, exits, ext in pending:
            if i in emitted or not all(a in env for a in ext):
                continue
            call = graph.call_module(name, (flags[i], *caches[i], *(env[a] for a in ext)))
            for j, e in enumerate(exits):
                env[e] = graph.call_function(operator.getitem, (call, j))
                env[e].meta["val"] = e.meta.get("val")
            emitted.add(i)

    outputs = None
    for n in src.graph.nodes:
        if n.op == "placeholder":
            continue
        flush()
        if n.op == "output":
            outputs = n.args[0]
            break
        if n in owner:
            continue
        for a in n.all_input_nodes:
            if a not in env:
                r = owner.get(a)
                raise GraphpassError(f"region {r.path if r else a.name} is not convex: node {n.name} outside it reads "
                                     f"{a.name} before all of the region's inputs exist; it cannot become one switch")
        env[n] = graph.node_copy(n, lambda a: env[a])
    if len(emitted) != len(switched):
        raise GraphpassError("some switchable regions never had all their inputs available")
    user = [fx.node.map_arg(o, lambda a: env[a]) for o in outputs]
    exits_out = [env[by_name[e]] for r in switched for e in r.exits]
    graph.output(tuple(user + exits_out))
    for n in graph.nodes:
        if n.op == "get_attr":
            attrs[n.target] = _fetch(src, n.target)
    gm = fx.GraphModule(attrs, graph, class_name="SwitchGraph")
    eliminate_dead_code(gm.graph)  # needs the owning module: call_module purity is checked on it
    gm.graph.lint()
    gm.recompile()
    return SwitchGraph(gm=gm, switch_paths=[r.path for r in switched],
                       cache_keys=[k for r in switched for k in r.cache_keys], num_user_outputs=len(outputs))


def _fetch(mod: torch.nn.Module, target: str):
    for part in target.split("."):
        mod = getattr(mod, part)
    return mod
