"""Sequence parallelism as a graph pass: one rank's graph of a captured DiT (DSP, Ulysses, ring).

The model is captured once with the whole video (every rank captures the same graph). This pass rewrites
that graph into the graph one rank runs when the frames are split across ``world_size`` ranks. In every
mode:

* the video input's frame dimension is cut to this rank's frames (a slice, no communication), unless
  ``keep_sharded`` (then the rank is given its frames);
* every op that does not mix the split axis runs on the local frames; the shape arguments of reshapes are
  rewritten to local sizes and whole constants such as position embeddings and rotary tables are sliced to
  the rank's frames;
* frame-sharded outputs are all-gathered into whole tensors, unless ``keep_sharded``.

The modes differ in how attention that spans the split axis gets all of it:

* ``"dsp"`` (Dynamic Sequence Parallelism; spatial-temporal models): around each **temporal** region an
  all-to-all switches the split from frames to tokens on the way in (every rank then holds all frames of
  a slice of the token positions) and a second one switches it back on the way out.
* ``"ulysses"`` (joint 3D attention: CogVideoX, Wan, HunyuanVideo): the token sequence is split by frames
  everywhere; for each attention op whose keys are split along the sequence, an all-to-all each switches
  q, k and v from a split of the sequence to a split of the heads, and one after the op switches the
  output back. Text tokens concatenated into the sequence stay whole on every rank (a *segment*, see
  :class:`Axis`): their heads are sliced locally on the way in and all-gathered on the way out. Heads that
  do not divide by the ranks are split unevenly (3 on 2 ranks: 2 + 1); with fewer heads than ranks the op
  falls back to ring attention.
* ``"ring"``: queries stay put; each rank's keys and values are passed round the ranks (``world_size - 1``
  exchanges, keys and values in one buffer) and the partial attentions are merged by log-sum-exp.

Collectives are ``torch.ops._c10d_functional`` nodes (``all_to_all_single`` / ``all_gather_into_tensor``
followed by ``wait_tensor``) tagged with the region they serve, so later passes see them:
:func:`~graphpass.passes.elide.elide_collectives` removes those of a region a phase reuses (DSP: its pair;
Ulysses: its four all-to-alls and the text all-gather; ring: its exchanges), and caches stay per rank.

Uneven splits are exact: frames are divided as evenly as possible (3 frames on 2 ranks: 2 + 1), tokens and
heads likewise, and the all-to-alls carry per-rank split sizes, so nothing is padded inside the model (only
all-gathers pad to the largest shard and drop the padding again).

How it works: the pass walks the graph once and tracks, for every tensor, where the split axis sits (its
dimension and the elements of that dimension below it, so merged dims such as ``B*F`` are followed through
reshapes and permutes). Each op the sharded data reaches must have a rule saying which dims it mixes
(:data:`RULES`, one entry per op family); an op that would mix the split axis (attention over frames
outside a temporal region in DSP, a reshape that splits frames) is an error naming the node. The result is
checked by propagating fake tensors through the local graph and comparing every node's shape with the
shape the pass predicted.

>>> sg = parallelize(captured, regions, rank=0, world_size=2, group_name="0")
>>> sg.frames.sizes, len(sg.collectives)          # VDT-tiny: 4 frames, 2 temporal regions + 1 output
((2, 2), 5)
>>> sg = parallelize(cog, cog_regions, rank=0, world_size=2, group_name="0", mode="ulysses")
>>> sg.frames.sizes, len(sg.collectives)          # CogVideoX-tiny: 3 frames; 2 joint attentions x 5 + 1
((2, 1), 11)
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
import torch.fx as fx

from ..errors import ParallelError  # also importable from here
from .capture import CapturedGraph, TensorSpec, module_path
from .elide import META_KEY, WAIT_OP, CollectiveInfo, collective_nodes
from .flops import node_flops
from .ops import CASTS, COPIES, RESHAPES, SPLITS
from .tag import Region, _pick_video_input

aten = torch.ops.aten
_C10D = torch.ops._c10d_functional


# --- splits and axes -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Split:
    """How ``total`` elements of one axis are divided over the ranks: ``sizes[r]`` for rank ``r``, in
    rank order (contiguous blocks). ``Split.even(3, 2).sizes == (2, 1)``."""

    name: str
    sizes: tuple[int, ...]

    @staticmethod
    def even(name: str, total: int, world_size: int) -> "Split":
        q, r = divmod(total, world_size)
        return Split(name, tuple(q + (i < r) for i in range(world_size)))

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for s in self.sizes:
            out.append(acc)
            acc += s
        return tuple(out)


@dataclass(frozen=True)
class Axis:
    """Where a logical axis (frames, tokens) sits in a tensor: dimension ``dim`` has size
    ``outer * size * inner`` and the axis is its middle factor (``inner`` elements below it).

    A *segment* (``pre`` or ``post`` > 0) is a sequence with whole, unsplit elements on either side of the
    axis: text tokens concatenated before (CogVideoX) or after (HunyuanVideo) the video tokens. Its dim has
    size ``pre + size * inner + post``; every rank holds the ``pre`` and ``post`` elements whole.

        >>> Axis(1, 16, 3, pre=5)        # (B, 5 + 3*16, D): 5 text tokens, then 3 frames of 16 tokens
    """

    dim: int
    inner: int
    size: int
    pre: int = 0
    post: int = 0

    @property
    def segment(self) -> bool:
        return bool(self.pre or self.post)

    def local_length(self, length: int, split: "Split", rank: int) -> int:
        """The dim's length on ``rank`` when its global length is ``length``."""
        middle = length - self.pre - self.post
        return middle // self.size * split.sizes[rank] + self.pre + self.post


@dataclass(frozen=True)
class _State:
    """Sharding of one tensor: ``shard`` is the axis split over the ranks (by ``split``), ``frames``
    where the frames are (the sharded axis outside temporal regions; tracked, whole, inside them)."""

    shard: Axis | None = None
    split: Split | None = None
    frames: Axis | None = None


_REPLICATED = _State()


class _Mixed(Exception):
    """An op mixes (or splits) an axis it would need to keep."""


# --- the result ----------------------------------------------------------------------------------
@dataclass
class ShardedGraph:
    """One rank's graph.

    captured: the local :class:`CapturedGraph` (same inputs and outputs as the model: whole tensors, or
        this rank's frames of the video input and outputs with ``keep_sharded``).
    regions: the regions with local exit shapes; a temporal region's exits are the outputs of its exit
        all-to-alls, so caching a temporal region stores (and reusing it skips) its communication too.
    frames: the frame split; ``frame_dim`` the video input's frame dimension.
    collectives: names of the collective nodes of the local graph, in order.
    held: how this rank holds the value of each node of the captured graph (by name): ``"split"`` (its part
        of the split axis: frames, tokens or heads), ``"whole"`` (the whole value, as on every rank), or
        ``"segment"`` (whole text tokens around its part of the video tokens). Sums over the ranks of a
        ``"split"`` value are the whole value's sums, e.g. for a distance measured on it.
    """

    captured: CapturedGraph
    regions: list[Region]
    frames: Split
    video_input: str
    frame_dim: int
    rank: int
    world_size: int
    keep_sharded: bool
    collectives: list[str] = field(default_factory=list)
    mode: str = "dsp"
    held: dict[str, str] = field(default_factory=dict)


def _shape(n) -> tuple[int, ...]:
    v = n.meta.get("val") if isinstance(n, fx.Node) else n
    if not isinstance(v, torch.Tensor):
        raise ParallelError(f"node {getattr(n, 'name', n)} has no tensor shape (meta['val']); capture the model "
                            f"with graphpass.passes.capture.capture")
    return tuple(int(s) for s in v.shape)


def _norm(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _local_shape(shape: tuple[int, ...], st: _State, rank: int) -> list[int]:
    out = list(shape)
    if st.shard is not None:
        out[st.shard.dim] = st.shard.local_length(shape[st.shard.dim], st.split, rank)
    return out


def _reshape_axis(axis: Axis, in_shape, out_shape) -> Axis:
    """The axis after a row-major reshape, or _Mixed if the reshape splits it across dims. A segment's dim
    must stay one whole dim (same size, same elements before it)."""
    if axis.segment:
        before = math.prod(in_shape[:axis.dim])
        for d in range(len(out_shape)):
            if math.prod(out_shape[:d]) == before and out_shape[d] == in_shape[axis.dim]:
                return replace(axis, dim=d)
        raise _Mixed(f"the reshape {list(in_shape)} -> {list(out_shape)} reshapes a sequence of whole and split "
                     f"tokens")
    stride = axis.inner * math.prod(in_shape[axis.dim + 1:])
    suffix = 1
    for d in range(len(out_shape) - 1, -1, -1):
        span = suffix * out_shape[d]
        if suffix <= stride and stride % suffix == 0 and span % (stride * axis.size) == 0:
            return Axis(d, stride // suffix, axis.size)
        suffix = span
    raise _Mixed(f"the reshape {list(in_shape)} -> {list(out_shape)} splits the axis over several dims")


# --- op rules ------------------------------------------------------------------------------------
# An index map says, for each dim of one tensor operand, which output dim it becomes and whether the op
# mixes values along it (reduction, contraction, normalisation): {in_dim: (out_dim or None, mixed)}.
IndexMap = dict[int, tuple[int | None, bool]]
Maps = list[tuple[fx.Node, IndexMap]]

_RESHAPES = RESHAPES
_IDENTITY = CASTS | COPIES
_NO_OUTPUT = {aten._assert_tensor_metadata.default}
_TUPLE_SPLITS = SPLITS


def _bcast(rank_in: int, rank_out: int) -> IndexMap:
    return {i: (i + rank_out - rank_in, False) for i in range(rank_in)}


def _arg(n: fx.Node, i: int, name: str, default=None):
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


def _rk(a: fx.Node) -> int:
    return len(_shape(a))


def _out_rank(n: fx.Node) -> int:
    return len(_shape(n)) if isinstance(n.meta.get("val"), torch.Tensor) else 0


def _keep(x: fx.Node, mixed: set[int] = frozenset()) -> IndexMap:
    """Each dim of ``x`` stays where it is; those in ``mixed`` are mixed."""
    return {i: (i, i in mixed) for i in range(_rk(x))}


# Each function below gives the index maps of one op family (see :data:`RULES`).
def _elementwise(n: fx.Node) -> Maps:
    return [(a, _bcast(_rk(a), _out_rank(n))) for a in n.all_input_nodes]


def _first(n: fx.Node) -> Maps:
    """Ops whose output is their first operand's values (conversions, copies, ``type_as``, whose second
    operand only gives the dtype)."""
    return [(n.args[0], _bcast(_rk(n.args[0]), _out_rank(n)))]


def _expand(n: fx.Node) -> Maps:
    return [(n.args[0], _bcast(_rk(n.args[0]), _out_rank(n)))]


def _permute(n: fx.Node) -> Maps:
    x, perm = n.args[0], [_norm(p, _out_rank(n)) for p in n.args[1]]
    return [(x, {i: (perm.index(i), False) for i in range(_rk(x))})]


def _transpose(n: fx.Node) -> Maps:
    x = n.args[0]
    r = _rk(x)
    a, b = _norm(n.args[1], r), _norm(n.args[2], r)
    sw = {a: b, b: a}
    return [(x, {i: (sw.get(i, i), False) for i in range(r)})]


def _t(n: fx.Node) -> Maps:
    x = n.args[0]
    return [(x, {i: (_rk(x) - 1 - i, False) for i in range(_rk(x))})]


def _unsqueeze(n: fx.Node) -> Maps:
    x, d = n.args[0], _norm(n.args[1], _out_rank(n))
    return [(x, {i: (i + (i >= d), False) for i in range(_rk(x))})]


def _squeeze(n: fx.Node) -> Maps:
    x = n.args[0]
    r = _rk(x)
    dims = n.args[1] if isinstance(n.args[1], (list, tuple)) else [n.args[1]]
    gone = {_norm(d, r) for d in dims if _shape(x)[_norm(d, r)] == 1}
    m, j = {}, 0
    for i in range(r):
        m[i] = (None, True) if i in gone else (j, False)
        j += i not in gone
    return [(x, m)]


def _slice(n: fx.Node) -> Maps:
    x = n.args[0]
    d = _norm(_arg(n, 1, "dim", 0), _rk(x))
    return [(x, _keep(x, set() if _shape(x)[d] == _shape(n)[d] else {d}))]


def _select(n: fx.Node) -> Maps:
    x, d = n.args[0], _norm(n.args[1], _rk(n.args[0]))
    return [(x, {i: ((None, True) if i == d else (i - (i > d), False)) for i in range(_rk(x))})]


def _linear(n: fx.Node) -> Maps:
    x, w, b = n.args[0], n.args[1], _arg(n, 2, "bias")
    r, o = _rk(x), _out_rank(n)
    maps = [(x, _keep(x, {r - 1})), (w, {0: (o - 1, False), 1: (None, True)})]
    return maps + ([(b, {0: (o - 1, False)})] if isinstance(b, fx.Node) else [])


def _layer_norm(n: fx.Node) -> Maps:
    x = n.args[0]
    r, k = _rk(x), len(n.args[1])
    return [(x, _keep(x, set(range(r - k, r))))] + [(a, _bcast(_rk(a), _out_rank(n))) for a in n.args[2:4]
                                                   if isinstance(a, fx.Node)]


def _group_norm(n: fx.Node) -> Maps:
    x = n.args[0]
    return [(x, _keep(x, set(range(1, _rk(x)))))] + [(a, {0: (1, False)}) for a in n.args[2:4]
                                                     if isinstance(a, fx.Node)]


def _along_dim(n: fx.Node) -> Maps:
    """softmax-like: mixes along ``args[1]``."""
    x = n.args[0]
    return [(x, _keep(x, {_norm(n.args[1], _rk(x))}))]


def _reduce(n: fx.Node) -> Maps:
    x = n.args[0]
    r = _rk(x)
    dims, keep = _arg(n, 1, "dim"), bool(_arg(n, 2, "keepdim", False))
    red = set(range(r)) if dims in (None, []) else {_norm(d, r) for d in dims}
    m, j = {}, 0
    for i in range(r):
        m[i] = ((j if keep else None), True) if i in red else (j, False)
        j += keep or i not in red
    return [(x, m)]


def _sdpa(n: fx.Node) -> Maps:
    q, k, v = n.args[:3]
    mask, o = _arg(n, 3, "attn_mask"), _out_rank(n)
    maps = [(q, _keep(q, {_rk(q) - 1}))]
    for a, last in ((k, None), (v, o - 1)):
        r = _rk(a)
        m = {i: (i + o - r, False) for i in range(r - 2)}
        m[r - 2] = (None, True)
        m[r - 1] = (last, last is None)
        maps.append((a, m))
    if isinstance(mask, fx.Node):
        r = _rk(mask)
        m = {i: (i + o - r, False) for i in range(r - 1)}
        m[r - 1] = (None, True)
        maps.append((mask, m))
    return maps


def _conv_keeps(n: fx.Node) -> set[int]:
    """Spatial dims of a convolution that map one input element to one output element (kernel 1, stride 1,
    no padding): a patch embedding with a frame patch of 1 keeps frames independent."""
    w = n.args[1]
    kernel = _shape(w)[2:]
    stride, padding = _arg(n, 3, "stride", [1]), _arg(n, 4, "padding", [0])
    if isinstance(padding, str):
        padding = [0] * len(kernel) if padding == "valid" else [1] * len(kernel)
    stride = list(stride) * (len(kernel) if len(stride) == 1 else 1)
    padding = list(padding) * (len(kernel) if len(padding) == 1 else 1)
    return {2 + i for i, (k, s, p) in enumerate(zip(kernel, stride, padding)) if k == 1 and s == 1 and p == 0}


def _conv(n: fx.Node) -> Maps:
    x = n.args[0]
    keeps = _conv_keeps(n) if n.target != aten.convolution.default else set()
    maps = [(x, {i: (i, i == 1 or (i > 1 and i not in keeps)) for i in range(_rk(x))})]
    return maps + [(a, {i: (None, True) for i in range(_rk(a))}) for a in n.all_input_nodes if a is not x]


def _embedding(n: fx.Node) -> Maps:
    w, idx = n.args[0], n.args[1]
    return [(w, {0: (None, True), 1: (_out_rank(n) - 1, False)}), (idx, _keep(idx))]


def _cat(n: fx.Node) -> Maps:
    d = _norm(_arg(n, 1, "dim", 0), _out_rank(n))
    return [(a, _keep(a, {d})) for a in n.args[0]]


def _stack(n: fx.Node) -> Maps:
    d = _norm(_arg(n, 1, "dim", 0), _out_rank(n))
    return [(a, {i: (i + (i >= d), False) for i in range(_rk(a))}) for a in n.args[0]]


def _matmul(n: fx.Node) -> Maps:
    a, b, o = n.args[0], n.args[1], _out_rank(n)
    ra, rb = _rk(a), _rk(b)
    ma = {i: (i + o - ra, False) for i in range(ra - 2)}
    ma.update({ra - 2: (o - 2, False), ra - 1: (None, True)})
    mb = {i: (i + o - rb, False) for i in range(rb - 2)}
    mb.update({rb - 2: (None, True), rb - 1: (o - 1, False)})
    return [(a, ma), (b, mb)]


def _repeat_interleave(n: fx.Node) -> Maps:
    x = n.args[0]
    return [(x, _keep(x, {_norm(_arg(n, 2, "dim"), _rk(x))}))]


def _pad(n: fx.Node) -> Maps:
    x, pad = n.args[0], n.args[1]
    return [(x, _keep(x, {_rk(x) - 1 - i for i in range(len(pad) // 2)}))]


def _plain_einsum(n: fx.Node) -> bool:
    eq = n.args[0].replace(" ", "")
    return "." not in eq and "->" in eq


def _einsum(n: fx.Node) -> Maps:
    ins, out = n.args[0].replace(" ", "").split("->")
    return [(a, {i: ((out.index(ch), False) if ch in out else (None, True)) for i, ch in enumerate(spec)})
            for spec, a in zip(ins.split(","), n.args[1])]


def _slice_scatter(n: fx.Node) -> Maps:
    """``out = x`` with ``src`` written into a strided slice of dim ``d``: only ``d`` moves values."""
    x, src = n.args[0], n.args[1]
    d = _norm(_arg(n, 2, "dim", 0), _rk(x))
    whole = _shape(x)[d] == _shape(src)[d]
    return [(x, _keep(x, set() if whole else {d})), (src, _keep(src, set() if whole else {d}))]


def _is_pointwise(n: fx.Node) -> bool:
    return isinstance(n.target, torch._ops.OpOverload) and torch.Tag.pointwise in n.target.tags


@dataclass(frozen=True)
class Rule:
    """One sharding rule: the ops it matches (``ops``, or any op for which ``check`` holds when ``ops`` is
    empty), an extra ``check`` on the node, and ``maps``: for each tensor operand, where each of its dims goes
    in the output and whether the op mixes values along it. The builder derives what happens to the sharded
    axis from that: kept (and followed to its output dim), or an error naming the op if it is mixed.

    Supporting a new op is one entry, e.g. ``Rule("roll", {aten.roll.default}, _roll_maps)``.

        >>> rule_for(node_of_aten_gelu).name
        'elementwise'
    """

    name: str
    ops: frozenset
    maps: Callable[[fx.Node], Maps]
    check: Callable[[fx.Node], bool] = lambda n: True

    def matches(self, n: fx.Node) -> bool:
        return (n.target in self.ops or not self.ops) and self.check(n)


_CONVS = frozenset({aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default})

#: The per-op sharding rules, first match wins.
RULES: tuple[Rule, ...] = (
    Rule("identity", frozenset(_IDENTITY), _first),
    Rule("elementwise", frozenset(), _elementwise, _is_pointwise),
    Rule("like", frozenset({aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default,
                            aten.full_like.default}), _elementwise),
    Rule("slice_scatter", frozenset({aten.slice_scatter.default}), _slice_scatter),
    # in-place writes into a view (CogVideoX's rotary: ``query[:, :, text:] = rotated``): the local view
    # of the local tensor is written the same way
    Rule("copy_", frozenset({aten.copy_.default}), _elementwise),
    Rule("expand", frozenset({aten.expand.default}), _expand),
    Rule("permute", frozenset({aten.permute.default}), _permute),
    Rule("transpose", frozenset({aten.transpose.int}), _transpose),
    Rule("t", frozenset({aten.t.default}), _t),
    Rule("unsqueeze", frozenset({aten.unsqueeze.default}), _unsqueeze),
    Rule("squeeze", frozenset({aten.squeeze.dim, aten.squeeze.dims}), _squeeze),
    Rule("slice", frozenset({aten.slice.Tensor}), _slice),
    Rule("select", frozenset({aten.select.int}), _select),
    Rule("linear", frozenset({aten.linear.default}), _linear),
    Rule("layer_norm", frozenset({aten.layer_norm.default, aten.rms_norm.default}), _layer_norm),
    Rule("group_norm", frozenset({aten.group_norm.default}), _group_norm),
    Rule("softmax", frozenset({aten.softmax.int, aten._softmax.default, aten._log_softmax.default,
                               aten.log_softmax.int}), _along_dim),
    Rule("reduce", frozenset({aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default}), _reduce),
    Rule("attention", frozenset({aten.scaled_dot_product_attention.default}), _sdpa),
    Rule("convolution", _CONVS, _conv),
    Rule("embedding", frozenset({aten.embedding.default}), _embedding),
    Rule("cat", frozenset({aten.cat.default}), _cat),
    Rule("stack", frozenset({aten.stack.default}), _stack),
    Rule("matmul", frozenset({aten.bmm.default, aten.matmul.default, aten.mm.default}), _matmul),
    Rule("repeat_interleave", frozenset({aten.repeat_interleave.self_int}), _repeat_interleave),
    Rule("pad", frozenset({aten.constant_pad_nd.default}), _pad),
    Rule("einsum", frozenset({aten.einsum.default}), _einsum, _plain_einsum),
)


def rule_for(n: fx.Node) -> Rule | None:
    """The first rule of :data:`RULES` that matches ``n``, or None."""
    return next((r for r in RULES if r.matches(n)), None)


def _index_maps(n: fx.Node) -> Maps:
    """Index maps of the tensor operands of ``n``; raises KeyError for ops without a rule."""
    rule = rule_for(n)
    if rule is None:
        raise KeyError(n.target)
    return rule.maps(n)


def _tuple_maps(n: fx.Node) -> tuple[fx.Node, int, bool]:
    """(operand, dim, removed) of chunk/split/unbind."""
    x = n.args[0]
    r = len(_shape(x))
    if n.target == aten.unbind.int:
        return x, _norm(_arg(n, 1, "dim", 0), r), True
    return x, _norm(_arg(n, 2, "dim", 0), r), False


# --- the builder ---------------------------------------------------------------------------------
class _Builder:
    def __init__(self, captured: CapturedGraph, regions: list[Region], *, rank: int, world_size: int,
                 group_name: str, video: str, frame_dim: int, keep_sharded: bool, mode: str = "dsp"):
        self.src = captured.gm
        self.captured = captured
        self.rank, self.world, self.group = rank, world_size, group_name
        self.video, self.frame_dim, self.keep_sharded = video, frame_dim, keep_sharded
        self.mode = mode
        vshape = captured.input_specs[captured.input_names.index(video)].shape
        self.frames = Split.even("frames", vshape[frame_dim], world_size)
        # DSP switches the split around temporal regions; Ulysses around each attention op instead.
        self.temporal = {r.path: r for r in regions if r.kind == "temporal" and mode == "dsp"}
        self.owner = {n: r.path for r in regions for n in r.nodes}
        self.region_of = {n: r.path for r in self.temporal.values() for n in r.nodes}
        self.exits_of = {e: r.path for r in self.temporal.values() for e in r.exits}
        self.g = fx.Graph()
        self.env: dict[fx.Node, Any] = {}
        self.state: dict[fx.Node, Any] = {}
        self.outside: dict[fx.Node, tuple[fx.Node, _State]] = {}
        self.entered: dict[tuple[fx.Node, str], tuple[fx.Node, _State]] = {}
        self.sliced: dict[tuple, fx.Node] = {}
        self.expected: dict[fx.Node, list[int]] = {}  # new node -> predicted local shape
        self.exit_nodes: dict[str, list[fx.Node]] = {p: [] for p in self.temporal}
        self.collectives: list[fx.Node] = []
        self._count = 0
        self.frames_at_attention: list[tuple[str, bool]] = []

    # helpers -------------------------------------------------------------------------------------
    def call(self, target, *args, hint: str) -> fx.Node:
        self._count += 1
        return self.g.create_node("call_function", target, args, {}, name=f"sp_{hint}_{self._count}")

    def fail(self, n: fx.Node, why: str) -> ParallelError:
        path = module_path(n)
        where = f" in {path[-1][0]}" if path else ""
        if self.mode != "dsp":
            return ParallelError(
                f"cannot shard the token sequence through node {n.name} ({n.target}){where}: {why}. Ulysses "
                f"sequence parallelism needs every op other than attention to keep tokens independent")
        return ParallelError(
            f"cannot shard frames through node {n.name} ({n.target}){where}: {why}. Sequence parallelism needs "
            f"every op outside temporal attention to keep frames independent; if this op is temporal attention, "
            f"tag its module as temporal with kinds={{'<path>': 'temporal'}}")

    def _expanded(self, shape, axes: list[tuple[Axis, int]]) -> tuple[list[int], list[int]]:
        """Shape with each axis' dim split into (outer, count, inner), and the index of each count."""
        by_dim = {a.dim: (a, c) for a, c in axes}
        out, pos = [], {}
        for d, s in enumerate(shape):
            if d in by_dim:
                a, c = by_dim[d]
                out += [s // (a.size * a.inner), c, a.inner]
                pos[d] = len(out) - 2
            else:
                out.append(s)
        return out, [pos[a.dim] for a, _ in axes]

    def _a2a(self, x: fx.Node, send: list[int], recv: list[int], info: CollectiveInfo) -> fx.Node:
        c = self.call(_C10D.all_to_all_single.default, x, recv, send, self.group, hint="all_to_all")
        c.meta[META_KEY] = info
        self.collectives.append(c)
        return self.call(WAIT_OP, c, hint="wait")

    def _switch(self, x: fx.Node, shape, dtype, cut: tuple[Axis, Split], join: tuple[Axis, Split],
                region: str, role: str) -> fx.Node:
        """All-to-all: rank j receives block j of axis ``cut`` (whole here) and every rank's block of axis
        ``join`` (split here), which becomes whole. ``shape`` is the global shape; returns the local result."""
        (ca, cs), (ja, js) = cut, join
        me, w = self.rank, self.world
        expand = lambda c, j: self._expanded(shape, [(ca, c), (ja, j)])  # noqa: E731
        here, (cpos, jpos) = expand(ca.size, js.sizes[me])
        x = self.call(aten.reshape.default, x, here, hint="expand")
        pieces = []
        for j in range(w):
            s = self.call(aten.slice.Tensor, x, cpos, cs.offsets[j], cs.offsets[j] + cs.sizes[j], hint="block")
            pieces.append(self.call(aten.reshape.default, s, [-1], hint="flat"))
        buf = self.call(aten.cat.default, pieces, 0, hint="send")
        send = [math.prod(expand(cs.sizes[j], js.sizes[me])[0]) for j in range(w)]
        recv = [math.prod(expand(cs.sizes[me], js.sizes[i])[0]) for i in range(w)]
        info = CollectiveInfo("all_to_all", region, role, (sum(send) - send[me]) * dtype.itemsize)
        y = self._a2a(buf, send, recv, info)
        parts = self.call(aten.split_with_sizes.default, y, recv, hint="recv")
        blocks = []
        for i in range(w):
            p = self.call(operator.getitem, parts, i, hint="from")
            blocks.append(self.call(aten.reshape.default, p, expand(cs.sizes[me], js.sizes[i])[0], hint="block"))
        joined = self.call(aten.cat.default, blocks, jpos, hint="join")
        local = list(shape)
        local[ca.dim] = shape[ca.dim] // ca.size * cs.sizes[me]
        return self.call(aten.reshape.default, joined, local, hint="merge")

    def _slice_replicated(self, a_new: fx.Node, a_shape, dim: int, ax: Axis, split: Split) -> fx.Node:
        key = (a_new, dim, ax, split)
        if key in self.sliced:
            return self.sliced[key]
        s, me = split, self.rank
        if ax.segment:  # whole prefix, this rank's block of the middle, whole suffix
            lo, n = ax.pre + s.offsets[me] * ax.inner, s.sizes[me] * ax.inner
            parts = [(0, ax.pre), (lo, lo + n), (a_shape[dim] - ax.post, a_shape[dim])]
            out = self.call(aten.cat.default, [self.call(aten.slice.Tensor, a_new, dim, b, e, hint="local")
                                               for b, e in parts if e > b], dim, hint="local")
            self.sliced[key] = out
            return out
        ex, (pos,) = self._expanded(a_shape, [(Axis(dim, ax.inner, ax.size), ax.size)])
        x = self.call(aten.reshape.default, a_new, ex, hint="view")
        x = self.call(aten.slice.Tensor, x, pos, s.offsets[me], s.offsets[me] + s.sizes[me], hint="local")
        local = list(a_shape)
        local[dim] = a_shape[dim] // ax.size * s.sizes[me]
        out = self.call(aten.reshape.default, x, local, hint="local")
        self.sliced[key] = out
        return out

    # inputs as seen by a consumer ----------------------------------------------------------------
    def view_of(self, a: fx.Node, consumer: fx.Node) -> tuple[Any, Any]:
        """``a`` as ``consumer`` reads it: after the exit all-to-all when ``a`` leaves a temporal region,
        after an enter all-to-all when it enters one."""
        inside = self.region_of.get(consumer.name)
        if a in self.outside and self.region_of.get(a.name) != inside:
            new, st = self.outside[a]
        else:
            new, st = self.env[a], self.state[a]
        if inside is not None and self.region_of.get(a.name) != inside and isinstance(st, _State) \
                and st.shard is not None:
            key = (a, inside)
            if key not in self.entered:
                self.entered[key] = self.enter(a, new, st, inside)
            return self.entered[key]
        return new, st

    def enter(self, a: fx.Node, new: fx.Node, st: _State, region: str) -> tuple[fx.Node, _State]:
        if st.split.name != "frames":
            raise self.fail(a, f"it enters temporal region {region} sharded by {st.split.name}, not frames")
        shape = _shape(a)
        fa = st.shard
        tok_dim = next((d for d in range(len(shape) - 1) if d != fa.dim and shape[d] >= self.world), None)
        if tok_dim is None:
            raise self.fail(a, f"temporal region {region} gets a tensor of shape {list(shape)} with no batch dim "
                               f"(other than frames and features) of at least {self.world} elements to shard")
        tokens = Split.even("tokens", shape[tok_dim], self.world)
        ta = Axis(tok_dim, 1, shape[tok_dim])
        out = self._switch(new, shape, a.meta["val"].dtype, cut=(ta, tokens), join=(fa, self.frames),
                           region=region, role="enter")
        new_st = _State(shard=ta, split=tokens, frames=fa)
        self.expected[out] = _local_shape(shape, new_st, self.rank)
        return out, new_st

    def leave(self, e: fx.Node, region: str) -> tuple[fx.Node, _State]:
        st: _State = self.state[e]
        if st.frames is None:
            raise self.fail(e, f"the frames of temporal region {region}'s output cannot be located")
        if st.frames.dim == st.shard.dim:
            raise self.fail(e, f"temporal region {region} returns tokens and frames merged in one dim")
        shape = _shape(e)
        out = self._switch(self.env[e], shape, e.meta["val"].dtype, cut=(st.frames, self.frames),
                           join=(st.shard, st.split), region=region, role="exit")
        new_st = _State(shard=st.frames, split=self.frames, frames=st.frames)
        self.expected[out] = _local_shape(shape, new_st, self.rank)
        return out, new_st

    def gather(self, x: fx.Node, shape, dtype, st: _State) -> fx.Node:
        """All-gather a frame-sharded output into the whole tensor (padding to the largest shard)."""
        me, w, fr = self.rank, self.world, self.frames
        ex, (fpos,) = self._expanded(shape, [(st.shard, fr.sizes[me])])
        x = self.call(aten.reshape.default, x, ex, hint="expand")
        perm = [fpos] + [i for i in range(len(ex)) if i != fpos]
        x = self.call(aten.permute.default, x, perm, hint="frames_first")
        x = self.call(aten.clone.default, x, hint="contiguous")
        fmax = max(fr.sizes)
        pad = [0, 0] * (len(ex) - 1) + [0, fmax - fr.sizes[me]]
        x = self.call(aten.constant_pad_nd.default, x, pad, 0.0, hint="pad")
        rest = [ex[i] for i in perm[1:]]
        info = CollectiveInfo("all_gather", "", "gather", fmax * math.prod(rest) * dtype.itemsize * (w - 1))
        c = self.call(_C10D.all_gather_into_tensor.default, x, w, self.group, hint="all_gather")
        c.meta[META_KEY] = info
        self.collectives.append(c)
        y = self.call(WAIT_OP, c, hint="wait")
        blocks = [self.call(aten.slice.Tensor, y, 0, i * fmax, i * fmax + fr.sizes[i], hint="rank") for i in range(w)]
        y = self.call(aten.cat.default, blocks, 0, hint="whole")
        inv = [perm.index(i) for i in range(len(ex))]
        y = self.call(aten.permute.default, y, inv, hint="frames_back")
        return self.call(aten.reshape.default, y, list(shape), hint="whole")

    # nodes ---------------------------------------------------------------------------------------
    def run(self) -> fx.Graph:
        placeholders = [n for n in self.src.graph.nodes if n.op == "placeholder"]
        for n in placeholders:
            new = self.g.node_copy(n, lambda a: self.env[a])
            self.env[n], self.state[n] = new, _REPLICATED
        v = placeholders[self.captured.input_names.index(self.video)]
        fa = Axis(self.frame_dim, 1, self.frames.total)
        vst = _State(shard=fa, split=self.frames, frames=fa)
        if not self.keep_sharded:
            me = self.rank
            self.env[v] = self.call(aten.slice.Tensor, self.env[v], self.frame_dim, self.frames.offsets[me],
                                    self.frames.offsets[me] + self.frames.sizes[me], hint="my_frames")
        self.state[v] = vst
        self.video_local_shape = _local_shape(_shape(v), vst, self.rank)
        self.expected[self.env[v]] = self.video_local_shape
        for n in self.src.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                self.output(n)
            elif n.op == "get_attr":
                self.env[n] = self.g.node_copy(n, lambda a: self.env[a])
                self.state[n] = _REPLICATED
            elif n.op == "call_function":
                self.node(n)
            else:
                raise self.fail(n, f"graphs from capture() have only call_function nodes, not {n.op}")
        return self.g

    def node(self, n: fx.Node) -> None:
        views = {a: self.view_of(a, n) for a in n.all_input_nodes}
        if n.target is operator.getitem and isinstance(self.state[n.args[0]], list):
            new_src, sts = views[n.args[0]]
            new = self.g.create_node("call_function", n.target, (new_src, n.args[1]), {}, name=n.name)
            self._finish(n, new, sts[n.args[1]])
            return
        sharded = any(isinstance(st, _State) and st.shard is not None for _, st in views.values())
        if not sharded:  # nothing sharded reaches this op: copy it
            new = self.g.create_node("call_function", n.target, fx.node.map_arg(n.args, lambda a: views[a][0]),
                                     fx.node.map_arg(n.kwargs, lambda a: views[a][0]), name=n.name)
            val = n.meta.get("val")
            self._finish(n, new, [_REPLICATED] * len(val) if isinstance(val, (list, tuple)) else _REPLICATED)
            return
        try:
            if self._along_shard(n, views):
                self.sequence_op(n, views)
            elif n.target in _RESHAPES:
                self.reshape(n, views)
            elif n.target in _TUPLE_SPLITS:
                self.split(n, views)
            elif n.target in _NO_OUTPUT:
                new = self.g.create_node("call_function", n.target, fx.node.map_arg(n.args, lambda a: views[a][0]),
                                         fx.node.map_arg(n.kwargs, lambda a: views[a][0]), name=n.name)
                self._finish(n, new, _REPLICATED)
            elif self.mode in ("ulysses", "ring") and n.target == aten.scaled_dot_product_attention.default \
                    and self._sequence_sharded(n, views):
                # Ulysses needs a head per rank; with fewer heads than ranks it falls back to ring.
                if self.mode == "ring" or _shape(n.args[0])[1] < self.world:
                    self.ring(n, views)
                else:
                    self.ulysses(n, views)
            else:
                self.indexwise(n, views)
        except _Mixed as e:
            raise self.fail(n, str(e)) from None
        if n.name in self.exits_of:
            region = self.exits_of[n.name]
            if self.state[n].shard is not None:
                self.outside[n] = self.leave(n, region)
                self.exit_nodes[region].append(self.outside[n][0])
            else:
                self.exit_nodes[region].append(self.env[n])

    # Ulysses -------------------------------------------------------------------------------------
    @staticmethod
    def _sequence_sharded(n: fx.Node, views) -> bool:
        """Whether the keys or values of attention ``n`` are sharded along their sequence dim."""
        return any(views[a][1].shard is not None and views[a][1].shard.dim == _rk(a) - 2 for a in n.args[1:3])

    def ulysses(self, n: fx.Node, views) -> None:
        """Attention over a sequence-sharded q, k, v (B, H, S, D): an all-to-all each switches them from the
        sequence split to a split of the heads (every rank then attends over the whole sequence with its
        heads), and one after the op switches the output back. Uneven heads (3 on 2 ranks: 2 + 1) are exact:
        the all-to-alls carry per-rank sizes."""
        q, k, v = n.args[:3]
        if any(_rk(a) != 4 for a in (q, k, v)) or len({_shape(a)[1] for a in (q, k, v)}) != 1:
            raise _Mixed(f"head-split attention needs q, k, v of shape (B, H, S, D) with the same heads, got "
                         f"{[list(_shape(a)) for a in (q, k, v)]}")
        heads = Split.even("heads", _shape(q)[1], self.world)
        region = self.owner.get(n.name, "")
        views = dict(views)
        for a in dict.fromkeys((q, k, v)):
            views[a] = self.to_heads(a, views[a], heads, region)
        self.indexwise(n, views)
        st: _State = self.state[n]
        seq = views[q][1].frames
        if seq is None or seq.dim != 2:
            raise _Mixed("its queries are not split along their sequence while its keys are")
        dtype = n.meta["val"].dtype
        switch = lambda x, shape, core: self._switch(x, shape, dtype, cut=(core, self.frames),  # noqa: E731
                                                     join=(st.shard, heads), region=region, role="exit")
        gather = lambda x, shape: self._all_gather(x, shape, dtype, st.shard, heads, region)  # noqa: E731
        out = self._by_segment(self.env[n], _shape(n), seq, switch, gather)
        new_st = _State(shard=seq, split=self.frames, frames=seq)
        self.expected[out] = _local_shape(_shape(n), new_st, self.rank)
        self.env[n], self.state[n] = out, new_st

    # ring attention --------------------------------------------------------------------------------
    def ring(self, n: fx.Node, views) -> None:
        """Attention over sequence-sharded q, k, v without moving queries: each rank's keys and values (its
        block of the split part) are passed round the ranks, one block per exchange (an all-to-all that
        sends to the next rank only), and every rank attends its queries to each block as it arrives. The
        partial results are merged with their log-sum-exp, in rank order, so the result does not depend on
        the order blocks arrive in. Whole (text) keys and values take part as one more local block."""
        q, k, v = n.args[:3]
        mask = _arg(n, 3, "attn_mask")
        if _arg(n, 4, "dropout_p", 0.0) or _arg(n, 5, "is_causal", False) or _arg(n, 7, "enable_gqa", False):
            raise _Mixed("ring attention supports attention without dropout, causal masking or grouped heads")
        (qn, qst), (kn, kst), (vn, vst) = views[q], views[k], views[v]
        if kst.shard is None or vst.shard != kst.shard or kst.shard.dim != 2:
            raise _Mixed("ring attention needs keys and values split alike along their sequence dim")
        region = self.owner.get(n.name, "")
        seq, split, me, w = kst.shard, kst.split, self.rank, self.world
        scale = _arg(n, 6, "scale") or 1.0 / math.sqrt(_shape(q)[-1])
        n_here = split.sizes[me] * seq.inner
        local_len = seq.local_length(_shape(k)[2], split, me)
        cut = lambda x, b, e: self.call(aten.slice.Tensor, x, 2, b, e, hint="kv")  # noqa: E731
        blocks = {me: (cut(kn, seq.pre, seq.pre + n_here), cut(vn, seq.pre, seq.pre + n_here))}
        held = me  # whose block this rank holds now
        for j in range(1, w):
            src = (me - j) % w
            blocks[src] = self._pass_on(blocks[held], _shape(k), split, seq, held, src, k.meta["val"].dtype, region)
            held = src
        rows = None if mask is None or _shape(mask)[-2] == 1 or qst.shard is None else \
            self._mask_rows(mask, views, qst)  # the mask's rows of this rank's queries
        mask_cols = lambda b, e: None if mask is None else self.call(  # noqa: E731
            aten.slice.Tensor, views[mask][0] if rows is None else rows, -1, b, e, hint="mask")
        parts = []  # (keys, values, global key columns), in the order of the whole sequence
        if seq.pre:
            parts.append((cut(kn, 0, seq.pre), cut(vn, 0, seq.pre), (0, seq.pre)))
        for r in range(w):
            lo = seq.pre + split.offsets[r] * seq.inner
            parts.append((*blocks[r], (lo, lo + split.sizes[r] * seq.inner)))
        if seq.post:
            total = _shape(k)[2]
            parts.append((cut(kn, local_len - seq.post, local_len), cut(vn, local_len - seq.post, local_len),
                          (total - seq.post, total)))
        boolean = mask is not None and mask.meta["val"].dtype == torch.bool
        partial = [self._block_attention(qn, kb, vb, mask_cols(*cols), boolean, scale) for kb, vb, cols in parts]
        top = partial[0][0]
        for m, _, _ in partial[1:]:
            top = self.call(aten.maximum.default, top, m, hint="max")
        num = den = None
        for m, acc, l in partial:
            wgt = self.call(aten.exp.default, self.call(aten.sub.Tensor, m, top, hint="shift"), hint="weight")
            a = self.call(aten.mul.Tensor, acc, wgt, hint="acc")
            d = self.call(aten.mul.Tensor, l, wgt, hint="sum")
            num = a if num is None else self.call(aten.add.Tensor, num, a, hint="acc")
            den = d if den is None else self.call(aten.add.Tensor, den, d, hint="sum")
        out = self.g.create_node("call_function", aten.div.Tensor, (num, den), {}, name=n.name)
        self._finish(n, out, _State(shard=qst.shard, split=qst.split, frames=qst.frames))

    def _mask_rows(self, mask: fx.Node, views, qst: _State) -> fx.Node:
        """A whole mask's query rows cut to this rank's queries."""
        r = _rk(mask)
        return self._slice_replicated(views[mask][0], _shape(mask), r - 2, replace(qst.shard, dim=r - 2), qst.split)

    def _pass_on(self, held: tuple[fx.Node, fx.Node], shape, split: Split, seq: Axis, mine: int, src: int, dtype,
                 region: str) -> tuple[fx.Node, fx.Node]:
        """Send the (keys, values) block of rank ``mine`` to the next rank and receive rank ``src``'s block from
        the previous one: one all-to-all whose only non-empty split goes to the next rank."""
        me, w = self.rank, self.world
        per_token = shape[0] * shape[1] * shape[3]
        flat = [self.call(aten.reshape.default, t, [-1], hint="flat") for t in held]
        buf = self.call(aten.cat.default, flat, 0, hint="send")
        n_send = 2 * per_token * split.sizes[mine] * seq.inner
        n_recv = 2 * per_token * split.sizes[src] * seq.inner
        send = [n_send if r == (me + 1) % w else 0 for r in range(w)]
        recv = [n_recv if r == (me - 1) % w else 0 for r in range(w)]
        y = self._a2a(buf, send, recv, CollectiveInfo("all_to_all", region, "ring", n_send * dtype.itemsize))
        kv = self.call(aten.split.Tensor, y, n_recv // 2, hint="kv")
        block = [shape[0], shape[1], split.sizes[src] * seq.inner, shape[3]]
        return tuple(self.call(aten.reshape.default, self.call(operator.getitem, kv, i, hint="kv"), block,
                               hint="block") for i in range(2))

    def _block_attention(self, q: fx.Node, k: fx.Node, v: fx.Node, mask: fx.Node | None, boolean: bool,
                         scale: float) -> tuple[fx.Node, fx.Node, fx.Node]:
        """(row maxima m, unnormalized output sum_j exp(s_ij - m_i) v_j, row sums l) of q against one block."""
        kt = self.call(aten.transpose.int, k, -2, -1, hint="kt")
        s = self.call(aten.mul.Tensor, self.call(aten.matmul.default, q, kt, hint="scores"), scale, hint="scores")
        if mask is not None:
            if boolean:
                s = self.call(aten.masked_fill.Scalar, s, self.call(aten.logical_not.default, mask, hint="mask"),
                              float("-inf"), hint="masked")
            else:
                s = self.call(aten.add.Tensor, s, mask, hint="masked")
        m = self.call(aten.amax.default, s, [-1], True, hint="max")
        # a row whose keys in this block are all masked: its exp terms are 0, keep the max finite
        m = self.call(aten.clamp_min.default, m, torch.finfo(torch.float32).min, hint="max")
        p = self.call(aten.exp.default, self.call(aten.sub.Tensor, s, m, hint="shift"), hint="p")
        l = self.call(aten.sum.dim_IntList, p, [-1], True, hint="l")
        return m, self.call(aten.matmul.default, p, v, hint="acc"), l

    def _by_segment(self, x: fx.Node, shape, seq: Axis, middle, ends, local_split: Split | None = None) -> fx.Node:
        """Apply ``middle(x, global shape, axis)`` to the split part of sequence dim ``seq.dim`` of ``x`` and
        ``ends(x, global shape)`` to the whole elements before and after it, and concatenate the results.
        ``local_split``: the middle is split by it in ``x`` (before an all-to-all), else it is whole in ``x``."""
        core = replace(seq, pre=0, post=0)
        if not seq.segment:
            return middle(x, shape, core)
        d, n_mid = seq.dim, seq.size * seq.inner
        n_here = n_mid if local_split is None else local_split.sizes[self.rank] * seq.inner
        pieces, start = [], 0
        for length, here, fn in ((seq.pre, seq.pre, ends), (n_mid, n_here, middle), (seq.post, seq.post, ends)):
            if length:
                piece = self.call(aten.slice.Tensor, x, d, start, start + here, hint="piece")
                g = list(shape)
                g[d] = length
                pieces.append(fn(piece, g) if fn is ends else fn(piece, g, core))
            start += here
        return self.call(aten.cat.default, pieces, d, hint="sequence")

    def _all_gather(self, x: fx.Node, shape, dtype, ax: Axis, split: Split, region: str) -> fx.Node:
        """The whole of dim ``ax.dim`` (global ``shape``) from every rank's block (padded to the largest)."""
        me, w, d = self.rank, self.world, ax.dim
        big = max(split.sizes)
        rest = [s for i, s in enumerate(shape) if i != d]
        x = self.call(aten.movedim.int, x, d, 0, hint="split_first")
        x = self.call(aten.constant_pad_nd.default, x, [0, 0] * len(rest) + [0, big - split.sizes[me]], 0.0,
                      hint="pad")
        x = self.call(aten.clone.default, x, hint="contiguous")
        info = CollectiveInfo("all_gather", region, "exit", big * math.prod(rest) * dtype.itemsize * (w - 1))
        c = self.call(_C10D.all_gather_into_tensor.default, x, w, self.group, hint="all_gather")
        c.meta[META_KEY] = info
        self.collectives.append(c)
        y = self.call(WAIT_OP, c, hint="wait")
        blocks = [self.call(aten.slice.Tensor, y, 0, i * big, i * big + split.sizes[i], hint="rank") for i in range(w)]
        y = self.call(aten.cat.default, blocks, 0, hint="whole")
        return self.call(aten.movedim.int, y, 0, d, hint="split_back")

    def to_heads(self, a: fx.Node, view, heads: Split, region: str) -> tuple[fx.Node, _State]:
        """``a`` (B, H, S, D) with this rank's heads and the whole sequence."""
        key = (a, "heads")
        if key in self.entered:
            return self.entered[key]
        new, st = view
        ha = Axis(1, 1, heads.total)
        if st.shard is None:  # replicated: keep this rank's heads
            out = self._slice_replicated(new, _shape(a), 1, ha, heads)
        elif st.shard.dim == 2:
            switch = lambda x, shape, core: self._switch(x, shape, a.meta["val"].dtype, cut=(ha, heads),  # noqa
                                                         join=(core, st.split), region=region, role="enter")
            mine = lambda x, shape: self._slice_replicated(x, shape, 1, ha, heads)  # noqa: E731
            out = self._by_segment(new, _shape(a), st.shard, switch, mine, local_split=st.split)
        else:
            raise _Mixed(f"attention operand {a.name} is sharded on dim {st.shard.dim}, not its sequence dim 2")
        new_st = _State(shard=ha, split=heads, frames=st.shard)
        self.expected[out] = _local_shape(_shape(a), new_st, self.rank)
        self.entered[key] = (out, new_st)
        return out, new_st

    # joining and cutting a sequence of whole and split tokens -------------------------------------
    @staticmethod
    def _along_shard(n: fx.Node, views) -> bool:
        """A cat, slice or split whose dim is the sharded dim of an operand (and that is not a no-op)."""
        if n.target == aten.cat.default:
            d = _norm(_arg(n, 1, "dim", 0), len(_shape(n)))
            return any(views[a][1].shard is not None and views[a][1].shard.dim == d for a in n.args[0])
        if n.target in (aten.slice.Tensor, aten.split.Tensor, aten.split_with_sizes.default):
            x = n.args[0]
            st = views[x][1]
            d = _norm(_arg(n, 1 if n.target == aten.slice.Tensor else 2, "dim", 0), _rk(x))
            return st.shard is not None and st.shard.dim == d and not (
                n.target == aten.slice.Tensor and _shape(n)[d] == _shape(x)[d])
        return False

    def sequence_op(self, n: fx.Node, views) -> None:
        if n.target == aten.cat.default:
            self.cat_segment(n, views)
        elif n.target == aten.slice.Tensor:
            x = n.args[0]
            d = _norm(_arg(n, 1, "dim", 0), _rk(x))
            start, end = _arg(n, 2, "start"), _arg(n, 3, "end")
            if _arg(n, 4, "step", 1) != 1:
                raise _Mixed(f"it takes every {_arg(n, 4, 'step', 1)}th element of the sharded dim")
            length = _shape(x)[d]
            start, end = slice(start, end).indices(length)[:2]
            (lo, hi), st = self._cut(views[x][1], length, start, end)
            new = self.g.create_node("call_function", aten.slice.Tensor, (views[x][0], d, lo, hi), {}, name=n.name)
            self._finish(n, new, st)
        else:
            x = n.args[0]
            d = _norm(_arg(n, 2, "dim", 0), _rk(x))
            length, sizes = _shape(x)[d], [int(v.shape[d]) for v in n.meta["val"]]
            pieces, start = [], 0
            for size in sizes:
                pieces.append(self._cut(views[x][1], length, start, start + size))
                start += size
            local = [hi - lo for (lo, hi), _ in pieces]
            new = self.g.create_node("call_function", aten.split_with_sizes.default, (views[x][0], local, d), {},
                                     name=n.name)
            self._finish(n, new, [st for _, st in pieces])

    def _cut(self, st: _State, length: int, start: int, end: int) -> tuple[tuple[int, int], _State]:
        """Elements ``start:end`` of a sharded dim of global ``length``: (local start, local end) and the
        piece's state. A piece may be whole elements only (replicated), the split middle with any whole
        elements around it (a sequence), nothing else.

            >>> b._cut(_State(Axis(1, 4, 3, pre=5), Split("frames", (2, 1)), ...), 17, 0, 5)    # rank 0
            ((0, 5), _REPLICATED)              # the 5 text tokens
        """
        a = st.shard
        middle = a.size * a.inner
        if length != a.pre + middle + a.post:
            raise _Mixed(f"it cuts a dim that holds the sharded {st.split.name} axis {length // middle} times")
        n_local = st.split.sizes[self.rank] * a.inner
        shift = middle - n_local  # elements after the middle move this much towards the start locally
        if end <= a.pre:
            return (start, end), _REPLICATED
        if start >= a.pre + middle:
            return (start - shift, end - shift), _REPLICATED
        if start <= a.pre and end >= a.pre + middle:
            piece = replace(a, pre=a.pre - start, post=end - a.pre - middle)
            frames = piece if st.frames == a else st.frames
            return (start, end - shift), _State(shard=piece, split=st.split, frames=frames)
        raise _Mixed(f"it cuts elements {start}:{end} of a dim whose elements {a.pre}:{a.pre + middle} are split "
                     f"over the ranks (only whole pieces of the split part can be cut)")

    def cat_segment(self, n: fx.Node, views) -> None:
        """cat along the sharded dim of one operand: the others (whole on every rank) become the segment's
        whole elements before or after it."""
        d = _norm(_arg(n, 1, "dim", 0), len(_shape(n)))
        parts = n.args[0]
        sharded = [i for i, a in enumerate(parts) if views[a][1].shard is not None]
        if len(sharded) != 1:
            raise _Mixed("it concatenates several sharded tensors along the sharded dim")
        (i,) = sharded
        st = views[parts[i]][1]
        a = st.shard
        if _shape(parts[i])[d] != a.pre + a.size * a.inner + a.post:
            raise _Mixed("it concatenates along a dim that holds the sharded axis several times")
        if any(views[b][1].shard is not None for b in parts if b is not parts[i]):
            raise _Mixed("it concatenates tensors sharded along other dims")
        pre = sum(_shape(b)[d] for b in parts[:i])
        post = sum(_shape(b)[d] for b in parts[i + 1:])
        seg = replace(a, pre=a.pre + pre, post=a.post + post)
        frames = seg if st.frames == a else st.frames
        new = self.g.create_node("call_function", aten.cat.default, ([views[b][0] for b in parts], d), {},
                                 name=n.name)
        self._finish(n, new, _State(shard=seg, split=st.split, frames=frames))

    def _finish(self, n: fx.Node, new: fx.Node, st) -> None:
        new.meta = {k: v for k, v in n.meta.items() if k != "val"}
        self.env[n], self.state[n] = new, st
        if isinstance(st, _State) and isinstance(n.meta.get("val"), torch.Tensor):
            self.expected[new] = _local_shape(_shape(n), st, self.rank)

    def reshape(self, n: fx.Node, views) -> None:
        x = n.args[0]
        new_x, st = views[x]
        in_shape, out_shape = _shape(x), _shape(n)
        shard = _reshape_axis(st.shard, in_shape, out_shape)
        frames = st.frames
        if frames is not None:
            try:
                frames = _reshape_axis(frames, in_shape, out_shape)
            except _Mixed:
                frames = None
        out_st = _State(shard=shard, split=st.split, frames=frames)
        new = self.g.create_node("call_function", aten.reshape.default,
                                 (new_x, _local_shape(out_shape, out_st, self.rank)), {}, name=n.name)
        self._finish(n, new, out_st)

    def split(self, n: fx.Node, views) -> None:
        x, d, removed = _tuple_maps(n)
        new_x, st = views[x]
        if st.shard.dim == d:
            raise _Mixed(f"it splits the sharded {st.split.name} dim {d}")
        move = lambda a: None if a is None else (  # noqa: E731
            None if removed and a.dim == d else replace(a, dim=a.dim - (removed and a.dim > d)))
        out = _State(shard=move(st.shard), split=st.split, frames=move(st.frames))
        new = self.g.create_node("call_function", n.target, (new_x, *n.args[1:]), dict(n.kwargs), name=n.name)
        self._finish(n, new, [out] * len(n.meta["val"]))

    def indexwise(self, n: fx.Node, views) -> None:
        try:
            maps = _index_maps(n)
        except KeyError:
            raise _Mixed("graphpass has no sharding rule for this op (add one to graphpass.passes.parallelize)") \
                from None
        out_shape = _shape(n)
        shard, split, frames = None, None, None
        for a, m in maps:
            st = views[a][1]
            if st.shard is not None:
                od, mixed = m.get(st.shard.dim, (None, True))
                if od is None or mixed:
                    raise _Mixed(f"it mixes values along the sharded {st.split.name} axis (dim {st.shard.dim} of "
                                 f"{a.name})")
                if out_shape[od] != _shape(a)[st.shard.dim]:
                    raise _Mixed(f"it resizes the sharded {st.split.name} dim")
                cand = replace(st.shard, dim=od)
                if shard is not None and (cand, st.split) != (shard, split):
                    raise _Mixed(f"its operands are sharded along different axes ({shard} vs {cand})")
                shard, split = cand, st.split
            if frames is None and st.frames is not None:
                od, _ = m.get(st.frames.dim, (None, True))
                if od is not None and out_shape[od] == _shape(a)[st.frames.dim]:
                    frames = replace(st.frames, dim=od)
        if n.target == aten.scaled_dot_product_attention.default and self.region_of.get(n.name):
            q_frames = views[n.args[0]][1].frames
            self.frames_at_attention.append((n.name, q_frames is not None and q_frames.dim == len(out_shape) - 2))
        replace_by: dict[fx.Node, fx.Node] = {}
        for a, m in maps:
            new_a, st = views[a]
            if st.shard is None and a not in replace_by:
                for j, (od, mixed) in m.items():
                    if od == shard.dim and _shape(a)[j] == out_shape[od] and out_shape[od] > 1:
                        if mixed:
                            raise _Mixed(f"a whole-{split.name} operand {a.name} is mixed along the sharded axis")
                        new_a = self._slice_replicated(new_a, _shape(a), j, shard, split)
                replace_by[a] = new_a
        lookup = lambda a: replace_by.get(a, views[a][0])  # noqa: E731
        args = fx.node.map_arg(n.args, lookup)
        kwargs = fx.node.map_arg(n.kwargs, lookup)
        out_st = _State(shard=shard, split=split, frames=frames)
        if n.target == aten.expand.default:
            args = (args[0], [(-1 if s == -1 else v) for s, v in zip(n.args[1], _local_shape(out_shape, out_st,
                                                                                              self.rank))])
        new = self.g.create_node("call_function", n.target, args, kwargs, name=n.name)
        self._finish(n, new, out_st)

    def output(self, n: fx.Node) -> None:
        outs = []
        for o in n.args[0]:
            if not isinstance(o, fx.Node):
                outs.append(o)
                continue
            new, st = self.view_of(o, n)
            if isinstance(st, _State) and st.shard is not None:
                if st.split.name != "frames":
                    raise self.fail(o, "a model output is sharded by tokens")
                if not self.keep_sharded:
                    new = self.gather(new, _shape(o), o.meta["val"].dtype, st)
            outs.append(new)
        self.g.output(tuple(outs))


def _find_frame_dim(captured: CapturedGraph, video: str, regions: list[Region], mode: str) -> list[int]:
    """Candidate dims of the video input to shard, best first: DSP needs the frames (the dim whose size is
    the temporal attention's length); Ulysses can shard any dim that ends up in the attention sequence, so
    it tries those dims first, then every other dim after the batch."""
    vshape = captured.input_specs[captured.input_names.index(video)].shape
    lengths = {r.attention_shape[-2] for r in regions if r.kind == "temporal" and r.attention_shape}
    frames = [d for d in range(1, len(vshape)) if vshape[d] in lengths]
    if mode == "dsp":
        return frames
    return frames + [d for d in range(1, len(vshape)) if d not in frames]


#: Attention kinds DSP serves: none of them attends over frames and tokens at once.
DSP_KINDS = frozenset({"spatial", "temporal", "cross"})
MODES = ("auto", "dsp", "ulysses", "ring")


def choose_mode(mode: str, regions: list[Region]) -> str:
    """``"dsp"`` or ``"ulysses"`` for a requested mode: ``"auto"`` is DSP for spatial-temporal models (a
    temporal region and no attention of another kind, such as joint 3D attention), Ulysses otherwise.

        >>> choose_mode("auto", [Region(kind="temporal", ...), Region(kind="spatial", ...)])
        'dsp'
        >>> choose_mode("auto", [Region(kind="joint", ...), Region(kind="mlp", ...)])
        'ulysses'
    """
    if mode not in MODES:
        raise ParallelError(f"unknown sequence-parallel mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    attention = {r.kind for r in regions if r.attention_shape} or {r.kind for r in regions} - {"mlp"}
    return "dsp" if "temporal" in attention and attention <= DSP_KINDS else "ulysses"


def parallelize(captured: CapturedGraph, regions: list[Region], *, rank: int, world_size: int, group_name: str,
                video_input: str | None = None, frame_dim: int | None = None,
                keep_sharded: bool = False, mode: str = "dsp") -> ShardedGraph:
    """The graph rank ``rank`` of ``world_size`` runs (see the module docstring).

    ``mode``: ``"dsp"`` (frames split, all-to-alls around temporal regions), ``"ulysses"`` (the sequence
    split by frames everywhere, all-to-alls between sequence and heads around every attention op that
    attends over the split), or ``"auto"`` (:func:`choose_mode`).

    requires: DSP: at least one temporal region; at least one frame per rank.
    ensures: every node's shape (fake-tensor propagation) equals the predicted local shape; original nodes
    keep their names (regions still name them); every temporal region's attention sees all frames.
    """
    mode = choose_mode(mode, regions)
    temporal = [r for r in regions if r.kind == "temporal"]
    if not temporal and mode == "dsp":
        kinds = ", ".join(sorted({r.kind for r in regions}))
        raise ParallelError(
            f"{captured.model_type} has no temporal attention region (it has: {kinds}). DSP shards frames and "
            f"exchanges them only around temporal attention; a model whose attention spans all frames at once "
            f"(joint 3D attention) needs head-split (Ulysses) attention instead: SequenceParallel(mode='ulysses') "
            f"or mode='auto'. If a region is temporal but was tagged otherwise, pass "
            f"kinds={{'<module path>': 'temporal'}} to graphpass.optimize.")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ParallelError(f"rank {rank} is not in a group of {world_size}")
    video = _pick_video_input(captured, video_input)
    vshape = captured.input_specs[captured.input_names.index(video)].shape
    candidates = [frame_dim] if frame_dim is not None else _find_frame_dim(captured, video, regions, mode)
    if not candidates:
        raise ParallelError(f"no dim of video input {video!r} {list(vshape)} matches the temporal attention length "
                            f"{sorted({r.attention_shape[-2] for r in temporal})}; pass SequenceParallel(frame_dim=...)")
    candidates = [_norm(c, len(vshape)) for c in candidates]
    if frame_dim is not None or mode == "dsp":
        if vshape[candidates[0]] < world_size:
            raise ParallelError(f"{vshape[candidates[0]]} frames cannot be split over {world_size} ranks (each rank "
                                f"needs at least one frame); use fewer ranks (at most {vshape[candidates[0]]})")
    else:
        candidates = [c for c in candidates if vshape[c] >= world_size] or candidates[:1]
    errors = []
    for cand in candidates:
        b = _Builder(captured, regions, rank=rank, world_size=world_size, group_name=group_name, video=video,
                     frame_dim=cand, keep_sharded=keep_sharded, mode=mode)
        try:
            graph = b.run()
        except ParallelError as e:
            errors.append((-len(b.env), e))  # the candidate that got furthest explains best why none fits
            continue
        bad = [name for name, ok in b.frames_at_attention if not ok]
        if bad:
            errors.append((-len(b.env), ParallelError(f"with frames on dim {cand} of {video!r}, temporal attention "
                                                      f"{bad[0]} does not attend over frames; pass "
                                                      f"SequenceParallel(frame_dim=...)")))
            continue
        return _finish(captured, regions, b, graph)
    raise min(errors, key=lambda e: e[0])[1]


def _finish(captured: CapturedGraph, regions: list[Region], b: _Builder, graph: fx.Graph) -> ShardedGraph:
    graph.lint()
    gm = fx.GraphModule(captured.gm, graph, class_name="ShardedGraph")
    names = {n.name for n in gm.graph.nodes}
    lost = [n.name for n in captured.gm.graph.nodes if n.op != "output" and n.name not in names]
    if lost:  # ensures: regions still name their nodes
        raise ParallelError(f"internal: sharding renamed nodes {lost[:3]}")
    specs = list(captured.input_specs)
    vi = captured.input_names.index(b.video)
    if b.keep_sharded:
        specs[vi] = TensorSpec(tuple(b.video_local_shape), specs[vi].dtype)
    _propagate_shapes(gm, specs)
    for node, shape in b.expected.items():  # ensures: the local graph computes the shapes we planned
        got = list(node.meta["val"].shape)
        if got != list(shape):
            raise ParallelError(f"internal: node {node.name} has local shape {got}, expected {shape}")
    local_regions = []
    by_name = {n.name: n for n in gm.graph.nodes}
    for r in regions:
        exits = [n.name for n in b.exit_nodes[r.path]] if r.path in b.temporal else r.exits
        specs_r = [TensorSpec(tuple(int(s) for s in by_name[e].meta["val"].shape), by_name[e].meta["val"].dtype)
                   for e in exits]
        local_regions.append(replace(r, exits=exits, exit_specs=specs_r,
                                     flops=sum(node_flops(by_name[n]) for n in r.nodes)))
    # Same call as the capture (structured arguments such as CogVideoX's rotary (cos, sin) tuple included);
    # value checks read whole inputs, which a rank given only its frames does not have.
    local = replace(captured, gm=gm, input_names=list(captured.input_names), input_specs=specs,
                    constants=dict(captured.constants), checker=None,
                    value_checks=[] if b.keep_sharded else list(captured.value_checks))
    return ShardedGraph(captured=local, regions=local_regions, frames=b.frames, video_input=b.video,
                        frame_dim=b.frame_dim, rank=b.rank, world_size=b.world, keep_sharded=b.keep_sharded,
                        mode=b.mode, collectives=[n.name for n in collective_nodes(gm.graph)],
                        held={n.name: _held(st) for n, st in b.state.items() if isinstance(st, _State)})


def _held(st: _State) -> str:
    """How a rank holds a value of this sharding (see :attr:`ShardedGraph.held`).

        >>> frames = Split("frames", (2, 1))
        >>> _held(_State()), _held(_State(Axis(1, 16, 3), frames)), _held(_State(Axis(1, 16, 3, pre=5), frames))
        ('whole', 'split', 'segment')
    """
    if st.shard is None:
        return "whole"
    return "segment" if st.shard.segment else "split"


def _propagate_shapes(gm: fx.GraphModule, specs: list[TensorSpec]) -> None:
    """Fill meta['val'] of every node with fake tensors (nothing runs, no communication)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        args = [torch.empty(s.shape, dtype=s.dtype) for s in specs]
    FakeTensorProp(gm, mode).propagate(*args)
