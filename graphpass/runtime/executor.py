"""OptimizedModel: runs the phase graph that the plan names for each call, with a CacheStore per context."""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..errors import InputError, ScheduleError
from ..passes.capture import CapturedGraph
from ..passes.elide import elide_collectives
from ..passes.specialize import PhaseGraph, specialize_phase
from ..passes.tag import Region
from ..schedules.base import Action, Phase, Plan, Schedule, progress_position
from .cache import CacheStore
from .facade import ModelFacade

TIMESTEP_ORDERS = ("falling", "rising")
def check_timestep_order(order: str) -> None:
    if order not in TIMESTEP_ORDERS:
        raise InputError(f"timestep_order={order!r}: one of {', '.join(TIMESTEP_ORDERS)} (how the sampler's "
                         f"timesteps move over a generation)")


#: Generations of a single call in a row after which the runtime says the timesteps look like they rise.
_SINGLE_CALL_GENERATIONS = 3


@dataclass
class GenerationState:
    """Per cache context: the call counter of the current generation, its last timestep and its cache."""

    counter: int = 0
    last_t: float | None = None
    shapes: tuple | None = None  # input shapes of the generation (a dynamic capture serves several)
    cache: CacheStore = field(default_factory=CacheStore)
    trace: list[tuple[float, Phase]] = field(default_factory=list)
    off_plan: bool = False  # a call of this generation left the plan: the rest goes step by step
    single_call_generations: int = 0  # generations in a row that ended after one call (rising timesteps?)
    warned: set[str] = field(default_factory=set)  # warnings given once per context

    def reset(self) -> None:
        self.counter = 0
        self.last_t = None
        self.shapes = None
        self.off_plan = False
        self.cache.clear()
        self.trace = []


class OptimizedModel(ModelFacade):
    """Drop-in replacement for the optimized model: same keyword call, same outputs, and the model's face
    for the code around it (``config``, ``dtype``, ``device``, ``save_pretrained``: see
    :mod:`graphpass.runtime.facade`).

    Each call reads its timestep, advances the generation counter, picks the phase (from the plan when one
    was made with :meth:`plan`, else step by step from the schedule), runs that phase's graph with the
    cached tensors it needs, stores what later steps read and frees what they do not.
    A call whose timestep is above the previous one (below it with ``timestep_order="rising"``), or whose
    input shapes differ from the previous call's (a new batch size, or with ``dynamic=True`` another frame
    count or resolution), starts a new generation (counter 0, empty cache).

    No silent failure: a second call at the same timestep in one cache context (separate cond/uncond calls
    without ``cache_context``) warns once; a generation that leaves its plan warns once and goes on step by
    step; generations that keep ending after one call (timesteps that rise) warn once.
    """

    #: Set when the model runs split over ranks (:mod:`graphpass.runtime.parallel`); decisions taken from
    #: measured values must go through ``self.parallel.reduce_metric(value)`` so that all ranks agree.
    parallel = None

    def __init__(self, model: torch.nn.Module, captured: CapturedGraph, regions: list[Region], schedule: Schedule,
                 *, timestep_arg: str = "timestep", backend: str = "eager", timestep_order: str = "falling"):
        super().__init__()
        from ..exporters.backends import make_runner  # backends come after the passes

        check_timestep_order(timestep_order)
        self._hold(model)
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
        self._context_info: dict[str, Any] = {}  # cache_context's keyword arguments (step_index...)
        self.timestep_order = timestep_order
        self._plan: Plan | None = None
        self._on_plan = False  # whether the current call follows the plan
        self._keys_by_region = {r.path: r.cache_keys for r in regions}
        self.phase_calls: dict[Phase, int] = {}

    # --- public ----------------------------------------------------------------------------------
    def plan(self, timesteps: Sequence[float] | torch.Tensor, *, step_indices: Sequence[int] | None = None,
             num_steps: int | None = None) -> Plan:
        """Fix the plan for generations over ``timesteps`` (the sampler's, in call order) and build the
        graphs of its phases. Calls whose timesteps follow it use it; a generation that leaves it warns
        and goes on step by step (or raises, for schedules that need the trajectory).

        ``step_indices``/``num_steps``: when this model runs only some steps of a longer trajectory (the
        experts of a two-transformer pipeline), each given timestep's index in it and its length, so that
        progress windows mean the same fraction of sampling for every expert.
        """
        self._plan = self.preview_plan(timesteps, step_indices=step_indices, num_steps=num_steps)
        for ph in self._plan.distinct():
            self.phase_graph(ph)
        return self._plan

    def preview_plan(self, timesteps: Sequence[float] | torch.Tensor, *, step_indices: Sequence[int] | None = None,
                     num_steps: int | None = None) -> Plan:
        """The plan :meth:`plan` would make, without adopting it or building graphs."""
        ts = _timestep_list(timesteps)
        if step_indices is None:
            step_indices, num_steps = list(range(len(ts))), len(ts)
        elif num_steps is None or len(step_indices) != len(ts):
            raise InputError("plan(step_indices=...) needs one index per timestep and num_steps")
        self._check_order(ts)
        positions = ([progress_position(i, num_steps) for i in step_indices] if self.schedule.needs_trajectory
                     else ts)
        return Plan(ts, self.schedule.plan(self.regions, positions).phases)

    def _check_order(self, ts: list[float]) -> None:
        rising = self.timestep_order == "rising"
        bad = next((i for i in range(1, len(ts)) if (ts[i] < ts[i - 1] if rising else ts[i] > ts[i - 1])), None)
        if bad is not None:
            raise InputError(f"plan timesteps {'fall' if rising else 'rise'} at step {bad} ({ts[bad - 1]:g} -> "
                             f"{ts[bad]:g}) but this model expects {self.timestep_order} timesteps (each generation "
                             f"starts when they turn back): pass the sampler's timesteps in call order, or "
                             f"optimize(..., timestep_order={'falling' if rising else 'rising'!r}) for such a sampler")

    @property
    def current_plan(self) -> Plan | None:
        return self._plan

    def phase_graph(self, phase: Phase) -> PhaseGraph:
        if phase not in self._phase_graphs:
            # Collectives in the graph (sequence parallelism) that only reused regions needed go too.
            self._phase_graphs[phase] = specialize_phase(self.captured, self.regions, phase,
                                                         passes=(elide_collectives,))
        return self._phase_graphs[phase]

    @contextlib.contextmanager
    def cache_context(self, name: str, **info):
        """Route calls to a separate cache and counter, e.g. for separate cond/uncond calls::

            with opt.cache_context("uncond"):
                eps_u = opt(hidden_states=x, timestep=t, encoder_hidden_states=null)

        diffusers' protocol: pipelines may say where the loop is (``step_index=``, ``num_inference_steps=``,
        ``sigma=``, ``timestep=``); schedules whose windows are fractions of the trajectory read
        ``step_index`` and ``num_inference_steps`` when no plan was made.
        """
        prev, prev_info = self._context, self._context_info
        self._context, self._context_info = name, dict(info)
        try:
            yield self._state()
        finally:
            self._context, self._context_info = prev, prev_info

    def reset(self) -> None:
        """Forget every context's generation: counters to 0, caches freed."""
        for st in self._contexts.values():
            st.reset()

    def state(self, context: str | None = None) -> GenerationState:
        return self._contexts.setdefault(context or self._context, GenerationState())

    def contexts(self) -> dict[str, GenerationState]:
        """Every cache context used so far, by name."""
        return dict(self._contexts)

    @property
    def cache_nbytes(self) -> int:
        return sum(st.cache.nbytes for st in self._contexts.values())

    # --- call ------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs) -> Any:
        if args:
            raise InputError(f"call the optimized model with keyword arguments only (got {len(args)} positional); "
                             f"the capture's inputs are {self.captured.input_names}")
        t = self._timestep(kwargs)  # first: a missing timestep gets the message that explains why it is needed
        flat = self.captured.flatten_call(kwargs)
        st = self._state()
        shapes = tuple(tuple(v.shape) for v in flat)
        if st.last_t is not None and (self._turned_back(t, st.last_t) or shapes != st.shapes
                                      or self._context_info.get("step_index") == 0):
            self._end_generation(st)  # timestep went back, the input size changed, or the pipeline says so
        elif st.last_t is not None and t == st.last_t and "repeat" not in st.warned:
            st.warned.add("repeat")
            warnings.warn(
                f"graphpass: two calls at timestep {t:g} in one generation of cache context {self._context!r}: the "
                f"second is taken as the next step and may reuse the first call's attention. Separate cond/uncond "
                f"calls need their own caches: wrap each in `with opt.cache_context('cond'):` / `('uncond')` (or "
                f"batch them in one call); to start a new generation at the same timestep call opt.reset()",
                stacklevel=3)
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

    def _turned_back(self, t: float, last_t: float) -> bool:
        return t < last_t if self.timestep_order == "rising" else t > last_t

    def _end_generation(self, st: GenerationState) -> None:
        st.single_call_generations = st.single_call_generations + 1 if st.counter == 1 else 0
        if st.single_call_generations >= _SINGLE_CALL_GENERATIONS and "order" not in st.warned:
            st.warned.add("order")
            other = "rising" if self.timestep_order == "falling" else "falling"
            warnings.warn(f"graphpass: the last {st.single_call_generations} generations each ended after one call: "
                          f"the timesteps look {other}, so every call starts a new generation and nothing is reused. "
                          f"Pass optimize(..., timestep_order={other!r}) for such a sampler.", stacklevel=3)
        st.reset()

    def _timestep(self, kwargs) -> float:
        if self.timestep_arg not in kwargs or kwargs[self.timestep_arg] is None:
            raise InputError(f"missing timestep: graphpass reads argument {self.timestep_arg!r} of every call to "
                             f"pick the schedule phase; pass it (or set timestep_arg= in graphpass.optimize)")
        t = kwargs[self.timestep_arg]
        t = t.detach() if isinstance(t, torch.Tensor) else torch.tensor([float(t)])
        if t.numel() == 0:
            raise InputError(f"timestep argument {self.timestep_arg!r} is empty")
        if not bool(torch.isfinite(t).all()):
            raise InputError(f"timestep argument {self.timestep_arg!r} holds a non-finite value ({t.flatten()[:4].tolist()}"
                             f"...); pass the sampler's timesteps")
        # One step for the whole call: per-sample timesteps must agree; per-token timesteps (a clean
        # conditioning frame at 0 beside noisy tokens, Wan 2.2 TI2V) step at their noisiest token.
        rows = t.reshape(t.shape[0], -1) if t.dim() > 0 else t.reshape(1, 1)
        if rows.shape[0] > 1 and not bool((rows == rows[:1]).all()):
            lo, hi = float(rows.amax(1).min()), float(rows.amax(1).max())
            raise InputError(f"timestep holds different values in one call, one per sample ({lo:g}..{hi:g}); "
                             f"graphpass steps all samples of a call together: pass one timestep for the whole batch")
        return float(rows[0].max())

    def _phase_for(self, st: GenerationState, t: float) -> Phase:
        plan = self._plan
        if plan is not None and not st.off_plan and st.counter < len(plan) and abs(plan.timesteps[st.counter] - t) < 1e-6:
            # The plan was made for this generation; its stores guarantee every reuse finds its tensors.
            self._on_plan = True
            return plan.phases[st.counter]
        position = self._position(st, t)
        st.off_plan = plan is not None
        if plan is not None and "plan" not in st.warned:
            st.warned.add("plan")
            expected = f"{plan.timesteps[st.counter]:g}" if st.counter < len(plan) else "the end of the plan"
            warnings.warn(f"graphpass: call {st.counter} of this generation (timestep {t:g}) leaves the plan made by "
                          f"opt.plan() for {len(plan)} steps (expected {expected}); going on step by step, which "
                          f"keeps more tensors cached. Call opt.plan() with the sampler's new timesteps.", stacklevel=3)
        cached = {p for p, keys in self._keys_by_region.items() if all(k in st.cache for k in keys)}
        return self.schedule.step_phase(self.regions, position, st.counter, cached)

    def _position(self, st: GenerationState, t: float) -> float:
        """What the schedule's windows read for this call: its timestep, or its position in the trajectory."""
        if not self.schedule.needs_trajectory:
            return t
        info = self._context_info
        if info.get("step_index") is not None and info.get("num_inference_steps"):
            return progress_position(int(info["step_index"]), int(info["num_inference_steps"]))
        raise ScheduleError(f"{self.schedule} places its windows on the sampling trajectory, but call {st.counter} "
                            f"(timestep {t:g}) is not on a plan: call opt.plan(timesteps) with the sampler's "
                            f"timesteps, use graphpass.optimize_pipeline(pipe, schedule) (plans each generation "
                            f"from the pipeline's scheduler), or pass cache_context(name, step_index=i, "
                            f"num_inference_steps=n)")

    # --- inspection ------------------------------------------------------------------------------
    def inspect(self, folder: str | None = None, timesteps: Sequence[float] | None = None) -> str:
        """A report of the regions, the phases and the per-step plan; with ``folder``, also write each
        phase graph as readable code (``.py``) and Graphviz DOT (``.dot``)."""
        from ..inspection import report

        return report(self, folder=folder, timesteps=timesteps)

    def to(self, *args, **kwargs):
        """Move or cast the model. The phase graphs were captured for the model's device and dtype, so a
        change needs a new capture: raise, saying how (a model optimized without ``example_kwargs``
        re-captures by itself on its next call)."""
        before = (self.device, self.dtype)
        self.model.to(*args, **kwargs)
        after = (self.device, self.dtype)
        if after != before:
            self.model.to(*before)
            raise InputError(f"moving an optimized model from {before[0]}/{before[1]} to {after[0]}/{after[1]} "
                             f"needs a new capture: call graphpass.optimize(model.to(...), schedule) again, or "
                             f"optimize without example_kwargs (it re-captures on the next call after .to())")
        return self

    def __repr__(self) -> str:
        return (f"OptimizedModel({self.captured.model_type}, {self.schedule}, regions={len(self.regions)}, "
                f"backend={self.backend!r})")


def _timestep_list(timesteps) -> list[float]:
    if isinstance(timesteps, torch.Tensor):
        timesteps = timesteps.detach().cpu().flatten().tolist()
    ts = [float(t) for t in timesteps]
    if not ts:
        raise InputError("plan() got no timesteps: pass the sampler's timesteps, in call order")
    return ts
