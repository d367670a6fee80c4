"""graphpass: compile video diffusion transformers into per-phase cache-or-compute graphs.

Public API::

    import graphpass
    opt = graphpass.optimize(transformer, graphpass.PAB(spatial=2, temporal=4, cross=6, window=(100, 800)),
                             example_kwargs=dict(hidden_states=x, timestep=t, encoder_hidden_states=c))
    out = opt(hidden_states=x, timestep=t, encoder_hidden_states=c)   # same call and outputs as transformer
    print(opt.inspect())

* :func:`optimize` -> :class:`OptimizedModel` (an ``nn.Module``; ``plan``, ``cache_context``, ``reset``, ``inspect``)
* schedules: :class:`PAB` (``PAB.preset("latte")``, ``"pab246"``...), :func:`schedule_from_json`
* errors: :class:`GraphpassError` and subclasses in :mod:`graphpass.errors`
"""
from .api import optimize
from .errors import ArtefactError, CaptureError, GraphpassError, InputError, ScheduleError, TaggingError
from .runtime.cache import CacheStore
from .runtime.executor import OptimizedModel
from .schedules import PAB, Action, Phase, Plan, Schedule, schedule_from_json

__version__ = "0.1.0"

__all__ = ["optimize", "OptimizedModel", "CacheStore", "PAB", "Schedule", "Phase", "Plan", "Action",
           "schedule_from_json", "GraphpassError", "CaptureError", "TaggingError", "ScheduleError", "InputError",
           "ArtefactError", "__version__"]
