"""Find the attention and MLP regions of a captured DiT and tag each attention region by kind.

A *region* is the set of nodes recorded under one module path (``blocks.3.temporal_attn``); its *exits*
are the region's nodes read outside it. Reusing a region means replacing its exits by cached tensors.

Kinds come from graph structure, not names. For the first attention op of a region, with video input of
batch ``B`` and query of shape ``(B*G, heads, L, d)``:

* ``cross``    keys/values do not depend on the video input (they come from the conditioning input);
* ``joint``    one sequence per sample (G == 1): 3D full attention over all tokens (+ text);
* ``temporal`` the sequence is the frames (L is a frame-count candidate) and G*p*p == H*W for an integer p;
* ``spatial``  the batch groups frames (G is a frame-count candidate) and L*p*p == H*W.

Frame-count candidates are dims 1 and 2 of a 5-D video input (B, C, F, H, W) or (B, F, C, H, W). When the
structure is ambiguous the module name decides, and users can force kinds by module-path glob pattern::

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
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..errors import TaggingError
from ..schedules.base import KINDS
from .capture import CapturedGraph, TensorSpec, module_path
from .flops import node_flops

aten = torch.ops.aten
ATTENTION_OPS = {aten.scaled_dot_product_attention.default}
LINEAR_OPS = {aten.linear.default, aten.addmm.default}


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
    extra: dict = field(default_factory=dict)

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


def _classify(q: tuple, k_deps: frozenset[str], video: str, vshape: tuple, path: str) -> tuple[str, str]:
    if video not in k_deps:
        src = ", ".join(sorted(k_deps)) or "constants"
        return "cross", f"keys/values come from {src}, not {video}"
    bq, lq = q[0], q[-2]
    b = vshape[0]
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
                        ("joint", ("joint", "full"))):
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


def _override(path: str, kinds: dict[str, str] | None) -> str | None:
    for pattern, kind in (kinds or {}).items():
        if fnmatch.fnmatchcase(path, pattern):
            if kind not in KINDS:
                raise TaggingError(f"kinds override {pattern!r} -> {kind!r}: kind must be one of {', '.join(KINDS)}")
            return kind
    return None


def find_attention_regions(captured: CapturedGraph, *, video_input: str | None = None,
                           kinds: dict[str, str] | None = None) -> list[Region]:
    gm = captured.gm
    video = _pick_video_input(captured, video_input)
    vshape = captured.input_specs[captured.input_names.index(video)].shape
    deps = _input_deps(gm)
    first_op: dict[str, tuple[fx.Node, str]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in ATTENTION_OPS:
            path, mtype = _attention_module(n)
            first_op.setdefault(path, (n, mtype))
    regions = []
    for path, (op, mtype) in first_op.items():
        q = tuple(op.args[0].meta["val"].shape)
        forced = _override(path, kinds)
        if forced:
            kind, reason = forced, "set by kinds override"
        else:
            kind, reason = _classify(q, deps[op.args[1]], video, vshape, path)
        regions.append(_make_region(gm, path, mtype, kind, reason, q))
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
    by_module: dict[str, list[fx.Node]] = {}
    types: dict[str, str] = {}
    has_attention: set[str] = set()
    for n in gm.graph.nodes:
        for p, t in module_path(n):
            types[p] = t
            if n.op == "call_function" and n.target in ATTENTION_OPS:
                has_attention.add(p)
            if n.op == "call_function" and n.target in LINEAR_OPS:
                by_module.setdefault(p, []).append(n)
    candidates = []
    for p, lins in by_module.items():
        if p in has_attention or len(lins) < 2 or "." not in p or p.rsplit(".", 1)[0] not in attn_parents:
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
        raise TaggingError(f"{captured.model_type} has no attention op (aten.scaled_dot_product_attention) in its "
                           f"captured graph, so there is nothing for graphpass to reuse. Models must compute "
                           f"attention with torch.nn.functional.scaled_dot_product_attention.")
    regions = attention + find_mlp_regions(captured, attention, kinds)
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
