"""Residual caching passes: skip the whole chain of transformer blocks on reuse steps (AdaCache).

A DiT's blocks form a chain on its hidden states: ``h_out = blocks(h_in)``. On a *compute* step the graph
also emits the span's residual ``R = h_out - h_in``; on a *reuse* step the blocks are cut out and
``h_out = h_in + R_cached``: embedders, conditioning and the final layer still run, every block is one add.
Two-stream blocks (CogVideoX, HunyuanVideo's double blocks) carry video and text tokens from block to block;
every hidden state the graph reads after the chain gets its own residual and its own add.

Granularity: ONE pre-summed residual per hidden state for the whole span. Because the blocks chain,
``h_out - h_in`` is the telescoping sum of every block's residual (block output - block input), which is the
sum of the reference implementation's per-block attention and cross-attention+MLP residuals; caching it
pre-summed makes a reuse step a single add instead of one add per block. Ops between blocks that do not
depend on the step (Latte's frame/token re-layout and its temporal position embedding) are folded into ``R``
as well.

Finding the span (structure, not names):

* a *block* is the module owning attention regions whose path ends in an index: ``blocks.3`` for
  ``blocks.3.temporal_attn``, ``temporal_transformer_blocks.0`` for ``temporal_transformer_blocks.0.attn1``;
  only the outermost such modules count (HunyuanVideo's token refiner, blocks inside its context embedder,
  prepares the text and is no part of the chain);
* the hidden states leaving the chain are the last block's outputs that a later op reads (HunyuanVideo and
  CogVideoX drop the last block's text tokens: one stream leaves; a model reading both gets two);
* a block output's *stream input* is the outside node of its shape that it reaches through the skip
  connection: adds, casts (Wan's ``(h.float() + f.float() * gate).type_as(h)``), re-layouts, and slices of a
  concatenation that select one of its parts (HunyuanVideo's single block ``cat([video, text]) + f(...)``
  sliced back into video and text reaches the video input alone); reached whole, or in slices that tile it
  (HunyuanVideo-I2V's token replace ``cat([x[:, :n], x[:, n:] + f])``, Helios's ``cat([history, x + f])``
  after ``torch.split``). An outside node that several blocks read (Cosmos adds ``extra_pos_emb`` in every
  block) is a per-block input, not the hidden state. Chaining backwards from the last block gives each
  stream's input ``h_in`` at the first block of the chain. Streams that the model concatenates between blocks
  (two-stream blocks feeding single-stream blocks over ``cat([text, video])``) enter the chain as one
  :class:`Concat` of their inputs;
* the chain starts at the first block whose hidden state does not come from the block before: earlier blocks
  that only feed it other inputs (Kandinsky's text blocks, read as cross-attention context; Motif-Video's
  encoder blocks, whose decoder restarts from a clone of the patch embeddings) stay outside and run every
  step;
* ``h_out`` is the last block's output, followed through re-layout ops until it has ``h_in``'s shape again
  (Latte's temporal blocks work on ``(B*tokens, F, D)``, its spatial ones on ``(B*F, tokens, D)``), then
  through adds of terms computed from ``h_in`` but not from the last block's output (WanVACE adds its last
  control block's hint after the last main block);
* modules between blocks that add to the hidden state (Wan-Animate's face adapters, ConsisID's identity
  cross-attention) depend on it and feed the next block: they are part of the span, skipped on a reuse step
  with their contribution inside ``R``; WanVACE's control blocks, which read ``h_in`` and whose hints are
  added between the main blocks, likewise.

In-place writes count as data flow: Wan and CogVideoX write rotary embeddings into q/k buffers
(``aten.copy_``); the span includes them, and a reuse graph drops the writes nobody reads any more
(:func:`~graphpass.passes.specialize.eliminate_dead_code` reads writes by the memory they touch).

The distance metric of AdaCache is measured on one *metric residual*: a block's residual (``out - in`` of
its largest stream) or an attention/MLP region's residual (what the region adds to the hidden state, gate
included; for a joint region, to the video tokens), found by following the region's output to the ``add``
that joins it to the skip connection.

>>> span = find_block_span(captured, regions)          # vdt-tiny: two blocks on (B, F, tokens, D)
>>> span.blocks, span.input, span.output, span.path
(['blocks.0', 'blocks.1'], 'add_1', 'add_26', 'blocks.0..blocks.1')
>>> find_block_span(hunyuan, hunyuan_regions).streams  # video only: the text tokens are dead after the chain
[('transpose', 'slice_27')]
"""
from __future__ import annotations

import contextlib
import operator
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from ..errors import GraphpassError, ScheduleError, TaggingError
from ..schedules.adacache import ResidualPhase
from ..schedules.base import Action, Phase
from .capture import CapturedGraph, TensorSpec, module_path
from .flops import graph_flops, node_flops
from .ops import CASTS, COPIES, LAYOUT
from .specialize import (PhaseGraph, cache_input_name, copy_graph, eliminate_dead_code, in_place_writers, is_impure,
                         specialize_phase)
from .tag import Region

aten = torch.ops.aten

#: Ops that only re-lay out a tensor (no arithmetic); the stream may pass through them between blocks.
_LAYOUT = LAYOUT - {aten.expand.default} | {aten.to.dtype}
#: Ops a region's output may pass through before it is added to the hidden state (gate, rescale, re-layout,
#: the slice of a joint region's output that belongs to the hidden state).
_TO_RESIDUAL = _LAYOUT | {aten.mul.Tensor, aten.div.Tensor, aten.slice.Tensor, aten._to_copy.default}
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


@dataclass(frozen=True)
class Concat:
    """A hidden state entering the chain that is built from several: ``torch.cat(parts, dim)``, each part the
    name of a node entering the first block (text and video tokens that two-stream blocks carry separately
    and the model joins before its single-stream blocks).

    >>> Concat(("linear_1", "linear"), 1).names(), str(Concat(("linear_1", "linear"), 1))
    (['linear_1', 'linear'], 'cat(linear_1, linear; dim=1)')
    """

    parts: tuple[str, ...]
    dim: int

    def names(self) -> list[str]:
        return list(self.parts)

    def __str__(self) -> str:
        return f"cat({', '.join(self.parts)}; dim={self.dim})"


def input_names(x: str | Concat) -> list[str]:
    """The nodes a stream input reads: ``[x]`` for a node name, the parts of a :class:`Concat`."""
    return x.names() if isinstance(x, Concat) else [x]


@dataclass
class BlockSpan:
    """The chain of transformer blocks that a reuse step replaces by one add per hidden state.

    blocks: block module paths in graph order.
    streams: per hidden state leaving the chain, (what enters the chain: a node name, or a :class:`Concat` of
        several when the model joins streams between blocks; the name of the node after the last block, in the
        entering value's layout). The largest (the video tokens) comes first; a
        two-stream model whose text tokens are read after the blocks (CogVideoX with rotary embeddings) has
        two, one whose last text tokens are dead (HunyuanVideo, CogVideoX without) one.
    block_streams: per block, the (stream input, stream output) node names of each of those hidden states.
    nodes: names of the nodes that depend on a stream input and feed a stream output: what a reuse step skips.
    specs: shape and dtype of each hidden state (and of its cached residual).
    flops: FLOPs of the nodes inside the blocks.
    region: the span as a :class:`Region` (path ``"<first block>..<last block>"``, kind ``"blocks"``, one
        cache key per stream: its pre-summed residual), which is what the runtime's cache and plans refer to.

    >>> span.streams    # two CogVideoX blocks whose text tokens are read after them: video, then text
    [('linear', 'add_22'), ('linear_1', 'add_23')]
    >>> span.residual_keys
    ['transformer_blocks.0..transformer_blocks.1:0', 'transformer_blocks.0..transformer_blocks.1:1']
    """

    blocks: list[str]
    streams: list[tuple[str | Concat, str]]
    block_streams: dict[str, list[tuple[str, str]]]
    nodes: list[str]
    specs: list[TensorSpec]
    flops: int
    region: Region
    inner: list[Region]

    @property
    def input(self) -> str | Concat:
        """The first (largest) hidden state entering the chain."""
        return self.streams[0][0]

    @property
    def output(self) -> str:
        """The first (largest) hidden state after the chain, in :attr:`input`'s layout."""
        return self.streams[0][1]

    @property
    def spec(self) -> TensorSpec:
        return self.specs[0]

    @property
    def block_io(self) -> dict[str, tuple[str, str]]:
        """Per block, the (stream input, stream output) of the first hidden state."""
        return {b: io[0] for b, io in self.block_streams.items()}

    @property
    def residual_keys(self) -> list[str]:
        """Cache key of each stream's residual, in :attr:`streams` order."""
        return list(self.region.cache_keys)

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
    group: the process group (its name) whose ranks each hold a part of the residual (sequence parallelism),
        or None when this process holds all of it. The distance's sums are then all-reduced over the group
        inside the graph (:func:`residual_stats`), so every rank reads the whole residual's distance.
    """

    path: str
    kind: str
    node: str | None
    block_io: tuple[str, str] | None
    spec: TensorSpec
    batch: int
    frame_layout: tuple[int, int, int] | None
    group: str | None = None

    @property
    def residual_key(self) -> str:
        return f"{self.path}:residual"

    @property
    def stats_key(self) -> str:
        return f"{self.path}:stats"


# --- finding the span -----------------------------------------------------------------------------------
#: Ops that keep a tensor's shape and element positions and change at most its dtype (Wan's
#: ``(h.float() + f.float() * gate).type_as(h)``). The skip connection passes through their first argument
#: (``type_as``'s second argument only supplies the dtype).
_CASTS = CASTS | COPIES
#: A slice still to apply while walking back: ``(dim, start, stop)`` with ``0 <= start < stop <= size``.
Window = tuple[int, int, int]


def _val(node: fx.Node):
    return node.meta.get("val")


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    v = _val(node)
    return tuple(int(s) for s in v.shape) if isinstance(v, torch.Tensor) else None


def _numel(node: fx.Node) -> int:
    n = 1
    for s in _shape(node) or ():
        n *= s
    return n


def _int(a) -> int:
    """An int argument of an op, which dynamic captures may hold as a node of a symbolic size."""
    return int(_val(a)) if isinstance(a, fx.Node) else int(a)


def _block_nodes(gm: fx.GraphModule, block: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if any(p == block for p, _ in module_path(n))]


def _live_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value reaches the graph's outputs or an impure op. The tails of streams that no later op
    reads (CogVideoX's and HunyuanVideo's text tokens after the last block) are not live."""
    live: set[fx.Node] = set()
    for n in reversed(gm.graph.nodes):
        if n.op == "output" or n in live or (n.op == "call_function" and is_impure(n)):
            live.add(n)
            live.update(n.all_input_nodes)
    return live


def _slice_window(node: fx.Node) -> Window | None:
    """``aten.slice.Tensor(x, dim, start, stop, step)`` as a window on ``x``; None for a stepped slice.
    E.g. ``x[:, :-5]`` of ``x`` of shape (2, 53, 16) (HunyuanVideo's video tokens before 5 text tokens) is
    ``(1, 0, 48)``."""
    x = node.args[0]
    shape = _shape(x)
    dim, start, stop, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1:])[:4]
    dim = _int(dim) % len(shape)
    size = shape[dim]

    def clamp(v, default):
        v = default if v is None else _int(v)
        return min(max(v + size if v < 0 else v, 0), size)

    return (dim, clamp(start, 0), clamp(stop, size)) if _int(step) == 1 else None


def _skip_step(n: fx.Node, win: Window | None) -> list[tuple[fx.Node, Window | None]]:
    """One step back along a skip connection from ``n`` (with a slice ``win`` still to apply to ``n``): the
    nodes ``n`` passes on unchanged and the window each still needs. A slice of a concatenation along the
    same axis follows only the part it selects, so HunyuanVideo's single block ``cat([video, text]) + f(..)``
    sliced back to video tokens reaches the video input alone."""
    t = n.target
    shape = _shape(n)
    if t in _ADD:  # operands broadcast to the result are folded into the residual (Latte's position embedding)
        return [(a, win if _shape(a) == shape else None) for a in n.args
                if isinstance(a, fx.Node) and (win is None or _shape(a) == shape)]
    if t in _CASTS:
        return [(n.args[0], win)]
    if t in _LAYOUT:
        return [(n.args[0], None)] if win is None else []
    if t == aten.slice.Tensor:
        w = _slice_window(n)
        if w is not None and w[1:] == (0, _shape(n.args[0])[w[0]]):
            return [(n.args[0], win)]  # a whole-axis slice (``x[:, :-5]`` keeps one over the batch): identity
        if w is None or (win is not None and win[0] != w[0]):
            return []
        if win is not None:
            w = (w[0], w[1] + win[1], w[1] + win[2])
        full = (0, _shape(n.args[0])[w[0]])
        return [(n.args[0], None if w[1:] == full else w)]
    if t == operator.getitem and _split_piece(n) is not None:  # Helios: history, x = torch.split(x, [h, n], 1)
        src, (dim, start, stop) = _split_piece(n)
        if win is not None and win[0] != dim:
            return []
        return [(src, (dim, start + win[1], start + win[2]) if win is not None else (dim, start, stop))]
    if t == aten.cat.default:
        parts = list(n.args[0])
        if win is None:
            return [(p, None) for p in parts]
        dim = _int(n.args[1] if len(n.args) > 1 else 0) % len(shape)
        if win[0] != dim:
            return []
        off = 0
        for p in parts:
            size = _shape(p)[dim]
            if off <= win[1] and win[2] <= off + size:
                return [(p, None if (win[1], win[2]) == (off, off + size) else (dim, win[1] - off, win[2] - off))]
            off += size
    return []


def _split_piece(n: fx.Node) -> tuple[fx.Node, Window] | None:
    """``torch.split(x, sizes, dim)[i]`` as ``(x, window of x)``; None for any other node.
    E.g. piece 1 of ``split_with_sizes(x, [5, 40], 1)`` is ``(x, (1, 5, 45))``."""
    src = n.args[0]
    if not (isinstance(src, fx.Node) and src.op == "call_function"
            and src.target in (aten.split_with_sizes.default, aten.split.Tensor)):
        return None
    x, shape = src.args[0], _shape(src.args[0])
    dim = _int(src.args[2] if len(src.args) > 2 else 0) % len(shape)
    size = shape[dim]
    if src.target == aten.split.Tensor:
        step = _int(src.args[1])
        sizes = [min(step, size - i) for i in range(0, size, step)]
    else:
        sizes = [_int(v) for v in src.args[1]]
    i = int(n.args[1])
    start = sum(sizes[:i])
    return x, (dim, start, start + sizes[i])


def _tiles(windows: list[Window], size: int) -> bool:
    """Whether slices of one axis cover ``[0, size)`` exactly once (HunyuanVideo-I2V's token replace
    ``cat([x[:, :n], x[:, n:] + f])``, Helios's ``cat([history, x + f])`` after a split).

    >>> _tiles([(1, 0, 5), (1, 5, 45)], 45), _tiles([(1, 0, 5), (1, 4, 45)], 45)
    (True, False)
    """
    if len({w[0] for w in windows}) != 1:
        return False
    end = 0
    for _, start, stop in sorted(set(windows), key=lambda w: w[1]):
        if start != end:
            return False
        end = stop
    return end == size


def _skip_sources(start: fx.Node, stop: Callable[[fx.Node], bool]) -> list[tuple[fx.Node, Window | None]]:
    """The nodes where ``stop`` holds that ``start`` reaches backwards through adds, casts, re-layouts and
    slices of concatenations (its skip connection), each with the slice of it that ``start`` reads (None:
    all of it). Any other op ends a path: it computes, it does not carry the hidden state."""
    found, seen, todo = [], set(), [(start, None)]
    while todo:
        n, win = todo.pop()
        if (n, win) in seen:
            continue
        seen.add((n, win))
        if stop(n):
            found.append((n, win))
        elif n.op == "call_function":
            todo.extend(_skip_step(n, win))
    return found


def _stream_input(block: str, out: fx.Node, inside: set[fx.Node], shared: set[fx.Node] = frozenset()) -> fx.Node:
    """The hidden state entering ``block`` that its output ``out`` carries on: the outside node of ``out``'s
    shape its skip connection reaches whole, or in slices that tile it (a block that re-assembles its tokens
    with ``torch.cat``). A node that several blocks read (``shared``: Cosmos adds ``extra_pos_emb`` to the
    hidden state in every block) is a per-block input, not the hidden state, when another candidate exists."""
    srcs = _skip_sources(out, lambda n: n not in inside)
    cands = list({n: None for n, w in srcs if w is None and _shape(n) == _shape(out)})
    if not cands:
        windows: dict[fx.Node, list[Window]] = {}
        for n, w in srcs:
            if w is not None and _shape(n) == _shape(out):
                windows.setdefault(n, []).append(w)
        cands = [n for n, ws in windows.items() if _tiles(ws, _shape(n)[ws[0][0]])]
    if len(cands) > 1 and [c for c in cands if c not in shared]:
        cands = [c for c in cands if c not in shared]
    if len(cands) != 1:
        sliced = [n.name for n, w in srcs if w is not None]
        why = f"; it reads only a slice of {sliced}" if sliced else ""
        raise TaggingError(f"cannot find the hidden state entering block {block}: its output {out.name} "
                           f"{_shape(out)} (computed by {out.target}) is reached through its skip connection (adds, "
                           f"casts, re-layouts, slices of concatenations) from "
                           f"{[c.name for c in cands] or 'no outside node'} of that shape{why}. Residual caching "
                           f"needs blocks of the form x -> x + f(x) for every hidden state they return (a block "
                           f"normalising after its add, x -> norm(x + f(x)), is not)")
    return cands[0]


def _joining_cat(x: fx.Node) -> fx.Node | None:
    """The ``aten.cat`` that ``x`` is, up to adds of broadcast terms and casts (same shape all along)."""
    n = x
    while n.op == "call_function":
        if n.target == aten.cat.default:
            return n
        nxt = [a for a, w in _skip_step(n, None) if w is None and _shape(a) == _shape(n)]
        if len(nxt) != 1:
            return None
        n = nxt[0]
    return None


def _previous_exit(block: str, x: fx.Node, prev: str, exits: set[fx.Node]) -> fx.Node | tuple[int, list[fx.Node]]:
    """The output of block ``prev`` that becomes ``block``'s hidden state ``x`` (through re-layouts, casts
    and adds between the two blocks), or ``(dim, outputs)`` when ``x`` concatenates several outputs of
    ``prev`` along ``dim``, each whole (text and video tokens joined before single-stream blocks). The caller
    has checked that ``x`` reaches some output of ``prev`` (else the chain starts at ``block``)."""
    hits = _skip_sources(x, lambda n: n in exits)
    if len(hits) == 1 and hits[0][1] is None:
        return hits[0][0]
    cat = _joining_cat(x)
    if cat is not None:
        parts = [_skip_sources(p, lambda n: n in exits) for p in cat.args[0]]
        if all(len(h) == 1 and h[0][1] is None for h in parts):
            dim = _int(cat.args[1] if len(cat.args) > 1 else 0) % len(_shape(cat))
            return dim, [h[0][0] for h in parts]
    raise TaggingError(f"block {block}'s hidden state {x.name} is built from {len(hits)} outputs of block {prev} "
                       f"({', '.join(n.name + ('' if w is None else f' sliced {w}') for n, w in hits)}) otherwise than by "
                       f"one concatenation (aten.cat) of whole outputs; residual caching needs each hidden state to "
                       f"pass from block to block on its own, or several to be joined by one torch.cat of whole "
                       f"hidden states")


class _Track:
    """One hidden state followed back through the chain: its output at the current block, and at the end what
    enters the chain (a node, or ``(dim, tracks)`` when it was concatenated from several)."""

    def __init__(self, out: fx.Node):
        self.out = out
        self.entry: fx.Node | tuple[int, list["_Track"]] | None = None

    def resolve(self) -> str | Concat:
        if isinstance(self.entry, fx.Node):
            return self.entry.name
        dim, tracks = self.entry
        parts = [t.resolve() for t in tracks]
        if any(isinstance(p, Concat) for p in parts):
            raise TaggingError(f"hidden state {self.out.name} is concatenated from streams that were themselves "
                               f"concatenated between earlier blocks ({parts}); residual caching supports one join")
        return Concat(tuple(parts), dim)


def _entry_shape(x: str | Concat, nodes: dict[str, fx.Node]) -> tuple[int, ...]:
    if not isinstance(x, Concat):
        return _shape(nodes[x])
    shapes = [_shape(nodes[p]) for p in x.parts]
    return tuple(sum(s[d] for s in shapes) if d == x.dim else shapes[0][d] for d in range(len(shapes[0])))


def _back_to_layout(block: str, out: fx.Node, like: str, shape: tuple[int, ...], live: set[fx.Node]) -> fx.Node:
    """``out`` followed through its re-layouts until it has the ``shape`` of the chain's input ``like``
    (Latte's last temporal block leaves ``(B*tokens, F, D)``, its first spatial block takes ``(B*F, tokens, D)``)."""
    while _shape(out) != shape:
        users = [u for u in out.users if u in live]
        if len(users) != 1 or users[0].op != "call_function" or users[0].target not in _LAYOUT:
            raise TaggingError(f"the hidden state {out.name} after the last block {block} ({_shape(out)}) does not "
                               f"return to the shape of the first block's input {like} {shape} through "
                               f"re-layouts")
        out = users[0]
    return out


def _descendants(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node computed from it."""
    found, todo = {node}, [node]
    while todo:
        for u in todo.pop().users:
            if u not in found:
                found.add(u)
                todo.append(u)
    return found


def _through_late_terms(out: fx.Node, after: set[fx.Node], live: set[fx.Node]) -> fx.Node:
    """``out``, the hidden state after the last block, followed through adds of terms that the chain's inputs
    computed (``after``) without it: WanVACE adds each control block's hint after its main block
    (``h = block(h); h = h + hint * scale``), the last one after the last main block, and the control blocks
    read the hidden state entering the chain. Such a term is work of the chain, skipped on a reuse step, so
    the chain ends after its add. A term computed from ``out`` itself (an adapter after the last block reading
    its output) is not: it runs on every step, after the chain.

    For WanVACE with ``vace_layers=[0, 1]`` and two blocks, ``out`` is ``blocks.1``'s output and the chain
    ends at ``out + hint_1 * scale_1``.
    """
    while True:
        users = [u for u in out.users if u in live]
        if len(users) != 1 or users[0].op != "call_function" or users[0].target not in _ADD:
            return out
        add = users[0]
        terms = [a for a in add.args if isinstance(a, fx.Node) and a is not out]
        if _shape(add) != _shape(out) or len(terms) != 1 or terms[0] not in after or terms[0] in _descendants(out):
            return out
        out = add


def _chain_blocks(regions: Sequence[Region], name_order: dict[str, int], model_type: str) -> list[str]:
    """The blocks owning attention regions, outermost module lists only: a block list nested in another module
    (HunyuanVideo's text token refiner in ``context_embedder``) belongs to an embedder, which always runs."""
    blocks: dict[str, None] = {}
    for r in sorted(regions, key=lambda r: name_order[r.nodes[0]]):
        b = block_of(r.path)
        if b is not None:
            blocks.setdefault(b, None)
    if not blocks:  # requires: blocks to cache
        raise TaggingError(f"no transformer blocks in {model_type}: none of its attention regions "
                           f"({', '.join(r.path for r in regions) or 'none'}) sits in a numbered module such as "
                           f"blocks.3; residual caching skips whole blocks")
    depth = min(b.count(".") for b in blocks)
    return [b for b in blocks if b.count(".") == depth]


def _value_inputs(n: fx.Node, h_ins: set[fx.Node]) -> list[fx.Node]:
    """The inputs whose values ``n`` reads, as far as the span is concerned: Cosmos's
    ``time_proj(t).type_as(hidden_states)`` takes only the dtype of the hidden state entering the chain, so its
    timestep embedding is no part of the blocks' span."""
    if n.op == "call_function" and n.target == aten.type_as.default and n.args[1] in h_ins:
        return [n.args[0]] if isinstance(n.args[0], fx.Node) else []
    return list(n.all_input_nodes)


def find_block_span(captured: CapturedGraph, regions: Sequence[Region]) -> BlockSpan:
    """The chain of transformer blocks of ``captured`` (see the module docstring)."""
    gm = captured.gm
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    name_order = {n.name: i for n, i in order.items()}
    live = _live_nodes(gm)
    blocks = _chain_blocks(regions, name_order, captured.model_type)
    members = {b: _block_nodes(gm, b) for b in blocks}
    paths = sorted(blocks, key=lambda b: order[members[b][0]])
    exits_of = {}
    for b in paths:
        inside = set(members[b])
        exits_of[b] = [n for n in members[b] if any(u not in inside and u in live for u in n.users)]

    readers: dict[fx.Node, int] = {}  # outside nodes -> how many blocks read them
    for b in paths:
        inside = set(members[b])
        for a in {a for n in members[b] for a in n.all_input_nodes if a not in inside}:
            readers[a] = readers.get(a, 0) + 1
    shared = {a for a, k in readers.items() if k > 1}
    last = paths[-1]
    # the streams leaving the chain: the largest (the video tokens) first
    outs = sorted(exits_of[last], key=lambda n: (-_numel(n), order[n]))
    if not outs:
        raise TaggingError(f"nothing the last block {last} computes is used after it")
    block_streams: dict[str, list[tuple[str, str]]] = {}
    tracks = [_Track(o) for o in outs]
    active = list(tracks)
    for k in range(len(paths) - 1, -1, -1):
        b = paths[k]
        xs = [_stream_input(b, t.out, set(members[b]), shared) for t in active]
        if len(set(xs)) != len(xs):
            raise TaggingError(f"block {b} returns {len(xs)} hidden states ({[t.out.name for t in active]}) carried "
                               f"on from the same input; residual caching needs one input per hidden state")
        pairs = sorted(zip(xs, (t.out for t in active)), key=lambda p: (-_numel(p[1]), order[p[1]]))
        block_streams[b] = [(x.name, o.name) for x, o in pairs]
        prev_exits = set(exits_of[paths[k - 1]]) if k > 0 else set()
        if k > 0 and not all(_skip_sources(x, lambda n: n in prev_exits) for x in xs):
            # the chain starts here: the earlier blocks feed it other inputs (Kandinsky's text blocks, WanVACE's
            # control blocks) and run on every step
            for t, x in zip(active, xs):
                t.entry = x
            paths = paths[k:]
            break
        following = []
        for t, x in zip(active, xs):
            found = x if k == 0 else _previous_exit(b, x, paths[k - 1], prev_exits)
            if isinstance(found, fx.Node) and k == 0:
                t.entry = found
            elif isinstance(found, fx.Node):
                t.out = found
                following.append(t)
            else:
                dim, parts = found
                t.entry = (dim, [_Track(p) for p in parts])
                following.extend(t.entry[1])
        active = following
    nodes = {n.name: n for n in gm.graph.nodes}
    entries = [t.resolve() for t in tracks]
    h_ins = [nodes[name] for x in entries for name in input_names(x)]
    # The span: nodes depending on a stream input that feed a stream output.
    after: set[fx.Node] = set(h_ins)
    for n in gm.graph.nodes:
        if any(a in after for a in _value_inputs(n, set(h_ins))):
            after.add(n)
    h_outs = [_through_late_terms(_back_to_layout(last, o, str(x), _entry_shape(x, nodes), live), after, live)
              for o, x in zip(outs, entries)]
    before: set[fx.Node] = set(h_outs)
    bases, writers = in_place_writers(gm.graph)
    for n in reversed(gm.graph.nodes):
        if n in before:
            for a in n.all_input_nodes:
                before.add(a)
                before.update(w for b in bases[a] for w in writers.get(b, ()) if order[w] < order[n])
    span_nodes = [n for n in gm.graph.nodes if n in after and n in before and n not in h_ins]
    span_set = set(span_nodes)
    leaks = [n.name for n in span_nodes if n not in h_outs and any(
        u not in span_set and u in live and u.target != aten._assert_tensor_metadata.default for u in n.users)]
    if leaks:
        raise TaggingError(f"values computed inside the blocks are used after them ({leaks[:3]}); residual caching "
                           f"needs the blocks' only outputs to be the hidden states {[n.name for n in h_outs]}")
    block_flops = sum(node_flops(n) for b in paths for n in members[b])
    specs = [TensorSpec(_shape(o), _val(o).dtype) for o in h_outs]
    path = f"{paths[0]}..{paths[-1]}" if len(paths) > 1 else paths[0]
    carried = " and ".join(f"{x} -> {o.name}" for x, o in zip(entries, h_outs))
    region = Region(path=path, module_type="blocks", kind="blocks", nodes=[n.name for n in span_nodes],
                    exits=[o.name for o in h_outs], exit_specs=specs, flops=block_flops,
                    reason=f"chain of {len(paths)} blocks carrying {carried}; cached as one pre-summed residual per "
                           f"hidden state")
    inner = [r for r in regions if block_of(r.path) in block_streams]
    return BlockSpan(blocks=paths, streams=[(x, o.name) for x, o in zip(entries, h_outs)],
                     block_streams={b: block_streams[b] for b in paths}, nodes=[n.name for n in span_nodes],
                     specs=specs, flops=block_flops, region=region, inner=inner)


# --- the metric site ------------------------------------------------------------------------------------
def _largest_slice(users: list[fx.Node]) -> fx.Node | None:
    """Among users that all slice one tensor along one axis (a joint region's output split back into video and
    text tokens), the one keeping the most elements; None if they are not such slices."""
    if len(users) < 2 or any(u.op != "call_function" or u.target != aten.slice.Tensor for u in users):
        return None
    if len({_slice_window(u)[0] if _slice_window(u) else None for u in users}) != 1:
        return None
    return max(users, key=_numel)


def region_residual(gm: fx.GraphModule, region: Region) -> fx.Node:
    """The node a region adds to the hidden state: its output followed through gate multiplies, rescales and
    re-layouts up to the ``add`` joining the skip connection. A joint region over video and text tokens is
    measured on what it adds to the video tokens: of several outputs (a two-stream attention's ``(video,
    text)``) the largest, of an output sliced into both (CogVideoX's feed-forward over their concatenation)
    the largest slice.

    >>> region_residual(cap.gm, ff_of_cogvideox_block_1).name     # gate * ff_output[:, text_length:]
    'mul_17'
    """
    live = _live_nodes(gm)
    by_name = {n.name: n for n in gm.graph.nodes}
    cur = max((by_name[e] for e in region.exits), key=_numel)
    for _ in range(12):
        users = [u for u in cur.users if u in live]
        if len(users) != 1:
            nxt = _largest_slice(users)
            if nxt is None:
                break
            cur = nxt
            continue
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
                   frame_layout: tuple[int, int, int] | None = None, strides: Sequence[int] = (),
                   group: str | None = None) -> torch.Tensor:
    """Per-sample statistics AdaCache reads after a compute step, as one ``(1 or 2, batch)`` tensor:

    * row 0, the distance ``||r_now - r_prev||_1 / ||r_prev||_1`` (not yet divided by the steps between the two
      computes: the host does that, so one graph serves every gap);
    * row 1 (when ``strides`` are given), the raw MoReg motion score of ``r_now``: for each stride ``s``,
      ``||r[f+s] - r[f]||_1 / (||r[s:]||_1 + ||r[:-s]||_1)`` over frames ``f``, averaged over strides.

    A zero denominator counts as the smallest normal float, so two zero residuals are at distance 0.

    ``group``: the residual is split over the ranks of this process group (each holds a part, or each the
    whole); the numerator and denominator sums are all-reduced over it before dividing (not the per-rank
    ratios), so every rank gets the whole residual's distance. A rank holding the whole residual adds
    ``world_size`` equal copies to both sums, which leaves the ratio unchanged. Not with ``strides``.

    >>> residual_stats(torch.ones(2, 3), torch.full((2, 3), 2.0), batch=2)
    tensor([[0.5000, 0.5000]])
    """
    tiny = torch.finfo(torch.float32).tiny
    a = r_now.float().reshape(batch, -1)
    b = r_prev.float().reshape(batch, -1)
    num, den = (a - b).abs().sum(1), b.abs().sum(1)
    if group is not None:
        if strides:
            raise GraphpassError("MoReg's motion score compares neighboring frames, which a split residual "
                                 "holds on different ranks; use moreg=None with sequence parallelism")
        c10d = torch.ops._c10d_functional
        num, den = c10d.wait_tensor(c10d.all_reduce(torch.stack([num, den]), "sum", group)).unbind(0)
    d = num / den.clamp_min(tiny)
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


def _entry_value(graph: fx.Graph, by_name: dict[str, fx.Node], x: str | Concat,
                 before: fx.Node | None = None) -> fx.Node:
    """The node holding a stream's value entering the chain: the node itself, or the concatenation of its
    parts (inserted before ``before``)."""
    if not isinstance(x, Concat):
        return by_name[x]

    def join(*parts):
        return torch.cat(parts, x.dim)

    return inline(graph, join, [by_name[p] for p in x.parts], before=before)


def specialize_residual_phase(captured: CapturedGraph, span: BlockSpan, phase: Phase, metric: MetricSite | None = None,
                              strides: Sequence[int] = (), unit: str = "residual", *,
                              passes: Sequence[Callable[[fx.Graph], object]] = ()) -> PhaseGraph:
    """The graph of one residual-caching phase.

    ``phase.action(span.path)`` with ``unit="residual"``: REUSE -> the blocks are cut out and, for each
    hidden state the chain carries, ``h_out = h_in + cache[its residual]``; STORE -> the graph also returns
    each ``h_out - h_in``; COMPUTE -> the captured graph. With ``unit="outputs"`` the action applies to every attention/MLP region inside the blocks
    (:func:`~graphpass.passes.specialize.specialize_phase`): a reuse step reads their cached outputs and still
    runs the blocks' gates and skip adds with the current step's conditioning.
    ``phase.metric`` (a :class:`~graphpass.schedules.adacache.ResidualPhase`; ``"none"`` for plain phases):
    ``"store"`` also returns the metric residual; ``"measure"`` reads the previous metric residual from the
    cache and returns the new one and :func:`residual_stats` (with MoReg motion when ``strides`` are given).
    ``passes`` run on the rewritten graph after dead-code elimination and before the checks, as in
    :func:`~graphpass.passes.specialize.specialize_phase` (the collectives of skipped blocks go there).
    """
    action = phase.action(span.path)
    mode = phase.metric if isinstance(phase, ResidualPhase) else "none"
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
        inner = specialize_phase(captured, span.inner, Phase.of({r.path: action for r in span.inner}), passes=passes)
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
        for (x, o), key in zip(span.streams, span.residual_keys):
            h_out = by_name[o]
            h_in = _entry_value(graph, by_name, x, before=h_out)
            cached = placeholder(key, h_out)
            cache_inputs.append(key)
            new = inline(graph, _add, [h_in, cached], before=h_out)
            h_out.replace_all_uses_with(new)
            outs = [fx.node.map_arg(a, lambda n, h_out=h_out, new=new: new if n is h_out else n) for a in outs]
    elif action != Action.REUSE:
        if unit == "residual" and action == Action.STORE:
            for (x, o), key in zip(span.streams, span.residual_keys):
                stored.append((key, inline(graph, _sub, [by_name[o], _entry_value(graph, by_name, x)])))
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
                    return residual_stats(now, before, metric.batch, layout, strides_, metric.group)

                stored.append((metric.stats_key, inline(graph, stats, [r, prev])))
    cache_outputs = [k for k, _ in stored]
    graph.output(tuple(outs) + tuple(n for _, n in stored))
    eliminate_dead_code(graph)
    for extra in passes:
        extra(graph)

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


# --- step caches that look before they leap: First Block Cache, TeaCache, MagCache calibration --------------
#: What a probe reads before the call decides (see :class:`ProbeSite`).
PROBES = ("none", "head", "modulated", "ratio")
#: Which part of a call a step-cache phase graph runs (see :class:`StepCachePhase`).
PARTS = ("whole", "probe", "rest")


@dataclass(frozen=True)
class StepCachePhase(Phase):
    """A phase of a step cache whose decision may depend on the current call.

    ``actions`` names the block span as in :class:`~graphpass.schedules.adacache.ResidualPhase` (STORE,
    REUSE or absent). Besides:

    keep_head: a reuse step still runs the first block and adds the residual of the *other* blocks to its
        output (First Block Cache: ``h_out = head(h_in) + R_tail``, ``R_tail = h_out - head(h_in)`` stored on
        compute steps); otherwise the whole chain is one add (``h_out = h_in + R``).
    probe: what the call reports about itself (:data:`PROBES`): ``"head"`` the first block's residual
        ``r0``; ``"modulated"`` the first block's timestep-modulated input ``m``; ``"ratio"`` MagCache's
        residual-norm ratio to the previous stored residual; ``"none"``.
    measure: the probe also compares its value with the cached reference (:func:`relative_l1`, or the norm
        ratio for ``"ratio"``) and returns that statistic.
    first_stream: only the first hidden state (the video tokens) carries a residual; the others leave the
        chain of a reuse step as they entered it (MagCache returns the text tokens unchanged) and nothing is
        stored for them.
    part: ``"whole"`` the full call; ``"probe"`` only what the probe needs (embeddings, the first block or
        its modulation), returning the statistic, the probed value and every value the rest of the call
        reads; ``"rest"`` the remainder, reading those values instead of recomputing them. A decided call
        runs ``probe``, reads one number on the host, then ``rest`` with the chosen action.

    >>> StepCachePhase(Phase.of({"blocks.0..blocks.1": Action.REUSE}).actions, keep_head=True, part="rest").label()
    'reuse 1, head kept, rest'
    """

    keep_head: bool = False
    first_stream: bool = False
    probe: str = "none"
    measure: bool = False
    part: str = "whole"

    def label(self) -> str:
        base = "probe" if self.part == "probe" else super().label()
        extra = [x for x, on in (("head kept", self.keep_head and self.part != "probe"),
                                 (f"{self.probe} probe", self.probe != "none" and self.part == "whole"),
                                 ("rest", self.part == "rest")) if on]
        return ", ".join([base, *extra])


@dataclass
class ProbeSite:
    """Where a step cache looks before deciding.

    kind: ``"head"`` (the first block's residual on the first stream, ``head out - head in``), ``"modulated"``
        (the node ``node``: the first block's input after its timestep modulation, i.e. what its first
        attention reads of the video tokens) or ``"ratio"`` (the span's residual itself).
    node: for ``"modulated"``, the node holding ``m``.
    head: per stream of the span, the first block's (input, output) node names.
    spec: shape and dtype of the probed value.
    """

    kind: str
    node: str | None
    head: list[tuple[str, str]]
    spec: TensorSpec

    #: cache keys: the probed value of this call, the reference it is compared with, the statistic
    value_key = "probe:value"
    reference_key = "probe:reference"
    stats_key = "probe:stats"

    @property
    def roots(self) -> list[str]:
        """Nodes whose computation the probe part of a call holds (with everything they depend on)."""
        return [self.node] if self.kind == "modulated" else [o for _, o in self.head]


def find_probe_site(captured: CapturedGraph, span: BlockSpan, regions: Sequence[Region], kind: str) -> ProbeSite:
    """Resolve a probe on the chain of blocks.

    ``"head"``: the first block's stream outputs must have the layout of the chain's outputs (its residual
    is added to them). ``"modulated"``: among the values the first attention/MLP region of the first block
    reads from outside it, the one holding as many elements as the video tokens (followed back through
    re-layouts) that is not the stream itself (Wan's ``norm1(h) * (1 + scale) + shift``, CogVideoX's
    ``norm1(h, text, temb)[0]``, VDT's modulated norm before its reshape to frames).

    >>> find_probe_site(cap, span, regions, "modulated").node     # tiny Wan: block 0's modulated norm
    'type_as_1'
    """
    if kind not in PROBES or kind == "none":
        raise GraphpassError(f"unknown probe {kind!r}; one of {PROBES[1:]}")
    by_name = {n.name: n for n in captured.gm.graph.nodes}
    head = span.block_streams[span.blocks[0]]
    for (x, o), (_, out) in zip(head, span.streams):
        if kind == "head" and _shape(by_name[o]) != _shape(by_name[out]):
            raise ScheduleError(f"the first block {span.blocks[0]} of {captured.model_type} returns its hidden state "
                                f"as {_shape(by_name[o])} but the chain ends in {_shape(by_name[out])}: a cache that "
                                f"keeps the first block (First Block Cache) needs both in one layout; use a "
                                f"whole-chain cache (MagCache, TeaCache, AdaCache) for this model")
    if kind != "modulated":
        node = by_name[span.output]
        return ProbeSite(kind, None, head, TensorSpec(_shape(node), _val(node).dtype))
    first = next((r for r in regions if block_of(r.path) == span.blocks[0]), None)
    inside = set(first.nodes) if first else set()
    entry = set(input_names(span.input))
    numel = _numel(by_name[span.output])
    found = {_before_layout(a) for n in (by_name[m] for m in inside) for a in n.all_input_nodes
             if a.name not in inside and a.op == "call_function" and isinstance(_val(a), torch.Tensor)
             and _numel(a) == numel}
    found = {a for a in found if a.name not in entry}
    if len(found) != 1:
        raise TaggingError(f"cannot find the timestep-modulated input of {span.blocks[0]} of {captured.model_type}: "
                           f"its first region {first.path if first else None} reads "
                           f"{sorted(a.name for a in found) or 'no value'} shaped like the video tokens "
                           f"{span.spec.shape}; TeaCache needs exactly one")
    (node,) = found
    return ProbeSite(kind, node.name, head, TensorSpec(_shape(node), _val(node).dtype))


def _before_layout(node: fx.Node) -> fx.Node:
    """``node`` followed back through re-layouts (views, reshapes, permutes) to the op that computed it:
    VDT's attention reads its modulated input reshaped to ``(B*F, tokens, D)``."""
    while node.op == "call_function" and node.target in _LAYOUT and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def relative_l1(now: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``mean|now - ref| / mean|ref|`` over every element (the whole batch) as a 0-d tensor, in the values'
    dtype: the distance of First Block Cache (first block's residual to the last computed one) and TeaCache
    (modulated input to the previous call's).

    >>> relative_l1(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0]))
    tensor(0.5000)
    """
    return (now - ref).abs().mean() / ref.abs().mean()


def norm_ratio(now: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """MagCache's magnitude ratio of a residual to the previous one: the mean over batch and tokens of
    ``||now||_2 / (||prev||_2 + 1e-8)``, norms over the last (channel) axis, in float32.

    >>> norm_ratio(torch.full((1, 2, 4), 2.0), torch.ones(1, 2, 4))
    tensor(2.)
    """
    return (torch.linalg.norm(now.float(), dim=-1) / (torch.linalg.norm(prev.float(), dim=-1) + 1e-8)).mean()


def probe_prefix(gm: fx.GraphModule, roots: Sequence[str]) -> set[str]:
    """Names of the nodes the ``roots`` depend on (placeholders and in-place writes into memory they read,
    made before they read it, included): what the probe part of a call computes."""
    bases, writers = in_place_writers(gm.graph)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    by_name = {n.name: n for n in gm.graph.nodes}
    seen: set[fx.Node] = set()
    todo = [by_name[r] for r in roots]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
        for a in [n, *n.all_input_nodes]:
            for b in bases[a]:
                todo.extend(w for w in writers.get(b, ()) if order[w] < order[n])
    return {n.name for n in seen}


def _split(src: fx.GraphModule, span: BlockSpan, site: ProbeSite) -> tuple[set[str], list[str]]:
    """(the nodes the probe part computes and the rest of the call does not, the tensors it hands over).

    The cut is :func:`probe_prefix` less its non-tensor values (sizes, tuples of results): a rest graph
    recomputes those from what it is handed, since only tensors travel through the cache. Handed over are the
    cut's tensors that a node outside the cut reads, the streams' entries and the first block's outputs (the
    bases of a rest graph's residual adds), in graph order."""
    prefix = probe_prefix(src, site.roots)
    cut = {n.name for n in src.graph.nodes if n.name in prefix and n.op != "placeholder"
           and isinstance(_val(n), torch.Tensor)}
    extra = set(_handed_over(span, site, cut))
    boundary = [n.name for n in src.graph.nodes if n.name in cut and (
        n.name in extra or any(u.name not in cut for u in n.users))]
    return cut, boundary


def boundary_key(name: str) -> str:
    """Cache key under which the probe part hands node ``name``'s value to the rest of the call."""
    return f"probe:boundary:{name}"


class _GraphBuilder:
    """A copy of a captured graph with helpers to add cache inputs (after the last input, in call order) and
    cache outputs."""

    def __init__(self, gm: fx.GraphModule):
        self.graph, self.by_name, self.outs = copy_graph(gm)
        self.last_input = [n for n in self.graph.nodes if n.op == "placeholder"][-1]
        self.cache_inputs: list[str] = []
        self.stored: list[tuple[str, fx.Node]] = []

    def cache_input(self, key: str, like: fx.Node | torch.Tensor) -> fx.Node:
        with self.graph.inserting_after(self.last_input):
            ph = self.graph.placeholder(cache_input_name(key))
        ph.meta["val"] = _val(like) if isinstance(like, fx.Node) else like
        ph.meta["graphpass_cache_key"] = key
        self.last_input = ph
        self.cache_inputs.append(key)
        return ph

    def finish(self, src: fx.GraphModule, phase: Phase, user_outputs: list, class_name: str) -> PhaseGraph:
        self.graph.output(tuple(user_outputs) + tuple(n for _, n in self.stored))
        eliminate_dead_code(self.graph)
        self.graph.lint()
        gm = fx.GraphModule(src, self.graph, class_name=class_name)
        return PhaseGraph(phase=phase, gm=gm, cache_inputs=list(self.cache_inputs),
                          cache_outputs=[k for k, _ in self.stored], num_user_outputs=len(user_outputs),
                          flops=graph_flops(gm))


def _probe_value(b: _GraphBuilder, site: ProbeSite) -> fx.Node:
    if site.kind == "modulated":
        return b.by_name[site.node]
    x, o = site.head[0]
    return inline(b.graph, _sub, [b.by_name[o], b.by_name[x]])


def specialize_step_phase(captured: CapturedGraph, span: BlockSpan, phase: StepCachePhase,
                          site: ProbeSite | None = None) -> PhaseGraph:
    """The graph of one :class:`StepCachePhase` (cache keys: the span's residual keys, the site's
    ``value_key``/``reference_key``/``stats_key`` and :func:`boundary_key` of each value handed from the probe
    part to the rest).

    * ``part="whole"``: the captured graph with the span STOREd (returns ``h_out - base`` per stream),
      REUSEd (``h_out = base + cached``) or computed, where ``base`` is the chain's input or, with
      ``keep_head``, the first block's output; with a ``"head"``/``"modulated"`` probe it also returns the
      probed value, with ``"ratio"`` and ``measure`` the :func:`norm_ratio` of the stored residual to the
      cached one.
    * ``part="probe"``: the nodes the probe depends on (:func:`probe_prefix`), returning the statistic
      (:func:`relative_l1` of the value to the cached reference), the value, then every computed value the
      rest of the call reads.
    * ``part="rest"``: the whole graph of the same action without the probe's nodes, which it reads as cache
      inputs instead.

    Running ``probe`` then ``rest`` gives the outputs of ``whole`` (the same ops on the same values).
    """
    if phase.probe not in PROBES or phase.part not in PARTS:
        raise GraphpassError(f"step-cache phase probe={phase.probe!r} part={phase.part!r}: probe one of {PROBES}, "
                             f"part one of {PARTS}")
    unknown = {p for p, _ in phase.actions} - {span.path}
    if unknown:
        raise GraphpassError(f"step-cache phase names {sorted(unknown)}; it may only name the block span {span.path}")
    if phase.probe != "none" and site is None:
        raise GraphpassError(f"phase with a {phase.probe!r} probe needs its ProbeSite")
    src = captured.gm
    if phase.part == "probe":
        return _probe_graph(captured, span, phase, site)
    b = _GraphBuilder(src)
    action = phase.action(span.path)
    outs = b.outs
    bases = [o for _, o in site.head] if phase.keep_head and site is not None else None
    if phase.keep_head and bases is None:
        bases = [o for _, o in span.block_streams[span.blocks[0]]]
    for s, ((x, o), key) in enumerate(zip(span.streams, span.residual_keys)):
        h_out = b.by_name[o]
        base = b.by_name[bases[s]] if bases else _entry_value(b.graph, b.by_name, x, before=h_out)
        if s and phase.first_stream:
            if action == Action.REUSE:  # this stream leaves the skipped chain unchanged
                h_out.replace_all_uses_with(base)
                outs = [fx.node.map_arg(a, lambda n, h_out=h_out, base=base: base if n is h_out else n) for a in outs]
            continue
        if action == Action.REUSE:
            new = inline(b.graph, _add, [base, b.cache_input(key, h_out)], before=h_out)
            h_out.replace_all_uses_with(new)
            outs = [fx.node.map_arg(a, lambda n, h_out=h_out, new=new: new if n is h_out else n) for a in outs]
        elif action == Action.STORE:
            b.stored.append((key, inline(b.graph, _sub, [h_out, base])))
    if phase.part == "whole" and phase.probe in ("head", "modulated"):
        b.stored.append((site.value_key, _probe_value(b, site)))
    if phase.probe == "ratio" and phase.measure:
        if action != Action.STORE or len(b.stored) < 1:
            raise GraphpassError("the 'ratio' probe measures the residual a STORE step returns")
        now = b.stored[0][1]
        b.stored.append((site.stats_key, inline(b.graph, norm_ratio, [now, b.cache_input(span.residual_keys[0], now)])))
    if phase.part == "rest":
        _cut_prefix(b, src, span, site)
    pg = b.finish(src, phase, outs, "StepCachePhaseGraph")
    if action == Action.REUSE:  # ensures: nothing of the skipped blocks runs
        skipped = span.blocks[1:] if phase.keep_head else span.blocks
        alive = {n.name for n in pg.gm.graph.nodes}
        left = [m.name for blk in skipped for m in _block_nodes(src, blk) if m.name in alive]
        if left:
            raise GraphpassError(f"reuse graph still runs nodes of the skipped blocks {left[:3]}")
    return pg


def _probe_graph(captured: CapturedGraph, span: BlockSpan, phase: StepCachePhase, site: ProbeSite) -> PhaseGraph:
    src = captured.gm
    prefix = probe_prefix(src, site.roots)
    _, boundary = _split(src, span, site)
    b = _GraphBuilder(src)
    value = _probe_value(b, site)
    if phase.measure:
        ref = b.cache_input(site.reference_key, value)
        b.stored.append((site.stats_key, inline(b.graph, relative_l1, [value, ref])))
    b.stored.append((site.value_key, value))
    b.stored.extend((boundary_key(n), b.by_name[n]) for n in boundary)
    copied = set(b.by_name.values())
    keep = {b.by_name[n] for n in prefix} | {n for n in b.graph.nodes if n not in copied}  # + the probe's own
    for n in reversed(list(b.graph.nodes)):
        if n.op != "placeholder" and n not in keep:
            b.graph.erase_node(n)
    return b.finish(src, phase, [], "ProbeGraph")


def _handed_over(span: BlockSpan, site: ProbeSite, prefix: set[str]) -> list[str]:
    """Prefix values a rest graph reads besides those the captured graph reads: the streams' entries and the
    first block's outputs (the bases of the residual adds)."""
    names = [n for x, _ in span.streams for n in input_names(x)] + [o for _, o in site.head]
    return [n for n in names if n in prefix]


def _cut_prefix(b: _GraphBuilder, src: fx.GraphModule, span: BlockSpan, site: ProbeSite) -> None:
    """Replace the probe's nodes in ``b`` by cache inputs holding their values (handed over by the probe
    graph) and delete them."""
    cut, boundary = _split(src, span, site)
    in_cut = {b.by_name[n] for n in cut}
    for name in boundary:
        node = b.by_name[name]
        ph = b.cache_input(boundary_key(name), node)
        node.replace_all_uses_with(ph, delete_user_cb=lambda u: u not in in_cut)
    for n in reversed(list(b.graph.nodes)):
        if n in in_cut:
            if n.users:  # requires: the probe hands over every value of the cut read after it
                raise GraphpassError(f"rest graph reads {n.name} of the probe's part, which is not handed over")
            b.graph.erase_node(n)
