"""StepCacheModel: runs whole-chain step caches that decide from the current call (First Block Cache,
TeaCache) or from a table (MagCache), on graphs from :func:`graphpass.passes.residuals.specialize_step_phase`.

A technique is a :class:`StepCacheSchedule`: data (its config), a probe (what a call measures about itself
before deciding) and a pure per-context :class:`StepPolicy`. For a schedule that decides per call, every
call whose decision is open runs in two parts::

    probe graph:  embeddings + what the probe needs (the first block, or its modulation)
                  -> statistic (0-d tensor), probed value, values the rest of the call reads
    host:         ONE .item() of the statistic; the policy says compute or reuse
    rest graph:   the remaining blocks (compute, storing the residual) or one add (reuse), then the output layer

so nothing is computed twice and a decision costs one host read. Calls the policy forces (the first, the
last for TeaCache, any call before a reference exists) run one whole graph and read nothing. A static
schedule (MagCache's table, a frozen run) reads nothing at all and runs like PAB.

>>> opt = graphpass.optimize(wan, FirstBlockCache(threshold=0.05), example_kwargs=kw)
>>> with opt.cache_context("cond"):
...     out = opt(**kw)
>>> opt.decisions("cond"), opt.metric_reads
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from ..errors import InputError, ScheduleError
from ..passes.capture import CapturedGraph
from ..passes.residuals import (ProbeSite, StepCachePhase, find_block_span, find_probe_site,
                                specialize_step_phase)
from ..passes.specialize import PhaseGraph
from ..passes.tag import Region
from ..schedules.adacache import ResidualSchedule, _decisions
from ..schedules.base import Action, Phase, Plan, RegionRef
from .executor import GenerationState, OptimizedModel

#: Prefix of the cache keys the probe part of a call hands to the rest (freed after the call).
_BOUNDARY = "probe:boundary:"


@dataclass
class StepRecord:
    """One decided call: its index, the statistic the probe measured and whether the call reused."""

    step: int
    value: float
    reuse: bool


class StepPolicy(ABC):
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
    """Base of the whole-chain step caches run by :class:`StepCacheModel`.

    Class attributes a technique sets: ``keep_head`` (a reuse keeps the first block: First Block Cache),
    ``first_stream`` (only the video tokens carry a residual; other hidden states pass a reuse unchanged:
    MagCache),
    ``reference`` (``"computed"``: the probe compares with the value of the last computed call;
    ``"previous"``: with the previous call's). Per instance: :attr:`probe` and, for schedules that decide
    per call, :meth:`policy`.
    """

    keep_head: ClassVar[bool] = False
    first_stream: ClassVar[bool] = False
    reference: ClassVar[str] = "computed"

    @property
    def probe(self) -> str:
        """What a call measures before deciding: ``"head"``, ``"modulated"``, ``"ratio"`` (measured on every
        computed call, read once at the end) or ``"none"`` (a static schedule)."""
        return "none"

    @property
    def decides_per_call(self) -> bool:
        return self.probe in ("head", "modulated")

    def steps_per_generation(self) -> int | None:
        """Calls per generation and cache context the config itself gives (None: known from the plan or the
        pipeline only)."""
        return None

    def policy(self, num_steps: int | None) -> StepPolicy:
        raise NotImplementedError(f"{type(self).__name__} decides from its table, not per call")

    def runtime_class(self):
        return StepCacheModel

    # static schedules (tables, frozen runs) answer these; per-call ones decide in the runtime
    def reuses(self, region: RegionRef, t: float, counter: int) -> bool:
        return False

    def may_reuse_next(self, region: RegionRef, t: float, counter: int) -> bool:
        return self.decides_per_call


@dataclass
class FrozenStepCache(StepCacheSchedule):
    """Base of a step cache's static form: one ``"C"`` (compute; keep the residual when a reuse follows) or
    ``"R"`` (reuse) per model call of a generation, the first ``"C"``; calls past the end compute. No probe,
    no host read; exports to ONNX. Subclasses set ``type_name`` and the technique's class attributes.

    Fields:
        decisions: e.g. ``opt.decisions()`` of an adaptive run.
    """

    decisions: str = "C"

    def __post_init__(self):
        self.decisions = _decisions(self.decisions)

    def reuses(self, region: RegionRef, t: float, counter: int) -> bool:
        return counter < len(self.decisions) and self.decisions[counter] == "R"

    def may_reuse_next(self, region: RegionRef, t: float, counter: int) -> bool:
        return self.reuses(region, t, counter + 1)

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


class StepCacheModel(OptimizedModel):
    """Drop-in replacement running a :class:`StepCacheSchedule`. Besides the core's API:

    * ``span``: the chain of blocks; ``site``: the :class:`ProbeSite` (None for a table);
    * ``decisions(context=None)``: ``"C"``/``"R"`` per call of the context's last generation;
    * ``records(context=None)``: each decided call's measured statistic and decision;
    * ``metric_reads``: host reads of statistics so far (one per decided call);
    * ``calibration(context=None)``: MagCache's magnitude ratios of the last generation (calibrating runs).
    """

    def __init__(self, model: torch.nn.Module, captured: CapturedGraph, regions: list[Region],
                 schedule: StepCacheSchedule, *, timestep_arg: str = "timestep", backend: str = "eager",
                 timestep_order: str = "falling"):
        span = find_block_span(captured, regions)
        region = span.region
        if schedule.first_stream:  # one cached residual: the video tokens'
            region = dataclasses.replace(region, exits=region.exits[:1], exit_specs=region.exit_specs[:1])
        super().__init__(model, captured, [region], schedule, timestep_arg=timestep_arg, backend=backend,
                         timestep_order=timestep_order)
        self.span = span
        self.attention_regions = regions
        probe = schedule.probe
        self.site: ProbeSite | None = (find_probe_site(captured, span, regions, probe) if probe != "none" else
                                       find_probe_site(captured, span, regions, "head") if schedule.keep_head
                                       else None)
        self.metric_reads = 0
        self._policies: dict[str, StepPolicy] = {}
        self._ratios: dict[str, list[torch.Tensor]] = {}
        self._timesteps: list[float] | None = None
        self._call: dict[str, Any] = {}

    @property
    def adaptive(self) -> bool:
        """Whether calls decide at run time (no fixed plan to export: freeze a run's decisions instead)."""
        return self.schedule.decides_per_call or self.schedule.probe == "ratio"

    # --- graphs ----------------------------------------------------------------------------------
    def _step_phase(self, action: Action, part: str = "whole", measure: bool = False) -> StepCachePhase:
        acts = Phase.of({self.span.path: action}).actions
        return StepCachePhase(acts, keep_head=self.schedule.keep_head, first_stream=self.schedule.first_stream,
                              probe=self.schedule.probe, measure=measure, part=part)

    def phase_graph(self, phase: Phase) -> PhaseGraph:
        if phase not in self._phase_graphs:
            sp = phase if isinstance(phase, StepCachePhase) else StepCachePhase(
                phase.actions, keep_head=self.schedule.keep_head, first_stream=self.schedule.first_stream)
            self._phase_graphs[phase] = specialize_step_phase(self.captured, self.span, sp, self.site)
        return self._phase_graphs[phase]

    def plan(self, timesteps: Sequence[float] | torch.Tensor, **kwargs) -> Plan:
        """As :meth:`OptimizedModel.plan` for a static schedule. A schedule deciding per call or calibrating
        keeps only the number of steps (TeaCache computes the last) and builds the graphs it may run."""
        if not (self.schedule.decides_per_call or self.schedule.probe == "ratio"):
            return super().plan(timesteps, **kwargs)
        if isinstance(timesteps, torch.Tensor):
            timesteps = timesteps.detach().cpu().flatten().tolist()
        self._timesteps = [float(t) for t in timesteps]
        for ph in self._possible_phases():
            self.phase_graph(ph)
        return Plan(self._timesteps, [self._step_phase(Action.STORE)] * len(self._timesteps))

    def preview_plan(self, timesteps: Sequence[float] | torch.Tensor, **kwargs) -> Plan:
        """As :meth:`OptimizedModel.preview_plan` for a static schedule. For one that decides per call: the
        phases a context's last generation over these timesteps ran (decided calls show their rest graph),
        else every call computing."""
        if not self.adaptive:
            return super().preview_plan(timesteps, **kwargs)
        ts = (timesteps.detach().cpu().flatten().tolist() if isinstance(timesteps, torch.Tensor)
              else [float(t) for t in timesteps])
        for st in self._contexts.values():
            if [t for t, _ in st.trace] == ts:
                return Plan(ts, [ph for _, ph in st.trace])
        return Plan(ts, [self._step_phase(Action.STORE)] * len(ts))

    def _possible_phases(self) -> list[StepCachePhase]:
        if self.schedule.probe == "ratio":
            return [self._step_phase(Action.STORE), self._step_phase(Action.STORE, measure=True)]
        return [self._step_phase(Action.STORE), StepCachePhase(probe=self.schedule.probe, measure=True, part="probe"),
                self._step_phase(Action.STORE, "rest"), self._step_phase(Action.REUSE, "rest")]

    # --- calls -----------------------------------------------------------------------------------
    def forward(self, *args, **kwargs) -> Any:
        self._call = kwargs
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._call = {}
            self._after_call(self._state())

    def _num_steps(self) -> int | None:
        """Calls per generation: from the plan, else the pipeline's ``cache_context(num_inference_steps=)``,
        else the schedule's own ``num_inference_steps``."""
        if self._timesteps is not None:
            return len(self._timesteps)
        n = self._context_info.get("num_inference_steps")
        return int(n) if n else self.schedule.steps_per_generation()

    def _phase_for(self, st: GenerationState, t: float) -> Phase:
        probe = self.schedule.probe
        if probe == "ratio":  # calibration: compute everything, measure against the previous residual
            return self._step_phase(Action.STORE, measure=self.span.residual_key in st.cache)
        if probe == "none":
            return super()._phase_for(st, t)
        i = st.counter
        if self._timesteps is not None and (i >= len(self._timesteps) or abs(self._timesteps[i] - t) > 1e-6):
            raise InputError(f"call {i} of this generation has timestep {t:g} but {type(self.schedule).__name__} "
                             f"was planned for {len(self._timesteps)} steps ({self._timesteps[:3]}...); call "
                             f"opt.plan(timesteps) with the sampler's timesteps")
        if i == 0:
            self._policies[self._context] = self.schedule.policy(self._num_steps())
        policy = self._policies[self._context]
        ready = self.site.reference_key in st.cache and all(k in st.cache for k in self.regions[0].cache_keys)
        if policy.forced(i) or not ready:
            return self._step_phase(Action.STORE)
        probe_phase = StepCachePhase(probe=probe, measure=True, part="probe")
        pg = self.phase_graph(probe_phase)
        runner = self._runners.get(probe_phase)
        if runner is None:
            runner = self._runners[probe_phase] = self._make_runner(pg, self.backend)
        flat = self.captured.flatten_call(self._call)
        with torch.no_grad():
            outs = runner(*flat, *(st.cache.get(k) for k in pg.cache_inputs))
        for key, value in zip(pg.cache_outputs, outs):
            st.cache.put(key, value)
        value = st.cache.get(self.site.stats_key).item()  # the one host read of this call
        self.metric_reads += 1
        reuse = policy.decide(i, float(value))
        return self._step_phase(Action.REUSE if reuse else Action.STORE, "rest")

    def _after_call(self, st: GenerationState) -> None:
        """Keep what the next call compares with; free what only this call needed."""
        cache = st.cache
        site = self.site
        if site is not None and site.value_key in cache:
            computed = not st.trace or st.trace[-1][1].action(self.span.path) != Action.REUSE
            if self.schedule.reference == "previous" or computed:
                cache.put(site.reference_key, cache.get(site.value_key))
            cache.drop(site.value_key)
        if self.schedule.probe == "ratio" and st.counter == 1:
            self._ratios[self._context] = []  # a new generation: its first call has nothing to compare with
        if site is not None and site.stats_key in cache:
            if self.schedule.probe == "ratio":  # kept on the device: read once, by calibration()
                self._ratios[self._context].append(cache.get(site.stats_key))
            cache.drop(site.stats_key)
        for key in cache.keys():
            if key.startswith(_BOUNDARY):
                cache.drop(key)

    # --- results ---------------------------------------------------------------------------------
    def decisions(self, context: str | None = None) -> str:
        """``"C"`` (blocks computed) or ``"R"`` (reused) per call of the context's last generation."""
        return "".join("R" if ph.action(self.span.path) == Action.REUSE else "C" for _, ph in self.state(context).trace)

    def records(self, context: str | None = None) -> list[StepRecord]:
        """Each decided call of the context's last generation: the statistic read and the decision."""
        policy = self._policies.get(context or self._context)
        return list(policy.records) if policy is not None else []

    def calibration(self, context: str | None = None) -> list[float]:
        """MagCache's magnitude ratios of the context's last calibrating generation, one per call (1.0 for the
        first, which has nothing to compare with), read with one host transfer."""
        ratios = self._ratios.get(context or self._context, [])
        return [1.0] + (torch.stack(ratios).tolist() if ratios else [])

    def freeze(self, context: str | None = None):
        """The context's last decisions as the technique's static form (see its ``freeze``)."""
        return self.schedule.freeze(self.decisions(context))
