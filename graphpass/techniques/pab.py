"""PAB (Pyramid Attention Broadcast): reuse attention outputs of the tagged regions over steps.

Acts on the tagged attention regions; a phase graph replaces each reused region by a cache input
(:func:`~graphpass.passes.specialize.specialize_phase`), and collectives that only reused regions needed go
too (sequence parallelism); the plan is static, so every phase exports.

>>> technique_for(graphpass.PAB.preset("pab246")) is PAB_TECHNIQUE
True
"""
from __future__ import annotations

from ..passes.capture import CapturedGraph
from ..passes.elide import elide_collectives
from ..passes.specialize import PhaseGraph, specialize_phase
from ..schedules.base import Phase, Schedule
from ..schedules.pab import PAB
from .base import Target, Technique, static_plan, tagged_regions
from .registry import register


def specialize_attention(captured: CapturedGraph, target: Target, phase: Phase) -> PhaseGraph:
    """One PAB phase graph; collectives in the graph (sequence parallelism) that only reused regions needed
    go too."""
    return specialize_phase(captured, target.regions, phase, passes=(elide_collectives,))


def attention_technique(name: str, *schedules: type[Schedule]) -> Technique:
    """A technique whose schedules statically plan what each tagged attention region does (PAB, and the
    evaluation's schedules that compute or store every region). Sequence parallelism drives it.

    >>> register(attention_technique("RecordAll", RecordAll)).schedules
    (<class 'graphpass.eval.analyze.RecordAll'>,)
    """
    return Technique(name=name, schedules=schedules, target=tagged_regions, specialize=specialize_attention,
                     policy=static_plan, parallel=True)


PAB_TECHNIQUE = register(attention_technique("PAB", PAB))
