"""graphpass.optimize: capture -> tag -> check schedule -> the runtime core driving the schedule's technique
(phases are specialized on first use)."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from .errors import InputError
from .passes.capture import capture
from .passes.hoist import Hoisting, per_step_inputs
from .passes.tag import _pick_video_input, include_gates, tag_attention
from .runtime import parallel as sp
from .runtime.backends import BACKENDS
from .runtime.executor import OptimizedModel, check_timestep_order
from .runtime.lazy import LazyOptimizedModel
from .schedules.base import Schedule
from .schedules.pab import PAB
from .techniques import technique_for


def optimize(model: torch.nn.Module, schedule: Schedule | str, *, example_kwargs: dict[str, Any] | None = None,
             timestep_arg: str = "timestep", video_input: str | None = None, kinds: dict[str, str] | None = None,
             backend: str = "eager", timesteps: Sequence[float] | None = None,
             reuse_gated: bool = False, parallel: sp.SequenceParallel | None = None,
             dynamic: bool = False, timestep_order: str = "falling", hoist: bool = True,
             step_inputs: Sequence[str] = ()) -> OptimizedModel | LazyOptimizedModel:
    """Compile ``model`` for ``schedule``.

    Args:
        model: the DiT (an ``nn.Module`` called with keyword arguments).
        schedule: a :class:`~graphpass.PAB` (or a PAB preset name such as ``"pab246"`` or ``"latte"``).
            Or a residual step cache: :class:`~graphpass.AdaCache`, :class:`~graphpass.FrozenAdaCache`. Any
            schedule whose type has a registered technique (:func:`graphpass.techniques.technique_for`).
        example_kwargs: one real call's keyword arguments; tensors become graph inputs (the graphs are
            specialized to their shapes unless ``dynamic``), plain constants such as ``return_dict=False`` are
            bound. Omitted: the model is optimized on its first call, which is the example (a
            :class:`~graphpass.runtime.lazy.LazyOptimizedModel`; what a diffusers pipeline needs:
            ``pipe.transformer = graphpass.optimize(pipe.transformer, schedule)``).
        timestep_arg: the argument holding the timestep, read on every call to pick the phase.
        video_input: the latent video argument (default: the first 5-D floating input).
        kinds: override tagging by module-path glob, e.g. ``{"temporal_transformer_blocks.*.attn1": "temporal"}``.
        backend: ``"eager"`` (FX graphs) or ``"inductor"`` (torch.compile per phase graph).
        timesteps: the sampler's timesteps, if known: builds the plan and all phase graphs up front.
        reuse_gated: cache ``gate * output`` as the Open-Sora/Latte reference code does, reusing a stale gate,
            instead of the raw region output with the current step's gate re-applied (the default: a reused
            output then carries the current step's modulation).
        parallel: a :class:`~graphpass.SequenceParallel` to split the frames over the ranks of a
            ``torch.distributed`` process group (DSP, or Ulysses/ring for joint attention; every rank calls
            ``optimize`` and the model alike). Phases that reuse an attention (PAB) or skip the blocks
            (AdaCache) also skip their collectives. Without ``example_kwargs`` every rank captures at its
            first call (collective: the ranks call in lockstep, as a pipeline run on every rank does). See
            :mod:`graphpass.runtime.parallel`.
        dynamic: keep the frame, height and width dimensions (and a conditioning sequence's length) free
            where the model allows, so one optimized model serves other video sizes; the dimensions the model
            fixes stay static and a call that changes them gets an ``InputError``. Each new shape is checked
            once on fake tensors; FLOPs and cache sizes in ``inspect()`` are those of the example call.
            Exported artefacts are static at the example's shapes. Not with ``parallel``; AdaCache's MoReg
            measures at the example's frame layout only (its plain metric serves any size).
        timestep_order: ``"falling"`` (DDPM/DDIM, flow matching from 1000 down) or ``"rising"`` (samplers
            whose timesteps grow over a generation): a generation starts when the timestep turns back.
        hoist: compute what no step changes (text K/V projections, caption embedding, mask preprocessing,
            rotary tables) once per generation and cache context instead of at every step (lossless; see
            :mod:`graphpass.passes.hoist`). On wherever it saves FLOPs; ``inspect()`` lists the values.
            Not with ``parallel``.
        step_inputs: arguments besides the latent (``video_input``) and the timestep that change from step to
            step (e.g. a guidance tensor a sampler varies), so hoisting treats them as per-step. An argument
            that changes unannounced is still safe: its hoisted values are recomputed.

    Returns an :class:`~graphpass.OptimizedModel` called exactly like ``model`` (with ``example_kwargs``), or
    a :class:`~graphpass.runtime.lazy.LazyOptimizedModel` that becomes one on its first call.
    """
    if backend not in BACKENDS:  # here, not at the first call, which may come after minutes of set-up
        raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} (ONNX Runtime and "
                         f"TensorRT run exported artefacts: graphpass.export(...) then graphpass.load(...))")
    if isinstance(schedule, str):
        schedule = PAB.preset(schedule)
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a graphpass schedule (e.g. graphpass.PAB(...)), got {type(schedule).__name__}")
    check_timestep_order(timestep_order)  # here too: a model optimized on its first call builds later
    if parallel is not None and not isinstance(parallel, sp.SequenceParallel):  # before a first call that may be late
        raise TypeError(f"parallel= takes a graphpass.SequenceParallel, got {type(parallel).__name__}")
    if parallel is not None and dynamic:
        raise InputError("dynamic=True with parallel=: the sequence-parallel graphs split a fixed frame count "
                         "over the ranks; optimize with dynamic=False (the default)")
    if example_kwargs is None:
        # with parallel=, every rank captures at its first call: the ranks call in lockstep, and they check
        # there, collectively, that they captured the same call
        options = dict(timestep_arg=timestep_arg, video_input=video_input, kinds=kinds, backend=backend,
                       timesteps=timesteps, reuse_gated=reuse_gated, dynamic=dynamic, timestep_order=timestep_order,
                       hoist=hoist, step_inputs=step_inputs, parallel=parallel)
        return LazyOptimizedModel(model, lambda kwargs: optimize(model, schedule, example_kwargs=kwargs, **options))
    if timestep_arg not in example_kwargs:
        raise InputError(f"example_kwargs has no {timestep_arg!r}: graphpass reads the timestep of every call to pick "
                         f"the schedule phase; include it or set timestep_arg= to the argument that holds it")
    if not isinstance(example_kwargs[timestep_arg], torch.Tensor):
        # A constant would be bound into the graph: every step would run with the example's timestep.
        raise InputError(f"example_kwargs[{timestep_arg!r}] is {example_kwargs[timestep_arg]!r}, not a tensor: the "
                         f"timestep must be a graph input, e.g. torch.full((batch,), 500.0)")
    technique_for(schedule)  # an unregistered schedule type fails here, before the capture
    session = None
    if parallel is not None:  # collective: the ranks agree on the group and the options before capturing
        session = sp.connect(parallel, schedule)
    try:
        captured = capture(model, example_kwargs, dynamic=dynamic)
        regions = tag_attention(captured, video_input=video_input, kinds=kinds)
        if reuse_gated:
            regions = include_gates(captured, regions)
        schedule.check_model({r.kind for r in regions})
    except Exception as e:
        if session is not None:  # collective: the other ranks learn of it at their next agreement, not wait
            session.agree(e)
        raise
    if session is not None:
        opt = sp.build(model, captured, regions, schedule, session, timestep_arg=timestep_arg, backend=backend,
                       video_input=video_input)
    else:
        opt = OptimizedModel(model, captured, regions, schedule, timestep_arg=timestep_arg, backend=backend,
                             timestep_order=timestep_order)
        if hoist:
            per_step = per_step_inputs(captured, _pick_video_input(captured, video_input), timestep_arg, step_inputs)
            opt.hoisting = Hoisting.of(captured, per_step)
    if timesteps is not None:
        opt.plan(timesteps)
    return opt
