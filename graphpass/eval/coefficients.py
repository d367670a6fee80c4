"""Calibration runs for the step caches that need per-model constants (``graphpass calibrate`` prints and saves
them; this module measures).

* **TeaCache** rescales the relative L1 change of the first block's timestep-modulated input into an estimate
  of the change of the model's output with a polynomial fitted offline per model (published for FLUX,
  HunyuanVideo, CogVideoX, Wan2.1, Mochi, LTX, Latte...). For a model without published coefficients,
  :func:`fit_teacache` samples a few seeds computing every step, records per step (one model call in a
  context) the modulated input ``m`` and the output ``v``, and fits ``np.polyfit(x, y, degree)`` with
  ``x = mean|m_s - m_{s-1}| / mean|m_{s-1}|`` and ``y = mean|v_s - v_{s-1}| / mean|v_{s-1}|`` (coefficients
  highest power first, as ``np.poly1d`` and the published tables).
  The modulated input is found from the graph (:func:`modulated_input`): the first value of the first block
  that depends on both the latent and the timestep, followed through its shift/scale arithmetic.
* **MagCache** (diffusers ``MagCacheConfig(mag_ratios=...)``): :func:`diffusers_mag_ratios` runs diffusers' own
  calibration (``calibrate=True``) on one seed and returns the ratios it reports;
  :func:`magcache_ratios` computes the same quantity from graphpass's block span on any model:
  ``g_s = mean over tokens of ||r_s||_2 / (||r_{s-1}||_2 + 1e-8)`` (L2 over the last dimension, fp32; 1.0 at
  the first step), ``r`` = output of the chain of blocks minus its input.

>>> fit = fit_teacache(Workload.from_name("vdt-tiny", num_steps=10), seeds=[0])
>>> len(fit.coefficients)          # degree 4, highest power first; fit.probe names the node measured
5
"""
from __future__ import annotations

import ast
import contextlib
import io
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx as fx

from ..errors import GraphpassError, TaggingError
from ..passes.capture import CapturedGraph, module_path
from ..passes.residuals import find_block_span, specialize_residual_phase
from ..passes.specialize import copy_graph
from ..passes.tag import _pick_video_input, tag_attention
from ..schedules.base import Action, Phase
from .harness import Workload

aten = torch.ops.aten
#: Elementwise ops that apply a timestep modulation (``norm(x) * (1 + scale) + shift``).
_MODULATION = {aten.add.Tensor, aten.mul.Tensor, aten.sub.Tensor}


# --- probing a graph -------------------------------------------------------------------------------------
def _depends(gm: fx.GraphModule, source: fx.Node) -> set[fx.Node]:
    """Nodes whose value depends on ``source``."""
    dep = {source}
    for n in gm.graph.nodes:
        if any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    return dep


def modulated_input(captured: CapturedGraph, timestep_arg: str = "timestep", video_input: str | None = None) -> str:
    """The node holding the first block's timestep-modulated input: in the first block (of the chain that
    :func:`~graphpass.passes.residuals.find_block_span` finds), the first node depending on both the latent
    and the timestep, followed while a single user keeps modulating it (``* (1 + scale)`` then ``+ shift``)
    at the same shape."""
    gm = captured.gm
    phs = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    names = dict(zip(captured.input_names, phs.values()))
    if timestep_arg not in names:
        raise GraphpassError(f"the capture has no input {timestep_arg!r} (inputs: {captured.input_names}); pass "
                             f"timestep_arg= the argument holding the timestep")
    from_t = _depends(gm, names[timestep_arg])
    from_x = _depends(gm, names[_pick_video_input(captured, video_input)])
    first = _first_block(captured)
    node = next((n for n in gm.graph.nodes if n in from_t and n in from_x and n.op == "call_function"
                 and any(p == first for p, _ in module_path(n))), None)
    if node is None:
        raise TaggingError(f"no value of the first block {first} depends on both the latent and the timestep: "
                           f"the model does not modulate its blocks with the timestep; TeaCache needs another "
                           f"probe (pass probe=<node name>)")
    shape = node.meta["val"].shape
    while len(node.users) == 1:
        (u,) = node.users
        if u.op != "call_function" or u.target not in _MODULATION or u.meta["val"].shape != shape:
            break
        node = u
    return node.name


def _first_block(captured: CapturedGraph) -> str:
    return find_block_span(captured, tag_attention(captured)).blocks[0]


def probe_graph(captured: CapturedGraph, nodes: Sequence[str]) -> fx.GraphModule:
    """The captured graph returning also the values of ``nodes`` (after the model's outputs)."""
    graph, by_name, outs = copy_graph(captured.gm)
    missing = [n for n in nodes if n not in by_name]
    if missing:
        raise GraphpassError(f"probe nodes {missing} are not in the graph of {captured.model_type}")
    graph.output(tuple(outs) + tuple(by_name[n] for n in nodes))
    graph.lint()
    return fx.GraphModule(captured.gm, graph, class_name="ProbeGraph")


class Recorder:
    """Calls like the model (keyword arguments), runs ``gm`` (the capture's graph with extra outputs) and keeps
    every output of every call, the model's first, in ``records`` (a list per call, fp32 copies);
    ``n_user``: how many are the model's."""

    def __init__(self, captured: CapturedGraph, gm: fx.GraphModule):
        self.captured, self.gm = captured, gm
        self.n_user = len([n for n in captured.gm.graph.nodes if n.op == "output"][0].args[0])
        self.records: list[list[torch.Tensor]] = []

    def __call__(self, **kwargs):
        with torch.no_grad():
            outs = self.gm(*self.captured.flatten_call(kwargs))
        self.records.append([o.detach().float() for o in outs])
        return self.captured.unflatten_outputs(outs[:self.n_user])


def relative_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """``mean|a - b| / mean|b|``.

    >>> relative_l1(torch.tensor([3.0, 1.0]), torch.tensor([2.0, 2.0]))
    0.5
    """
    return float((a - b).abs().mean() / b.abs().mean())


# --- TeaCache ----------------------------------------------------------------------------------------
@dataclass
class TeaCacheFit:
    """A fitted TeaCache rescaling polynomial.

    coefficients: highest power first (``np.poly1d``), like the published tables; probe: the node whose change
    is the input; degree; input_changes / output_changes: the (x, y) points of the fit, per seed and step;
    rms_error: root mean square of ``poly(x) - y`` over the points.
    """

    coefficients: list[float]
    probe: str
    degree: int
    input_changes: list[float] = field(repr=False)
    output_changes: list[float] = field(repr=False)
    rms_error: float = 0.0

    def __call__(self, x: float) -> float:
        return float(np.poly1d(self.coefficients)(x))

    def negative_at(self, points: int = 256) -> float | None:
        """The smallest input change in the fitted range (``min(input_changes)`` to ``max``) at which the
        polynomial predicts a negative output change, or None. TeaCache adds the prediction to its accumulated
        distance each call, so a negative one lowers the sum and the reuse never ends: such a fit is not usable
        (more seeds, a lower degree, or raw distances ``coefficients=[1.0, 0.0]``).

        >>> TeaCacheFit([1.0, 0.0, -0.01], "p", 2, [0.0, 0.2], [0.0, 0.03]).negative_at()
        0.0
        """
        grid = np.linspace(min(self.input_changes), max(self.input_changes), points)
        below = grid[np.poly1d(self.coefficients)(grid) < 0]
        return float(below[0]) if below.size else None

    def to_dict(self) -> dict[str, Any]:
        return {"method": "teacache", "coefficients": self.coefficients, "probe": self.probe, "degree": self.degree,
                "points": len(self.input_changes), "rms_error": self.rms_error, "negative_at": self.negative_at(),
                "input_changes": self.input_changes, "output_changes": self.output_changes}


def fit_teacache(workload: Workload, seeds: Sequence[int] = (0, 1), *, degree: int = 4,
                 probe: str | None = None) -> TeaCacheFit:
    """Fit TeaCache's polynomial for ``workload``'s model from full runs of ``seeds`` (see the module
    docstring). ``probe``: the node whose relative change is the input (default :func:`modulated_input`)."""
    cap = workload.captured
    probe = probe or modulated_input(cap)
    xs, ys = [], []
    for seed in seeds:
        rec = Recorder(cap, probe_graph(cap, [probe]))
        workload.generate(rec, seed)
        ms = [r[rec.n_user] for r in rec.records]
        vs = [r[0] for r in rec.records]  # the prediction
        for s in range(1, len(ms)):
            xs.append(relative_l1(ms[s], ms[s - 1]))
            ys.append(relative_l1(vs[s], vs[s - 1]))
    if len(xs) <= degree:
        raise GraphpassError(f"a degree-{degree} fit needs more than {degree} points; got {len(xs)} from "
                             f"{len(seeds)} seed(s): sample more steps or seeds")
    coef = np.polyfit(np.array(xs), np.array(ys), degree)
    err = float(np.sqrt(np.mean((np.poly1d(coef)(np.array(xs)) - np.array(ys)) ** 2)))
    return TeaCacheFit([float(c) for c in coef], probe, degree, xs, ys, err)


# --- MagCache ----------------------------------------------------------------------------------------
def magnitude_ratio(r_now: torch.Tensor, r_prev: torch.Tensor | None) -> float:
    """diffusers' MagCache calibration quantity: mean over tokens of ``||r_now|| / (||r_prev|| + 1e-8)``, L2
    norms over the last dimension in fp32; 1.0 without a previous residual.

    >>> magnitude_ratio(torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 1.0]]))
    5.0
    """
    if r_prev is None:
        return 1.0
    now = torch.linalg.norm(r_now.float(), dim=-1)
    prev = torch.linalg.norm(r_prev.float(), dim=-1)
    return float((now / (prev + 1e-8)).mean())


def magcache_ratios(workload: Workload, seed: int = 0) -> list[float]:
    """MagCache's magnitude ratios of ``workload``'s model from one full run of ``seed``: the residual of the
    chain of blocks (output minus input of the video stream) at every step."""
    cap = workload.captured
    span = find_block_span(cap, tag_attention(cap))
    pg = specialize_residual_phase(cap, span, Phase.of({span.path: Action.STORE}))
    rec = Recorder(cap, pg.gm)
    workload.generate(rec, seed)
    ratios, prev = [], None
    for r in rec.records:
        ratios.append(magnitude_ratio(r[rec.n_user], prev))
        prev = r[rec.n_user]
    return ratios


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def diffusers_mag_ratios(workload: Workload, seed: int = 0) -> list[float]:
    """The magnitude ratios diffusers' own MagCache calibration (``MagCacheConfig(calibrate=True)``) reports
    for ``workload``'s model on one run of ``seed`` (read from the hook's log record, not its print)."""
    from diffusers import MagCacheConfig

    if workload.family != "diffusers":
        raise GraphpassError(f"diffusers' MagCache hook needs a diffusers model ({workload.name} is not one); use "
                             f"magcache_ratios() for graphpass's own measurement")
    model = workload.model
    log = logging.getLogger("diffusers.hooks.mag_cache")
    handler, level = _Capture(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    model.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=workload.num_steps))
    try:
        def fn(**kw):
            with model.cache_context("batched_cfg"):
                return model(**kw)

        with contextlib.redirect_stdout(io.StringIO()):
            workload.generate(fn, seed, adapted=workload.adapt(fn, on_new_generation=model._reset_stateful_cache))
    finally:
        model.disable_cache()
        log.removeHandler(handler)
        log.setLevel(level)
    prefix = "MagCache Calibration Results: "
    found = [m[len(prefix):] for m in handler.messages if m.startswith(prefix)]
    if not found:
        raise GraphpassError(f"diffusers' MagCache calibration reported no ratios for {type(model).__name__} (its "
                             f"hook may not apply to this model)")
    return [float(r) for r in ast.literal_eval(found[-1])]
