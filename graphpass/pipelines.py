"""graphpass in a diffusers pipeline: one line, or one call that also plans every generation.

The one line is ``pipe.transformer = graphpass.optimize(pipe.transformer, schedule)``: the transformer is
optimized on its first call and shows the pipeline the face it expects (``config``, ``dtype``, ``device``,
``cache_context``, ``save_pretrained``). Phases are then chosen step by step from each call's timestep (and,
for schedules whose windows are fractions of the trajectory, from what the pipeline passes to
``cache_context``).

:func:`optimize_pipeline` does the same for every transformer of the pipeline (``transformer`` and, in
two-expert pipelines such as Wan 2.2, ``transformer_2``) and connects to the pipeline's scheduler: each
``scheduler.set_timesteps`` (called by the pipeline when a generation starts) plans the generation from the
timesteps the pipeline will actually use, split between the experts as the pipeline splits them. Progress
windows (``PAB(..., window_unit="progress")``) then mean the same fraction of sampling on every sampler.

    >>> pipe = graphpass.optimize_pipeline(pipe, graphpass.PAB.preset("wan"))
    >>> latents = pipe(prompt_embeds=e, negative_prompt_embeds=n, num_inference_steps=30, output_type="latent")
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import torch

from .api import optimize
from .errors import InputError
from .runtime.facade import ModelFacade
from .schedules.base import Schedule

#: Pipeline components graphpass optimizes when present.
TRANSFORMERS = ("transformer", "transformer_2")
_CONNECTED = "_graphpass_set_timesteps"


def optimize_pipeline(pipe: Any, schedule: Schedule | str, *, components: Sequence[str] = TRANSFORMERS,
                      **options) -> Any:
    """Optimize the pipeline's transformers for ``schedule`` and plan each generation from its scheduler.

    Args:
        pipe: a diffusers pipeline (anything with the ``components`` attributes and a ``scheduler``).
        schedule: as for :func:`graphpass.optimize`.
        components: the attributes holding transformers; absent or ``None`` ones are skipped.
        options: passed to :func:`graphpass.optimize` (``backend=``, ``kinds=``, ``dynamic=``,
            ``parallel=``...); no ``example_kwargs``: each transformer is captured on its first call. With
            ``parallel=graphpass.SequenceParallel()`` run the pipeline on every rank with the same arguments
            (the same ``generator`` seed or ``latents``): each transformer call is split over the ranks and
            returns whole outputs, so the pipeline's own code runs unchanged on every rank.

    >>> # torchrun --nproc_per_node 2 generate.py
    >>> dist.init_process_group("gloo")
    >>> pipe = graphpass.optimize_pipeline(pipe, graphpass.PAB(joint=2), parallel=graphpass.SequenceParallel())
    >>> latents = pipe(prompt_embeds=e, generator=torch.Generator().manual_seed(0), output_type="latent")

    Returns ``pipe``, modified in place.
    """
    if "example_kwargs" in options:
        raise InputError("optimize_pipeline captures each transformer on its first call; drop example_kwargs (or "
                         "use graphpass.optimize on the transformer directly)")
    found = []
    for name in components:
        module = getattr(pipe, name, None)
        if module is None:
            continue
        if isinstance(module, ModelFacade):
            raise InputError(f"pipe.{name} is already optimized by graphpass; optimize the original model once")
        if not isinstance(module, torch.nn.Module):
            raise InputError(f"pipe.{name} is a {type(module).__name__}, not a torch.nn.Module")
        setattr(pipe, name, optimize(module, schedule, **options))
        found.append(name)
    if not found:
        raise InputError(f"the pipeline has none of the components {list(components)}; pass components=[...] naming "
                         f"the attribute that holds its transformer")
    _connect_scheduler(pipe, found)
    return pipe


def _connect_scheduler(pipe: Any, names: list[str]) -> None:
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None:
        raise InputError("the pipeline has no scheduler to plan generations from; use graphpass.optimize on the "
                         "transformer and call .plan(timesteps) yourself")
    if _CONNECTED in scheduler.__dict__:
        return
    original = scheduler.set_timesteps

    @functools.wraps(original)  # pipelines inspect its signature (timesteps=, sigmas=)
    def set_timesteps(*args, **kwargs):
        result = original(*args, **kwargs)
        plan_generation(pipe, scheduler.timesteps, names)
        return result

    scheduler.__dict__[_CONNECTED] = original
    scheduler.set_timesteps = set_timesteps


def expert_steps(pipe: Any, timesteps: list[float], names: list[str]) -> dict[str, list[int]]:
    """Which steps of the trajectory each transformer runs. Two-expert pipelines (Wan 2.2) give
    ``transformer`` the steps with ``t >= boundary_ratio * num_train_timesteps`` and ``transformer_2`` the
    rest; otherwise the one transformer runs them all.

    >>> expert_steps(pipe, [999.0, 900.0, 700.0, 400.0], ["transformer", "transformer_2"])  # boundary 875
    {'transformer': [0, 1], 'transformer_2': [2, 3]}
    """
    config = getattr(pipe, "config", {}) or {}
    ratio = config.get("boundary_ratio") if isinstance(config, dict) else None
    if ratio is None or "transformer_2" not in names:
        return {names[0]: list(range(len(timesteps)))}
    boundary = ratio * pipe.scheduler.config.num_train_timesteps
    high = [i for i, t in enumerate(timesteps) if t >= boundary]
    low = [i for i, t in enumerate(timesteps) if t < boundary]
    return {"transformer": high, "transformer_2": low}


def plan_generation(pipe: Any, timesteps: torch.Tensor | Sequence[float], names: Sequence[str] = TRANSFORMERS) -> None:
    """Plan the next generation of every optimized transformer of ``pipe`` over ``timesteps`` (what its
    scheduler's ``set_timesteps`` produced) and start it afresh."""
    ts = [float(t) for t in (timesteps.detach().cpu().flatten().tolist() if isinstance(timesteps, torch.Tensor)
                             else timesteps)]
    present = [n for n in names if getattr(pipe, n, None) is not None]
    for name, steps in expert_steps(pipe, ts, present).items():
        opt = getattr(pipe, name)
        opt.reset()
        if steps:
            opt.plan([ts[i] for i in steps], step_indices=steps, num_steps=len(ts))
