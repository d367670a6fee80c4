"""What a caching technique is, as data: :class:`Technique`, what it acts on (:class:`Target`) and how it
picks each call's phase (:class:`StepPolicy`).

A technique sits between the schedules (its configuration, plain data) and the runtime (which drives any
technique the same way). It says:

* which schedule types it serves;
* how it finds what it acts on in a capture (the tagged attention regions for PAB, the chain of blocks for
  residual caching): a :class:`Target` whose ``regions`` are the names a phase speaks of;
* the pass that specializes one phase graph of that target;
* the step policy: a static plan (:class:`StaticPlan`), or decisions taken at run time from a value the
  phase graphs measure (at most one host read per compute step);
* whether it exports, and if not, how to make an exportable schedule of a run (:class:`Export`).

The runtime core asks the registry (:func:`graphpass.techniques.technique_for`) and never the schedule's
attributes, so a new technique is one module: its schedule dataclass, its policy and one
:func:`~graphpass.techniques.register` call.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch

from ..errors import ScheduleError
from ..passes.capture import CapturedGraph
from ..passes.residuals import BlockSpan, MetricSite
from ..passes.specialize import PhaseGraph
from ..passes.tag import Region
from ..schedules.base import Phase, Plan, Schedule


@dataclass
class Target:
    """What a technique acts on in one capture.

    regions: the regions its phases name (each :class:`~graphpass.schedules.base.Phase` says what every one
        of them does at a step); the runtime caches their ``cache_keys``.
    attention_regions: the tagged regions of the capture it was found from (the same list for PAB).
    span: the chain of transformer blocks, for techniques that cache the blocks' residual; else None.
    metric: where an adaptive technique measures the value it decides from; else None.

    >>> t = Target(regions=tagged, attention_regions=tagged)           # PAB: the tagged regions themselves
    >>> t.span is None and t.metric is None
    True
    """

    regions: list[Region]
    attention_regions: list[Region]
    span: BlockSpan | None = None
    metric: MetricSite | None = None


class CacheView(Protocol):
    """What a step policy may do with the runtime's cache of one context (a
    :class:`~graphpass.runtime.cache.CacheStore`)."""

    def get(self, key: str) -> torch.Tensor: ...

    def drop(self, key: str) -> None: ...

    def keys(self) -> list[str]: ...

    def __contains__(self, key: str) -> bool: ...


@dataclass
class StepCall:
    """One call as a step policy sees it.

    counter: the call's index in its generation (0 for the first).
    timestep: its timestep.
    context: the cache context it runs in (``opt.cache_context(name)``; ``"default"`` otherwise).
    shapes: the shapes of its graph inputs.
    cache: the context's cache, as the previous call left it.
    plan: the plan made with ``opt.plan(timesteps)``, or None.
    off_plan: an earlier call of this generation left the plan.
    position: what a schedule's windows read for this call (its timestep, or its place in the trajectory for
        schedules that need it); a function, since only a call off the plan needs it and it may raise.
    info: what the pipeline said of the loop in ``opt.cache_context(name, **info)`` (``num_inference_steps``,
        ``step_index``...); empty otherwise.
    inputs: the call's graph inputs, in the capture's order (``captured.input_names``), for a policy that
        decides from the call's own values (EasyCache reads the latent); a policy only reads them (no host
        read unless it counts one in ``metric_reads``).
    """

    counter: int
    timestep: float
    context: str
    shapes: tuple
    cache: CacheView
    plan: Plan | None
    off_plan: bool
    position: Callable[[], float]
    info: dict[str, Any] = field(default_factory=dict)
    inputs: Sequence[torch.Tensor] = ()


@dataclass(frozen=True)
class Decision:
    """A policy's answer for one call.

    phase: what every region of the target does at this call.
    on_plan: the call follows the plan, so the runtime frees a cached tensor after its last planned reuse.
    left_plan: a plan exists and this call is not on it (the runtime warns once and goes on step by step).
    feeds: per-call inputs of the phase graph, by the name of its cache input: a value the policy computes
        for this call alone (TaylorSeer's step gap, a 0-d tensor), given to the graph in place of a cached
        tensor of that name and never stored. One graph then serves every value (no graph per gap).

    >>> Decision(phase, feeds={"taylorseer:gap": torch.tensor(2.0)})   # the graph reads the gap as an input
    """

    phase: Phase
    on_plan: bool = False
    left_plan: bool = False
    feeds: Mapping[str, torch.Tensor] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Probe:
    """A policy's answer that needs part of the call run first: a decision taken from the current call.

    phase: the phase graph that runs first (e.g. the embeddings and the first block); it returns no model
        output, only cache outputs, which the runtime stores in the call's cache. The runtime then asks the
        policy's :meth:`StepPolicy.complete` for the :class:`Decision` whose phase finishes the call, reading
        what the probe left (First Block Cache: one host read of the first block's change).

    >>> policy.decide(call)                 # e.g. Probe(phase=StepCachePhase(..., part='probe'))
    >>> policy.complete(call).phase.label() # after the probe ran: 'reuse 1, head kept, rest'
    """

    phase: Phase


class StepPolicy(ABC):
    """Picks the phase of each call. One policy serves one optimized model and all its cache contexts."""

    #: Decided at run time from measured values: no fixed set of phases exists before a run.
    adaptive: bool = False

    def __init__(self, schedule: Schedule, target: Target):
        self.schedule = schedule
        self.target = target
        #: Host reads of measured values so far (an adaptive policy's only synchronization).
        self.metric_reads = 0

    def plan(self, timesteps: list[float], positions: list[float]) -> Plan:
        """The plan of a generation over ``timesteps`` (``positions``: what the schedule's windows read for
        each step), without adopting it."""
        return Plan(timesteps, self.schedule.plan(self.target.regions, positions).phases)

    def adopt(self, plan: Plan) -> list[Phase]:
        """Make ``plan`` the one calls follow; returns the phases whose graphs to build up front."""
        return plan.distinct()

    def possible_phases(self, plan: Plan) -> list[Phase]:
        """Every phase a generation over ``plan``'s timesteps may run, in the order reports list them: the plan's
        own for a static policy; for one deciding at run time, every phase a call may pick, probes included
        (what ``opt.inspect()`` shows, since ``plan`` then only says what happens before any decision)."""
        return plan.distinct()

    def describe(self) -> str:
        """How each call's phase is picked, in one sentence for ``opt.inspect()``."""
        return "a static plan: every step's phase is fixed before sampling"

    def feeds(self, plan: Plan) -> list[Mapping[str, torch.Tensor]]:
        """The :attr:`Decision.feeds` of every step of ``plan``, as a generation following it gets them: what an
        export records per step and its loaded artefact replays. Default: nothing fed.

        >>> [dict(f) for f in opt.policy.feeds(opt.current_plan)][:5]   # TaylorSeer, diffusers' defaults
        [{}, {'taylorseer:gap': tensor(1.)}, {'taylorseer:gap': tensor(1.)}, {'taylorseer:gap': tensor(1.)}, ...]
        """
        return [{} for _ in plan.phases]

    @abstractmethod
    def decide(self, call: StepCall) -> Decision | Probe:
        """The phase of ``call``, or a :class:`Probe` to run first when the decision reads the call itself."""

    def complete(self, call: StepCall) -> Decision:
        """The phase finishing ``call`` after the :class:`Probe` that :meth:`decide` returned ran (its cache
        outputs are in ``call.cache``). Policies that never probe keep this default."""
        raise ScheduleError(f"{type(self).__name__}.decide returned a Probe but the policy does not define "
                            f"complete(call), which picks the phase finishing the call from the probe's outputs")

    def finish(self, call: StepCall, phase: Phase) -> None:
        """After ``call`` ran ``phase`` and its cache outputs were stored: keep what the next call compares
        with, drop what only this call needed (a probe's hand-over values). Default: nothing to do."""

    def records(self, context: str) -> list[Any]:
        """What the policy measured and decided in ``context``'s generation (empty for static policies)."""
        return []


class StaticPlan(StepPolicy):
    """A schedule's static plan: follow ``opt.plan(...)`` when the call is on it, else step by step with
    :meth:`~graphpass.schedules.base.Schedule.step_phase` (storing what the next step may reuse).

    >>> StaticPlan(PAB.preset("pab246"), target).decide(call).phase.label()     # e.g. 'reuse 14, store 6'
    """

    def decide(self, call: StepCall) -> Decision:
        plan = call.plan
        i = call.counter
        if plan is not None and not call.off_plan and i < len(plan) and abs(plan.timesteps[i] - call.timestep) < 1e-6:
            # The plan was made for this generation; its stores guarantee every reuse finds its tensors.
            return Decision(plan.phases[i], on_plan=True)
        position = call.position()
        regions = self.target.regions
        cached = {r.path for r in regions if all(k in call.cache for k in r.cache_keys)}
        return Decision(self.schedule.step_phase(regions, position, i, cached), left_plan=plan is not None)


def static_plan(schedule: Schedule, target: Target, captured: CapturedGraph) -> StaticPlan:
    """The ``policy`` of techniques whose schedules plan statically (a :class:`StaticPlan`)."""
    return StaticPlan(schedule, target)


@dataclass(frozen=True)
class Export:
    """Whether a technique's phases can be exported (ONNX, TensorRT).

    refusal: None when they can; else why not and what to do instead (the export error's text).
    freeze: makes an exportable schedule from the schedule and a run's decisions (``"CCRRC..."``), e.g.
        AdaCache's :meth:`~graphpass.AdaCache.freeze`; None when there is nothing to freeze.

    >>> Export().refusal is None
    True
    """

    refusal: str | None = None
    freeze: Callable[[Schedule, str], Schedule] | None = None


@dataclass(frozen=True)
class Technique:
    """One caching technique, declared as data (see the module docstring).

    name: what reports call it (``"PAB"``, ``"AdaCache"``).
    schedules: the schedule types it serves; a subclass of one of them is served too (the registry walks the
        MRO).
    target: finds what it acts on: ``target(captured, tagged_regions, schedule) -> Target``; raises a
        :class:`~graphpass.errors.GraphpassError` saying why the model does not fit.
    specialize: the pass that builds one phase graph: ``specialize(captured, target, phase) -> PhaseGraph``.
    policy: makes the step policy of one optimized model: ``policy(schedule, target, captured) -> StepPolicy``.
    export: whether and how its phases export (:class:`Export`).
    parallel: whether sequence parallelism (:class:`~graphpass.SequenceParallel`) drives it: its phase graphs
        must be those of the sharded capture, with collectives that only reused regions need elided.

    >>> technique_for(PAB.preset("pab246")).name
    'PAB'
    """

    name: str
    schedules: tuple[type[Schedule], ...]
    target: Callable[[CapturedGraph, list[Region], Schedule], Target]
    specialize: Callable[[CapturedGraph, Target, Phase], PhaseGraph]
    policy: Callable[[Schedule, Target, CapturedGraph], StepPolicy]
    export: Export = field(default_factory=Export)
    parallel: bool = False

    def __post_init__(self):
        if not self.schedules:
            raise ScheduleError(f"technique {self.name!r} serves no schedule type: give schedules=(YourSchedule,)")


def tagged_regions(captured: CapturedGraph, regions: list[Region], schedule: Schedule) -> Target:
    """The target of techniques that act on the tagged attention regions themselves (PAB)."""
    return Target(regions=list(regions), attention_regions=list(regions))

