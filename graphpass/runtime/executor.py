"""OptimizedModel: runs the phase graph that the plan names for each call, with a CacheStore per context."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..errors import InputError
from ..passes.capture import CapturedGraph
from ..passes.elide import elide_collectives
from ..passes.specialise import PhaseGraph, specialise_phase
from ..passes.tag import Region
from ..schedules.base import Action, Phase, Plan, Schedule
from .cache import CacheStore


@dataclass
class GenerationState:
    """Per cache context: the call counter of the current generation, its last timestep and its cache."""

    counter: int = 0
    last_t: float | None = None
    shapes: tuple | None = None  # input shapes of the generation (a dynamic capture serves several)
    cache: CacheStore = field(default_factory=CacheStore)
    trace: list[tuple[float, Phase]] = field(default_factory=list)

    def reset(self) -> None:
        self.counter = 0
        self.last_t = None
        self.shapes = None
        self.cache.clear()
        self.trace = []


class OptimizedModel(torch.nn.Module):
    """Drop-in replacement for the optimised model: same keyword call, same outputs.

    Each call reads its timestep, advances the generation counter, picks the phase (from the plan when one
    was made with :meth:`plan`, else step by step from the schedule), runs that phase's graph with the
    cached tensors it needs, stores what later steps read and frees what they do not.
    A call whose timestep is above the previous one, or whose input shapes differ from the previous call's
    (a capture made with ``dynamic=True`` serves other frame counts and resolutions), starts a new
    generation (counter 0, empty cache).
    """

    #: Set when the model runs split over ranks (:mod:`graphpass.runtime.parallel`); decisions taken from
    #: measured values must go through ``self.parallel.reduce_metric(value)`` so that all ranks agree.
    parallel = None

    def __init__(self, model: torch.nn.Module, captured: CapturedGraph, regions: list[Region], schedule: Schedule,
                 *, timestep_arg: str = "timestep", backend: str = "eager"):
        super().__init__()
        from ..exporters.backends import make_runner  # backends come after the passes

        self.model = model  # keeps the shared parameters registered on this module
        self.config = getattr(model, "config", None)  # pipelines and samplers read the model's config
        self.captured = captured
        self.regions = regions
        self.schedule = schedule
        self.timestep_arg = timestep_arg
        self.backend = backend
        self._make_runner: Callable[[PhaseGraph, str], Callable] = make_runner
        self._phase_graphs: dict[Phase, PhaseGraph] = {}
        self._runners: dict[Phase, Callable] = {}
        self._contexts: dict[str, GenerationState] = {}
        self._context = "default"
        self._plan: Plan | None = None
        self._on_plan = False  # whether the current call follows the plan
        self._keys_by_region = {r.path: r.cache_keys for r in regions}
        self.phase_calls: dict[Phase, int] = {}

    # --- public ----------------------------------------------------------------------------------
    def plan(self, timesteps: Sequence[float] | torch.Tensor) -> Plan:
        """Fix the plan for generations over ``timesteps`` (the sampler's, in call order) and build the
        graphs of its phases. Calls whose timesteps follow it use it; others fall back to step-by-step."""
        if isinstance(timesteps, torch.Tensor):
            timesteps = timesteps.detach().cpu().flatten().tolist()
        self._plan = self.schedule.plan(self.regions, list(timesteps))
        for ph in self._plan.distinct():
            self.phase_graph(ph)
        return self._plan

    @property
    def current_plan(self) -> Plan | None:
        return self._plan

    def phase_graph(self, phase: Phase) -> PhaseGraph:
        if phase not in self._phase_graphs:
            # Collectives in the graph (sequence parallelism) that only reused regions needed go too.
            self._phase_graphs[phase] = specialise_phase(self.captured, self.regions, phase,
                                                         passes=(elide_collectives,))
        return self._phase_graphs[phase]

    @contextlib.contextmanager
    def cache_context(self, name: str):
        """Route calls to a separate cache and counter, e.g. for separate cond/uncond calls::

            with opt.cache_context("uncond"):
                eps_u = opt(hidden_states=x, timestep=t, encoder_hidden_states=null)
        """
        prev, self._context = self._context, name
        try:
            yield self._state()
        finally:
            self._context = prev

    def reset(self) -> None:
        """Forget every context's generation: counters to 0, caches freed."""
        for st in self._contexts.values():
            st.reset()

    def state(self, context: str | None = None) -> GenerationState:
        return self._contexts.setdefault(context or self._context, GenerationState())

    @property
    def cache_nbytes(self) -> int:
        return sum(st.cache.nbytes for st in self._contexts.values())

    # --- call ------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs) -> Any:
        if args:
            raise InputError(f"call the optimised model with keyword arguments only (got {len(args)} positional); "
                             f"the capture's inputs are {self.captured.input_names}")
        t = self._timestep(kwargs)  # first: a missing timestep gets the message that explains why it is needed
        flat = self.captured.flatten_call(kwargs)
        st = self._state()
        shapes = tuple(tuple(v.shape) for v in flat)
        if st.last_t is not None and (t > st.last_t or shapes != st.shapes):
            st.reset()  # timestep went back up, or the video size changed: a new generation
        st.shapes = shapes
        self._on_plan = False  # _phase_for sets it when this call follows the plan
        phase = self._phase_for(st, t)
        pg = self.phase_graph(phase)
        runner = self._runners.get(phase)
        if runner is None:
            runner = self._runners[phase] = self._make_runner(pg, self.backend)
        with torch.no_grad():  # inference only: cached tensors must not hold autograd graphs
            outs = runner(*flat, *(st.cache.get(k) for k in pg.cache_inputs))
        n = pg.num_user_outputs
        for key, value in zip(pg.cache_outputs, outs[n:]):
            st.cache.put(key, value)
        # Free what no later step reads: regions computed without storing, and, on the plan, regions reused
        # for the last time (the next step computes or re-stores them).
        nxt = None
        if self._on_plan and st.counter + 1 < len(self._plan):
            nxt = self._plan.phases[st.counter + 1]
        for r in self.regions:
            a = phase.action(r.path)
            if a == Action.COMPUTE or (a == Action.REUSE and self._on_plan
                                       and (nxt is None or nxt.action(r.path) != Action.REUSE)):
                for key in r.cache_keys:
                    st.cache.drop(key)
        st.trace.append((t, phase))
        st.counter += 1
        st.last_t = t
        self.phase_calls[phase] = self.phase_calls.get(phase, 0) + 1
        return self.captured.unflatten_outputs(outs[:n])

    def _state(self) -> GenerationState:
        return self.state(self._context)

    def _timestep(self, kwargs) -> float:
        if self.timestep_arg not in kwargs or kwargs[self.timestep_arg] is None:
            raise InputError(f"missing timestep: graphpass reads argument {self.timestep_arg!r} of every call to "
                             f"pick the schedule phase; pass it (or set timestep_arg= in graphpass.optimize)")
        t = kwargs[self.timestep_arg]
        t = t.detach().flatten() if isinstance(t, torch.Tensor) else torch.tensor([float(t)])
        if t.numel() == 0:
            raise InputError(f"timestep argument {self.timestep_arg!r} is empty")
        lo, hi = float(t.min()), float(t.max())
        if lo != hi:
            raise InputError(f"timestep holds different values in one call ({lo:g}..{hi:g}); graphpass steps all "
                             f"samples of a call together: pass one timestep for the whole batch")
        return hi

    def _phase_for(self, st: GenerationState, t: float) -> Phase:
        plan = self._plan
        if plan is not None and st.counter < len(plan) and abs(plan.timesteps[st.counter] - t) < 1e-6:
            # The plan was made for this generation; its stores guarantee every reuse finds its tensors.
            self._on_plan = True
            return plan.phases[st.counter]
        cached = {p for p, keys in self._keys_by_region.items() if all(k in st.cache for k in keys)}
        return self.schedule.step_phase(self.regions, t, st.counter, cached)

    # --- inspection ------------------------------------------------------------------------------
    def inspect(self, folder: str | None = None, timesteps: Sequence[float] | None = None) -> str:
        """A report of the regions, the phases and the per-step plan; with ``folder``, also write each
        phase graph as readable code (``.py``) and Graphviz DOT (``.dot``)."""
        from ..inspection import report

        return report(self, folder=folder, timesteps=timesteps)

    def __repr__(self) -> str:
        return (f"OptimizedModel({self.captured.model_type}, {self.schedule}, regions={len(self.regions)}, "
                f"backend={self.backend!r})")
