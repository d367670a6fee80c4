"""Residual caching passes: skip the whole chain of transformer blocks on reuse steps (AdaCache).

A DiT's blocks form a chain on one hidden state: ``h_out = blocks(h_in)``. On a *compute* step the graph
also emits the span's residual ``R = h_out - h_in``; on a *reuse* step the blocks are cut out and
``h_out = h_in + R_cached``: embedders, conditioning and the final layer still run, every block is one add.

Granularity: ONE pre-summed residual for the whole span. Because the blocks chain, ``h_out - h_in`` is the
telescoping sum of every block's residual (block output - block input), which is the sum of the reference
implementation's per-block attention and cross-attention+MLP residuals; caching it pre-summed makes a reuse
step a single add instead of one add per block. Ops between blocks that do not depend on the step (Latte's
frame/token re-layout and its temporal position embedding) are folded into ``R`` as well.

Finding the span (structure, not names):

* a *block* is the module owning attention regions whose path ends in an index: ``blocks.3`` for
  ``blocks.3.temporal_attn``, ``temporal_transformer_blocks.0`` for ``temporal_transformer_blocks.0.attn1``;
* a block's *stream input* is the outside node its output reaches through the skip connection (a chain of
  ``add`` nodes) with the output's shape; chaining backwards from the last block gives the span input ``h_in``
  (the first block's stream input);
* the span output ``h_out`` is the last block's output, followed through re-layout ops until it has
  ``h_in``'s shape again (Latte's temporal blocks work on ``(B*tokens, F, D)``, its spatial ones on
  ``(B*F, tokens, D)``).

The distance metric of AdaCache is measured on one *metric residual*: a block's residual (``out - in``) or
an attention/MLP region's residual (what the region adds to the hidden state, gate included), found by
following the region's output to the ``add`` that joins it to the skip connection.

>>> span = find_block_span(captured, regions)          # vdt-tiny: two blocks on (B, F, tokens, D)
>>> span.blocks, span.input, span.output, span.path
(['blocks.0', 'blocks.1'], 'add_1', 'add_26', 'blocks.0..blocks.1')
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from ..errors import GraphpassError, ScheduleError, TaggingError
from ..schedules.base import Action, Phase
from .capture import CapturedGraph, TensorSpec, module_path
from .flops import graph_flops, node_flops
from .specialise import PhaseGraph, cache_input_name, copy_graph, eliminate_dead_code, specialise_phase
from .tag import Region

aten = torch.ops.aten

#: Ops that only re-lay out a tensor (no arithmetic); the stream may pass through them between blocks.
_LAYOUT = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
           aten.transpose.int, aten.clone.default, aten.contiguous.default, aten.squeeze.dim, aten.squeeze.default,
           aten.unsqueeze.default, aten.flatten.using_ints, aten.alias.default, aten.to.dtype, aten.dropout.default}
#: Ops a region's output may pass through before it is added to the hidden state (gate, rescale, re-layout).
_TO_RESIDUAL = _LAYOUT | {aten.mul.Tensor, aten.div.Tensor}
_ADD = {aten.add.Tensor}

#: What a reuse step adds (see :class:`graphpass.schedules.adacache.AdaCache` ``cache_unit``).
CACHE_UNITS = ("residual", "outputs")
#: Metric modes of a residual phase (see :class:`graphpass.schedules.adacache.ResidualPhase`).
METRIC_MODES = ("none", "store", "measure")


def block_of(path: str) -> str | None:
    """The block owning a region path: the prefix up to its first numeric component
    (``blocks.3.temporal_attn`` -> ``blocks.3``); None when the region is in no numbered block."""
    m = re.match(r"^(.*?\.\d+)(?=\.)", path)
    return m[1] if m else None


@dataclass
class BlockSpan:
    """The chain of transformer blocks that a reuse step replaces by one add.

    blocks: block module paths in graph order.
    input: name of the node holding the hidden state entering the first block (``h_in``).
    output: name of the node holding the hidden state after the last block, in ``h_in``'s layout (``h_out``).
    block_io: per block, the (stream input, stream output) node names.
    nodes: names of the nodes that depend on ``h_in`` and feed ``h_out``: what a reuse step skips.
    spec: shape and dtype of the hidden state (and of the cached residual).
    flops: FLOPs of the nodes inside the blocks.
    region: the span as a :class:`Region` (path ``"<first block>..<last block>"``, kind ``"blocks"``, one
        cache key: the pre-summed residual), which is what the runtime's cache and plans refer to.
    """

    blocks: list[str]
    input: str
    output: str
    block_io: dict[str, tuple[str, str]]
    nodes: list[str]
    spec: TensorSpec
    flops: int
    region: Region
    inner: list[Region]

    @property
    def path(self) -> str:
        return self.region.path

    @property
    def residual_key(self) -> str:
        return self.region.cache_keys[0]

    def as_region(self, unit: str = "residual") -> Region:
        """The span as the region the runtime caches: for ``unit="residual"`` one exit (the pre-summed
        residual, key ``<span>:0``); for ``unit="outputs"`` the exits of every attention/MLP region inside the
        blocks, in graph order (keys ``<span>:0..K-1``)."""
        if unit == "residual":
            return self.region
        if unit != "outputs":
            raise GraphpassError(f"unknown cache unit {unit!r}; one of {CACHE_UNITS}")
        exits = [e for r in self.inner for e in r.exits]
        specs = [s for r in self.inner for s in r.exit_specs]
        return Region(path=self.path, module_type="blocks", kind="blocks", nodes=self.region.nodes, exits=exits,
                      exit_specs=specs, flops=sum(r.flops for r in self.inner),
                      reason=f"outputs of the {len(self.inner)} attention/MLP regions of {len(self.blocks)} blocks, "
                             f"re-gated on reuse")

    def inner_keys(self) -> dict[str, str]:
        """Cache key of each inner region exit (``<region>:<i>``) -> the span's key for it (unit "outputs")."""
        keys = [k for r in self.inner for k in r.cache_keys]
        return {k: f"{self.path}:{j}" for j, k in enumerate(keys)}


@dataclass
class MetricSite:
    """Where AdaCache measures: the residual compared between compute steps.

    path: the block or region path (``blocks.1`` or ``blocks.1.temporal_attn``).
    kind: ``"block"`` (the block's output - its input) or ``"region"`` (what the region adds to the hidden
        state: its output after the gate, as in the reference implementation).
    node: for ``"region"``, the name of the node holding that residual.
    block_io: for ``"block"``, the (stream input, stream output) node names of the block.
    spec: shape and dtype of the residual.
    batch: the video batch (distances are per sample: the residual's first dim is ``batch`` or a multiple of
        it, sample-major).
    frame_layout: ``(X, F, Y)`` such that each sample's residual reshapes to ``(X, F, Y)`` with frames on the
        middle axis (for the MoReg frame differences), or None when the frame axis is unknown.
    """

    path: str
    kind: str
    node: str | None
    block_io: tuple[str, str] | None
    spec: TensorSpec
    batch: int
    frame_layout: tuple[int, int, int] | None

    @property
    def residual_key(self) -> str:
        return f"{self.path}:residual"

    @property
    def stats_key(self) -> str:
        return f"{self.path}:stats"


# --- finding the span -----------------------------------------------------------------------------------
def _val(node: fx.Node):
    return node.meta.get("val")


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    v = _val(node)
    return tuple(int(s) for s in v.shape) if isinstance(v, torch.Tensor) else None


def _block_nodes(gm: fx.GraphModule, block: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if any(p == block for p, _ in module_path(n))]


def _skip_inputs(out: fx.Node, inside: set[fx.Node]) -> list[fx.Node]:
    """Outside nodes that ``out`` reaches backwards through adds and re-layouts (the skip connection)."""
    found, seen, todo = [], set(), [out]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n not in inside:
            found.append(n)
            continue
        if n.op == "call_function" and (n.target in _ADD or n.target in _LAYOUT):
            todo.extend(a for a in n.args if isinstance(a, fx.Node))
    return found


def _stream_input(block: str, out: fx.Node, inside: set[fx.Node]) -> fx.Node:
    cands = [n for n in _skip_inputs(out, inside) if _shape(n) == _shape(out)]
    if len(cands) != 1:
        raise TaggingError(f"cannot find the hidden state entering block {block}: its output {out.name} "
                           f"{_shape(out)} is reached through its skip connection from "
                           f"{[c.name for c in cands] or 'no outside node'} of that shape. Residual caching needs "
                           f"blocks of the form x -> x + f(x).")
    return cands[0]


def _reaching_exit(start: fx.Node, exits: set[fx.Node]) -> fx.Node | None:
    """The block exit that ``start`` derives from through re-layouts and adds (between two blocks)."""
    seen, todo, hits = set(), [start], []
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in exits:
            hits.append(n)
            continue
        if n.op == "call_function" and (n.target in _LAYOUT or n.target in _ADD):
            todo.extend(a for a in n.args if isinstance(a, fx.Node))
    return hits[0] if len(hits) == 1 else None


def find_block_span(captured: CapturedGraph, regions: Sequence[Region]) -> BlockSpan:
    """The chain of transformer blocks of ``captured`` (see the module docstring)."""
    gm = captured.gm
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    name_order = {n.name: i for n, i in order.items()}
    blocks: dict[str, None] = {}
    for r in sorted(regions, key=lambda r: name_order[r.nodes[0]]):
        b = block_of(r.path)
        if b is not None:
            blocks.setdefault(b, None)
    if not blocks:  # requires: blocks to cache
        raise TaggingError(f"no transformer blocks in {captured.model_type}: none of its attention regions "
                           f"({', '.join(r.path for r in regions) or 'none'}) sits in a numbered module such as "
                           f"blocks.3; residual caching skips whole blocks")
    members = {b: _block_nodes(gm, b) for b in blocks}
    paths = sorted(blocks, key=lambda b: order[members[b][0]])

    exits_of = {}
    for b in paths:
        inside = set(members[b])
        exits_of[b] = [n for n in members[b] if any(u not in inside for u in n.users)]

    last = paths[-1]
    if len(exits_of[last]) != 1:
        raise TaggingError(f"the last block {last} has {len(exits_of[last])} outputs used after it "
                           f"({[n.name for n in exits_of[last]]}); residual caching needs one hidden state "
                           f"leaving the chain of blocks")
    out = exits_of[last][0]
    block_io: dict[str, tuple[str, str]] = {}
    for k in range(len(paths) - 1, -1, -1):
        b = paths[k]
        inside = set(members[b])
        x = _stream_input(b, out, inside)
        block_io[b] = (x.name, out.name)
        if k == 0:
            break
        prev = paths[k - 1]
        out = _reaching_exit(x, set(exits_of[prev]))
        if out is None:
            raise TaggingError(f"block {b}'s hidden state {x.name} does not come from block {prev} through "
                               f"re-layouts and adds only; residual caching needs the blocks to form one chain")
    h_in = x
    # h_out: the last block's output, back in h_in's layout.
    h_out = next(n for n in gm.graph.nodes if n.name == block_io[last][1])
    while _shape(h_out) != _shape(h_in):
        users = list(h_out.users)
        if len(users) != 1 or users[0].op != "call_function" or users[0].target not in _LAYOUT:
            raise TaggingError(f"the hidden state after the last block {last} ({_shape(h_out)}) does not return "
                               f"to the shape of the first block's input {_shape(h_in)} through re-layouts")
        h_out = users[0]

    # The span: nodes depending on h_in that feed h_out.
    after: set[fx.Node] = {h_in}
    for n in gm.graph.nodes:
        if n is not h_in and any(a in after for a in n.all_input_nodes):
            after.add(n)
    before: set[fx.Node] = {h_out}
    for n in reversed(gm.graph.nodes):
        if n in before:
            before.update(n.all_input_nodes)
    span_nodes = [n for n in gm.graph.nodes if n in after and n in before and n is not h_in]
    span_set = set(span_nodes)
    leaks = [n.name for n in span_nodes if n is not h_out and any(
        u not in span_set and u.target != aten._assert_tensor_metadata.default for u in n.users)]
    if leaks:
        raise TaggingError(f"values computed inside the blocks are used after them ({leaks[:3]}); residual caching "
                           f"needs the blocks' only output to be the hidden state {h_out.name}")
    block_flops = sum(node_flops(n) for b in paths for n in members[b])
    v = _val(h_in)
    spec = TensorSpec(tuple(int(s) for s in v.shape), v.dtype)
    path = f"{paths[0]}..{paths[-1]}" if len(paths) > 1 else paths[0]
    region = Region(path=path, module_type="blocks", kind="blocks", nodes=[n.name for n in span_nodes],
                    exits=[h_out.name], exit_specs=[spec], flops=block_flops,
                    reason=f"chain of {len(paths)} blocks from {h_in.name} to {h_out.name}; cached as one "
                           f"pre-summed residual")
    inner = [r for r in regions if block_of(r.path) in block_io]
    return BlockSpan(blocks=paths, input=h_in.name, output=h_out.name, block_io=block_io,
                     nodes=[n.name for n in span_nodes], spec=spec, flops=block_flops, region=region, inner=inner)


# --- the metric site ------------------------------------------------------------------------------------
def region_residual(gm: fx.GraphModule, region: Region) -> fx.Node:
    """The node a region adds to the hidden state: its output followed through gate multiplies, rescales and
    re-layouts up to the ``add`` joining the skip connection."""
    if len(region.exits) != 1:
        raise TaggingError(f"region {region.path} has {len(region.exits)} outputs; measure on its block instead "
                           f"(metric_at={block_of(region.path)!r})")
    cur = next(n for n in gm.graph.nodes if n.name == region.exits[0])
    for _ in range(12):
        users = list(cur.users)
        if len(users) != 1:
            break
        u = users[0]
        if u.op == "call_function" and u.target in _ADD:
            return cur
        if u.op != "call_function" or u.target not in _TO_RESIDUAL:
            break
        cur = u
    raise TaggingError(f"cannot follow region {region.path}'s output to the add that joins it to the hidden "
                       f"state (stopped at {cur.name}); measure on its block instead "
                       f"(metric_at={block_of(region.path)!r})")


def _frame_layout(shape: tuple[int, ...], batch: int, frames: int | None) -> tuple[int, int, int] | None:
    """(X, F, Y) with X*F*Y = one sample's elements and frames on the middle axis, or None: the first axis of
    one sample's residual whose size is the frame count, else the first axis that folds frames (frame-major)
    with tokens, like the reference's ``(B, F*S, C)``."""
    if frames is None or not shape or shape[0] % batch:
        return None
    per = (shape[0] // batch, *shape[1:])
    numel = 1
    for d in per:
        numel *= d
    for fold in (False, True):
        x = 1
        for s in per:
            if (s == frames) if not fold else (s > frames and s % frames == 0):
                return (x, frames, numel // (x * frames))
            x *= s
    return None


def find_metric_site(captured: CapturedGraph, span: BlockSpan, regions: Sequence[Region],
                     metric_at: str | int | None, *, video_batch: int, frames: int | None) -> MetricSite:
    """Resolve ``metric_at`` (None: the published default, the temporal-attention residual of the middle
    block, else the middle block's residual; an int: the block at that position of the chain; a string: a
    block path or an attention/MLP region path)."""
    gm = captured.gm
    by_path = {r.path: r for r in regions}
    if metric_at is None:
        temporal = [r for r in regions if r.kind == "temporal" and block_of(r.path) in span.block_io]
        metric_at = temporal[(len(temporal) - 1) // 2].path if temporal else span.blocks[(len(span.blocks) - 1) // 2]
    if isinstance(metric_at, int) and not isinstance(metric_at, bool):
        if not 0 <= metric_at < len(span.blocks):
            raise ScheduleError(f"metric_at={metric_at}: the chain has {len(span.blocks)} blocks "
                                 f"(0..{len(span.blocks) - 1}: {', '.join(span.blocks)})")
        metric_at = span.blocks[metric_at]
    if metric_at in span.block_io:
        x, o = span.block_io[metric_at]
        v = _val(next(n for n in gm.graph.nodes if n.name == o))
        spec = TensorSpec(tuple(int(s) for s in v.shape), v.dtype)
        return MetricSite(metric_at, "block", None, (x, o), spec, video_batch,
                          _frame_layout(spec.shape, video_batch, frames))
    if metric_at in by_path:
        node = region_residual(gm, by_path[metric_at])
        v = _val(node)
        spec = TensorSpec(tuple(int(s) for s in v.shape), v.dtype)
        if block_of(metric_at) not in span.block_io:
            raise ScheduleError(f"metric_at={metric_at!r} is not inside the chain of blocks {span.path}")
        return MetricSite(metric_at, "region", node.name, None, spec, video_batch,
                          _frame_layout(spec.shape, video_batch, frames))
    raise ScheduleError(f"metric_at={metric_at!r} names no block or region of {captured.model_type}; blocks: "
                         f"{', '.join(span.blocks)} (or their position 0..{len(span.blocks) - 1}); regions: "
                         f"{', '.join(r.path for r in regions if block_of(r.path) in span.block_io)}")


# --- graph building -------------------------------------------------------------------------------------
def residual_stats(r_now: torch.Tensor, r_prev: torch.Tensor, batch: int,
                   frame_layout: tuple[int, int, int] | None = None, strides: Sequence[int] = ()) -> torch.Tensor:
    """Per-sample statistics AdaCache reads after a compute step, as one ``(1 or 2, batch)`` tensor:

    * row 0, the distance ``||r_now - r_prev||_1 / ||r_prev||_1`` (not yet divided by the steps between the two
      computes: the host does that, so one graph serves every gap);
    * row 1 (when ``strides`` are given), the raw MoReg motion score of ``r_now``: for each stride ``s``,
      ``||r[f+s] - r[f]||_1 / (||r[s:]||_1 + ||r[:-s]||_1)`` over frames ``f``, averaged over strides.

    A zero denominator counts as the smallest normal float, so two zero residuals are at distance 0.

    >>> residual_stats(torch.ones(2, 3), torch.full((2, 3), 2.0), batch=2)
    tensor([[0.5000, 0.5000]])
    """
    tiny = torch.finfo(torch.float32).tiny
    a = r_now.float().reshape(batch, -1)
    b = r_prev.float().reshape(batch, -1)
    d = (a - b).abs().sum(1) / b.abs().sum(1).clamp_min(tiny)
    if not strides:
        return d.unsqueeze(0)
    x, f, y = frame_layout
    v = r_now.float().reshape(batch, x, f, y)
    ms = []
    for s in strides:
        hi, lo = v[:, :, s:], v[:, :, :-s]
        num = (hi - lo).abs().sum((1, 2, 3))
        den = hi.abs().sum((1, 2, 3)) + lo.abs().sum((1, 2, 3))
        ms.append(num / den.clamp_min(tiny))
    return torch.stack([d, torch.stack(ms).mean(0)])


def _example(node: fx.Node) -> torch.Tensor:
    v = _val(node)
    return torch.zeros(tuple(v.shape), dtype=v.dtype)


def inline(graph: fx.Graph, fn: Callable, args: Sequence[fx.Node], before: fx.Node | None = None) -> fx.Node:
    """Trace ``fn`` (plain torch on tensors) into aten ops with the shapes of ``args``' values and insert them
    into ``graph`` reading ``args``; returns the node of its (single tensor) result. Inserted nodes carry
    ``meta["val"]`` for later passes."""
    sub = make_fx(fn, tracing_mode="fake", pre_dispatch=True)(*[_example(a) for a in args])
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    env = dict(zip(placeholders, args))
    for n in sub.graph.nodes:
        if n.op == "get_attr":
            raise GraphpassError(f"inlined function {fn} reads constants; pass them as arguments")
    ctx = graph.inserting_before(before) if before is not None else contextlib.nullcontext()
    result = None
    with ctx:
        for n in sub.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                result = env[n.args[0]] if isinstance(n.args[0], fx.Node) else env[n.args[0][0]]
                continue
            new = graph.node_copy(n, lambda a: env[a])
            new.meta = {"val": n.meta.get("val")}
            env[n] = new
    return result


def _sub(a, b):
    return a - b


def _add(a, b):
    return a + b


def specialise_residual_phase(captured: CapturedGraph, span: BlockSpan, phase: Phase, metric: MetricSite | None = None,
                              strides: Sequence[int] = (), unit: str = "residual") -> PhaseGraph:
    """The graph of one residual-caching phase.

    ``phase.action(span.path)`` with ``unit="residual"``: REUSE -> the blocks are cut out and
    ``h_out = h_in + cache[span residual]``; STORE -> the graph also returns ``h_out - h_in``; COMPUTE -> the
    captured graph. With ``unit="outputs"`` the action applies to every attention/MLP region inside the blocks
    (:func:`~graphpass.passes.specialise.specialise_phase`): a reuse step reads their cached outputs and still
    runs the blocks' gates and skip adds with the current step's conditioning.
    ``phase.metric`` (a :class:`~graphpass.schedules.adacache.ResidualPhase`; ``"none"`` for plain phases):
    ``"store"`` also returns the metric residual; ``"measure"`` reads the previous metric residual from the
    cache and returns the new one and :func:`residual_stats` (with MoReg motion when ``strides`` are given).
    """
    action = phase.action(span.path)
    mode = getattr(phase, "metric", "none")
    unknown = {p for p, _ in phase.actions} - {span.path}
    if unknown:  # requires: the phase speaks of the span only
        raise GraphpassError(f"residual phase names {sorted(unknown)}; it may only name the block span {span.path}")
    if mode not in METRIC_MODES:
        raise GraphpassError(f"unknown metric mode {mode!r}; one of {METRIC_MODES}")
    if unit not in CACHE_UNITS:
        raise GraphpassError(f"unknown cache unit {unit!r}; one of {CACHE_UNITS}")
    if mode != "none" and (metric is None or action == Action.REUSE):
        raise GraphpassError(f"metric mode {mode!r} needs a metric site and a step that computes the blocks")
    if strides and mode == "measure" and metric.frame_layout is None:
        raise GraphpassError(f"MoReg needs the frame axis of the metric residual {metric.path} {metric.spec}")

    cache_inputs: list[str] = []
    stored: list[tuple[str, fx.Node]] = []  # (cache key, node) returned after the model's outputs
    if unit == "outputs":
        inner = specialise_phase(captured, span.inner, Phase.of({r.path: action for r in span.inner}))
        graph, by_name, outs = copy_graph(inner.gm)
        rename = span.inner_keys()
        n_user = inner.num_user_outputs
        stored = [(rename[k], v) for k, v in zip(inner.cache_outputs, outs[n_user:])]
        outs = outs[:n_user]
        cache_inputs = [rename[k] for k in inner.cache_inputs]
        for ph in graph.nodes:
            if ph.op == "placeholder" and "graphpass_cache_key" in ph.meta:
                ph.meta["graphpass_cache_key"] = rename[ph.meta["graphpass_cache_key"]]
    else:
        graph, by_name, outs = copy_graph(captured.gm)
        n_user = len(outs)
    last_input = [n for n in graph.nodes if n.op == "placeholder"][-1]

    def placeholder(key: str, like: fx.Node) -> fx.Node:
        nonlocal last_input
        with graph.inserting_after(last_input):
            ph = graph.placeholder(cache_input_name(key))
        ph.meta["val"] = _val(like)
        ph.meta["graphpass_cache_key"] = key
        last_input = ph
        return ph

    if unit == "residual" and action == Action.REUSE:
        h_in, h_out = by_name[span.input], by_name[span.output]
        cached = placeholder(span.residual_key, h_out)
        cache_inputs.append(span.residual_key)
        new = inline(graph, _add, [h_in, cached], before=h_out)
        h_out.replace_all_uses_with(new)
        outs = [fx.node.map_arg(o, lambda n: new if n is h_out else n) for o in outs]
    elif action != Action.REUSE:
        if unit == "residual" and action == Action.STORE:
            stored.append((span.residual_key, inline(graph, _sub, [by_name[span.output], by_name[span.input]])))
        if mode != "none":
            if metric.kind == "region":
                r = by_name[metric.node]
            else:
                bi, bo = metric.block_io
                r = inline(graph, _sub, [by_name[bo], by_name[bi]])
            stored.append((metric.residual_key, r))
            if mode == "measure":
                prev = placeholder(metric.residual_key, r)
                cache_inputs.append(metric.residual_key)
                layout, strides_ = metric.frame_layout, tuple(strides)

                def stats(now, before):
                    return residual_stats(now, before, metric.batch, layout, strides_)

                stored.append((metric.stats_key, inline(graph, stats, [r, prev])))
    cache_outputs = [k for k, _ in stored]
    graph.output(tuple(outs) + tuple(n for _, n in stored))
    eliminate_dead_code(graph)

    # ensures: a reuse step runs nothing of the blocks (unit "residual") / of their regions (unit "outputs")
    if action == Action.REUSE:
        alive = {n.name for n in graph.nodes}
        skipped = [m.name for b in span.blocks for m in _block_nodes(captured.gm, b)] if unit == "residual" else [
            n for r in span.inner for n in r.nodes]
        left = [n for n in skipped if n in alive]
        if left:
            raise GraphpassError(f"reuse graph still runs nodes of the blocks {left[:3]}; they are used outside "
                                 f"the span")
    graph.lint()
    gm = fx.GraphModule(captured.gm, graph, class_name="ResidualPhaseGraph")
    return PhaseGraph(phase=phase, gm=gm, cache_inputs=cache_inputs, cache_outputs=cache_outputs,
                      num_user_outputs=n_user, flops=graph_flops(gm))
