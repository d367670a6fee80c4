"""What residual-caching techniques share: the chain of transformer blocks as their target, and its phase
graphs.

A reuse step skips every block and adds the blocks' cached residual (``cache_unit="residual"``), or reads
the cached attention/MLP outputs and re-applies the current step's gates (``"outputs"``); see
:mod:`graphpass.passes.residuals`. A technique deciding from a measured value puts a
:class:`~graphpass.passes.residuals.MetricSite` on its target; its phases are then
:class:`~graphpass.schedules.adacache.ResidualPhase` with a metric mode.

>>> target = span_target(captured, tagged, unit="residual")
>>> target.regions == [target.span.region]
True
"""
from __future__ import annotations

from dataclasses import dataclass

from ..passes.capture import CapturedGraph
from ..passes.elide import elide_collectives
from ..passes.residuals import find_block_span, specialize_residual_phase
from ..passes.specialize import PhaseGraph
from ..passes.tag import Region
from ..schedules.adacache import ResidualPhase
from ..schedules.base import Action, Phase
from .base import Target


@dataclass
class SpanTarget(Target):
    """A :class:`~graphpass.techniques.base.Target` that is the chain of blocks.

    cache_unit: what a reuse step adds (``"residual"`` or ``"outputs"``).
    strides: frame strides of MoReg's motion score measured with the metric (empty: no motion score).
    """

    cache_unit: str = "residual"
    strides: tuple[int, ...] = ()


def span_target(captured: CapturedGraph, regions: list[Region], unit: str = "residual") -> SpanTarget:
    """The chain of blocks of ``captured`` (found from its tagged ``regions``), as the one region a residual
    technique's phases name."""
    span = find_block_span(captured, regions)
    return SpanTarget(regions=[span.as_region(unit)], attention_regions=list(regions), span=span, cache_unit=unit)


def specialize_span(captured: CapturedGraph, target: SpanTarget, phase: Phase) -> PhaseGraph:
    """One residual phase graph of a :class:`SpanTarget` (its metric site and strides measured when the
    phase says so); collectives in the graph (sequence parallelism) that only skipped blocks needed go too."""
    return specialize_residual_phase(captured, target.span, phase, target.metric, target.strides, target.cache_unit,
                                     passes=(elide_collectives,))


def span_phase(target: Target, action: Action, metric: str = "none") -> ResidualPhase:
    """The phase where the span does ``action`` and the metric site ``metric`` (``"none"``, ``"store"``,
    ``"measure"``)."""
    return ResidualPhase(Phase.of({target.span.path: action}).actions, metric)
