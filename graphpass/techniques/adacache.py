"""AdaCache and FrozenAdaCache: cache the residual of the whole chain of blocks.

:class:`~graphpass.AdaCache` decides each compute step from a distance its phase graph measures
(:class:`AdaCachePolicy`: the statistics, a ``(1 or 2, batch)`` tensor, stay in the cache and the next call
reads them with ONE ``tolist()``; reuse steps read nothing). Its phases depend on the video, so it does not
export: freeze a run's decisions into a :class:`~graphpass.FrozenAdaCache`, a static plan that exports.

>>> opt = graphpass.optimize(model, graphpass.AdaCache.preset("slow"), example_kwargs=kw, timesteps=ts)
>>> _ = sample(opt, labels=labels, num_steps=len(ts))
>>> opt.decisions(), opt.metric_reads          # e.g. ('CCCRCRRCRC...', 12)
"""
from __future__ import annotations

from ..errors import InputError, ScheduleError
from ..passes.capture import CapturedGraph
from ..passes.residuals import find_metric_site
from ..passes.tag import Region, _pick_video_input
from ..schedules.adacache import AdaCache, AdaptiveDecider, FrozenAdaCache, StepRecord
from ..schedules.base import Action, Phase, Plan, Schedule
from .base import Decision, Export, StepCall, StepPolicy, Technique, static_plan
from .registry import register
from .residual import SpanTarget, span_phase, span_target, specialize_span


def adacache_target(captured: CapturedGraph, regions: list[Region], schedule: AdaCache) -> SpanTarget:
    """The chain of blocks, and where AdaCache measures (``schedule.metric_at``) with MoReg's strides."""
    target = span_target(captured, regions, schedule.cache_unit)
    video = captured.input_specs[captured.input_names.index(_pick_video_input(captured, None))].shape[0]
    temporal = sorted({r.attention_shape[-2] for r in regions if r.kind == "temporal" and r.attention_shape})
    target.metric = find_metric_site(captured, target.span, regions, schedule.metric_at, video_batch=video,
                                     frames=temporal[0] if len(temporal) == 1 else None)
    if schedule.moreg is not None:
        if target.metric.frame_layout is None:
            raise ScheduleError(f"MoReg needs the frame axis of the metric residual {target.metric.path} "
                                f"{target.metric.spec}, found from the frame count of the temporal attention; "
                                f"this model has {'no' if not temporal else 'ambiguous'} temporal "
                                f"attention. Use moreg=None or measure at a residual with a frame axis")
        frames = target.metric.frame_layout[1]
        if max(schedule.moreg.strides) >= frames:
            raise ScheduleError(f"MoReg strides {schedule.moreg.strides} must be below the frame count "
                                f"{frames} of the video")
        target.strides = schedule.moreg.strides
    return target


class AdaCachePolicy(StepPolicy):
    """AdaCache's decisions: an :class:`~graphpass.schedules.adacache.AdaptiveDecider` per cache context,
    fed by the statistics the previous measuring step left in the cache (one host read per measuring step).
    """

    adaptive = True

    def __init__(self, schedule: AdaCache, target: SpanTarget, captured: CapturedGraph):
        super().__init__(schedule, target)
        self.captured_shapes = tuple(sp.shape for sp in captured.input_specs)
        self.timesteps: list[float] | None = None
        self.deciders: dict[str, AdaptiveDecider] = {}

    def plan(self, timesteps: list[float], positions: list[float]) -> Plan:
        """AdaCache's plan before running (every measured distance above every bound); it reads the timesteps
        only."""
        return self.schedule.plan(self.target.regions, timesteps)

    def adopt(self, plan: Plan) -> list[Phase]:
        """Calls must come at ``plan``'s timesteps; every phase a decision may pick is built."""
        self.timesteps = list(plan.timesteps)
        return self.possible_phases(plan)

    def possible_phases(self, plan: Plan) -> list[Phase]:
        return [span_phase(self.target, a, m) for a, m in ((Action.STORE, "store"), (Action.STORE, "measure"),
                                                           (Action.REUSE, "none"), (Action.COMPUTE, "none"))]

    def describe(self) -> str:
        return ("decided at run time, per cache context: a measuring compute step measures the residual's change; "
                "the next call reads it once and the codebook says how many steps reuse")

    def decide(self, call: StepCall) -> Decision:
        if self.target.strides and call.shapes != self.captured_shapes:
            # MoReg splits the residual into frames with the layout found at capture (sizes, not symbols)
            raise InputError(f"MoReg measures motion over the frames of the captured shapes "
                             f"{list(self.captured_shapes)}, not {list(call.shapes)}: optimize for this size, or "
                             f"use AdaCache(moreg=None), whose metric serves any size")
        i, t, ts = call.counter, call.timestep, self.timesteps
        if i == 0:
            self.deciders[call.context] = AdaptiveDecider(self.schedule, self.target.span.path,
                                                          None if ts is None else len(ts))
        dec = self.deciders[call.context]
        if ts is not None and (i >= len(ts) or abs(ts[i] - t) > 1e-6):
            raise InputError(f"call {i} of this generation has timestep {t:g} but AdaCache was planned for "
                             f"{len(ts)} steps ({ts[:3]}...); call opt.plan(timesteps) with the sampler's timesteps")
        m, cache = self.target.metric, call.cache
        if m.stats_key in cache:  # the previous call measured: one host read, then decide
            stats = cache.get(m.stats_key).tolist()
            cache.drop(m.stats_key)
            self.metric_reads += 1
            dec.observe(stats[0], stats[1] if len(stats) > 1 else None)
        if not dec.needs_metric(i):
            cache.drop(m.residual_key)
        phase = dec.phase(i, have_residual=all(k in cache for k in self.target.regions[0].cache_keys),
                          have_metric=m.residual_key in cache)
        dec.begin(i, phase)
        return Decision(phase)

    def records(self, context: str) -> list[StepRecord]:
        dec = self.deciders.get(context)
        return list(dec.records) if dec is not None else []


def _freeze(schedule: Schedule, decisions: str) -> FrozenAdaCache:
    return FrozenAdaCache(decisions, cache_unit=schedule.cache_unit)


ADACACHE = register(Technique(
    name="AdaCache", schedules=(AdaCache,), target=adacache_target, specialize=specialize_span,
    policy=AdaCachePolicy,
    export=Export(refusal="AdaCache decides reuse at run time from measured values, so no fixed set of phases "
                          "exists to export; export its decisions of a run as a static schedule instead: "
                          "graphpass.optimize(model, opt.schedule.freeze(opt.decisions()), ...)",
                  freeze=_freeze),
    parallel=True))

FROZEN_ADACACHE = register(Technique(
    name="FrozenAdaCache", schedules=(FrozenAdaCache,),
    target=lambda captured, regions, schedule: span_target(captured, regions, schedule.cache_unit),
    specialize=specialize_span, policy=static_plan,
    export=Export(freeze=_freeze), parallel=True))
