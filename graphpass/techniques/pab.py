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
from ..schedules.base import Phase
from ..schedules.pab import PAB
from .base import StaticPlan, Target, Technique, tagged_regions
from .registry import register


def specialize_attention(captured: CapturedGraph, target: Target, phase: Phase) -> PhaseGraph:
    """One PAB phase graph; collectives in the graph (sequence parallelism) that only reused regions needed
    go too."""
    return specialize_phase(captured, target.regions, phase, passes=(elide_collectives,))


PAB_TECHNIQUE = register(Technique(
    name="PAB", schedules=(PAB,), target=tagged_regions, specialize=specialize_attention,
    policy=lambda schedule, target, captured: StaticPlan(schedule, target), parallel=True))
