"""EasyCache (Zhou et al., arXiv 2507.02860; H-EmbodVis/EasyCache) as a compiled technique.

Runtime-adaptive reuse of the whole model's output, no calibration. Per cache context, with ``x`` the raw
latent input of a call, ``v`` the model's output and ``|t|`` the mean of ``|t|`` over all elements::

    computed call:  D = v - x ;  k = |v - v_prev| / |x - x_prev|     (v_prev, x_prev: the previous COMPUTED call)
    other calls:    E += k * |x - x_last| / |v_prev|                  (x_last: the previous call, computed or not)
                    reuse  v = x + D   while E < threshold; else compute and set E = 0

The first ``warmup_steps`` calls and the last ``always_compute_last`` compute (and set ``E = 0``); a call
without ``k`` yet (fewer than two computed calls before it) computes. Published settings (the reference
code): Wan2.1 forces 10 steps and the last, threshold 0.05 (its help text: 0.1 is about 2x);
HunyuanVideo forces 5 calls and the last, threshold 0.025. Reported: HunyuanVideo 2.21x at PSNR 32.66,
Wan2.1-1.3B 2.54x at PSNR 25.24.

Graphs (:mod:`graphpass.passes.transform_rate`): a reuse call runs ``x + D`` and nothing of the model; a
computed call runs the model and emits ``D``, ``k``, ``|v|`` and copies of ``x`` and ``v``, all kept on the
device. Host reads: the rule needs each call's own input change, so each call where it decides reads ONE
value, the comparison ``E < threshold`` computed on the device (``opt.metric_reads``); forced calls and
calls without ``k`` read nothing. A run's decisions replay as :class:`FrozenEasyCache` with no read at all
(and export like any static schedule).

Batches: one decision per call, on statistics over the whole batch (batched CFG: cond and uncond together,
as the reference's means over the whole latent). Separate cond/uncond calls decide in their own
``opt.cache_context`` (the Wan2.1 reference instead lets the uncond call follow the cond call's decision).

>>> e = EasyCache.preset("wan2.1")
>>> e.threshold, e.warmup_steps, e.always_compute_last
(0.05, 10, 1)
>>> schedule_from_json(e.to_json()) == e
True
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from ..errors import ScheduleError
from ..passes.capture import CapturedGraph, TensorSpec
from ..passes.flops import graph_flops
from ..passes.specialize import PhaseGraph
from ..passes.tag import Region, _pick_video_input
from ..passes.transform_rate import (KEYS, MODEL_REGION, TransformPhase, accumulate, model_io, specialize_frozen_phase,
                                     specialize_transform_phase)
from ..runtime.executor import GenerationState, OptimizedModel
from ..schedules.base import Action, Phase, Plan, RegionRef, Schedule, schedule_from_json  # noqa: F401 (doctest)

#: Published settings of the reference code: threshold, forced first calls, forced last calls.
PRESETS: dict[str, dict[str, Any]] = {
    "wan2.1": {"threshold": 0.05, "warmup_steps": 10, "always_compute_last": 1},
    "wan2.1-fast": {"threshold": 0.1, "warmup_steps": 10, "always_compute_last": 1},
    "hunyuanvideo": {"threshold": 0.025, "warmup_steps": 5, "always_compute_last": 1},
}


class _EasyCacheBase(Schedule):
    def kinds(self) -> set[str]:
        return set()  # reuses the whole model's output

    def runtime_class(self):
        return EasyCacheModel


@dataclass
class EasyCache(_EasyCacheBase):
    """EasyCache: reuse the model's transformation ``v - x`` while the predicted change stays small.

    Fields:
        threshold: ``tau``; reuse while the accumulated predicted change ``E`` is below it. Published 0.05
            (Wan2.1; 0.1 for about 2x), 0.025 (HunyuanVideo). 0 never reuses.
        warmup_steps: calls computed at the start of each generation (per cache context). Published 10
            (Wan2.1), 5 (HunyuanVideo).
        always_compute_last: calls computed at the end; published 1. Needs the number of calls: pass
            ``timesteps=`` to ``graphpass.optimize`` (or ``opt.plan(timesteps)``), or run inside a pipeline's
            ``cache_context(num_inference_steps=...)``; 0 needs neither.

    Example:
        >>> opt = graphpass.optimize(model, EasyCache.preset("wan2.1"), example_kwargs=kw, timesteps=ts)
        >>> opt.decisions(), opt.metric_reads      # e.g. ('CCCCCCCCCCRRCRRC...', 12)
        >>> frozen = opt.freeze()                  # the run's decisions, no reads
    """

    type_name: ClassVar[str] = "EasyCache"

    threshold: float = 0.05
    warmup_steps: int = 10
    always_compute_last: int = 1

    def __post_init__(self):
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ScheduleError(f"EasyCache threshold={t!r} must be a number >= 0 (published 0.05 for Wan2.1, "
                                f"0.025 for HunyuanVideo; 0 never reuses)")
        self.threshold = float(t)
        for name, lo in (("warmup_steps", 1), ("always_compute_last", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                why = " (the first call has nothing to reuse)" if name == "warmup_steps" else ""
                raise ScheduleError(f"EasyCache {name}={v!r} must be an integer >= {lo}{why}")

    def reuses(self, region: RegionRef, t: float, counter: int) -> bool:
        return False  # decided at run time; see EasyCachePolicy

    def may_reuse_next(self, region: RegionRef, t: float, counter: int) -> bool:
        return True

    def freeze(self, decisions: str | Sequence[bool] | Sequence[str]) -> "FrozenEasyCache":
        return FrozenEasyCache(decisions)

    @classmethod
    def preset(cls, name: str, **overrides) -> "EasyCache":
        """A published setting (:data:`PRESETS`: ``"wan2.1"``, ``"wan2.1-fast"``, ``"hunyuanvideo"``)."""
        key = name.lower()
        if key not in PRESETS:
            raise ScheduleError(f"unknown EasyCache preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "warmup_steps": self.warmup_steps,
                "always_compute_last": self.always_compute_last}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EasyCache":
        known = {"threshold", "warmup_steps", "always_compute_last"}
        if set(d) - known:
            raise ScheduleError(f"EasyCache JSON has unknown fields {sorted(set(d) - known)}; known: {sorted(known)}")
        return cls(**d)

    def __str__(self) -> str:
        return f"EasyCache(tau {self.threshold:g}; first {self.warmup_steps}, last {self.always_compute_last})"


def _decisions(decisions) -> str:
    if isinstance(decisions, str):
        text = decisions.upper()
    else:
        try:
            text = "".join(("C" if d else "R") if isinstance(d, bool) else str(d).upper() for d in decisions)
        except TypeError:
            text = None
    if not text or set(text) - {"C", "R"}:
        raise ScheduleError(f"decisions={decisions!r}: give one 'C' (compute) or 'R' (reuse) per call, e.g. 'CCRRC'")
    if text[0] != "C":
        raise ScheduleError(f"decisions={text!r} start with a reuse; the first call has nothing cached: start with 'C'")
    return text


@dataclass
class FrozenEasyCache(_EasyCacheBase):
    """EasyCache's decisions replayed: ``"C"`` (compute) or ``"R"`` (reuse ``x + D``) per call; calls past
    the end compute. No statistics, no host read.

    >>> FrozenEasyCache("CCRC").reuses(None, 0.0, 2)
    True
    """

    type_name: ClassVar[str] = "EasyCacheFrozen"

    decisions: str = "C"

    def __post_init__(self):
        self.decisions = _decisions(self.decisions)

    def reuses(self, region: RegionRef, t: float, counter: int) -> bool:
        return counter < len(self.decisions) and self.decisions[counter] == "R"

    def may_reuse_next(self, region: RegionRef, t: float, counter: int) -> bool:
        return self.reuses(region, t, counter + 1)

    def to_dict(self) -> dict[str, Any]:
        return {"decisions": self.decisions}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FrozenEasyCache":
        if set(d) - {"decisions"}:
            raise ScheduleError(f"EasyCacheFrozen JSON has unknown fields {sorted(set(d) - {'decisions'})}")
        return cls(**d)

    def __str__(self) -> str:
        return f"FrozenEasyCache({self.decisions}: {self.decisions.count('C')}/{len(self.decisions)} computed)"


@dataclass
class EasyCachePolicy:
    """EasyCache's rule for one generation of one cache context, without tensors: which calls are forced,
    which test the accumulated error, and what a test's answer means.

    >>> p = EasyCachePolicy(EasyCache(warmup_steps=2, always_compute_last=1), num_steps=6)
    >>> [p.forced(i) for i in range(6)]
    [True, True, False, False, False, True]
    >>> p.tests(2, have_rate=True), p.tests(2, have_rate=False)
    (True, False)
    """

    schedule: EasyCache
    num_steps: int | None
    decisions: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.num_steps is None and self.schedule.always_compute_last:
            raise ScheduleError("EasyCache keeps the last calls computed but the number of calls is unknown: pass "
                                "timesteps= to graphpass.optimize (or call opt.plan(timesteps)), run inside "
                                "cache_context(..., num_inference_steps=n), or set always_compute_last=0")

    def forced(self, i: int) -> bool:
        """Call ``i`` computes whatever the error (warm-up or tail); the error restarts from 0."""
        s = self.schedule
        return i < s.warmup_steps or (self.num_steps is not None and i >= self.num_steps - s.always_compute_last)

    def tests(self, i: int, *, have_rate: bool) -> bool:
        """Whether call ``i`` accumulates and tests the error (else it computes: forced, or no rate ``k`` yet)."""
        return not self.forced(i) and have_rate

    def decide(self, below: bool | None) -> str:
        """Record a call: ``below`` is the test ``E < threshold`` (None: the call did not test and computes)."""
        d = "R" if below else "C"
        self.decisions.append(d)
        return d


def _model_region(captured: CapturedGraph, out_index: int) -> Region:
    """The whole model as the one region a reuse call skips (for reports)."""
    nodes = [n for n in captured.gm.graph.nodes if n.op == "call_function"]
    exit_ = [n for n in captured.gm.graph.nodes if n.op == "output"][0].args[0][out_index]
    v = exit_.meta["val"]
    return Region(path=MODEL_REGION, module_type=captured.model_type, kind="other", nodes=[n.name for n in nodes],
                  exits=[exit_.name], exit_specs=[TensorSpec(tuple(int(s) for s in v.shape), v.dtype)],
                  flops=graph_flops(captured.gm), reason="the whole model: a reuse call returns x + (v - x)")


class EasyCacheModel(OptimizedModel):
    """The runtime of :class:`EasyCache` and :class:`FrozenEasyCache`: the core executor with whole-model
    phase graphs. Besides the core's API: ``decisions(context)`` (``"C"``/``"R"`` per call),
    ``metric_reads`` (host reads so far: one per call that tested the error) and ``freeze(context)``."""

    def __init__(self, model: torch.nn.Module, captured: CapturedGraph, regions: list[Region], schedule: Schedule,
                 *, timestep_arg: str = "timestep", backend: str = "eager", timestep_order: str = "falling"):
        video = _pick_video_input(captured, None)
        _, out = model_io(captured, video)  # refuses a model whose output is not shaped like its latent
        super().__init__(model, captured, [_model_region(captured, out)], schedule, timestep_arg=timestep_arg,
                         backend=backend, timestep_order=timestep_order)
        self.video_input = video
        self.attention_regions = regions
        self._x_index = captured.input_names.index(video)
        self._num_steps: int | None = None
        self._policies: dict[str, EasyCachePolicy] = {}
        self._errors: dict[str, Any] = {}
        self._call_kwargs: dict[str, Any] = {}
        self.metric_reads = 0

    @property
    def adaptive(self) -> bool:
        return isinstance(self.schedule, EasyCache)

    def phase_graph(self, phase: Phase) -> PhaseGraph:
        if phase not in self._phase_graphs:
            if isinstance(phase, TransformPhase):
                pg = specialize_transform_phase(self.captured, self.video_input, phase)
            else:  # a frozen schedule's static plan: the core's phases, exported like any static schedule
                pg = specialize_frozen_phase(self.captured, self.video_input, phase, self.regions[0].cache_keys[0])
            self._phase_graphs[phase] = pg
        return self._phase_graphs[phase]

    def _adaptive_phases(self) -> list[TransformPhase]:
        return [TransformPhase.of("compute"), TransformPhase.of("compute", rate=True), TransformPhase.of("reuse")]

    def plan(self, timesteps: Sequence[float] | torch.Tensor, **kwargs) -> Plan:
        """A frozen schedule: the core's static plan (its decisions). An adaptive one: record the number of
        calls per generation and build its phase graphs; the plan shown is every call computing (the real
        decisions depend on the video: ``opt.decisions()``)."""
        if not self.adaptive:
            return super().plan(timesteps, **kwargs)
        if isinstance(timesteps, torch.Tensor):
            timesteps = timesteps.detach().cpu().flatten().tolist()
        ts = [float(t) for t in timesteps]
        self._check_order(ts)
        self._num_steps = len(ts)
        self._plan = Plan(ts, [self._adaptive_phases()[0]] * len(ts))
        for ph in self._adaptive_phases():
            self.phase_graph(ph)
        return self._plan

    def forward(self, *args, **kwargs):
        self._call_kwargs = kwargs  # the decision reads this call's latent
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._call_kwargs = {}

    def _num_calls(self) -> int | None:
        info = self._context_info.get("num_inference_steps")
        return int(info) if info else self._num_steps

    def _phase_for(self, st: GenerationState, t: float) -> Phase:
        if not self.adaptive:
            return super()._phase_for(st, t)
        i = st.counter
        ctx = self._context
        if i == 0:
            self._policies[ctx] = EasyCachePolicy(self.schedule, self._num_calls())
            self._errors[ctx] = 0
        pol = self._policies[ctx]
        below = None
        if pol.forced(i):
            self._errors[ctx] = 0
        elif pol.tests(i, have_rate=KEYS["rate"] in st.cache):
            x = self.captured.flatten_call(self._call_kwargs)[self._x_index]
            c = st.cache
            err = accumulate(self._errors[ctx], c.get(KEYS["rate"]), x, c.get(KEYS["x"]), c.get(KEYS["v_norm"]))
            below = bool(err < self.schedule.threshold)  # the one host read of this call
            self.metric_reads += 1
            self._errors[ctx] = err if below else 0
        if pol.decide(below) == "R":
            return TransformPhase.of("reuse")
        return TransformPhase.of("compute", rate=KEYS["v"] in st.cache)

    def decisions(self, context: str | None = None) -> str:
        """``"C"`` (computed) or ``"R"`` (reused ``x + D``) per call of the context's last generation."""
        return "".join("R" if ph.action(MODEL_REGION) == Action.REUSE else "C" for _, ph in self.state(context).trace)

    def freeze(self, context: str | None = None) -> FrozenEasyCache:
        """The last generation's decisions as a static :class:`FrozenEasyCache`."""
        return FrozenEasyCache(self.decisions(context))
