"""Communication elision: remove collectives whose results nobody reads.

Plain dead-code elimination keeps every collective: ``_c10d_functional.wait_tensor`` is side-effectful for
torch.fx, and rightly so by default, since a collective that one rank skips and another runs deadlocks
both. Removing one is safe only when every rank removes it, which holds for the graphs graphpass builds:
all ranks run the same phase on graphs of the same structure (only tensor sizes differ per rank), so a
decision taken from the graph's structure alone is the same on every rank.

The rule, from the graph and not from names: a collective is removable iff its result has no users, or
its only users are ``wait_tensor`` nodes that have no users. After removing collectives the pass runs DCE
again (the tensors only a removed collective sent become dead) and repeats until nothing changes.

Typical use, after :func:`~graphpass.passes.specialize.specialize_phase` has replaced a reused temporal
attention by its cache input: the all-to-all that fed the attention (frames -> tokens) and the one after
it (tokens -> frames) both lose their users, and both go::

    >>> pg = specialize_phase(local, regions, phase, passes=(elide_collectives,))
    >>> [c.name for c in collective_nodes(pg.gm.graph)]      # the all-to-alls of computed regions only

Every collective node the parallel passes create carries ``meta["graphpass_collective"]``, a
:class:`CollectiveInfo` (kind, region, role, bytes this rank sends), which reports read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..errors import GraphpassError
from .specialize import eliminate_dead_code

_C10D = torch.ops._c10d_functional
#: Functional collectives (result must be waited on) and the wait op.
COLLECTIVE_OPS = frozenset({_C10D.all_to_all_single.default, _C10D.all_gather_into_tensor.default,
                            _C10D.all_reduce.default, _C10D.reduce_scatter_tensor.default,
                            _C10D.broadcast.default})
WAIT_OP = _C10D.wait_tensor.default

META_KEY = "graphpass_collective"


@dataclass(frozen=True)
class CollectiveInfo:
    """What one collective node does, recorded when a pass creates it.

    kind: ``"all_to_all"``, ``"all_gather"`` or ``"all_reduce"``.
    region: the region it serves (``blocks.0.temporal_attn``), or ``""`` for model inputs/outputs.
    role: ``"enter"`` (before the region: frames -> tokens), ``"exit"`` (after it: tokens -> frames),
        ``"gather"`` (whole outputs from the ranks' frames), or ``"metric"`` (the sums of a distance an
        adaptive technique decides from, all-reduced so that every rank decides alike).
    bytes_sent: bytes this rank sends to other ranks per call (its own chunk is not counted).
    """

    kind: str
    region: str
    role: str
    bytes_sent: int


def is_collective(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in COLLECTIVE_OPS


def collective_nodes(graph: fx.Graph) -> list[fx.Node]:
    """The collective nodes of ``graph`` in order (their waits are not listed)."""
    return [n for n in graph.nodes if is_collective(n)]


def _unused(node: fx.Node) -> bool:
    """No user, or only waits that have no user themselves."""
    return all(u.op == "call_function" and u.target == WAIT_OP and not u.users for u in node.users)


def elide_collectives(graph: fx.Graph) -> list[str]:
    """Remove collectives whose results have no users (with their waits), then the dead code that fed
    them, until nothing changes. Returns the names of the removed collective nodes, in graph order.

    requires: every ``wait_tensor`` waits on a collective node of this graph.
    ensures: no collective of the result is unused.
    """
    for n in graph.nodes:
        if n.op == "call_function" and n.target == WAIT_OP:
            src = n.args[0]
            if not (isinstance(src, fx.Node) and is_collective(src)):
                raise GraphpassError(f"wait_tensor node {n.name} waits on {src}, which is not a collective of this "
                                     f"graph; elide_collectives needs each wait next to its collective")
    order = {n: i for i, n in enumerate(graph.nodes)}
    removed: list[fx.Node] = []
    while True:
        dead = [n for n in graph.nodes if is_collective(n) and _unused(n)]
        if not dead:
            break
        for c in dead:
            for w in list(c.users):
                graph.erase_node(w)
            graph.erase_node(c)
            removed.append(c)
        eliminate_dead_code(graph)
    left = [n.name for n in collective_nodes(graph) if _unused(n)]
    if left:  # ensures
        raise GraphpassError(f"collectives {left} are unused after elision")
    return [n.name for n in sorted(removed, key=order.__getitem__)]


def collective_info(node: fx.Node) -> CollectiveInfo | None:
    return node.meta.get(META_KEY)


#: The collective kind of each functional collective op, as reports name it.
_KINDS = {_C10D.all_to_all_single.default: "all_to_all", _C10D.all_gather_into_tensor.default: "all_gather",
          _C10D.all_reduce.default: "all_reduce", _C10D.reduce_scatter_tensor.default: "reduce_scatter",
          _C10D.broadcast.default: "broadcast"}


def describe_collectives(graph: fx.Graph, *, region: str, role: str) -> list[str]:
    """Tag the collectives of ``graph`` that no pass described (a phase's own, such as the all-reduce of
    AdaCache's distance sums) with a :class:`CollectiveInfo` of ``region`` and ``role``; returns their names.
    Bytes are those the op hands to the group (the whole tensor for an all-reduce; an all-gather's input
    once per other rank), as :func:`graphpass.runtime.parallel.count_collectives` counts them.

        >>> describe_collectives(pg.gm.graph, region="blocks.1", role="metric")   # a measuring AdaCache phase
        ['all_reduce']
        >>> collective_info(next(n for n in pg.gm.graph.nodes if n.name == "all_reduce")).bytes_sent
        16
    """
    named = []
    for n in collective_nodes(graph):
        if collective_info(n) is not None:
            continue
        v = n.args[0].meta.get("val") if isinstance(n.args[0], fx.Node) else None
        nbytes = v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 0
        kind = _KINDS[n.target]
        if kind == "all_gather":
            nbytes *= n.args[1] - 1
        n.meta[META_KEY] = CollectiveInfo(kind, region, role, nbytes)
        named.append(n.name)
    return named
