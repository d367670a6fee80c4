"""Step-invariant hoisting: compute once per generation what no sampling step changes.

A sampler calls the DiT once per step with a new latent and a new timestep; the other inputs (the prompt
embedding, masks, rotary tables) stay the same through a generation. Every node whose value depends only on
those inputs and on parameters (the text K/V projections of each cross-attention, the caption embedding,
mask preprocessing, rotary tables) gives the same tensor at every step. This pass finds those nodes from
data dependence alone and cuts each phase graph in two:

* the *prologue* computes the hoisted values: the step-invariant values that a per-step node reads (the
  frontier), once per generation and cache context (cond and uncond calls have different text);
* the *step graph* is the phase graph with each hoisted value replaced by an input ``hoisted_<node>``, and
  whatever only that value needed removed.

Worked example (the tiny diffusers Latte of the tests: 2 blocks, text (2, 5, 16), 3 frames)::

    >>> h = Hoisting.of(captured, per_step={"hidden_states", "timestep"})
    >>> sg = h.step_graph(pg)                      # pg: a phase graph of the same capture
    >>> sg.hoisted_inputs[:2], h.values_info()["transpose_6"].source
    (['unsqueeze_1', 'transpose_6'], 'transformer_blocks.0.attn2.to_k')
    >>> pg.flops - sg.flops                        # FLOPs no step computes any more
    72224

Hoisting runs *after* phase specialization, on each phase graph: specialization's dead-code elimination has
already removed every reused region and what only it read, so a step-invariant value that only a reused
region needed is neither an input of that phase nor computed for it; region node names and cache keys stay
those of the capture (hoisting first would rename what the regions name); and cache inputs are per-step
values by nature. The prologue is cut from the captured graph, so one prologue serves every phase: a value is
hoisted in a phase only where its node is the captured node (same name, op and arguments).

What may be hoisted (:func:`hoistable_nodes`): a node whose inputs are parameters, buffers, inputs other than
the per-step ones, sizes of any input (fixed within a generation: see :func:`invariant_leaves`), or hoistable
nodes; that is neither random (a ``nondeterministic_seeded`` op draws anew each step) nor impure (a side
effect happens at every step, as in eager); and whose memory no op writes in place (a write into a per-step value, or any write whose order against the per-step reads matters, keeps the
written tensor and everything reading it in the step graph). A graph that writes into its inputs or
parameters is not hoisted at all: the prologue would have to replay writes the caller sees.

Worth hoisting (:func:`frontier`): a value is hoisted only when it is a tensor, is not a model output, and its
hoisted ancestry costs FLOPs (:mod:`~graphpass.passes.flops`): a view of a parameter or a reshape of an input
stays in the step graph, where it costs nothing and holds no memory.

Never stale (:class:`HoistedValues`): each context keeps the prologue's inputs' identity (``data_ptr``,
``_version``, shape, strides, dtype, device; metadata only, no host sync) and holds those tensors, so no
other tensor can take their address while the values live. A call whose step-invariant inputs differ (another
prompt embedding tensor, or the same one written in place) recomputes. Inference-mode tensors carry no
version counter: a new tensor is seen, an in-place write into one inside ``torch.inference_mode`` is not.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.fx as fx

from ..errors import GraphpassError, InputError
from .capture import CapturedGraph, module_path
from .flops import graph_flops, node_flops
from .specialize import PhaseGraph, copy_graph, eliminate_dead_code, in_place_writers, is_impure

#: Prefix of the step graphs' inputs that receive hoisted values: ``hoisted_<captured node name>``.
HOISTED_PREFIX = "hoisted_"


def _seeded(node: fx.Node) -> bool:
    """Whether the node draws random numbers (a different value at every call)."""
    return isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags


def writes_outside(graph: fx.Graph) -> list[fx.Node]:
    """The in-place writes into memory the graph did not make (an input, a parameter or a buffer).

        >>> # self.calls.add_(1) in forward: export keeps ``add_(b_calls, 1)``
        >>> [n.name for n in writes_outside(gm.graph)]
        ['add_']
    """
    _, writers = in_place_writers(graph)
    return [w for b, ws in writers.items() if b.op != "call_function" for w in ws]


def hoistable_nodes(graph: fx.Graph, invariant_leaves: set[fx.Node]) -> set[fx.Node]:
    """The call nodes whose value is the same at every step, given the leaves that are (parameters, buffers
    and step-invariant inputs); graph order makes one pass enough.

    A node is hoistable when every input node is a leaf or hoistable, it is neither random nor impure, and
    no op writes in place into its memory (see :func:`~graphpass.passes.specialize.storage_bases`).

        >>> # q = linear(x, Wq); k = linear(text, Wk); out = empty_like(k); out.copy_(k)
        >>> sorted(n.name for n in hoistable_nodes(g, {text, Wq, Wk}))   # out is written in place
        ['k']
    """
    bases, writers = in_place_writers(graph)
    out: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op != "call_function" or _seeded(n) or is_impure(n):
            continue
        if any(b in writers for b in bases[n]):
            continue
        if all(a in out or a in invariant_leaves for a in n.all_input_nodes):
            out.add(n)
    return out


def invariant_leaves(graph: fx.Graph, invariant_inputs: set[str]) -> set[fx.Node]:
    """The values a step cannot change that no op computes from others: parameters and buffers, the
    step-invariant inputs (placeholders named in ``invariant_inputs``), and the sizes of every input.
    A size is read with ``sym_size`` in a dynamic capture; the executor starts a new generation whenever an
    input's shape changes, so within one generation the size of the latent is step-invariant too.

        >>> # dynamic Wan: rope tables from sym_size(hidden_states, 2..4) and the rope buffers
        >>> sorted(n.name for n in invariant_leaves(g, {"encoder_hidden_states"}) if n.op != "get_attr")
        ['encoder_hidden_states', 'sym_size_int_2', 'sym_size_int_3', 'sym_size_int_4', ...]
    """
    out = set()
    for n in graph.nodes:
        if n.op == "get_attr" or (n.op == "placeholder" and n.name in invariant_inputs):
            out.add(n)
        elif n.op == "call_function" and n.target is torch.ops.aten.sym_size.int and n.args[0].op == "placeholder":
            out.add(n)
    return out


def _ancestry(node: fx.Node, within: set[fx.Node]) -> set[fx.Node]:
    todo, seen = [node], {node}
    while todo:
        for a in todo.pop().all_input_nodes:
            if a in within and a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def frontier(graph: fx.Graph, computable: set[fx.Node]) -> tuple[list[fx.Node], set[fx.Node]]:
    """(the hoisted values, every node the prologue takes off the step graph): the values of ``computable``
    nodes that a per-step node reads, narrowed to those worth hoisting.

    A value that cannot be an input of the step graph (not a tensor: a ``split``'s list, a size) or should not
    be (a model output, returned at every step; one whose hoisted ancestry costs no FLOP, e.g. ``t(weight)``
    or ``view(text)``) stays in the step graph, and its own inputs become candidates in turn.

        >>> # text -> linear(Wk) -> view -> transpose -> sdpa(q, ., .)
        >>> front, taken = frontier(g, computable)
        >>> [n.name for n in front], sorted(n.name for n in taken)
        (['transpose'], ['linear', 'transpose', 'view'])
    """
    taken = set(computable)
    while True:
        front = [n for n in graph.nodes if n in taken and any(u not in taken for u in n.users)]
        bad = [n for n in front if not isinstance(n.meta.get("val"), torch.Tensor)
               or any(u.op == "output" for u in n.users)
               or sum(node_flops(a) for a in _ancestry(n, taken)) == 0]
        if not bad:
            return front, taken
        taken.difference_update(bad)


def _signature(node: fx.Node):
    """What a node computes, with its input nodes by name: equal signatures in two copies of one graph mean
    the same value, given the same inputs."""
    return node.target, fx.node.map_arg(node.args, lambda a: a.name), fx.node.map_arg(node.kwargs, lambda a: a.name)


@dataclass(frozen=True)
class HoistedValue:
    """One hoisted value: the captured node, its shape and dtype at the example call, what it is (the module
    of the costliest node only it needs: ``blocks.0.attn2.to_k``), and the FLOPs of its hoisted ancestry
    (shared parts, such as the caption embedding behind every key and value, counted in each)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: str
    flops: int

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


@dataclass
class StepGraph(PhaseGraph):
    """A phase graph whose hoisted values are inputs. Inputs: the capture's, the phase's ``cache_inputs``,
    then one per ``hoisted_inputs`` entry (captured node names); ``flops`` counts what a step still runs,
    ``saved_flops`` what the prologue took off it."""

    hoisted_inputs: list[str] = field(default_factory=list)
    saved_flops: int = 0


@dataclass
class HoistedValues:
    """One cache context's hoisted values and what they were computed from.

    ``key``/``inputs``: the identity of the step-invariant inputs the values came from, and those tensors
    (held: no other tensor can take their address while the values live). ``runs``: prologue runs in this
    context since the model was optimized (:meth:`clear` keeps it).
    """

    key: tuple | None = None
    inputs: tuple = ()
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    runs: int = 0

    def clear(self) -> None:
        """Free the values (the generation ended)."""
        self.key, self.inputs, self.values = None, (), {}

    @property
    def nbytes(self) -> int:
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.values.values()}
        return sum(storages.values())


def _identity(t: torch.Tensor) -> tuple:
    """What says a tensor is the one a hoisted value came from, read without a host sync. ``_version``
    counts in-place writes (shared by views); inference tensors have none."""
    version = None if t.is_inference() else t._version
    return t.data_ptr(), version, tuple(t.shape), tuple(t.stride()), t.dtype, t.device


def per_step_inputs(captured: CapturedGraph, latent: str, timestep: str, extra: Iterable[str] = ()) -> set[str]:
    """The graph inputs that change from step to step: the latent, the timestep and ``extra`` (argument
    names; a structured argument names all its leaves).

        >>> per_step_inputs(cap, "hidden_states", "timestep", ["image_rotary_emb"])
        {'hidden_states', 'timestep', 'image_rotary_emb.0', 'image_rotary_emb.1'}
    """
    out = set()
    for arg in (latent, timestep, *extra):
        leaves = [n for n in captured.input_names if n == arg or n.startswith(arg + ".")]
        if not leaves and arg in captured.constants:
            continue  # bound at capture: the same at every call
        if not leaves:
            raise InputError(f"step_inputs names {arg!r}, which is not an argument of the capture "
                             f"({captured.arguments}); name the arguments that change from step to step")
        out.update(leaves)
    return out


class Hoisting:
    """Step-invariant hoisting for one capture: step graphs per phase and the prologue that feeds them.

    Use :meth:`of` (None when nothing would be saved). The executor calls :meth:`step_graph` once per phase
    to build its runner and :meth:`inputs` at every call for the hoisted values.
    """

    def __init__(self, captured: CapturedGraph, per_step: set[str]):
        self.captured = captured
        self.per_step = frozenset(per_step)
        graph = captured.gm.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        self._invariant_inputs = {p.name for p, name in zip(placeholders, captured.input_names)
                                  if name not in self.per_step}
        leaves = invariant_leaves(graph, self._invariant_inputs)
        computable = hoistable_nodes(graph, leaves) if not writes_outside(graph) else set()
        self._front, taken = frontier(graph, computable)
        self._computable = {n.name: _signature(n) for n in computable}
        self._order = {n.name: i for i, n in enumerate(graph.nodes)}
        used = set().union(*(_ancestry(f, computable | leaves) for f in self._front)) if self._front else set()
        #: indices of the step-invariant inputs the prologue reads (the staleness key)
        self.reads = [i for i, p in enumerate(placeholders) if p in used]
        ancestries = {f: _ancestry(f, taken) for f in self._front}
        shared = Counter(n for a in ancestries.values() for n in a)
        self._values = {f.name: HoistedValue(f.name, tuple(f.meta["val"].shape), f.meta["val"].dtype,
                                             _source(a, {n for n in a if shared[n] == 1}),
                                             sum(node_flops(n) for n in a))
                        for f, a in ancestries.items()}
        self._step_graphs: dict[object, StepGraph] = {}
        self._prologues: dict[tuple[str, ...], fx.GraphModule] = {}

    @classmethod
    def of(cls, captured: CapturedGraph, per_step: set[str]) -> "Hoisting | None":
        """Hoisting for ``captured`` with ``per_step`` inputs, or None when no value is worth hoisting."""
        h = cls(captured, per_step)
        return h if h._front else None

    def values_info(self) -> dict[str, HoistedValue]:
        """The values hoisted out of the full (compute-everything) graph, by captured node name."""
        return dict(self._values)

    @property
    def prologue_flops(self) -> int:
        """FLOPs of one prologue run computing every hoisted value."""
        return graph_flops(self.prologue(tuple(self._values)))

    # --- step graphs -----------------------------------------------------------------------------
    def step_graph(self, pg: PhaseGraph) -> StepGraph:
        """``pg`` with its hoisted values as inputs (built once per phase)."""
        if pg.phase not in self._step_graphs:
            self._step_graphs[pg.phase] = self._cut(pg)
        return self._step_graphs[pg.phase]

    def _cut(self, pg: PhaseGraph) -> StepGraph:
        graph, by_name, outs = copy_graph(pg.gm)
        graph.output(tuple(outs))
        leaves = invariant_leaves(graph, self._invariant_inputs)
        # the captured graph's hoistable nodes, where this phase computes them as the capture does
        computable: set[fx.Node] = set()
        candidates = hoistable_nodes(graph, leaves)
        for n in graph.nodes:
            if (n in candidates and self._computable.get(n.name) == _signature(n)
                    and all(a in computable or a in leaves for a in n.all_input_nodes)):
                computable.add(n)
        front, taken = frontier(graph, computable)
        last = [n for n in graph.nodes if n.op == "placeholder"][-1]
        for f in front:
            with graph.inserting_after(last):
                ph = graph.placeholder(HOISTED_PREFIX + f.name)
            ph.meta["val"] = f.meta["val"]
            f.replace_all_uses_with(ph, delete_user_cb=lambda user: user not in taken)
            last = ph
        eliminate_dead_code(graph)
        graph.lint()
        gm = fx.GraphModule(pg.gm, graph, class_name="StepGraph")
        flops = graph_flops(gm)
        return StepGraph(**{f.name: getattr(pg, f.name) for f in dataclasses.fields(PhaseGraph)} | dict(gm=gm, flops=flops),
                         hoisted_inputs=[f.name for f in front], saved_flops=pg.flops - flops)

    # --- prologue --------------------------------------------------------------------------------
    def prologue(self, names: Sequence[str]) -> fx.GraphModule:
        """The captured graph cut to the hoisted values ``names`` (in that order); called with the capture's
        inputs, it reads only the step-invariant ones."""
        key = tuple(names)
        if key not in self._prologues:
            graph, by_name, _ = copy_graph(self.captured.gm)
            wanted = [by_name[n] for n in key]
            graph.output(tuple(wanted))
            keep = set().union(*(_ancestry(w, set(graph.nodes)) for w in wanted))
            for n in reversed(list(graph.nodes)):
                if n not in keep and n.op not in ("placeholder", "output"):
                    graph.erase_node(n)
            # ensures: hoisted values read per-step inputs for their sizes only
            values = [p.name for p in graph.nodes if p.op == "placeholder" and p.name not in self._invariant_inputs
                      and any(u.target is not torch.ops.aten.sym_size.int for u in p.users)]
            if values:
                raise GraphpassError(f"hoisting prologue reads per-step inputs {values}; hoisted values {list(key)}")
            graph.lint()
            self._prologues[key] = fx.GraphModule(self.captured.gm, graph, class_name="Prologue")
        return self._prologues[key]

    def inputs(self, held: HoistedValues, flat: Sequence[torch.Tensor], phase) -> list[torch.Tensor]:
        """The hoisted values the step graph of ``phase`` reads, for a call with graph inputs ``flat``.

        Recomputes when the step-invariant inputs are not those the context's values came from. A missing
        value is computed together with every other value a built step graph reads, so a planned generation
        runs the prologue once.
        """
        key = tuple(_identity(flat[i]) for i in self.reads)
        if key != held.key:
            held.clear()
            held.key, held.inputs = key, tuple(flat[i] for i in self.reads)
        names = self._step_graphs[phase].hoisted_inputs
        if any(n not in held.values for n in names):
            wanted = set().union(*(sg.hoisted_inputs for sg in self._step_graphs.values())) - set(held.values)
            todo = sorted(wanted, key=self._order.__getitem__)
            held.values.update(zip(todo, self.prologue(todo)(*flat)))
            held.runs += 1
        return [held.values[n] for n in names]


def _source(ancestry: set[fx.Node], own: set[fx.Node]) -> str:
    """What a hoisted value is: the module of the costliest node only it needs (``blocks.0.attn2.to_k`` for
    the heads of a key projection, not the caption embedding every key and value shares), else of the
    costliest node it needs."""
    top = max(own if any(node_flops(n) for n in own) else ancestry, key=node_flops)
    stack = module_path(top)
    # a node of the model's own forward has no submodule: name its op (``aten.cos`` of sin-cos positions)
    return stack[-1][0] if stack and stack[-1][0] else f"{top.target} (model)"
