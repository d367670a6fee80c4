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
(and export like any static schedule). One read per deciding call, reused ones included, is the minimum for
the published rule: the error ``E`` already accumulates on the device with no new model measurement on a
reused call, but its increment is this call's input change ``|x - x_prev|``, which the sampler makes from the
previous output, so no earlier call can know whether ``E`` stays below the threshold (counted in
``tests/techniques/test_host_reads.py``).

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

from ..errors import ScheduleError
from ..passes.capture import CapturedGraph, TensorSpec
from ..passes.flops import graph_flops
from ..passes.specialize import PhaseGraph
from ..passes.tag import Region, _pick_video_input
from ..passes.transform_rate import (KEYS, MODEL_REGION, TransformPhase, accumulate, model_io, specialize_frozen_phase,
                                     specialize_transform_phase)
from ..schedules.base import (Phase, Plan, RegionRef, ReplaysDecisions, Schedule, parse_decisions,  # noqa: F401
                               schedule_from_json)  # (doctest)
from .base import Decision, Export, StepCall, StepPolicy, Target, Technique, static_plan
from .registry import register

#: Published settings of the reference code: threshold, forced first calls, forced last calls.
PRESETS: dict[str, dict[str, Any]] = {
    "wan2.1": {"threshold": 0.05, "warmup_steps": 10, "always_compute_last": 1},
    "wan2.1-fast": {"threshold": 0.1, "warmup_steps": 10, "always_compute_last": 1},
    "hunyuanvideo": {"threshold": 0.025, "warmup_steps": 5, "always_compute_last": 1},
}


class _EasyCacheBase(Schedule):
    def kinds(self) -> set[str]:
        return set()  # reuses the whole model's output


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




@dataclass
class FrozenEasyCache(ReplaysDecisions, _EasyCacheBase):
    """EasyCache's decisions replayed: ``"C"`` (compute) or ``"R"`` (reuse ``x + D``) per call; calls past
    the end compute. No statistics, no host read.

    >>> FrozenEasyCache("CCRC").reuses(None, 0.0, 2)
    True
    """

    type_name: ClassVar[str] = "EasyCacheFrozen"

    decisions: str = "C"

    def __post_init__(self):
        self.decisions = parse_decisions(self.decisions)

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


@dataclass
class EasyCacheTarget(Target):
    """EasyCache's :class:`~graphpass.techniques.base.Target`: the whole model as one region
    (:data:`~graphpass.passes.transform_rate.MODEL_REGION`), and the latent input ``video_input`` (at
    ``x_index`` among the graph inputs) whose change the rule reads."""

    video_input: str = ""
    x_index: int = 0


def easycache_target(captured: CapturedGraph, regions: list[Region], schedule: Schedule) -> EasyCacheTarget:
    """The whole model of ``captured``; raises when its output is not shaped like its latent input."""
    video = _pick_video_input(captured, None)
    _, out = model_io(captured, video)
    return EasyCacheTarget(regions=[_model_region(captured, out)], attention_regions=list(regions),
                           video_input=video, x_index=captured.input_names.index(video))


def specialize_easycache(captured: CapturedGraph, target: EasyCacheTarget, phase: Phase) -> PhaseGraph:
    """One phase graph over the whole model: EasyCache's own phases (:class:`TransformPhase`: reuse ``x + D``,
    or compute and emit ``D`` and the statistics), or a frozen schedule's plain phases (the core's static
    plan, which exports)."""
    if isinstance(phase, TransformPhase):
        return specialize_transform_phase(captured, target.video_input, phase)
    return specialize_frozen_phase(captured, target.video_input, phase, target.regions[0].cache_keys[0])


#: Every phase an adaptive EasyCache may pick: compute (first), compute and measure the rate, reuse.
ADAPTIVE_PHASES = (TransformPhase.of("compute"), TransformPhase.of("compute", rate=True), TransformPhase.of("reuse"))


class EasyCacheSteps(StepPolicy):
    """EasyCache's step policy: an :class:`EasyCachePolicy` and the accumulated error ``E`` per cache context.
    A call that tests the error reads the call's latent (:attr:`~graphpass.techniques.StepCall.inputs`) and
    the statistics the last computed call left in the cache, and reads back ONE value, ``E < threshold``
    (``metric_reads``).

    >>> opt.policy.records("default")     # [] ; opt.decisions() -> e.g. 'CCCCCCCCCCRRCRRC...'
    """

    adaptive = True

    def __init__(self, schedule: EasyCache, target: EasyCacheTarget, captured: CapturedGraph):
        super().__init__(schedule, target)
        self.num_steps: int | None = None
        self.rules: dict[str, EasyCachePolicy] = {}
        self.errors: dict[str, Any] = {}

    def plan(self, timesteps: list[float], positions: list[float]) -> Plan:
        """Before running, every call computes (the real decisions depend on the video: ``opt.decisions()``)."""
        return Plan(list(timesteps), [ADAPTIVE_PHASES[0]] * len(timesteps))

    def adopt(self, plan: Plan) -> list[Phase]:
        """Generations have ``len(plan)`` calls (the last ones compute); every phase a call may pick is built."""
        self.num_steps = len(plan)
        return self.possible_phases(plan)

    def possible_phases(self, plan: Plan) -> list[Phase]:
        return list(ADAPTIVE_PHASES)

    def describe(self) -> str:
        return ("decided at run time, per call and cache context: forced calls compute; any other adds its input "
                "change to the error on the device and reads 'error < threshold' once: reuse x + D, or compute")

    def decide(self, call: StepCall) -> Decision:
        i, ctx, c = call.counter, call.context, call.cache
        if i == 0:
            n = call.info.get("num_inference_steps")  # the pipeline's count, else the plan's
            self.rules[ctx] = EasyCachePolicy(self.schedule, int(n) if n else self.num_steps)
            self.errors[ctx] = 0
        rule = self.rules[ctx]
        below = None
        if rule.forced(i):
            self.errors[ctx] = 0
        elif rule.tests(i, have_rate=KEYS["rate"] in c):
            x = call.inputs[self.target.x_index]
            err = accumulate(self.errors[ctx], c.get(KEYS["rate"]), x, c.get(KEYS["x"]), c.get(KEYS["v_norm"]))
            below = bool(err < self.schedule.threshold)  # the one host read of this call
            self.metric_reads += 1
            self.errors[ctx] = err if below else 0
        if rule.decide(below) == "R":
            return Decision(TransformPhase.of("reuse"))
        return Decision(TransformPhase.of("compute", rate=KEYS["v"] in c))


def _freeze(schedule: Schedule, decisions: str) -> FrozenEasyCache:
    return FrozenEasyCache(decisions)


EASYCACHE = register(Technique(
    name="EasyCache", schedules=(EasyCache,), target=easycache_target, specialize=specialize_easycache,
    policy=EasyCacheSteps,
    export=Export(refusal="EasyCache decides reuse at run time from the latent's change, so no fixed set of "
                          "phases exists to export; export a run's decisions as a static schedule instead: "
                          "graphpass.optimize(model, opt.freeze(), ...) (a FrozenEasyCache)",
                  freeze=_freeze)))

FROZEN_EASYCACHE = register(Technique(
    name="FrozenEasyCache", schedules=(FrozenEasyCache,), target=easycache_target,
    specialize=specialize_easycache, policy=static_plan, export=Export(freeze=_freeze)))
