"""ResidualModel: the core executor running residual-caching schedules (AdaCache, FrozenAdaCache).

It is an :class:`~graphpass.runtime.executor.OptimizedModel` whose only region is the chain of transformer
blocks (:func:`~graphpass.passes.residuals.find_block_span`) and whose phase graphs come from
:func:`~graphpass.passes.residuals.specialize_residual_phase`; calls, cache contexts, the cache store and
plans are the core's. A :class:`~graphpass.FrozenAdaCache` runs exactly like PAB (its plan is static).
For an :class:`~graphpass.AdaCache` each call's phase comes from an :class:`AdaptiveDecider` per cache
context: a measuring compute step leaves its statistics (a ``(1 or 2, batch)`` tensor) in the cache, and the
next call reads them with ONE ``tolist()`` (the only host sync AdaCache adds; reuse steps read nothing) and
picks the next compute step.

>>> opt = graphpass.optimize(model, graphpass.AdaCache.preset("slow"), example_kwargs=kw, timesteps=ts)
>>> _ = sample(opt, labels=labels, num_steps=len(ts))
>>> opt.decisions(), opt.metric_reads          # e.g. ('CCCRCRRCRC...', 12)
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import InputError, ScheduleError
from ..passes.capture import CapturedGraph
from ..passes.residuals import MetricSite, find_block_span, find_metric_site, specialize_residual_phase
from ..passes.specialize import PhaseGraph
from ..passes.tag import Region, _pick_video_input
from ..schedules.adacache import AdaCache, AdaptiveDecider, ResidualPhase, StepRecord
from ..schedules.base import Action, Phase, Plan, Schedule
from .executor import GenerationState, OptimizedModel


class ResidualModel(OptimizedModel):
    """Drop-in replacement running a residual-caching schedule. Besides the core's API:

    * ``span``: the chain of blocks (``span.as_region(cache_unit)`` is the one entry of ``regions``);
      ``attention_regions``: the tagged regions it was found from;
    * ``metric``: where AdaCache measures (None for a frozen schedule);
    * ``decisions(context=None)``: ``"C"``/``"R"`` per call of the last generation;
    * ``records(context=None)``: what each measuring step measured and decided;
    * ``metric_reads``: host reads of metric statistics so far (one per measuring compute step).
    """

    def __init__(self, model: torch.nn.Module, captured: CapturedGraph, regions: list[Region], schedule: Schedule,
                 *, timestep_arg: str = "timestep", backend: str = "eager", timestep_order: str = "falling"):
        span = find_block_span(captured, regions)
        unit = getattr(schedule, "cache_unit", "residual")
        super().__init__(model, captured, [span.as_region(unit)], schedule, timestep_arg=timestep_arg,
                         backend=backend, timestep_order=timestep_order)
        self.cache_unit = unit
        self.span = span
        self.attention_regions = regions
        self.metric: MetricSite | None = None
        self._strides: tuple[int, ...] = ()
        if isinstance(schedule, AdaCache):
            video = captured.input_specs[captured.input_names.index(_pick_video_input(captured, None))].shape[0]
            temporal = sorted({r.attention_shape[-2] for r in regions if r.kind == "temporal" and r.attention_shape})
            self.metric = find_metric_site(captured, span, regions, schedule.metric_at, video_batch=video,
                                           frames=temporal[0] if len(temporal) == 1 else None)
            if schedule.moreg is not None:
                if self.metric.frame_layout is None:
                    raise ScheduleError(f"MoReg needs the frame axis of the metric residual {self.metric.path} "
                                        f"{self.metric.spec}, found from the frame count of the temporal attention; "
                                        f"this model has {'no' if not temporal else 'ambiguous'} temporal "
                                        f"attention. Use moreg=None or measure at a residual with a frame axis")
                frames = self.metric.frame_layout[1]
                if max(schedule.moreg.strides) >= frames:
                    raise ScheduleError(f"MoReg strides {schedule.moreg.strides} must be below the frame count "
                                        f"{frames} of the video")
                self._strides = schedule.moreg.strides
        self._timesteps: list[float] | None = None
        self._deciders: dict[str, AdaptiveDecider] = {}
        self.metric_reads = 0

    @property
    def adaptive(self) -> bool:
        return isinstance(self.schedule, AdaCache)

    # --- core hooks ------------------------------------------------------------------------------
    def phase_graph(self, phase: Phase) -> PhaseGraph:
        if phase not in self._phase_graphs:
            self._phase_graphs[phase] = specialize_residual_phase(self.captured, self.span, phase, self.metric,
                                                                  self._strides, self.cache_unit)
        return self._phase_graphs[phase]

    def plan(self, timesteps: Sequence[float] | torch.Tensor, **kwargs) -> Plan:
        """As :meth:`OptimizedModel.plan`; AdaCache decides from measurements, so it reads only the timesteps
        (``step_indices``/``num_steps`` place a frozen schedule's steps in a longer trajectory)."""
        if not self.adaptive:
            return super().plan(timesteps, **kwargs)
        if isinstance(timesteps, torch.Tensor):
            timesteps = timesteps.detach().cpu().flatten().tolist()
        self._timesteps = [float(t) for t in timesteps]
        self._plan = self.schedule.plan(self.regions, self._timesteps)
        for ph in self._possible_phases():
            self.phase_graph(ph)
        return self._plan

    def _possible_phases(self) -> list[Phase]:
        span = self.span.path
        return [ResidualPhase(Phase.of({span: a}).actions, m) for a, m in
                ((Action.STORE, "store"), (Action.STORE, "measure"), (Action.REUSE, "none"),
                 (Action.COMPUTE, "none"))]

    def _phase_for(self, st: GenerationState, t: float) -> Phase:
        if not self.adaptive:
            return super()._phase_for(st, t)
        if self._strides and st.shapes != tuple(sp.shape for sp in self.captured.input_specs):
            # MoReg splits the residual into frames with the layout found at capture (sizes, not symbols)
            raise InputError(f"MoReg measures motion over the frames of the captured shapes "
                             f"{[sp.shape for sp in self.captured.input_specs]}, not {list(st.shapes)}: optimize for "
                             f"this size, or use AdaCache(moreg=None), whose metric serves any size")
        i = st.counter
        if i == 0:
            self._deciders[self._context] = AdaptiveDecider(self.schedule, self.span.path,
                                                            None if self._timesteps is None else len(self._timesteps))
        dec = self._deciders[self._context]
        if self._timesteps is not None and (i >= len(self._timesteps) or abs(self._timesteps[i] - t) > 1e-6):
            raise InputError(f"call {i} of this generation has timestep {t:g} but AdaCache was planned for "
                             f"{len(self._timesteps)} steps ({self._timesteps[:3]}...); call opt.plan(timesteps) with "
                             f"the sampler's timesteps")
        m = self.metric
        if m.stats_key in st.cache:  # the previous call measured: one host read, then decide
            stats = st.cache.get(m.stats_key).tolist()
            st.cache.drop(m.stats_key)
            self.metric_reads += 1
            dec.observe(stats[0], stats[1] if len(stats) > 1 else None)
        if not dec.needs_metric(i):
            st.cache.drop(m.residual_key)
        phase = dec.phase(i, have_residual=all(k in st.cache for k in self.regions[0].cache_keys),
                          have_metric=m.residual_key in st.cache)
        dec.begin(i, phase)
        return phase

    def with_schedule(self, schedule: Schedule) -> "ResidualModel":
        """A model running another residual schedule on the same capture (no new export), planned for the same
        timesteps."""
        opt = ResidualModel(self.model, self.captured, self.attention_regions, schedule,
                            timestep_arg=self.timestep_arg, backend=self.backend)
        ts = self._timesteps or (self._plan.timesteps if self._plan is not None else None)
        if ts is not None:
            opt.plan(ts)
        return opt

    # --- results ---------------------------------------------------------------------------------
    def decisions(self, context: str | None = None) -> str:
        """``"C"`` (blocks computed) or ``"R"`` (residual reused) per call of the context's last generation."""
        return "".join("R" if ph.action(self.span.path) == Action.REUSE else "C" for _, ph in self.state(context).trace)

    def records(self, context: str | None = None) -> list[StepRecord]:
        """What each measuring step of the context's generation measured and decided (AdaCache only); the
        last measuring step is included once the next call has read it."""
        dec = self._deciders.get(context or self._context)
        return list(dec.records) if dec is not None else []

    def freeze(self, context: str | None = None):
        """The last generation's decisions as a static :class:`~graphpass.FrozenAdaCache`."""
        from ..schedules.adacache import FrozenAdaCache

        return FrozenAdaCache(self.decisions(context), cache_unit=self.cache_unit)

