"""What the whole-chain step caches share (First Block Cache, MagCache, TeaCache and their frozen forms):
their schedule bases, their target (the chain of blocks and where a call looks before deciding), their
phase graphs (:func:`~graphpass.passes.residuals.specialize_step_phase`) and their step policies.

A schedule that decides per call (First Block Cache, TeaCache) runs a *probe* before deciding: its
:class:`ProbePolicy` answers the runtime core with a :class:`~graphpass.techniques.Probe`, so a decided call
runs in two parts::

    probe graph:  embeddings + what the probe needs (the first block, or its modulation)
                  -> statistic (0-d tensor), probed value, values the rest of the call reads
    host:         ONE .item() of the statistic; the per-context rule says compute or reuse
    rest graph:   the remaining blocks (compute, storing the residual) or one add (reuse), then the output layer

so nothing is computed twice and a decision costs one host read. Calls the rule forces (the first, the last
for TeaCache, any call before a reference exists) run one whole graph and read nothing. A static schedule
(MagCache's table, a frozen run) follows a static plan, reads nothing and exports like PAB; a calibrating
MagCache computes every call and measures the magnitude ratio in the graph (:class:`CalibrationPolicy`, read
once by ``opt.records()``).

>>> opt = graphpass.optimize(wan, FirstBlockCache(threshold=0.05), example_kwargs=kw)
>>> with opt.cache_context("cond"):
...     out = opt(**kw)
>>> opt.decisions("cond"), opt.metric_reads              # e.g. ('C', 0): the first call computes, reads nothing
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from ..errors import InputError, ScheduleError
from ..passes.capture import CapturedGraph
from ..passes.residuals import ProbeSite, StepCachePhase, boundary_key, find_block_span, find_probe_site, \
    specialize_step_phase
from ..passes.specialize import PhaseGraph
from ..passes.tag import Region
from ..schedules.adacache import ResidualSchedule
from ..schedules.base import Action, Phase, Plan, RegionRef, ReplaysDecisions, Schedule, parse_decisions
from .base import Decision, Export, Probe, StepCall, StepPolicy, Technique, static_plan
from .registry import register
from .residual import SpanTarget


@dataclass
class StepRecord:
    """One decided call: its index, the statistic the probe measured and whether the call reused."""

    step: int
    value: float
    reuse: bool


class StepRule(ABC):
    """The decision rule of one cache context for one generation (pure Python: floats in, booleans out).

    ``forced(i)``: call ``i`` computes whatever it would measure (no measurement is read).
    ``decide(i, value)``: after the probe of call ``i`` measured ``value``, whether the call reuses.
    """

    def __init__(self):
        self.records: list[StepRecord] = []

    @abstractmethod
    def forced(self, i: int) -> bool:
        ...

    @abstractmethod
    def _reuse(self, i: int, value: float) -> bool:
        ...

    def decide(self, i: int, value: float) -> bool:
        reuse = self._reuse(i, value)
        self.records.append(StepRecord(i, value, reuse))
        return reuse


class StepCacheSchedule(ResidualSchedule):
    """Base of the whole-chain step caches.

    Class attributes a technique sets: ``keep_head`` (a reuse keeps the first block: First Block Cache),
    ``first_stream`` (only the video tokens carry a residual; other hidden states pass a reuse unchanged:
    MagCache), ``reference`` (``"computed"``: the probe compares with the value of the last computed call;
    ``"previous"``: with the previous call's). Per instance: :attr:`probe` and, for schedules that decide
    per call, :meth:`rule`.
    """

    keep_head: ClassVar[bool] = False
    first_stream: ClassVar[bool] = False
    reference: ClassVar[str] = "computed"

    @property
    def probe(self) -> str:
        """What a call measures before deciding: ``"head"``, ``"modulated"``, ``"ratio"`` (measured on every
        computed call, read once at the end) or ``"none"`` (a static schedule)."""
        return "none"

    def steps_per_generation(self) -> int | None:
        """Calls per generation and cache context the config itself gives (None: known from the plan or the
        pipeline only)."""
        return None

    def rule(self, num_steps: int | None) -> StepRule:
        """The decision rule of one generation of ``num_steps`` calls (None: unknown)."""
        raise ScheduleError(f"{type(self).__name__} decides from its table, not per call")

    def freeze(self, decisions: str) -> Schedule:
        """A static schedule replaying ``decisions`` (``"CCRC..."``, e.g. ``opt.decisions()``)."""
        raise ScheduleError(f"{type(self).__name__} does not say how to freeze decisions")

    # static schedules (tables, frozen runs) answer these; per-call ones decide in their policy
    def reuses(self, region: RegionRef, t: float, counter: int) -> bool:
        return False

    def may_reuse_next(self, region: RegionRef, t: float, counter: int) -> bool:
        return False


@dataclass
class FrozenStepCache(ReplaysDecisions, StepCacheSchedule):
    """Base of a step cache's static form: one ``"C"`` (compute; keep the residual when a reuse follows) or
    ``"R"`` (reuse) per model call of a generation, the first ``"C"``; calls past the end compute. No probe,
    no host read; exports to ONNX. Subclasses set ``type_name`` and the technique's class attributes.

    Fields:
        decisions: e.g. ``opt.decisions()`` of an adaptive run.
    """

    decisions: str = "C"

    def __post_init__(self):
        self.decisions = parse_decisions(self.decisions)

    def freeze(self, decisions) -> "FrozenStepCache":
        return type(self)(decisions)

    def to_dict(self) -> dict[str, Any]:
        return {"decisions": self.decisions}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FrozenStepCache":
        unknown = set(d) - {"decisions"}
        if unknown:
            raise ScheduleError(f"{cls.type_name} JSON has unknown fields {sorted(unknown)}; known: ['decisions']")
        return cls(**d)

    def __str__(self) -> str:
        return (f"{type(self).__name__}({self.decisions}: {self.decisions.count('C')}/{len(self.decisions)} "
                f"computed)")


# --- target and phase graphs ---------------------------------------------------------------------------
@dataclass
class StepCacheTarget(SpanTarget):
    """The chain of blocks of a step cache (a :class:`~graphpass.techniques.residual.SpanTarget`).

    site: where a call looks before deciding (:class:`~graphpass.passes.residuals.ProbeSite`); for a static
        First Block Cache the first block, which a reuse keeps; None when nothing is probed.
    keep_head, first_stream: the schedule's (see :class:`StepCacheSchedule`), which every phase graph applies.
    """

    site: ProbeSite | None = None
    keep_head: bool = False
    first_stream: bool = False


def step_cache_target(captured: CapturedGraph, regions: list[Region], schedule: StepCacheSchedule) -> StepCacheTarget:
    """The chain of blocks as the one region the phases name (only the video tokens' exit when the schedule
    passes the other streams through a reuse), and the probe site.

    >>> step_cache_target(captured, tagged, FirstBlockCache(0.05)).site.kind
    'head'
    """
    span = find_block_span(captured, regions)
    region = span.region
    if schedule.first_stream:  # one cached residual: the video tokens'
        region = dataclasses.replace(region, exits=region.exits[:1], exit_specs=region.exit_specs[:1])
    probe = schedule.probe
    kind = probe if probe != "none" else "head" if schedule.keep_head else None
    site = find_probe_site(captured, span, regions, kind) if kind is not None else None
    return StepCacheTarget(regions=[region], attention_regions=list(regions), span=span, site=site,
                           keep_head=schedule.keep_head, first_stream=schedule.first_stream)


def specialize_step(captured: CapturedGraph, target: StepCacheTarget, phase: Phase) -> PhaseGraph:
    """One phase graph of a step cache: a plain phase of a static plan gets the target's ``keep_head`` and
    ``first_stream``; a :class:`~graphpass.passes.residuals.StepCachePhase` says them itself. The graph
    keeps the phase it was asked for (the runtime and hoisting find graphs by it)."""
    if isinstance(phase, StepCachePhase):
        return specialize_step_phase(captured, target.span, phase, target.site)
    full = StepCachePhase(phase.actions, keep_head=target.keep_head, first_stream=target.first_stream)
    return dataclasses.replace(specialize_step_phase(captured, target.span, full, target.site), phase=phase)


def step_phase(target: StepCacheTarget, probe: str, action: Action, part: str = "whole",
               measure: bool = False) -> StepCachePhase:
    """The phase where the chain does ``action``: the whole call, or the ``"rest"`` after a probe.

    >>> step_phase(target, "head", Action.REUSE, "rest").label()
    'reuse 1, head kept, rest'
    """
    return StepCachePhase(Phase.of({target.span.path: action}).actions, keep_head=target.keep_head,
                          first_stream=target.first_stream, probe=probe, measure=measure, part=part)


# --- policies ------------------------------------------------------------------------------------------
#: Prefix of the cache keys of values a probe hands over to the rest of its call (dropped after the call).
_HAND_OVER = boundary_key("")

def _check_on_plan(schedule: Schedule, timesteps: list[float] | None, call: StepCall) -> None:
    i, t, ts = call.counter, call.timestep, timesteps
    if ts is not None and (i >= len(ts) or abs(ts[i] - t) > 1e-6):
        raise InputError(f"call {i} of this generation has timestep {t:g} but {type(schedule).__name__} "
                         f"was planned for {len(ts)} steps ({ts[:3]}...); call opt.plan(timesteps) with the "
                         f"sampler's timesteps")


class ProbePolicy(StepPolicy):
    """Decisions from the current call (First Block Cache, TeaCache): per cache context, the schedule's
    :class:`StepRule`; an open decision asks the runtime for a probe and reads its statistic once.

    Calls per generation (TeaCache computes the last): from ``opt.plan(timesteps)``, else the pipeline's
    ``cache_context(num_inference_steps=)``, else the schedule's own.
    """

    adaptive = True

    def __init__(self, schedule: StepCacheSchedule, target: StepCacheTarget, captured: CapturedGraph):
        super().__init__(schedule, target)
        self.timesteps: list[float] | None = None
        self.rules: dict[str, StepRule] = {}
        self.probe_phase = StepCachePhase(probe=schedule.probe, measure=True, part="probe")

    def _phase(self, action: Action, part: str = "whole") -> StepCachePhase:
        return step_phase(self.target, self.schedule.probe, action, part)

    def plan(self, timesteps: list[float], positions: list[float]) -> Plan:
        """Every call computing: the decisions are taken at run time."""
        return Plan(timesteps, [self._phase(Action.STORE)] * len(timesteps))

    def adopt(self, plan: Plan) -> list[Phase]:
        """Calls must come at ``plan``'s timesteps; every graph a call may run is built."""
        self.timesteps = list(plan.timesteps)
        return self.possible_phases(plan)

    def possible_phases(self, plan: Plan) -> list[Phase]:
        """A forced call's whole graph, the probe, and the two ways a decided call finishes."""
        return [self._phase(Action.STORE), self.probe_phase, self._phase(Action.STORE, "rest"),
                self._phase(Action.REUSE, "rest")]

    def describe(self) -> str:
        return (f"decided at run time, per call and cache context: a call the rule forces runs "
                f"'{self._phase(Action.STORE).label()}'; any other runs the probe, reads its statistic once on "
                f"the host, then finishes with '{self._phase(Action.STORE, 'rest').label()}' or "
                f"'{self._phase(Action.REUSE, 'rest').label()}'")

    def _num_steps(self, call: StepCall) -> int | None:
        if self.timesteps is not None:
            return len(self.timesteps)
        n = call.info.get("num_inference_steps")
        return int(n) if n else self.schedule.steps_per_generation()

    def decide(self, call: StepCall) -> Decision | Probe:
        _check_on_plan(self.schedule, self.timesteps, call)
        if call.counter == 0:
            self.rules[call.context] = self.schedule.rule(self._num_steps(call))
        rule, cache = self.rules[call.context], call.cache
        ready = self.target.site.reference_key in cache and all(k in cache for k in self.target.regions[0].cache_keys)
        if rule.forced(call.counter) or not ready:
            return Decision(self._phase(Action.STORE))
        return Probe(self.probe_phase)

    def complete(self, call: StepCall) -> Decision:
        value = call.cache.get(self.target.site.stats_key).item()  # the one host read of this call
        self.metric_reads += 1
        reuse = self.rules[call.context].decide(call.counter, float(value))
        return Decision(self._phase(Action.REUSE if reuse else Action.STORE, "rest"))

    def finish(self, call: StepCall, phase: Phase) -> None:
        """Keep the probed value as the next call's reference (TeaCache: every call's; First Block Cache:
        computed calls' only); drop the statistic and the values the probe handed to the rest."""
        cache, site = call.cache, self.target.site
        if site.value_key in cache:
            if self.schedule.reference == "previous" or phase.action(self.target.span.path) != Action.REUSE:
                cache.put(site.reference_key, cache.get(site.value_key))
            cache.drop(site.value_key)
        cache.drop(site.stats_key)
        for key in cache.keys():
            if key.startswith(_HAND_OVER):
                cache.drop(key)

    def records(self, context: str) -> list[StepRecord]:
        rule = self.rules.get(context)
        return list(rule.records) if rule is not None else []


class CalibrationPolicy(StepPolicy):
    """A calibrating MagCache: every call computes; each call after the first measures the ratio of its
    residual's norm to the previous one's in the graph. The ratios stay on the device until
    :meth:`records` reads them with one host transfer: ``[1.0, g1, g2, ...]``, one per call of the
    context's last generation (the first has nothing to compare with)."""

    def __init__(self, schedule: StepCacheSchedule, target: StepCacheTarget, captured: CapturedGraph):
        super().__init__(schedule, target)
        self.ratios: dict[str, list[torch.Tensor]] = {}

    def _phase(self, measure: bool) -> StepCachePhase:
        return step_phase(self.target, "ratio", Action.STORE, measure=measure)

    def plan(self, timesteps: list[float], positions: list[float]) -> Plan:
        return Plan(timesteps, [self._phase(measure=i > 0) for i in range(len(timesteps))])

    def decide(self, call: StepCall) -> Decision:
        if call.counter == 0:
            self.ratios[call.context] = []  # a new generation
        return Decision(self._phase(measure=self.target.span.residual_key in call.cache))

    def finish(self, call: StepCall, phase: Phase) -> None:
        key = self.target.site.stats_key
        if key in call.cache:  # kept on the device: read once, by records()
            self.ratios[call.context].append(call.cache.get(key))
            call.cache.drop(key)

    def records(self, context: str) -> list[float]:
        ratios = self.ratios.get(context, [])
        return [1.0] + (torch.stack(ratios).tolist() if ratios else [])


def adaptive_refusal(name: str) -> str:
    """The export error of a technique that decides per call: what to export instead."""
    return (f"{name} decides reuse at run time from each call, so no fixed set of phases exists to export; "
            f"export its decisions of a run as a static schedule instead: "
            f"graphpass.optimize(model, opt.freeze(), ...)")


def _freeze(schedule: Schedule, decisions: str) -> Schedule:
    return schedule.freeze(decisions)


def step_cache_technique(name: str, schedule_type: type[StepCacheSchedule],
                         policy: Callable[[Schedule, StepCacheTarget, CapturedGraph], StepPolicy] = static_plan,
                         refusal: str | None = None) -> Technique:
    """Register the step cache ``schedule_type`` under ``name``: the chain of blocks as target, its phase
    graphs, ``policy`` (a static plan by default) and, for one deciding per call, ``refusal`` (it freezes
    with the schedule's own ``freeze``).

    >>> step_cache_technique("FrozenFirstBlockCache", FrozenFirstBlockCache).name
    'FrozenFirstBlockCache'
    """
    return register(Technique(name=name, schedules=(schedule_type,), target=step_cache_target,
                              specialize=specialize_step, policy=policy,
                              export=Export(refusal=refusal, freeze=_freeze)))
