"""The runtime core and the optimized model.

:class:`RuntimeCore` steps a plan and owns the caches: for each call it reads the timestep, advances the
generation of the cache context, asks for the call's phase, runs that phase's :class:`~graphpass.runtime.backends.PhaseRunner` with
the cached tensors it reads, stores what it returns for later steps and frees what no later step reads
(:func:`~graphpass.runtime.cache.frees`). What a phase is and how it runs are its subclasses' business:

* :class:`OptimizedModel`: a capture optimized for a schedule. The schedule's technique
  (:func:`~graphpass.techniques.technique_for`) says what it acts on, specializes each phase graph and
  picks each call's phase (its step policy); the backend makes the runners (:mod:`.backends`).
* :class:`~graphpass.exporters.artefact.ArtefactModel`: an exported folder, whose phases are files run by
  ONNX Runtime sessions or TensorRT engines.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import InputError, ScheduleError
from ..passes.capture import CallSignature, CapturedGraph
from ..passes.hoist import HoistedValues, Hoisting
from ..passes.residuals import BlockSpan, MetricSite
from ..passes.specialize import PhaseGraph
from ..passes.tag import Region
from ..schedules.base import Phase, Plan, Schedule, progress_position
from ..techniques import Decision, Probe, StepCall, Target, technique_for
from .backends import PhaseProgram, PhaseRunner, make_runner
from .cache import CacheStore, frees
from .facade import ModelFacade
from .inspection import report

TIMESTEP_ORDERS = ("falling", "rising")
def check_timestep_order(order: str) -> None:
    if order not in TIMESTEP_ORDERS:
        raise InputError(f"timestep_order={order!r}: one of {', '.join(TIMESTEP_ORDERS)} (how the sampler's "
                         f"timesteps move over a generation)")


#: Timesteps of up to this many values are read to the host as they are (one read, checked in Python); larger
#: ones (per-token timesteps) are reduced on their device first, then read once.
_READ_WHOLE_TIMESTEP = 64
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
    probes: list[tuple[int, Phase]] = field(default_factory=list)  # (call, probe phase) of calls that probed
    off_plan: bool = False  # a call of this generation left the plan: the rest goes step by step
    single_call_generations: int = 0  # generations in a row that ended after one call (rising timesteps?)
    warned: set[str] = field(default_factory=set)  # warnings given once per context
    hoisted: HoistedValues = field(default_factory=HoistedValues)  # step-invariant values of the generation

    def reset(self) -> None:
        self.counter = 0
        self.last_t = None
        self.shapes = None
        self.off_plan = False
        self.cache.clear()
        self.hoisted.clear()
        self.trace = []
        self.probes = []


class RuntimeCore(ModelFacade):
    """Drop-in replacement for the optimized model: same keyword call, same outputs, and the model's face
    for the code around it (``config``, ``dtype``, ``device``, ``save_pretrained``: see
    :mod:`graphpass.runtime.facade`).

    Each call reads its timestep, advances the generation counter, picks the phase (:meth:`_decide`: from
    the plan when one was made with :meth:`plan`, else step by step), runs that phase's runner with the
    cached tensors it needs (or the per-call values the decision feeds in their place:
    :attr:`~graphpass.techniques.Decision.feeds`), stores what later steps read and frees what they do not.
    A call whose timestep is above the previous one (below it with ``timestep_order="rising"``), or whose
    input shapes differ from the previous call's (a new batch size, or with ``dynamic=True`` another frame
    count or resolution), starts a new generation (counter 0, empty cache).

    No silent failure: a second call at the same timestep in one cache context (separate cond/uncond calls
    without ``cache_context``) warns once; a generation that leaves its plan warns once and goes on step by
    step; generations that keep ending after one call (timesteps that rise) warn once.

    Args: ``model``, the wrapped model (None for an exported folder); ``signature``, how it is called;
    ``schedule``; ``cached``, each region path the phases name -> the cache keys of its outputs (what
    :func:`~graphpass.runtime.cache.frees` frees); ``make_runner(program, backend)``, which makes each phase's
    :class:`~graphpass.runtime.backends.PhaseRunner` once. Subclasses give :meth:`phase_graph` (the
    :class:`~graphpass.runtime.backends.PhaseProgram` of a phase), :meth:`_decide` and :meth:`_make_plan`;
    a subclass whose decisions read the call itself also gives :meth:`_complete` (the phase after a probe) and
    :meth:`_finish` (what the next call keeps).
    """

    #: Set when the model runs split over ranks (:mod:`graphpass.runtime.parallel`); decisions taken from
    #: measured values must go through ``self.parallel.reduce_metric(value)`` so that all ranks agree.
    parallel = None

    def __init__(self, model: torch.nn.Module | None, signature: CallSignature, schedule: Schedule,
                 cached: dict[str, list[str]], make_runner: Callable[[Any, str], PhaseRunner], *,
                 timestep_arg: str = "timestep", backend: str = "eager", timestep_order: str = "falling"):
        super().__init__()
        check_timestep_order(timestep_order)
        self._hold(model)
        self.signature = signature
        self.schedule = schedule
        self.timestep_arg = timestep_arg
        self.backend = backend
        self.timestep_order = timestep_order
        self._make_runner = make_runner
        self._keys_by_region = cached  # region path -> the cache keys of its outputs
        self._phase_graphs: dict[Phase, PhaseProgram] = {}
        self._runners: dict[Phase, PhaseRunner] = {}
        self._contexts: dict[str, GenerationState] = {}
        self._context = "default"
        self._context_info: dict[str, Any] = {}  # cache_context's keyword arguments (step_index...)
        self._plan: Plan | None = None
        self.phase_calls: dict[Phase, int] = {}
        #: step-invariant hoisting (:mod:`graphpass.passes.hoist`): set by :func:`graphpass.optimize`
        self.hoisting: Hoisting | None = None

    # --- what subclasses give --------------------------------------------------------------------
    def phase_graph(self, phase: Phase) -> PhaseProgram:
        """The program of ``phase`` (built on first use)."""
        raise NotImplementedError

    def _decide(self, call: StepCall) -> Decision | Probe:
        """The phase of ``call``, or a :class:`~graphpass.techniques.Probe` to run before deciding."""
        raise NotImplementedError

    def _complete(self, call: StepCall) -> Decision:
        """The phase finishing ``call`` after the :class:`~graphpass.techniques.Probe` :meth:`_decide` asked
        for ran."""
        raise NotImplementedError

    def _finish(self, call: StepCall, phase: Phase) -> None:
        """After ``call`` ran ``phase`` and its cache outputs were stored (nothing more by default)."""

    def _make_plan(self, timesteps: list[float], positions: list[float]) -> Plan:
        """The plan over ``timesteps`` (``positions``: what the schedule's windows read at each step)."""
        raise NotImplementedError

    def _adopt(self, plan: Plan) -> list[Phase]:
        """Make ``plan`` the current one; the phases whose programs to build up front."""
        return plan.distinct()

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
        plan = self.preview_plan(timesteps, step_indices=step_indices, num_steps=num_steps)
        self._plan = plan
        for ph in self._adopt(plan):
            self.phase_graph(ph)
        return plan

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
        return self._make_plan(ts, positions)

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

    def decisions(self, context: str | None = None) -> str:
        """Per call of the context's last generation: ``"R"`` when it reused cached tensors, else ``"C"``
        (for residual caching: whether the blocks were skipped)."""
        return "".join("R" if ph.reused else "C" for _, ph in self.state(context).trace)

    # --- call ------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs) -> Any:
        if args:
            raise InputError(f"call the optimized model with keyword arguments only (got {len(args)} positional); "
                             f"the capture's inputs are {self.signature.input_names}")
        t = self._timestep(kwargs)  # first: a missing timestep gets the message that explains why it is needed
        flat = self.signature.flatten_call(kwargs)
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
        call = StepCall(counter=st.counter, timestep=t, context=self._context, shapes=shapes, cache=st.cache,
                        plan=self._plan, off_plan=st.off_plan, position=lambda: self._position(st, t),
                        info=dict(self._context_info), inputs=flat)
        decision = self._decide(call)
        if isinstance(decision, Probe):  # the decision reads part of this call: run it, then ask again
            self._run(decision.phase, flat, st)
            st.probes.append((st.counter, decision.phase))
            decision = self._complete(call)
        if not decision.on_plan:
            st.off_plan = decision.left_plan
            if decision.left_plan and "plan" not in st.warned:
                st.warned.add("plan")
                self._warn_left_plan(st, t)
        phase = decision.phase
        outs = self._run(phase, flat, st, decision.feeds)
        self._free(st, phase, decision)
        if decision.on_plan and st.counter + 1 >= len(self._plan):
            st.hoisted.clear()  # the plan's last step: no later call of this generation reads them
        self._finish(call, phase)
        st.trace.append((t, phase))
        st.counter += 1
        st.last_t = t
        return self.signature.unflatten_outputs(outs)

    def _run(self, phase: Phase, flat: list, st: GenerationState, feeds: Mapping[str, torch.Tensor] = {}) -> list:
        """Run ``phase``'s runner on the call's inputs and the cached tensors it reads (a cache input named in
        ``feeds``, the decision's per-call values, is read from it instead); store its cache outputs; return
        its model outputs (none for a probe)."""
        program = self.phase_graph(phase)
        runner = self._runners.get(phase)
        if runner is None:
            runnable = program if self.hoisting is None else self.hoisting.step_graph(program)
            runner = self._runners[phase] = self._make_runner(runnable, self.backend)
        with torch.no_grad():  # inference only: cached tensors must not hold autograd graphs
            hoisted = () if self.hoisting is None else self.hoisting.inputs(st.hoisted, flat, phase)
            outs = runner(*flat, *(feeds[k] if k in feeds else st.cache.get(k) for k in program.cache_inputs),
                          *hoisted)
        n = program.num_user_outputs
        for key, value in zip(program.cache_outputs, outs[n:]):
            st.cache.put(key, value)
        self.phase_calls[phase] = self.phase_calls.get(phase, 0) + 1
        return list(outs[:n])

    def _free(self, st: GenerationState, phase: Phase, decision: Decision) -> None:
        """Free what no later step reads (:func:`~graphpass.runtime.cache.frees`); on the plan the next step's
        phase is known, off it a reuse keeps its tensors."""
        nxt: Phase | None = None
        if decision.on_plan:
            i = st.counter + 1
            nxt = self._plan.phases[i] if i < len(self._plan) else Phase(())
        for path, keys in self._keys_by_region.items():
            if frees(phase.action(path), None if nxt is None else nxt.action(path)):
                for key in keys:
                    st.cache.drop(key)

    def _warn_left_plan(self, st: GenerationState, t: float) -> None:
        plan = self._plan
        expected = f"{plan.timesteps[st.counter]:g}" if st.counter < len(plan) else "the end of the plan"
        warnings.warn(f"graphpass: call {st.counter} of this generation (timestep {t:g}) leaves the plan made by "
                      f"opt.plan() for {len(plan)} steps (expected {expected}); going on step by step, which "
                      f"keeps more tensors cached. Call opt.plan() with the sampler's new timesteps.", stacklevel=3)

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
        if not isinstance(t, torch.Tensor):
            t = float(t)
            if not math.isfinite(t):
                raise InputError(f"timestep argument {self.timestep_arg!r} is {t}; pass the sampler's timesteps")
            return t
        if t.numel() == 0:
            raise InputError(f"timestep argument {self.timestep_arg!r} is empty")
        # One step for the whole call: per-sample timesteps must agree; per-token timesteps (a clean
        # conditioning frame at 0 beside noisy tokens, Wan 2.2 TI2V) step at their noisiest token. One host
        # read per call: a few values are read as they are, more are reduced on their device first.
        t = t.detach()
        rows = t.reshape(t.shape[0], -1) if t.dim() > 0 else t.reshape(1, 1)
        if t.numel() <= _READ_WHOLE_TIMESTEP:
            values = rows.tolist()
            finite = all(math.isfinite(v) for row in values for v in row)
            same = all(row == values[0] for row in values)
            peaks = [max(row) for row in values]
            lo, hi = min(peaks), max(peaks)
        else:
            top = rows.amax(1).double()
            finite, same, lo, hi = torch.stack([torch.isfinite(t).all().double(), (rows == rows[:1]).all().double(),
                                                top.min(), top.max()]).tolist()
        if not finite:
            raise InputError(f"timestep argument {self.timestep_arg!r} holds a non-finite value "
                             f"({t.flatten()[:4].tolist()}...); pass the sampler's timesteps")
        if not same:
            raise InputError(f"timestep holds different values in one call, one per sample ({lo:g}..{hi:g}); "
                             f"graphpass steps all samples of a call together: pass one timestep for the whole batch")
        return float(lo)  # every row is the same: its noisiest token

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


class OptimizedModel(RuntimeCore):
    """A model optimized for a schedule: the runtime core driving the phase graphs of the schedule's
    technique (:func:`~graphpass.techniques.technique_for`) on a backend.

    ``technique``: the technique; ``target``: what it acts on (``regions`` are the target's: the tagged
    attention regions for PAB, the chain of blocks for residual caching); ``policy``: its step policy.
    Besides the core's API:

    * ``span``: the chain of blocks a residual technique caches (None otherwise); ``attention_regions``: the
      tagged regions the target was found from; ``metric``: where an adaptive technique measures (or None);
    * ``decisions(context=None)``: ``"C"``/``"R"`` per call of the last generation;
    * ``records(context=None)``: what an adaptive policy measured and decided at each measuring step (the
      last one once the next call has read it); ``metric_reads``: host reads of measured values so far;
    * ``freeze(context=None)``: the last generation's decisions as a static, exportable schedule (for
      techniques that declare how, e.g. AdaCache -> :class:`~graphpass.FrozenAdaCache`);
    * ``with_schedule(schedule)``: the same capture run under another schedule.
    """

    def __init__(self, model: torch.nn.Module, captured: CapturedGraph, regions: list[Region], schedule: Schedule,
                 *, timestep_arg: str = "timestep", backend: str = "eager", timestep_order: str = "falling",
                 target: Target | None = None):
        technique = technique_for(schedule)
        # ``target``: found by the caller (sequence parallelism finds a residual technique's chain of blocks on
        # the whole model's graph, where the collectives of the split do not hide it)
        target = target if target is not None else technique.target(captured, regions, schedule)
        super().__init__(model, captured, schedule, {r.path: r.cache_keys for r in target.regions}, make_runner,
                         timestep_arg=timestep_arg, backend=backend, timestep_order=timestep_order)
        self.captured = captured
        self.technique = technique
        self.target = target
        self.regions = target.regions
        self.policy = technique.policy(schedule, target, captured)

    # --- the core's hooks ------------------------------------------------------------------------
    def phase_graph(self, phase: Phase) -> PhaseGraph:
        if phase not in self._phase_graphs:
            self._phase_graphs[phase] = self.technique.specialize(self.captured, self.target, phase)
        return self._phase_graphs[phase]

    def _decide(self, call: StepCall) -> Decision | Probe:
        return self.policy.decide(call)

    def _complete(self, call: StepCall) -> Decision:
        return self.policy.complete(call)

    def _finish(self, call: StepCall, phase: Phase) -> None:
        self.policy.finish(call, phase)

    def _make_plan(self, timesteps: list[float], positions: list[float]) -> Plan:
        return self.policy.plan(timesteps, positions)

    def _adopt(self, plan: Plan) -> list[Phase]:
        return self.policy.adopt(plan)

    # --- what the technique acts on and decided --------------------------------------------------
    @property
    def span(self) -> BlockSpan | None:
        return self.target.span

    @property
    def metric(self) -> MetricSite | None:
        return self.target.metric

    @property
    def attention_regions(self) -> list[Region]:
        return self.target.attention_regions

    @property
    def adaptive(self) -> bool:
        """Whether phases are decided at run time from measured values (no fixed plan)."""
        return self.policy.adaptive

    @property
    def metric_reads(self) -> int:
        return self.policy.metric_reads

    def records(self, context: str | None = None) -> list:
        """What the policy measured and decided at each measuring step of the context's generation."""
        return self.policy.records(context or self._context)

    def freeze(self, context: str | None = None) -> Schedule:
        """The last generation's decisions as a static schedule (AdaCache -> :class:`~graphpass.FrozenAdaCache`)."""
        freeze = self.technique.export.freeze
        if freeze is None:
            raise InputError(f"{self.technique.name} has no run-time decisions to freeze: its schedule "
                             f"{self.schedule} is already static")
        return freeze(self.schedule, self.decisions(context))

    def with_schedule(self, schedule: Schedule) -> "OptimizedModel":
        """A model running ``schedule`` on the same capture (no new export) and its hoisting, planned for the
        same timesteps."""
        opt = OptimizedModel(self.model, self.captured, self.attention_regions, schedule,
                             timestep_arg=self.timestep_arg, backend=self.backend, timestep_order=self.timestep_order)
        opt.hoisting = self.hoisting  # per capture: its step graphs are keyed by phase, its values live per model
        if self._plan is not None:
            opt.plan(self._plan.timesteps)
        return opt

    def inspect(self, folder: str | None = None, timesteps: Sequence[float] | None = None) -> str:
        """A report of the regions, the phases and the per-step plan; with ``folder``, also write each
        phase graph as readable code (``.py``) and Graphviz DOT (``.dot``)."""
        return report(self, folder=folder, timesteps=timesteps)

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
