"""ResidualModel: the optimized model of a residual-caching schedule (AdaCache, FrozenAdaCache).

The runtime core drives every technique alike (:class:`~graphpass.runtime.executor.OptimizedModel`); what
residual caching does lives in :mod:`graphpass.techniques.adacache` (its target, the chain of blocks; its
phase graphs; AdaCache's step policy, one host read per measuring step). This class builds such a model
from a capture and refuses a schedule whose technique does not cache the chain of blocks.

>>> opt = ResidualModel(model, captured, tagged_regions, graphpass.FrozenAdaCache("CCRCR"))
>>> opt.regions == [opt.span.region], opt.decisions()
(True, '')
"""
from __future__ import annotations

import torch

from ..errors import ScheduleError
from ..passes.capture import CapturedGraph
from ..passes.tag import Region
from ..schedules.base import Schedule
from .executor import OptimizedModel


class ResidualModel(OptimizedModel):
    """An :class:`~graphpass.runtime.executor.OptimizedModel` for a residual-caching schedule (``span``,
    ``metric``, ``decisions()``, ``records()``, ``metric_reads``, ``freeze()`` are the optimized model's)."""

    def __init__(self, model: torch.nn.Module, captured: CapturedGraph, regions: list[Region], schedule: Schedule,
                 *, timestep_arg: str = "timestep", backend: str = "eager", timestep_order: str = "falling"):
        super().__init__(model, captured, regions, schedule, timestep_arg=timestep_arg, backend=backend,
                         timestep_order=timestep_order)
        if self.span is None:
            raise ScheduleError(f"ResidualModel runs residual-caching schedules (AdaCache, FrozenAdaCache...), not "
                                f"{type(schedule).__name__}, whose technique {self.technique.name} acts on "
                                f"attention regions; use graphpass.optimize(model, schedule), which runs any")
