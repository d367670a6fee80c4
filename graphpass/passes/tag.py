"""Find the attention and MLP regions of a captured DiT and tag each attention region by kind.

A *region* is the set of nodes recorded under one module path (``blocks.3.temporal_attn``); its *exits*
are the region's nodes read outside it. Reusing a region means replacing its exits by cached tensors.

Attention is found from ops and data flow, in three forms (the first of a module is its *core*):

* ``sdpa``     a call of ``aten.scaled_dot_product_attention``;
* ``softmax``  ``softmax(Q K^T) V`` written with ``matmul``/``bmm``: a product of two activations whose
  result reaches, through a softmax (and scaling, masks, casts, views), a product with a third activation;
* ``linear``   the same chain without a softmax: ``Q (K^T V)`` with a kernel feature map and a normaliser
  (Sana's ``(V K^T) Q``); the first product sums over the key tokens, the queries enter at the second.

A region covers the core's attention module: the innermost enclosing module whose class is named like one,
or, when that module holds no projection (SANA-WM's parameter-free ``blocks.0.attn.attn``), the module that
projects the core's queries (``blocks.0.attn``).

Kinds come from graph structure, not names. The graph inputs get roles from their shapes (see
:class:`InputRoles`): the video; *streams* denoised alongside it (an input shaped like an output: LTX-2's
audio); *text* (other ``(batch, tokens, width)`` inputs, and ``(batch, 1, tokens, width)`` ones that a projection
reads); *features* (other inputs of rank >= 4). An operand
of the core holds the tokens of the inputs it depends on, narrowed by its token count when that is one
input's (:func:`token_roles`: the text positions of a single-stream block are text although joint attention
mixed video into them). Then, with a query of shape ``(B*G, heads, L, d)`` for a video batch ``B``:

* ``text``     queries and keys hold only text/conditioning tokens (HunyuanVideo's token refiner);
* ``other``    queries hold no video tokens but a stream's or features' (LTX-2's audio attention), or video
  queries read keys of another stream (LTX-2's audio-to-video attention);
* ``cross``    video queries, keys/values of text/conditioning tokens;
* ``joint``    one sequence per sample (G == 1): 3D full attention over all tokens (+ text);
* ``temporal`` the sequence is the frames (L is a frame-count candidate) and G*p*p == H*W for an integer p;
* ``spatial``  the batch groups frames (G is a frame-count candidate) and L*p*p == H*W.

An attention run once per slice of the batch (Mochi loops over the samples: ``sdpa(q[i:i+1], ...)``) is read
with the batch its queries were sliced from. Frame-count candidates are dims 1 and 2 of a 5-D video input
(B, C, F, H, W) or (B, F, C, H, W). When the structure is ambiguous the module name decides, and users can
force kinds by module-path glob pattern (a pattern that matches no region is an error)::

    >>> regions = tag_attention(captured, kinds={"temporal_transformer_blocks.*.attn1": "temporal"})
    >>> [(r.path, r.kind) for r in regions][:2]
    [('transformer_blocks.0.attn1', 'spatial'), ('transformer_blocks.0.attn2', 'cross')]

MLP regions are the innermost modules that hold an expanding linear followed by a contracting one back to
the input width, contain no attention, and sit in a block that has an attention region.
"""
from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..errors import TaggingError
from ..schedules.base import KINDS
from .capture import CapturedGraph, TensorSpec, module_path
from .flops import node_flops
from .ops import LINEAR, PRODUCTS, SDPA, SOFTMAX

aten = torch.ops.aten
ATTENTION_OPS = SDPA
LINEAR_OPS = LINEAR


@dataclass
class Region:
    path: str
    module_type: str
    kind: str
    nodes: list[str]
    exits: list[str]
    exit_specs: list[TensorSpec]
    flops: int
    reason: str
    block: int | None = None
    attention_shape: tuple[int, ...] | None = None  # query shape of the first attention op
    #: how the attention is computed: ``"sdpa"``, ``"softmax"`` (matrix products around a softmax) or
    #: ``"linear"`` (kernel feature maps, no softmax); ``None`` for MLP regions
    form: str | None = None

    @property
    def cache_keys(self) -> list[str]:
        return [f"{self.path}:{i}" for i in range(len(self.exits))]

    @property
    def exit_bytes(self) -> int:
        return sum(math.prod(s.shape) * _itemsize(s.dtype) for s in self.exit_specs)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _spec(node: fx.Node) -> TensorSpec:
    v = node.meta.get("val")
    if not isinstance(v, torch.Tensor):
        raise TaggingError(f"region exit {node.name} is not a tensor ({type(v).__name__}); cannot be cached")
    return TensorSpec(tuple(int(s) for s in v.shape), v.dtype)


def _block_index(path: str) -> int | None:
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    return int(m[1]) if m else None


def _is_size(n: fx.Node) -> bool:
    """A size computation (``sym_size`` of an input and arithmetic on it, in dynamic captures): it reads
    shapes, not data, so it belongs to no region and carries no data dependency."""
    return n.op == "call_function" and isinstance(n.meta.get("val"), (int, torch.SymInt)) \
        and not isinstance(n.meta.get("val"), bool)


def _region_nodes(gm: fx.GraphModule, path: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if not _is_size(n) and any(p == path for p, _ in module_path(n))]


def _make_region(gm, path, mtype, kind, reason, qshape=None) -> Region:
    nodes = _region_nodes(gm, path)
    inside = set(nodes)
    exits = [n for n in nodes if any(u not in inside for u in n.users)]
    if not exits:
        raise TaggingError(f"region {path} has no outputs used elsewhere; nothing to cache")
    return Region(path=path, module_type=mtype, kind=kind, nodes=[n.name for n in nodes],
                  exits=[n.name for n in exits], exit_specs=[_spec(n) for n in exits],
                  flops=sum(node_flops(n) for n in nodes), reason=reason, block=_block_index(path),
                  attention_shape=qshape)


def _input_deps(gm: fx.GraphModule) -> dict[fx.Node, frozenset[str]]:
    """For every node, the graph inputs (placeholder names) it depends on."""
    deps: dict[fx.Node, frozenset[str]] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            deps[n] = frozenset([n.name])
        elif _is_size(n):
            deps[n] = frozenset()
        else:
            acc: set[str] = set()
            for a in n.all_input_nodes:
                acc |= deps[a]
            deps[n] = frozenset(acc)
    return deps


def _attention_module(node: fx.Node) -> tuple[str, str]:
    """The innermost enclosing module whose class is an attention module, else the innermost module."""
    stack = module_path(node)
    if not stack:
        raise TaggingError(f"attention op {node.name} has no module path; graphpass needs models built from "
                           f"nn.Modules (capture with torch.export keeps their paths)")
    for p, t in reversed(stack):
        if "attention" in t.rsplit(".", 1)[-1].lower() or "attn" in t.rsplit(".", 1)[-1].lower():
            return p, t
    return stack[-1]


def _is_spatial_size(n: int, h: int, w: int) -> bool:
    if n <= 0 or (h * w) % n:
        return False
    p = math.isqrt((h * w) // n)
    return p * p * n == h * w


# --- attention cores: SDPA, and the same computation written with matrix products ----------------------

PRODUCT_OPS = PRODUCTS
SOFTMAX_OPS = SOFTMAX
# Ops that may sit between the two products of an attention written by hand: scaling, masking, casts,
# dropout, views and the kernel feature maps / normalisers of linear attention. Anything else ends the search.
_BETWEEN_PRODUCTS = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.add.Tensor,
                     aten.sub.Tensor, aten.to.dtype, aten.type_as.default, aten.dropout.default,
                     aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self, aten.view.default,
                     aten.reshape.default, aten._unsafe_view.default, aten.permute.default, aten.transpose.int,
                     aten.contiguous.default, aten.clone.default, aten.expand.default, aten.unsqueeze.default,
                     aten.squeeze.dim, aten._assert_tensor_metadata.default} | SOFTMAX_OPS


@dataclass(frozen=True)
class AttentionCore:
    """One attention computation: the node that produces its output, the query and key operands, and their
    shapes laid out as ``(..., tokens, features)``.

    form: ``"sdpa"`` (``aten.scaled_dot_product_attention``), ``"softmax"`` (``softmax(Q K^T) V`` written with
    matmul/bmm) or ``"linear"`` (``Q (K^T V)`` with a kernel feature map and no softmax, as in Sana).
    """

    node: fx.Node
    query: fx.Node
    key: fx.Node
    query_shape: tuple[int, ...]
    key_shape: tuple[int, ...]
    form: str
    #: a bmm's ``(batch * heads, tokens, features)`` query not viewed from a 4-D tensor: the heads cannot be
    #: told from the batch, so the layout cannot separate frames from tokens
    heads_folded: bool = False


def _shape_of(n: fx.Node) -> tuple[int, ...]:
    return tuple(int(x) for x in n.meta["val"].shape)


def _tokens_last(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (*shape[:-2], shape[-1], shape[-2])


def _next_product(start: fx.Node, path: str, deps: dict) -> tuple[fx.Node, fx.Node, bool] | None:
    """From a product's output, follow its users inside the attention module ``path`` through the ops an
    attention puts between its two products, to the next product whose other operand is not derived from
    ``start``. Returns (that product, its other operand, whether a softmax was crossed) or None.

    ``softmax(Q K^T / s) V`` gives (``A V``, V, True); Sana's ``(V K^T) Q`` gives (``S Q``, Q, False).
    """
    todo, seen = [(start, False)], {start}
    while todo:
        node, soft = todo.pop(0)
        for user in node.users:
            if user in seen or user.op != "call_function" or not _inside(user, path):
                continue
            seen.add(user)
            if user.target in PRODUCT_OPS:
                other = user.args[1] if user.args[0] is node else user.args[0]
                if isinstance(other, fx.Node) and deps[other] and not _derived_from(other, start, path):
                    return user, other, soft
                continue
            if user.target in _BETWEEN_PRODUCTS:
                todo.append((user, soft or user.target in SOFTMAX_OPS))
    return None


def _inside(node: fx.Node, path: str) -> bool:
    return any(p == path for p, _ in module_path(node))


def _derived_from(node: fx.Node, source: fx.Node, path: str) -> bool:
    """Whether ``node`` is computed from ``source`` within the module ``path`` (the walk stays inside it)."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n is source:
            return True
        if n in seen or not _inside(n, path):
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return False


_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
          aten.clone.default, aten.contiguous.default}


def _head_layout(n: fx.Node) -> tuple[int, ...]:
    """The shape of a query as ``(batch, heads, tokens, features)`` when a bmm reads it flattened to
    ``(batch * heads, tokens, features)``: the 4-D tensor it was viewed from, else its own shape.

    ``q.reshape(B * H, L, d)`` of a ``(B, H, L, d)`` query gives ``(B, H, L, d)``.
    """
    shape, node = _shape_of(n), n
    while len(shape) == 3 and node.op == "call_function" and node.target in _VIEWS:
        node = node.args[0]
        up = _shape_of(node)
        if len(up) == 4 and up[-2:] == shape[-2:] and math.prod(up) == math.prod(shape):
            return up
    return shape


def _product_core(p1: fx.Node, path: str, deps: dict) -> AttentionCore | None:
    """The attention core whose first product is ``p1``, if ``p1`` multiplies two activations and its result
    reaches a second product with a third activation (see :func:`_next_product`)."""
    a, b = p1.args[0], p1.args[1]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and deps[a] and deps[b]):
        return None  # a product with a weight is a projection, not attention
    found = _next_product(p1, path, deps)
    if found is None:
        return None
    p2, other, softmax = found
    if softmax:  # scores = Q K^T: queries are p1's left operand, keys its right one (transposed)
        q_shape = _head_layout(a)
        return AttentionCore(p2, a, b, q_shape, _tokens_last(_shape_of(b)), "softmax", len(q_shape) == 3)
    # linear attention: p1 = K^T V (or V K^T) sums over the key tokens; the queries enter at p2
    if p2.args[1] is other:  # S @ Q: Q is laid out (..., features, tokens)
        q_shape = _tokens_last(_shape_of(other))
    else:
        q_shape = _head_layout(other)
    key_tokens, features = _shape_of(a)[-1], _shape_of(a)[-2]
    return AttentionCore(p2, other, b, q_shape, (*_shape_of(b)[:-2], key_tokens, features), "linear",
                         len(q_shape) == 3)


def _projecting_paths(gm: fx.GraphModule) -> set[str]:
    """Paths of the modules that hold a projection (a linear op), at any depth."""
    return {p for n in gm.graph.nodes if n.op == "call_function" and n.target in LINEAR_OPS
            for p, _ in module_path(n)}


def _query_projection(query: fx.Node) -> fx.Node | None:
    """The nearest projection (linear op) the query is computed from, walking back through its inputs."""
    todo, seen = [query], set()
    while todo:
        n = todo.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target in LINEAR_OPS:
            return n
        todo.extend(n.all_input_nodes)
    return None


def _region_module(core: AttentionCore, path: str, mtype: str, projecting: set[str]) -> tuple[str, str]:
    """The module a region of ``core`` covers: its attention module ``path``; or, when that module holds no
    projection (a parameter-free core that another module calls with the queries, keys and values it
    projected), the innermost module around it that also computes the query's projection, unless that module
    is a block (an entry of a module list: its path ends in an index).

    SANA-WM's ``blocks.0.attn`` projects q/k/v and calls the cores ``blocks.0.attn.attn`` and
    ``blocks.0.attn.cam_attn``: both give ``blocks.0.attn``, whose output the block adds to its hidden state.
    """
    if path in projecting:
        return path, mtype
    projection = _query_projection(core.query)
    if projection is None:
        return path, mtype
    shared = [entry for entry, other in zip(module_path(core.node), module_path(projection)) if entry == other]
    if not shared or not path.startswith(shared[-1][0] + ".") or re.search(r"(?:^|\.)\d+$", shared[-1][0]):
        return path, mtype
    return shared[-1]


def find_attention_cores(gm: fx.GraphModule, deps: dict) -> dict[str, tuple[AttentionCore, str]]:
    """The first attention core of every attention module, keyed by module path, with the module type.

    SDPA calls come first; a module without one is searched for two chained products of activations
    (:func:`_product_core`). A parameter-free core is keyed by the module that projects its inputs
    (:func:`_region_module`).
    """
    projecting = _projecting_paths(gm)
    cores: dict[str, tuple[AttentionCore, str]] = {}
    searched: set[str] = set()
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in ATTENTION_OPS:
            path, mtype = _attention_module(n)
            searched.add(path)
            q, k = n.args[0], n.args[1]
            core = AttentionCore(n, q, k, _shape_of(q), _shape_of(k), "sdpa")
            region, rtype = _region_module(core, path, mtype, projecting)
            cores.setdefault(region, (core, rtype))
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in PRODUCT_OPS and module_path(n):
            path, mtype = _attention_module(n)
            if path in searched:
                continue
            core = _product_core(n, path, deps)
            if core is not None:
                searched.add(path)
                region, rtype = _region_module(core, path, mtype, projecting)
                cores.setdefault(region, (core, rtype))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return dict(sorted(cores.items(), key=lambda kv: order[kv[1][0].node]))


# --- kinds -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InputRoles:
    """What each graph input is, decided from shapes (names are not read).

    video: the latent video input. streams: other inputs denoised alongside it (shaped like one of the
    model's outputs: an audio latent). text: other floating token sequences ``(batch, tokens, width)``.
    features: other floating inputs of rank >= 4 (reference images, identity features). Integer inputs,
    timesteps and pooled vectors have no role: attending through them says nothing about the tokens.
    """

    video: str
    vshape: tuple[int, ...]
    streams: dict[str, tuple[int, ...]]
    text: dict[str, tuple[int, ...]]
    features: dict[str, tuple[int, ...]]

    def role(self, name: str) -> str | None:
        if name == self.video:
            return "video"
        for role, group in (("stream", self.streams), ("text", self.text), ("feature", self.features)):
            if name in group:
                return role
        return None

    def video_token_counts(self) -> set[int]:
        """Sequence lengths an attention over video tokens may have: a frame's tokens, the frames, or all
        tokens of a run of frames, for any integer patch size.

        >>> InputRoles("x", (2, 4, 3, 8, 8), {}, {}, {}).video_token_counts() >= {64, 16, 3, 48, 192}
        True
        """
        shape = self.vshape
        if len(shape) == 3:
            return {shape[1]}
        h, w = shape[-2:]
        per_frame = {h * w // (p * p) for p in range(1, math.isqrt(h * w) + 1) if (h * w) % (p * p) == 0}
        frames = {shape[1], shape[2]} if len(shape) == 5 else {1}
        runs = {f for fr in frames for f in range(1, fr + 1) if fr % f == 0}
        return per_frame | runs | {n * f for n in per_frame for f in runs}

    def token_counts(self, role: str) -> set[int]:
        if role == "video":
            return self.video_token_counts()
        group = {"stream": self.streams, "text": self.text, "feature": self.features}[role]
        return {s[1] for s in group.values() if len(s) == 3}


def _output_shapes(gm: fx.GraphModule) -> set[tuple[int, ...]]:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return {_shape_of(n) for n in out.all_input_nodes if isinstance(n.meta.get("val"), torch.Tensor)}


#: Ops that pass an input's values on unchanged (re-layouts, casts), between an input and its projection.
_PASS_ON = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.squeeze.dim,
            aten.squeeze.dims, aten.unsqueeze.default, aten.permute.default, aten.transpose.int,
            aten.contiguous.default, aten.clone.default, aten.to.dtype, aten._to_copy.default,
            aten.flatten.using_ints, aten.slice.Tensor, aten.select.int}


def _projected(gm: fx.GraphModule, name: str) -> bool:
    """Whether the input ``name`` reaches, unchanged but for re-layouts and casts, the data operand of a
    projection (a linear op): token embeddings do (a caption projection), coordinates and masks do not."""
    todo = [n for n in gm.graph.nodes if n.op == "placeholder" and n.name == name]
    seen = set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if u.op != "call_function":
                continue
            if u.target in LINEAR_OPS and u.args[0] is n:
                return True
            if u.target in _PASS_ON and u.args[0] is n:
                todo.append(u)
    return False


def input_roles(captured: CapturedGraph, video: str) -> InputRoles:
    """Roles of the capture's inputs besides ``video``, from their shapes and the outputs' shapes.

    LTX-2 (video packed as ``(2, 48, 4)``, outputs ``(2, 48, 4)`` and ``(2, 6, 4)``): ``audio_hidden_states``
    ``(2, 6, 4)`` is a stream, ``encoder_hidden_states`` ``(2, 5, 16)`` text, ``timestep`` ``(2,)`` nothing.
    SANA-WM's caption ``(2, 1, 5, 16)`` is text too (tokens with a singleton axis), read as ``(2, 5, 16)``.
    """
    outputs = _output_shapes(captured.gm)
    streams, text, features = {}, {}, {}
    for name, spec in zip(captured.input_names, captured.input_specs):
        if name == video or not spec.dtype.is_floating_point or len(spec.shape) < 3:
            continue
        if spec.shape in outputs:
            streams[name] = spec.shape
        elif len(spec.shape) == 3 or (set(spec.shape[1:-2]) == {1} and _projected(captured.gm, name)):
            # (B, 1, L, D) read by a projection: token embeddings with singleton axes (SANA's caption), read
            # as (B, L, D); LTX-2's audio coordinates (B, 1, N, 2) only feed rotary tables: features
            text[name] = (spec.shape[0], *spec.shape[-2:])
        else:
            features[name] = spec.shape
    vshape = captured.input_specs[captured.input_names.index(video)].shape
    return InputRoles(video, vshape, streams, text, features)


def token_roles(node: fx.Node, tokens: int, deps: dict, roles: InputRoles) -> set[str]:
    """Whose tokens an attention operand holds.

    The operand's data comes from some inputs (``deps``); after a joint attention every stream depends on
    every input, so data alone cannot tell the text positions of a single-stream block from its video
    positions. When the operand's token count is that of exactly one of the inputs it depends on, its tokens
    are that input's; otherwise they are all of them (e.g. video and text tokens concatenated).

    Example: in a single-stream block whose hidden state is ``cat([video (48 tokens), text (5 tokens)])``,
    ``k = to_k(hidden[:, 48:])`` depends on video and text but holds 5 tokens: ``{"text"}``.
    """
    found = {r for r in (roles.role(i) for i in deps[node]) if r is not None}
    by_count = {r for r in found if tokens in roles.token_counts(r)}
    if len(by_count) == 1:
        return by_count
    if "video" in by_count:  # ambiguous sizes: the video's data decides
        return {"video"}
    return found


def _holders(node: fx.Node, which: set[str], deps: dict, roles: InputRoles) -> str:
    """The inputs of roles ``which`` that ``node`` reads, for reasons: ``"encoder_hidden_states"``."""
    return ", ".join(sorted(i for i in deps[node] if roles.role(i) in which)) or "constants"


def _classify(core: AttentionCore, deps: dict, roles: InputRoles, path: str) -> tuple[str, str]:
    """The kind of an attention from whose tokens its queries and keys hold (:func:`token_roles`).

    * queries hold video tokens: keys too -> spatial/temporal/joint by layout (:func:`_video_kind`); keys
      of another denoised stream or of features -> ``other``; keys of text/conditioning -> ``cross``;
    * queries hold no video tokens: any stream or feature tokens -> ``other``; text only -> ``text``.
    """
    q_roles = token_roles(core.query, core.query_shape[-2], deps, roles)
    k_roles = token_roles(core.key, core.key_shape[-2], deps, roles)
    lq, lk, video = core.query_shape[-2], core.key_shape[-2], roles.video
    if "video" not in q_roles:
        q_src = _holders(core.query, q_roles, deps, roles)
        if (q_roles | k_roles) & {"stream", "feature"}:
            return "other", f"queries are {lq} tokens of {q_src}, none of {video}"
        if "text" in q_roles | k_roles:
            k_src = _holders(core.key, k_roles, deps, roles)
            return "text", f"queries ({lq} tokens of {q_src}) and keys ({lk} of {k_src}) are conditioning only"
        return "other", f"queries are {lq} tokens of {q_src}, none of {video}"
    if "video" not in k_roles:
        k_src = _holders(core.key, k_roles, deps, roles)
        if k_roles & {"stream", "feature"}:
            return "other", f"keys/values are {lk} tokens of {k_src}, a stream other than {video}"
        return "cross", f"keys/values are {lk} tokens of {k_src}, not of {video}"
    if core.heads_folded:
        return _by_name(path, f"its bmm query {core.query_shape} folds the heads into the batch")
    q_shape = core.query_shape
    whole = _batch_sliced_from(core.query)
    if whole is not None and len(q_shape) <= 4 and q_shape[0] < roles.vshape[0]:
        kind, reason = _video_kind((whole, *q_shape[1:]), roles.vshape, path)
        return kind, f"{reason} (one attention call per slice of the batch: queries sliced from batch {whole})"
    return _video_kind(q_shape, roles.vshape, path)


def _batch_sliced_from(query: fx.Node) -> int | None:
    """The batch a query was sliced from when the attention runs once per slice of the batch, else None.

    Mochi loops over the samples: ``cat([q[i:i+1], text_q[i:i+1, :, valid]], dim=2)`` queries one sample of
    the batch of 2, so its query batch 1 stands for 2 samples of one sequence each. The walk goes back through
    concatenations and slices along other axes, token selections and casts, to a slice of axis 0.
    """
    todo, seen = [query], set()
    while todo:
        n = todo.pop()
        if n in seen or n.op != "call_function":
            continue
        seen.add(n)
        if n.target == aten.slice.Tensor:
            if int(n.args[1] if len(n.args) > 1 else 0) % n.args[0].meta["val"].dim() == 0:
                return int(n.args[0].meta["val"].shape[0])
            todo.append(n.args[0])
        elif n.target == aten.cat.default and int(n.args[1] if len(n.args) > 1 else 0) % n.meta["val"].dim():
            todo.extend(n.args[0])
        elif n.target == aten.index.Tensor and n.args[1] and n.args[1][0] is None:
            todo.append(n.args[0])
        elif n.target in {aten.to.dtype, aten._to_copy.default, aten.contiguous.default, aten.clone.default}:
            todo.append(n.args[0])
    return None


def _video_kind(q: tuple, vshape: tuple, path: str) -> tuple[str, str]:
    """spatial/temporal/joint for an attention whose queries and keys are video tokens: query ``q`` is
    ``(B*G, heads, L, d)``, ``(B*G, L, d)`` (one head), or ``(..., heads, L, d)`` whose leading dims
    multiply to B*G."""
    b, lq = vshape[0], q[-2]
    bq = q[0] if len(q) <= 4 else math.prod(q[:-3])
    if bq % b:
        return _by_name(path, f"query batch {bq} is not a multiple of the video batch {b}")
    g = bq // b
    if g == 1:
        return "joint", f"one sequence of {lq} tokens per sample"
    if len(vshape) == 5:
        frames, (h, w) = {vshape[1], vshape[2]}, vshape[3:]
        is_t = lq in frames and _is_spatial_size(g, h, w)
        is_s = g in frames and _is_spatial_size(lq, h, w)
        if is_t and not is_s:
            return "temporal", f"sequence of {lq} = frames, batch {b}x{g} tokens"
        if is_s and not is_t:
            return "spatial", f"sequence of {lq} = tokens of one frame, batch {b}x{g} frames"
        return _by_name(path, f"sequence {lq} / groups {g} fit both frames and tokens")
    return _by_name(path, f"video input has rank {len(vshape)}, not 5")


def _by_name(path: str, why: str) -> tuple[str, str]:
    low = path.lower()
    for kind, words in (("temporal", ("temp", "time")), ("cross", ("cross",)), ("spatial", ("spatial", "space")),
                        ("joint", ("joint", "full")), ("other", ("audio",)), ("text", ("refiner", "text"))):
        if any(w in low for w in words):
            return kind, f"by name ({why})"
    raise TaggingError(f"cannot tell the kind of attention {path}: {why}. Pass kinds={{'{path}': '<kind>'}} to "
                       f"graphpass.optimize (kinds: {', '.join(KINDS)})")


def _pick_video_input(captured: CapturedGraph, video_input: str | None) -> str:
    if video_input is not None:
        if video_input not in captured.input_names:
            raise TaggingError(f"video_input={video_input!r} is not an input of the capture ({captured.input_names})")
        return video_input
    for rank in (5, 4, 3):
        for name, spec in zip(captured.input_names, captured.input_specs):
            if len(spec.shape) == rank and spec.dtype.is_floating_point:
                return name
    raise TaggingError(f"no video-like floating tensor input among {captured.input_names}; pass video_input=<name>")


def _check_batch(captured: CapturedGraph, video: str) -> None:
    shape = captured.input_specs[captured.input_names.index(video)].shape
    if 0 in shape:
        raise TaggingError(f"the example {video!r} has shape {shape} with an empty dimension: tagging reads the "
                           f"attention layout from the example's sizes. Pass example inputs with batch >= 1 and "
                           f"non-empty frames, height and width.")


def _override(path: str, kinds: dict[str, str] | None) -> str | None:
    for pattern, kind in (kinds or {}).items():
        if fnmatch.fnmatchcase(path, pattern):
            if kind not in KINDS:
                raise TaggingError(f"kinds override {pattern!r} -> {kind!r}: kind must be one of {', '.join(KINDS)}")
            return kind
    return None


def _check_overrides_match(kinds: dict[str, str] | None, regions: list["Region"]) -> None:
    """Every ``kinds=`` pattern must name at least one region: a typo would otherwise be ignored silently."""
    paths = [r.path for r in regions]
    for pattern, kind in (kinds or {}).items():
        if kind not in KINDS:
            raise TaggingError(f"kinds override {pattern!r} -> {kind!r}: kind must be one of {', '.join(KINDS)}")
        if not any(fnmatch.fnmatchcase(p, pattern) for p in paths):
            shown = ", ".join(paths[:4]) + (", ..." if len(paths) > 4 else "")
            raise TaggingError(f"kinds override pattern {pattern!r} matches no attention or MLP region; region paths "
                               f"look like: {shown}. Fix the pattern (fnmatch globs over module paths, e.g. "
                               f"'blocks.*.attn1').")


def find_attention_regions(captured: CapturedGraph, *, video_input: str | None = None,
                           kinds: dict[str, str] | None = None) -> list[Region]:
    gm = captured.gm
    video = _pick_video_input(captured, video_input)
    _check_batch(captured, video)
    roles = input_roles(captured, video)
    deps = _input_deps(gm)
    regions = []
    for path, (core, mtype) in find_attention_cores(gm, deps).items():
        forced = _override(path, kinds)
        if forced:
            kind, reason = forced, "set by kinds override"
        else:
            kind, reason = _classify(core, deps, roles, path)
        if core.form != "sdpa":
            reason += f"; {core.form} attention written with matrix products"
        region = _make_region(gm, path, mtype, kind, reason, core.query_shape)
        region.form = core.form
        regions.append(region)
    return regions


def _linear_dims(n: fx.Node) -> tuple[int, int]:
    w = n.args[1] if n.target == aten.linear.default else n.args[2]
    shape = tuple(w.meta["val"].shape)
    return (shape[1], shape[0]) if n.target == aten.linear.default else (shape[0], shape[1])


def find_mlp_regions(captured: CapturedGraph, attention: list[Region],
                     kinds: dict[str, str] | None = None) -> list[Region]:
    gm = captured.gm
    attn_paths = [r.path for r in attention]
    attn_parents = {p.rsplit(".", 1)[0] for p in attn_paths if "." in p}
    # a module holding an attention region (or inside one) is no MLP
    has_attention = {".".join(p.split(".")[:i]) for p in attn_paths for i in range(1, p.count(".") + 2)}
    by_module: dict[str, list[fx.Node]] = {}
    types: dict[str, str] = {}
    for n in gm.graph.nodes:
        for p, t in module_path(n):
            types[p] = t
            if n.op == "call_function" and n.target in LINEAR_OPS:
                by_module.setdefault(p, []).append(n)
    candidates = []
    for p, lins in by_module.items():
        inside_attention = p in has_attention or any(p.startswith(a + ".") for a in attn_paths)
        if inside_attention or len(lins) < 2 or "." not in p or p.rsplit(".", 1)[0] not in attn_parents:
            continue
        (i0, o0), (i1, o1) = _linear_dims(lins[0]), _linear_dims(lins[-1])
        if o0 > i0 and i1 > i0 and o1 == i0:  # i1 may be o0/2 for gated units (GEGLU, SwiGLU)
            candidates.append(p)
    innermost = [p for p in candidates if not any(q != p and q.startswith(p + ".") for q in candidates)]
    regions = []
    for p in innermost:
        forced = _override(p, kinds)
        reason = "set by kinds override" if forced else "expand/contract linear pair in a block"
        regions.append(_make_region(gm, p, types[p], forced or "mlp", reason))
    return regions


def tag_attention(captured: CapturedGraph, *, video_input: str | None = None,
                  kinds: dict[str, str] | None = None) -> list[Region]:
    """All attention and MLP regions of ``captured``, tagged by kind, in graph order."""
    attention = find_attention_regions(captured, video_input=video_input, kinds=kinds)
    if not attention:
        raise TaggingError(f"{captured.model_type} has no attention op in its captured graph (neither "
                           f"aten.scaled_dot_product_attention nor two chained matmul/bmm products of activations), "
                           f"so there is nothing for graphpass to reuse. Models must compute attention with "
                           f"torch.nn.functional.scaled_dot_product_attention or with matmul/bmm inside nn.Modules.")
    regions = attention + find_mlp_regions(captured, attention, kinds)
    _check_overrides_match(kinds, regions)
    order = {n.name: i for i, n in enumerate(captured.gm.graph.nodes)}
    regions.sort(key=lambda r: order[r.nodes[0]])
    _check_disjoint(regions)
    return regions


def _check_disjoint(regions: list[Region]) -> None:
    owner: dict[str, str] = {}
    for r in regions:
        for n in r.nodes:
            if n in owner:
                raise TaggingError(f"regions {owner[n]} and {r.path} overlap (node {n}); a region must not contain "
                                   f"another. Override kinds or restructure the model.")
            owner[n] = r.path


_SHAPE_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
              aten.transpose.int, aten.unsqueeze.default, aten.contiguous.default, aten.clone.default}


def include_gates(captured: CapturedGraph, regions: list[Region]) -> list[Region]:
    """Extend each region over the gate multiplication that follows it, when there is one.

    By default graphpass caches a region's raw output and the block re-applies the *current* step's gate
    (the gate depends on the timestep). The Open-Sora and Latte reference code instead caches
    ``gate * output``, reusing a stale gate; this pass gives that behaviour for comparison. A gate is a
    ``mul`` reached from the region's single exit through single-user shape ops, whose other operand does
    not depend on the region. Regions without one are returned unchanged.
    """
    by_name = {n.name: n for n in captured.gm.graph.nodes}
    out = []
    for r in regions:
        if len(r.exits) != 1:
            out.append(r)
            continue
        chain, node = [], by_name[r.exits[0]]
        while len(node.users) == 1:
            (user,) = node.users
            if user.op != "call_function":
                break
            if user.target in _SHAPE_OPS:
                chain.append(user)
                node = user
                continue
            if user.target == aten.mul.Tensor and len(user.all_input_nodes) == 2:
                chain.append(user)
                node = user
            break
        if not chain or chain[-1].target != aten.mul.Tensor:
            out.append(r)
            continue
        gate_node = chain[-1]
        nodes = r.nodes + [n.name for n in chain]
        out.append(Region(path=r.path, module_type=r.module_type, kind=r.kind, nodes=nodes, exits=[gate_node.name],
                          exit_specs=[_spec(gate_node)],
                          flops=r.flops + sum(node_flops(n) for n in chain), reason=r.reason + "; gate included",
                          block=r.block, attention_shape=r.attention_shape))
    return out
