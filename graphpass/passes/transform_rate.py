"""Whole-model output reuse from the transformation vector (EasyCache, arXiv 2507.02860), as phase graphs.

EasyCache treats the denoiser end to end: its *transformation vector* is ``D = v - x`` (model output minus
the raw latent input). A reuse call runs no part of the model: ``v = x + D``. A computed call runs the model
and also emits what later calls read (cache keys of :data:`KEYS`):

* ``delta``: ``D = v - x``;
* ``x``: a copy of this call's input (every call emits it: the next call measures its input change
  ``mean|x_now - x_prev|`` against it, and the next computed call its rate's denominator);
* ``v``, ``v_norm``: a copy of the output and ``mean|v|`` (the next decisions divide by it);
* ``rate`` (when an earlier computed call left ``v`` and ``x``): the transformation rate
  ``k = mean|v - v_prev| / mean|x - x_prev_computed|``.

Statistics are means of absolute values over all elements, batch included (one decision per call). A frozen
schedule (decisions known) needs only ``delta`` (``stats=False``).

>>> pg = specialize_transform_phase(captured, "hidden_states", TransformPhase("compute", rate=True))
>>> pg.cache_inputs, pg.cache_outputs
(['easycache:v', 'easycache:x_computed'], ['easycache:delta', 'easycache:x', 'easycache:x_computed', 'easycache:v', 'easycache:v_norm', 'easycache:rate'])
>>> specialize_transform_phase(captured, "hidden_states", TransformPhase("reuse")).cache_inputs
['easycache:delta']
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..errors import GraphpassError, ScheduleError
from ..schedules.base import Action, Phase
from .capture import CapturedGraph
from .flops import graph_flops
from .residuals import inline
from .specialize import PhaseGraph, cache_input_name, copy_graph, eliminate_dead_code

#: Cache keys (see the module docstring). ``x_computed`` is the input of the last computed call.
KEYS = {name: f"easycache:{name}" for name in ("delta", "x", "x_computed", "v", "v_norm", "rate")}
#: The region name phases use for the whole model (what a reuse call skips).
MODEL_REGION = "model"


@dataclass(frozen=True)
class TransformPhase(Phase):
    """``mode`` ``"compute"`` or ``"reuse"``; ``rate``: a computed call also measures the transformation
    rate (an earlier computed call left its output and input); ``stats``: the call emits what run-time
    decisions read (False for a frozen schedule, which only needs ``delta``)."""

    mode: str = "compute"
    rate: bool = False
    stats: bool = True

    @staticmethod
    def of(mode: str, *, rate: bool = False, stats: bool = True) -> "TransformPhase":
        action = Action.REUSE if mode == "reuse" else Action.STORE
        return TransformPhase(Phase.of({MODEL_REGION: action}).actions, mode, rate and mode == "compute", stats)

    def label(self) -> str:
        if self.mode == "reuse":
            return "reuse x + D"
        return "compute" + (", rate" if self.rate else "") + ("" if self.stats else ", D only")


def model_io(captured: CapturedGraph, video_input: str) -> tuple[fx.Node, int]:
    """(the placeholder of the latent input, the index of the output leaf that predicts it). The model must
    return one tensor of the latent's shape: ``D = v - x`` is added back to the next input."""
    gm = captured.gm
    x = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == _placeholder_name(captured, video_input))
    outs = [n for n in gm.graph.nodes if n.op == "output"][0].args[0]
    xv = x.meta["val"]
    fits = [i for i, o in enumerate(outs) if isinstance(o, fx.Node) and isinstance(o.meta.get("val"), torch.Tensor)
            and tuple(o.meta["val"].shape) == tuple(xv.shape)]
    if len(outs) != 1 or not fits:
        shapes = [tuple(o.meta["val"].shape) if isinstance(o, fx.Node) else o for o in outs]
        raise ScheduleError(f"EasyCache reuses the model's output as input + (output - input), so the model must "
                            f"return one tensor shaped like its latent input {video_input} {tuple(xv.shape)}; "
                            f"{captured.model_type} returns {shapes} (a model predicting extra channels, or one "
                            f"whose input carries conditioning channels, does not fit): use a block-level cache "
                            f"such as AdaCache instead")
    return x, fits[0]


def _placeholder_name(captured: CapturedGraph, video_input: str) -> str:
    phs = [n for n in captured.gm.graph.nodes if n.op == "placeholder"]
    return phs[captured.input_names.index(video_input)].name


def _mean_abs(t):
    return t.abs().mean()


def _delta(v, x):
    return v - x


def _rate(v, v_prev, x, x_prev):
    return (v - v_prev).abs().mean() / (x - x_prev).abs().mean()


def specialize_frozen_phase(captured: CapturedGraph, video_input: str, phase: Phase, delta_key: str) -> PhaseGraph:
    """The graph of a plain phase of a frozen schedule over the whole model (region :data:`MODEL_REGION`, whose
    one cache key ``delta_key`` holds ``D``): REUSE -> ``x + D``; STORE -> the model, emitting ``D``; COMPUTE
    -> the model alone. These are the phases the core's static plans (and exported artefacts) use."""
    action = phase.action(MODEL_REGION)
    mode = "reuse" if action == Action.REUSE else "compute"
    graph = specialize_transform_phase(captured, video_input, TransformPhase.of(mode, stats=False),
                                       delta_key=delta_key, store_delta=action == Action.STORE)
    graph.phase = phase
    return graph


def specialize_transform_phase(captured: CapturedGraph, video_input: str, phase: TransformPhase, *,
                               delta_key: str = KEYS["delta"], store_delta: bool = True) -> PhaseGraph:
    """The graph of one EasyCache phase (see the module docstring); ``delta_key``: the cache key of ``D``;
    ``store_delta`` False: a computed call emits no ``D`` (nothing reuses it)."""
    if phase.mode not in ("compute", "reuse"):
        raise GraphpassError(f"unknown EasyCache phase mode {phase.mode!r}; 'compute' or 'reuse'")
    x0, out_index = model_io(captured, video_input)
    graph, by_name, outs = copy_graph(captured.gm)
    x = by_name[x0.name]
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    cache_inputs: list[str] = []

    def cache_input(key: str, like: fx.Node) -> fx.Node:
        nonlocal last
        with graph.inserting_after(last):
            ph = graph.placeholder(cache_input_name(key))
        ph.meta["val"] = like.meta["val"]
        ph.meta["graphpass_cache_key"] = key
        cache_inputs.append(key)
        last = ph
        return ph

    v = outs[out_index]
    stored: list[tuple[str, fx.Node]] = []
    if phase.mode == "reuse":
        d = cache_input(delta_key, v)
        outs[out_index] = inline(graph, _add_cast, [x, d])
    elif store_delta:
        stored.append((delta_key, inline(graph, _delta, [v, x])))
    if phase.stats:
        x_copy = inline(graph, torch.clone, [x])
        stored.append((KEYS["x"], x_copy))
    if phase.stats and phase.mode == "compute":
        stored.append((KEYS["x_computed"], x_copy))
        if phase.rate:
            v_prev = cache_input(KEYS["v"], v)
            x_prev = cache_input(KEYS["x_computed"], x)
        stored.append((KEYS["v"], inline(graph, torch.clone, [v])))
        stored.append((KEYS["v_norm"], inline(graph, _mean_abs, [v])))
        if phase.rate:
            stored.append((KEYS["rate"], inline(graph, _rate, [v, v_prev, x, x_prev])))
    graph.output(tuple(outs) + tuple(n for _, n in stored))
    eliminate_dead_code(graph)
    if phase.mode == "reuse":  # ensures: a reuse call runs none of the model's weights
        used = [n.target for n in graph.nodes if n.op == "get_attr"]
        if used:
            raise GraphpassError(f"EasyCache reuse graph still reads weights {used[:3]}")
    graph.lint()
    gm = fx.GraphModule(captured.gm, graph, class_name="TransformPhaseGraph")
    return PhaseGraph(phase=phase, gm=gm, cache_inputs=cache_inputs, cache_outputs=[k for k, _ in stored],
                      num_user_outputs=len(outs), flops=graph_flops(gm))


def _add_cast(x, d):
    return (x + d).to(d.dtype)


def accumulate(error, rate: torch.Tensor, x: torch.Tensor, x_prev: torch.Tensor, v_norm: torch.Tensor):
    """EasyCache's accumulated error after one more call: ``E + k * (mean|x - x_prev| / mean|v|)``, on the
    device (``error`` starts as 0).

    >>> accumulate(0, torch.tensor(2.0), torch.ones(3), torch.zeros(3), torch.tensor(4.0))
    tensor(0.5000)
    """
    return error + rate * ((x - x_prev).abs().mean() / v_norm)
