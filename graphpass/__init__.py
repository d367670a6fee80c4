"""graphpass: compile video diffusion transformers into per-phase cache-or-compute graphs.

Public API::

    import graphpass
    opt = graphpass.optimize(transformer, graphpass.PAB(spatial=2, temporal=4, cross=6, window=(100, 800)),
                             example_kwargs=dict(hidden_states=x, timestep=t, encoder_hidden_states=c))
    out = opt(hidden_states=x, timestep=t, encoder_hidden_states=c)   # same call and outputs as transformer
    print(opt.inspect())

* :func:`optimize` -> :class:`OptimizedModel` (an ``nn.Module``; ``plan``, ``cache_context``, ``reset``, ``inspect``);
  ``dynamic=True`` keeps frames/height/width free where the model allows; without ``example_kwargs`` the model
  is optimized on its first call (``pipe.transformer = graphpass.optimize(pipe.transformer, schedule)``)
* :func:`optimize_pipeline` optimizes a diffusers pipeline's transformers and plans every generation from its
  scheduler
* schedules: :class:`PAB` (``PAB.preset("latte")``, ``"pab246"``...), :func:`schedule_from_json`
* step caches: :class:`AdaCache` (``AdaCache.preset("slow")``, with :class:`MoReg`), :class:`FrozenAdaCache` (a run's decisions replayed)
* whole-chain step caches: :class:`FirstBlockCache`, :class:`MagCache` (``MagCache.preset("hunyuanvideo-720p")``),
  :class:`TeaCache` (``TeaCache.preset("hunyuanvideo")``); frozen forms :class:`FrozenFirstBlockCache`,
  :class:`FrozenMagCache` (TeaCache freezes to :class:`FrozenAdaCache`)
* techniques: :class:`TaylorSeer` (diffusers' TaylorSeerCacheConfig, compiled), :class:`EasyCache` and :class:`FrozenEasyCache`
* sequence parallelism: ``optimize(..., parallel=SequenceParallel())`` splits frames over torch.distributed ranks (DSP)
* deployment: :func:`export` (per-phase ONNX files or TensorRT engines + manifest) and :func:`load`
* errors: :class:`GraphpassError` and subclasses in :mod:`graphpass.errors`
"""
from .api import optimize
from .pipelines import optimize_pipeline
from .errors import (ArtefactError, CaptureError, GraphpassError, InputError, ParallelError, ScheduleError, TaggingError,
                     UnloweredOpError)
from .exporters import export, load
from .runtime.cache import CacheStore
from .runtime.executor import OptimizedModel
from .runtime.parallel import SequenceParallel
from .schedules import PAB, Action, Phase, Plan, Schedule, schedule_from_json
from .schedules.adacache import AdaCache, FrozenAdaCache, MoReg
from .techniques.first_block_cache import FirstBlockCache, FrozenFirstBlockCache
from .techniques.magcache import FrozenMagCache, MagCache
from .techniques.teacache import TeaCache
from .techniques.easycache import EasyCache, FrozenEasyCache
from .techniques.taylorseer import TaylorSeer
from .version import __version__

__all__ = [
    "optimize", "optimize_pipeline", "OptimizedModel", "CacheStore",
    "PAB", "AdaCache", "MoReg", "FrozenAdaCache", "FirstBlockCache", "FrozenFirstBlockCache",
    "MagCache", "FrozenMagCache", "TeaCache", "TaylorSeer", "EasyCache",
    "FrozenEasyCache", "Schedule", "Phase", "Plan", "Action", "schedule_from_json",
    "SequenceParallel", "export", "load",
    "GraphpassError", "CaptureError", "TaggingError", "ScheduleError", "InputError", "ArtefactError",
    "UnloweredOpError", "ParallelError",
    "__version__",
]
