"""Taylor extrapolation of module outputs (TaylorSeer, arXiv 2503.06923), compiled into phase graphs.

TaylorSeer acts on whole modules picked by name (diffusers' ``TaylorSeerCacheConfig`` identifiers, matched
with ``re.fullmatch`` against ``model.named_modules()``): *active* modules are extrapolated, *inactive*
ones return zeros on predict steps. Two kinds of phase graph:

* **update** (a computed step): the captured graph, plus, for every output ``y`` of every active module,
  its new Taylor factors as extra outputs::

      F0 = y ;  F[j+1] = (F[j] - F_prev[j]) / d        (j < max_order, while F_prev[j] exists)

  stored in the factors' dtype. ``d`` (steps since the previous update) is a graph *input* (a 0-d float32
  tensor, cache key :data:`GAP_KEY`), so one graph serves every gap;
* **predict**: every active module's outputs are replaced by ``sum_k F[k] * g**k / k!`` (``g``: steps since
  the last update, the same graph input) and every inactive module's outputs by zeros of the shape the last
  update recorded (it stores a one-element, zero-stride tensor of that shape); dead-code elimination then
  drops the modules, and everything only they needed.

A module's *outputs* are the values of its nodes read outside it, less the values it only passes through
(``temb.float()`` of a ``temb`` that is already float32 is the caller's tensor, not a result). Each output is
extrapolated on its own and elementwise, so their order does not matter.

>>> mods = taylor_modules(captured, names, active=[r"blocks\\.\\d+\\.attn\\d"], inactive=[])
>>> [m.path for m in mods], mods[0].exits
(['blocks.0.attn1', 'blocks.0.attn2', 'blocks.1.attn1', 'blocks.1.attn2'], ['dropout'])
>>> pg = specialize_taylor_phase(captured, mods, TaylorPhase.predict(mods, orders=2), max_order=1,
...                              factors_dtype=torch.float32)
>>> pg.cache_inputs[:3]
['taylorseer:gap', 'blocks.0.attn1:0:F0', 'blocks.0.attn1:0:F1']
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar, Iterable, Sequence

import torch
import torch.fx as fx

from ..errors import GraphpassError, ScheduleError
from ..schedules.base import Action, Phase
from .capture import CapturedGraph, TensorSpec, module_path
from .flops import graph_flops
from .residuals import inline
from .specialize import PhaseGraph, _clone_before_first_user, cache_input_name, copy_graph, eliminate_dead_code, \
    written_through

aten = torch.ops.aten

#: Cache key of the step gap: steps since the last update (a 0-d float32 tensor the runtime puts in the cache).
GAP_KEY = "taylorseer:gap"
#: Phase modes: an update runs the graph and refreshes the factors; a predict extrapolates them.
MODES = ("update", "predict")
#: Ops that hand their first argument on unchanged when shape and dtype stay: a module output through them is
#: the caller's value passing through, not a result of the module.
_PASS_THROUGH = {aten.to.dtype, aten._to_copy.default, aten.alias.default, aten.clone.default,
                 aten.contiguous.default, aten.type_as.default, aten.view.default, aten.detach.default}


@dataclass
class TaylorModule:
    """One module TaylorSeer acts on.

    path: module name (``blocks.0.attn1``); inactive: True for a module returning zeros on predict steps
    (``skip_predict_identifiers``), False for one whose outputs are extrapolated (``cache_identifiers``);
    nodes: names of its graph nodes; exits: names of the nodes holding its outputs; specs: their shapes/dtypes.
    """

    path: str
    inactive: bool
    nodes: list[str]
    exits: list[str]
    specs: list[TensorSpec]

    def factor_key(self, exit_index: int, order: int) -> str:
        """Cache key of one factor, e.g. ``blocks.0.attn1:0:F1``."""
        return f"{self.path}:{exit_index}:F{order}"

    def shape_key(self, exit_index: int) -> str:
        """Cache key of an inactive module's recorded output shape (a zero-stride tensor of that shape)."""
        return f"{self.path}:{exit_index}:shape"

    def factor_keys(self, orders: int) -> list[str]:
        """Keys of factors ``0..orders-1`` of every output (inactive modules keep none)."""
        if self.inactive:
            return []
        return [self.factor_key(i, k) for i in range(len(self.exits)) for k in range(orders)]


@dataclass(frozen=True)
class TaylorPhase(Phase):
    """A TaylorSeer phase: ``mode`` ``"update"`` with ``orders`` factors kept by the previous update (0 for the
    first), or ``"predict"`` from ``orders`` cached factors. ``actions`` lists the modules (STORE on update,
    REUSE on predict) so reports count them like regions.

    >>> TaylorPhase.update([], orders=0).label(), TaylorPhase.predict([], orders=2).label()
    ('update (first)', 'predict (2 factors)')
    """

    mode: str = "update"
    orders: int = 0
    caches_region_outputs: ClassVar[bool] = False  # it caches the modules' Taylor factors

    @staticmethod
    def update(modules: Sequence[TaylorModule], orders: int) -> "TaylorPhase":
        return TaylorPhase(Phase.of({m.path: Action.STORE for m in modules}).actions, "update", orders)

    @staticmethod
    def predict(modules: Sequence[TaylorModule], orders: int) -> "TaylorPhase":
        return TaylorPhase(Phase.of({m.path: Action.REUSE for m in modules}).actions, "predict", orders)

    def label(self) -> str:
        if self.mode == "update":
            return "update (first)" if self.orders == 0 else f"update ({self.orders} factors held)"
        return f"predict ({self.orders} factors)"


# --- finding the modules ---------------------------------------------------------------------------------
def match_modules(names: Iterable[str], active: Sequence[str], inactive: Sequence[str]) -> dict[str, bool]:
    """Module name -> inactive?, for the names fully matching a pattern (an inactive pattern wins, as in
    diffusers' ``apply_taylorseer_cache``).

    >>> match_modules(["blocks.0", "blocks.0.attn1", "proj_out"], [r"proj_out"], [r"[^.]*block[^.]*\\.[^.]+"])
    {'blocks.0': True, 'proj_out': False}
    """
    out = {}
    for name in names:
        off = any(re.fullmatch(p, name) for p in inactive)
        if off or any(re.fullmatch(p, name) for p in active):
            out[name] = off
    return out


def _passes_through(n: fx.Node, inside: set[fx.Node]) -> bool:
    """Whether ``n`` only hands on a value from outside the module (a no-op cast or view of it)."""
    if n.op != "call_function" or n.target not in _PASS_THROUGH or not isinstance(n.args[0], fx.Node):
        return False
    src = n.args[0]
    a, b = src.meta.get("val"), n.meta.get("val")
    same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
    return same and (src not in inside or _passes_through(src, inside))


def module_outputs(gm: fx.GraphModule, path: str) -> tuple[list[fx.Node], list[fx.Node]]:
    """(nodes of module ``path``, the nodes holding its outputs): tensors read outside it, less pass-throughs.
    Size computations belong to no module; multi-output ops (``unbind``, ``split``) belong to it like any op."""
    nodes = [n for n in gm.graph.nodes if any(p == path for p, _ in module_path(n))
             and not isinstance(n.meta.get("val"), (int, torch.SymInt))]
    inside = set(nodes)
    exits = [n for n in nodes if isinstance(n.meta.get("val"), torch.Tensor)
             and any(u not in inside for u in n.users) and not _passes_through(n, inside)]
    return nodes, exits


def graph_module_names(gm: fx.GraphModule) -> list[str]:
    """The names of the modules whose calls the captured graph records (``nn_module_stack``), in graph order:
    the modules identifiers can pick (one that computes nothing records no node).

    >>> graph_module_names(captured.gm)[:3]       # e.g. ['patch_embedding', 'blocks.0', 'blocks.0.norm1']
    """
    names: dict[str, None] = {}
    for n in gm.graph.nodes:
        for path, _ in module_path(n):
            names.setdefault(path, None)
    return list(names)


def taylor_modules(captured: CapturedGraph, names: Iterable[str], active: Sequence[str],
                   inactive: Sequence[str]) -> list[TaylorModule]:
    """The modules of ``names`` (the model's ``named_modules()`` names) that the patterns pick, in graph
    order, with their outputs. Raises when they pick nothing, nest, or pick a module without outputs."""
    picked = match_modules(names, active, inactive)
    if not picked:
        raise ScheduleError(f"TaylorSeer identifiers pick no module of {captured.model_type} (cache: {list(active)}, "
                            f"skip: {list(inactive)}; matched with re.fullmatch against module names such as "
                            f"'blocks.0.attn1'): give cache_identifiers that match, e.g. [r'blocks\\.\\d+\\.attn\\d']")
    for a in picked:
        for b in picked:
            if a != b and b.startswith(a + "."):
                raise ScheduleError(f"TaylorSeer identifiers pick {b!r} inside {a!r}: a module skipped on predict "
                                    f"steps does not run the modules inside it, so their step counters would stop; "
                                    f"pick modules that do not nest")
    mods = []
    for path, off in picked.items():
        nodes, exits = module_outputs(captured.gm, path)
        if not exits:
            raise ScheduleError(f"TaylorSeer module {path!r} computes nothing in the captured graph (an identity "
                                f"or unused module): leave it out of the identifiers")
        mods.append(TaylorModule(path, off, [n.name for n in nodes], [n.name for n in exits],
                                 [TensorSpec(tuple(int(s) for s in e.meta["val"].shape), e.meta["val"].dtype)
                                  for e in exits]))
    order = {n.name: i for i, n in enumerate(captured.gm.graph.nodes)}
    return sorted(mods, key=lambda m: order[m.exits[0]])


# --- graph building --------------------------------------------------------------------------------------
def taylor_update(features: torch.Tensor, previous: Sequence[torch.Tensor], gap: torch.Tensor,
                  max_order: int) -> list[torch.Tensor]:
    """New factors from a computed output and the previous update's factors (before the dtype cast):
    ``F0 = y``, ``F[j+1] = (F[j] - F_prev[j]) / gap`` for ``j < min(len(previous), max_order)``.

    >>> taylor_update(torch.tensor([5.0]), [torch.tensor([1.0])], torch.tensor(2.0), max_order=1)
    [tensor([5.]), tensor([2.])]
    """
    new = [features]
    for j in range(min(len(previous), max_order)):
        new.append((new[j] - previous[j].to(features.dtype)) / gap)
    return new


def taylor_predict(factors: Sequence[torch.Tensor], gap: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``sum_k F[k] * gap**k / k!`` in ``dtype``, summed from zeros in order as diffusers' hook does.

    >>> taylor_predict([torch.tensor([5.0]), torch.tensor([2.0])], torch.tensor(3.0), torch.float32)
    tensor([11.])
    """
    out = torch.zeros_like(factors[0], dtype=dtype)
    for k, f in enumerate(factors):
        out = out + f.to(dtype) * (gap ** k / math.factorial(k))
    return out


def _placeholder(graph: fx.Graph, after: fx.Node, key: str, val) -> fx.Node:
    with graph.inserting_after(after):
        ph = graph.placeholder(cache_input_name(key))
    ph.meta["val"] = val
    ph.meta["graphpass_cache_key"] = key
    return ph


def _factor_val(spec: TensorSpec, dtype: torch.dtype | None) -> torch.Tensor:
    return torch.empty(spec.shape, dtype=dtype or spec.dtype)


def specialize_taylor_phase(captured: CapturedGraph, modules: Sequence[TaylorModule], phase: TaylorPhase, *,
                            max_order: int, factors_dtype: torch.dtype | None) -> PhaseGraph:
    """The graph of one TaylorSeer phase (see the module docstring). Inputs: the capture's, then the gap
    (:data:`GAP_KEY`, when the phase reads it) and the factors it reads; outputs: the model's, then the
    factors an update stores (``factors_dtype`` None keeps each output's dtype)."""
    if phase.mode not in MODES:
        raise GraphpassError(f"unknown TaylorSeer phase mode {phase.mode!r}; one of {MODES}")
    if not 0 <= phase.orders <= max_order + 1 or (phase.mode == "predict" and phase.orders < 1):
        raise GraphpassError(f"TaylorSeer {phase.mode} phase with {phase.orders} factors for max_order {max_order}")
    graph, by_name, outs = copy_graph(captured.gm)
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    cache_inputs: list[str] = []
    stored: list[tuple[str, fx.Node]] = []
    reads_gap = phase.mode == "predict" or (phase.orders > 0 and max_order > 0)
    gap = None
    if reads_gap:
        gap = last = _placeholder(graph, last, GAP_KEY, torch.empty((), dtype=torch.float32))
        cache_inputs.append(GAP_KEY)
    replaced: dict[fx.Node, fx.Node] = {}
    for m in modules:
        inside = {by_name[n] for n in m.nodes}
        for i, (e, spec) in enumerate(zip(m.exits, m.specs)):
            node = by_name[e]
            if phase.mode == "update":
                if m.inactive:  # record the shape, as diffusers' hook does: a zero-stride tensor of it
                    stored.append((m.shape_key(i), _shape_carrier(graph, node, _device(captured))))
                    continue
                if written_through(node, ignore=inside):  # factor of the value the module produced
                    node = _clone_before_first_user(graph, node, set(node.users) - inside)
                prev = []
                for k in range(min(phase.orders, max_order)):
                    last = _placeholder(graph, last, m.factor_key(i, k), _factor_val(spec, factors_dtype))
                    prev.append(last)
                    cache_inputs.append(m.factor_key(i, k))
                raw = [node]
                for j, p in enumerate(prev):
                    raw.append(inline(graph, _difference, [raw[j], p, gap]))
                for k, r in enumerate(raw):
                    stored.append((m.factor_key(i, k), _cast(graph, r, factors_dtype)))
                continue
            if m.inactive:
                last = _placeholder(graph, last, m.shape_key(i), node.meta["val"])
                cache_inputs.append(m.shape_key(i))
                with graph.inserting_before(node):
                    new = graph.call_function(aten.zeros_like.default, (last,), {"dtype": spec.dtype})
                new.meta["val"] = node.meta["val"]
            else:
                fs = []
                for k in range(phase.orders):
                    last = _placeholder(graph, last, m.factor_key(i, k), _factor_val(spec, factors_dtype))
                    fs.append(last)
                    cache_inputs.append(m.factor_key(i, k))
                dtype = spec.dtype

                def predict(g, *factors, dtype=dtype):
                    return taylor_predict(factors, g, dtype)

                new = inline(graph, predict, [gap, *fs], before=node)
            node.replace_all_uses_with(new, delete_user_cb=lambda u, inside=inside: u not in inside)
            replaced[node] = new
    outs = [fx.node.map_arg(o, lambda n: replaced.get(n, n)) for o in outs]
    n_user = len(outs)
    graph.output(tuple(outs) + tuple(n for _, n in stored))
    eliminate_dead_code(graph)
    if phase.mode == "predict":  # ensures: nothing of a predicted or zeroed module runs
        alive = {n.name for n in graph.nodes}
        left = [n for m in modules for n in m.nodes if n in alive]
        if left:
            raise GraphpassError(f"TaylorSeer predict graph still runs module nodes {left[:3]}: they are read "
                                 f"outside the modules other than through their outputs")
    graph.lint()
    gm = fx.GraphModule(captured.gm, graph, class_name="TaylorPhaseGraph")
    return PhaseGraph(phase=phase, gm=gm, cache_inputs=cache_inputs, cache_outputs=[k for k, _ in stored],
                      num_user_outputs=n_user, flops=graph_flops(gm))


def _shape_carrier(graph: fx.Graph, node: fx.Node, device: torch.device) -> fx.Node:
    """``zeros(()).expand(node.shape)`` built from ``sym_size`` of ``node`` at run time: a tensor of the call's
    output shape (the batch, and with ``dynamic=True`` frames and resolution, follow the call) holding one
    element. Appended to the graph."""
    val = node.meta["val"]
    sizes = []
    for d, size in enumerate(val.shape):
        sz = graph.call_function(aten.sym_size.int, (node, d))
        sz.meta["val"] = size
        sizes.append(sz)
    zero = graph.call_function(aten.zeros.default, ([],), {"dtype": val.dtype, "device": device})
    zero.meta["val"] = torch.empty((), dtype=val.dtype)
    carrier = graph.call_function(aten.expand.default, (zero, sizes))
    carrier.meta["val"] = val
    return carrier


def _device(captured: CapturedGraph) -> torch.device:
    """Where the model's weights live (the capture's value metadata may sit on the meta device)."""
    for t in (*captured.gm.parameters(), *captured.gm.buffers()):
        return t.device
    return torch.device("cpu")


def _difference(now, prev, gap):
    return (now - prev.to(now.dtype)) / gap


def _cast(graph: fx.Graph, node: fx.Node, dtype: torch.dtype | None) -> fx.Node:
    """``node.to(dtype)`` as a new node (a copy when the dtype stays, so the stored factor never aliases a
    value the graph still uses)."""
    val = node.meta["val"]
    if dtype is None or dtype == val.dtype:
        return inline(graph, torch.clone, [node])
    return inline(graph, lambda x: x.to(dtype), [node])
