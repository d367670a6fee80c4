"""Phase runners: what runs one phase for the runtime core, and the backends that make them from phase
graphs.

A :class:`PhaseRunner` takes the phase's inputs (the model's graph inputs, then the cached tensors of its
:class:`PhaseProgram`'s ``cache_inputs``) and returns its outputs (``num_user_outputs`` model outputs, then
``cache_outputs``). The runtime core (:mod:`graphpass.runtime.executor`) drives any of them the same way:
an FX graph, an Inductor-compiled graph (here), an ONNX Runtime session or a TensorRT engine (loaded
artefacts, :mod:`graphpass.exporters.artefact`).

* ``eager`` runs the FX graph as is.
* ``inductor`` compiles it with ``torch.compile(fullgraph=True, dynamic=False)`` on its first call. Each phase
  graph is its own module with its own code, and at one input size its inputs (the model's tensors and the
  cached tensors) never change shape, so a sampling loop compiles every distinct phase once: the schedule's
  decisions are which graph runs, not Python state the compiled code would guard on. A model optimized with
  ``dynamic=True`` serves other sizes; each new size compiles each phase once more (kernels stay specialized
  to their shapes).
  Inputs on CUDA add CUDA graphs (``mode="reduce-overhead"``); their outputs are copied out of the graph's
  memory pool because cached tensors must survive later replays.

ONNX Runtime and TensorRT run exported folders (:func:`graphpass.export`, :func:`graphpass.load`).

    >>> opt = graphpass.optimize(model, "pab246", example_kwargs=kw, backend="inductor")
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch

from ..errors import GraphpassError
from ..passes.specialize import PhaseGraph

BACKENDS = ("eager", "inductor")


class PhaseProgram(Protocol):
    """What the runtime core reads of one phase besides its runner: which cached tensors it reads and
    stores, and how many of its outputs are the model's (a :class:`~graphpass.passes.specialize.PhaseGraph`,
    or an exported phase's :class:`~graphpass.exporters.artefact.PhaseSpec`)."""

    cache_inputs: list[str]
    cache_outputs: list[str]
    num_user_outputs: int


class PhaseRunner(Protocol):
    """Runs one phase: ``runner(*model_inputs, *cached_inputs) -> outputs``."""

    def __call__(self, *inputs: torch.Tensor) -> Sequence[torch.Tensor]: ...


class InductorRunner:
    """A phase graph compiled by Inductor on first use.

    cudagraphs: when the first call's inputs are on CUDA, compile with ``mode="reduce-overhead"`` (CUDA
        graphs) and clone the outputs after each replay; ignored for CPU inputs.
    """

    def __init__(self, pg: PhaseGraph, cudagraphs: bool = True):
        self.gm = pg.gm
        self.cudagraphs = cudagraphs
        self.mode: str | None = None
        self._compiled: Callable | None = None

    def compile(self, *args: torch.Tensor) -> Callable:
        on_cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
        self.mode = "reduce-overhead" if on_cuda and self.cudagraphs else "default"
        self._compiled = torch.compile(self.gm, fullgraph=True, dynamic=False, mode=self.mode)
        return self._compiled

    def __call__(self, *args: torch.Tensor):
        fn = self._compiled if self._compiled is not None else self.compile(*args)
        if self.mode != "reduce-overhead":
            return fn(*args)
        torch.compiler.cudagraph_mark_step_begin()
        # CUDA-graph outputs live in the graph's pool and are overwritten by its next replay.
        return tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in fn(*args))


def bound_attributes(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` whose weights are read as plain instance attributes: the copy of a captured graph reads
    each parameter through its module path (``getattr(self.blocks, "0").attn1.to_q.weight``), one
    ``nn.Module.__getattr__`` per level on every call, a few hundred per call of a small model; the copy
    reads one instance attribute per weight, with the same tensors (nothing is copied).

        >>> run = bound_attributes(pg.gm)
        >>> [n.target for n in run.graph.nodes if n.op == "get_attr"][:2]
        ['_w0', '_w1']
    """
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    names: dict[str, str] = {}  # attribute path in gm -> its flat name in the copy
    values: dict[str, object] = {}
    for n in graph.nodes:
        if n.op == "get_attr":
            if n.target not in names:
                names[n.target] = f"_w{len(names)}"
                values[names[n.target]] = _attribute(gm, n.target)
            n.target = names[n.target]
    out = torch.fx.GraphModule(values, graph, class_name=type(gm).__name__)
    out.__dict__.update(values)  # found by plain lookup, before nn.Module.__getattr__ is asked
    return out


def _attribute(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def make_runner(pg: PhaseGraph, backend: str) -> PhaseRunner:
    """The runner of a phase graph on ``backend`` (``"eager"``: the FX graph with its weights bound as plain
    attributes, :func:`bound_attributes`)."""
    if backend == "eager":
        return bound_attributes(pg.gm)
    if backend == "inductor":
        return InductorRunner(pg)
    raise GraphpassError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} (ONNX Runtime and "
                         f"TensorRT run exported artefacts: graphpass.export(...) then graphpass.load(...))")
