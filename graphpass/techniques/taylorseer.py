"""TaylorSeer (Liu et al., arXiv 2503.06923) as a compiled technique, with diffusers' semantics.

diffusers 0.42.1's ``TaylorSeerCacheConfig`` hooks modules picked by name. Per module and cache context a
counter ``c`` counts calls (from 0); the call computes when::

    c < disable_cache_before_step  or  (c - disable_cache_before_step - 1) % cache_interval == 0
    or  c >= disable_cache_after_step (when set)

A computed call refreshes the module's Taylor factors (``F0 = y``, ``F[j+1] = (F[j] - F_prev[j]) / gap``,
``gap`` = calls since the previous refresh, up to ``max_order``), stored in ``taylor_factors_dtype``; any other
call *predicts* ``sum_k F[k] * gap**k / k!`` (``gap`` = calls since the last refresh) instead of running the
module. Modules picked by ``skip_predict_identifiers`` return zeros on predict calls instead.

graphpass compiles the same thing: one update graph per number of factors held and one predict graph per
number of factors (:mod:`graphpass.passes.taylor`); the gap is a graph input, so no graph is rebuilt per
distance. The decisions depend on the call counter alone: no value is read back from the device, ever
(``opt.metric_reads`` stays 0), and the whole plan is known up front, so the schedule is its own frozen form.
``graphpass.export`` writes its plan's phases like any static plan; the manifest records each call's gap
(the per-step feeds) and the loaded artefact feeds them back, so the exported loop equals the eager one.
All modules of one call follow one counter: diffusers' per-module counters agree because every picked module
runs once per call (graphpass refuses identifiers that pick nested modules, which would break that).

Defaults are diffusers': note that its default identifiers (``^blocks.*attn`` and the like, fully matched)
pick no module of Wan or CogVideoX, whose attention modules are ``attn1``/``attn2``; graphpass then raises
instead of running unchanged. The ``"attention"`` preset picks them.

>>> ts = TaylorSeer()                              # diffusers' defaults
>>> "".join("C" if ts.computes(i) else "P" for i in range(12))
'CCCPCPPPPCPP'
>>> schedule_from_json(ts.to_json()) == ts
True
>>> TaylorSeer(cache_interval=0)
Traceback (most recent call last):
...
graphpass.errors.ScheduleError: TaylorSeer cache_interval=0 must be an integer >= 1
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import torch

from ..errors import ScheduleError
from ..passes.capture import CapturedGraph
from ..passes.flops import node_flops
from ..passes.specialize import PhaseGraph
from ..passes.tag import Region
from ..passes.taylor import (GAP_KEY, TaylorModule, TaylorPhase, graph_module_names, specialize_taylor_phase,
                             taylor_modules)
from ..schedules.base import KINDS, Plan, RegionRef, Schedule, schedule_from_json  # noqa: F401 (doctest)
from .base import Decision, Export, StepCall, StepPolicy, Target, Technique
from .registry import register

#: diffusers' default identifiers (``taylorseer_cache.py``): attention modules of the block lists.
DEFAULT_CACHE_IDENTIFIERS = ("^blocks.*attn", "^transformer_blocks.*attn", "^single_transformer_blocks.*attn",
                             "^temporal_transformer_blocks.*attn")
#: Lite mode (diffusers): extrapolate ``proj_out``, zero every block.
LITE_CACHE_IDENTIFIERS = ("^proj_out$",)
LITE_SKIP_IDENTIFIERS = ("^[^.]*block[^.]*\\.[^.]+$",)
#: Attention modules named ``attn``, ``attn1``, ``attn2``... of the block lists (Wan, CogVideoX, Latte, Flux).
ATTENTION_IDENTIFIERS = (r"(blocks|transformer_blocks|single_transformer_blocks|temporal_transformer_blocks)"
                         r"\.\d+\.attn\d*",)
#: Factor dtypes by name (JSON); None keeps each output's own dtype.
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

#: Published settings. "diffusers": the defaults of diffusers' TaylorSeerCacheConfig (the paper's N=5
#: interval, first order). "attention": the same on attention modules named attn1/attn2 (which diffusers'
#: default patterns miss). "regions": the same on the attention regions graphpass tags from the graph's
#: structure, whatever the modules are named (VDT's spatial_attn...). "lite": diffusers' lite mode. "flux": interval 6, first order, warm-up 3 as in the
#: official FLUX code (whose first refresh is at step 8; under diffusers' rule it is step 4).
PRESETS: dict[str, dict[str, Any]] = {
    "diffusers": {},
    "attention": {"cache_identifiers": list(ATTENTION_IDENTIFIERS)},
    "regions": {"cache_kinds": ["spatial", "temporal", "cross", "joint"]},
    "lite": {"use_lite_mode": True},
    "flux": {"cache_interval": 6, "disable_cache_before_step": 3, "max_order": 1},
}


def _dtype_name(d) -> str | None:
    """A factor dtype as its name: ``torch.bfloat16`` or ``"bfloat16"`` -> ``"bfloat16"``; None stays."""
    if d is None:
        return None
    for name, dt in DTYPES.items():
        if d == dt or d == name:
            return name
    raise ScheduleError(f"TaylorSeer taylor_factors_dtype={d!r}: one of {', '.join(DTYPES)} (or torch dtypes "
                        f"torch.bfloat16/float16/float32), or None to keep each output's dtype")


def _patterns(name: str, value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not all(isinstance(p, str) for p in value):
        raise ScheduleError(f"TaylorSeer {name}={value!r} must be a list of regular expressions, e.g. "
                            f"[r'blocks\\.\\d+\\.attn1']")
    for p in value:
        try:
            re.compile(p)
        except re.error as e:
            raise ScheduleError(f"TaylorSeer {name}: {p!r} is not a regular expression ({e})") from None
    return list(value)


@dataclass
class TaylorSeer(Schedule):
    """TaylorSeer: refresh module outputs every ``cache_interval`` calls and extrapolate them in between.

    Fields (the names and meaning of diffusers' ``TaylorSeerCacheConfig``):
        cache_interval: calls from one refresh to the next once caching runs; diffusers 5 (the paper's N).
        disable_cache_before_step: calls ``0 .. n-1`` all compute (they seed the factors); call ``n`` is the
            first prediction. diffusers 3; must be >= 1 (a prediction needs a refresh before it).
        disable_cache_after_step: from this call on every call computes (and refreshes); None: never.
        max_order: highest Taylor order (0: reuse the last output; 1: linear extrapolation); diffusers 1.
        taylor_factors_dtype: dtype the factors are stored in: ``"bfloat16"`` (diffusers' default),
            ``"float16"``, ``"float32"``, or None for each output's own dtype.
        cache_identifiers: regular expressions (``re.fullmatch`` on module names) of the modules to
            extrapolate; None: diffusers' defaults (:data:`DEFAULT_CACHE_IDENTIFIERS`).
        skip_predict_identifiers: patterns of modules returning zeros on predict calls (their consumers are
            predicted too, so they need not run); a module matching both lists is skipped.
        use_lite_mode: diffusers' lite variant: extrapolate ``proj_out`` and zero every block (overrides the
            identifiers).
        cache_kinds: graphpass's addition: extrapolate the attention regions tagged with these kinds
            (``"spatial"``, ``"temporal"``, ``"cross"``, ``"joint"``, ``"mlp"``...), found from the graph's
            structure, in place of ``cache_identifiers``; :meth:`to_diffusers` names their modules.

    Example:
        >>> opt = graphpass.optimize(model, TaylorSeer.preset("attention"), example_kwargs=kw)
        >>> opt.decisions()      # after a generation: 'C' computed (refreshed), 'P' predicted, per call
    """

    type_name: ClassVar[str] = "TaylorSeer"

    cache_interval: int = 5
    disable_cache_before_step: int = 3
    disable_cache_after_step: int | None = None
    max_order: int = 1
    taylor_factors_dtype: str | None = "bfloat16"
    cache_identifiers: list[str] | None = None
    skip_predict_identifiers: list[str] | None = None
    use_lite_mode: bool = False
    cache_kinds: list[str] | None = None

    def __post_init__(self):
        for name, lo in (("cache_interval", 1), ("disable_cache_before_step", 1), ("max_order", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                why = " (a prediction needs an earlier refresh)" if name == "disable_cache_before_step" else ""
                raise ScheduleError(f"TaylorSeer {name}={v!r} must be an integer >= {lo}{why}")
        after = self.disable_cache_after_step
        if after is not None and (isinstance(after, bool) or not isinstance(after, int) or after < 0):
            raise ScheduleError(f"TaylorSeer disable_cache_after_step={after!r} must be a call index >= 0 or None")
        self.taylor_factors_dtype = _dtype_name(self.taylor_factors_dtype)
        self.cache_identifiers = _patterns("cache_identifiers", self.cache_identifiers)
        self.skip_predict_identifiers = _patterns("skip_predict_identifiers", self.skip_predict_identifiers)
        if self.cache_kinds is not None:
            bad = [k for k in self.cache_kinds] if isinstance(self.cache_kinds, str) else [
                k for k in self.cache_kinds if k not in KINDS]
            if bad or not self.cache_kinds:
                raise ScheduleError(f"TaylorSeer cache_kinds={self.cache_kinds!r}: give a list of region kinds from "
                                    f"{', '.join(KINDS)}, e.g. ['spatial', 'temporal', 'cross']")
            self.cache_kinds = list(self.cache_kinds)
        if not isinstance(self.use_lite_mode, bool):
            raise ScheduleError(f"TaylorSeer use_lite_mode={self.use_lite_mode!r} must be True or False")

    # --- decisions -------------------------------------------------------------------------------
    def computes(self, counter: int) -> bool:
        """Whether call ``counter`` (0-based, per cache context) computes and refreshes the factors."""
        before, after = self.disable_cache_before_step, self.disable_cache_after_step
        return (counter < before or (counter - before - 1) % self.cache_interval == 0
                or (after is not None and counter >= after))

    def reuses(self, region: RegionRef, t: float, counter: int) -> bool:
        return not self.computes(counter)

    def may_reuse_next(self, region: RegionRef, t: float, counter: int) -> bool:
        return not self.computes(counter + 1)

    def kinds(self) -> set[str]:
        return set()  # acts on modules picked by name, whatever their kind

    def plan(self, regions: Sequence[RegionRef], timesteps: Sequence[float]) -> Plan:
        """The phase of every call over ``timesteps``: they depend on the call counter alone, so the plan is
        the whole run's (what an export holds; ``regions`` are the picked modules, ``opt.regions``).

        >>> [ph.label() for ph in TaylorSeer(cache_interval=2, disable_cache_before_step=1).plan(mods, [3, 2, 1, 0]).phases]
        ['update (first)', 'predict (1 factors)', 'update (1 factors held)', 'predict (2 factors)']
        """
        rule = TaylorSeerPolicy(self)
        return Plan([float(t) for t in timesteps], [taylor_phase(regions, rule.step(i)) for i in range(len(timesteps))])

    def patterns(self, regions: Sequence[RegionRef] = ()) -> tuple[list[str], list[str]]:
        """(patterns of extrapolated modules, patterns of zeroed modules), resolved as diffusers does;
        ``cache_kinds`` picks the paths of the tagged ``regions`` of those kinds.

        >>> TaylorSeer(cache_kinds=["temporal"]).patterns([Region("blocks.0.temporal_attn", "", "temporal", [],
        ...                                                      [], [], 0, "")])
        (['blocks\\.0\\.temporal_attn'], [])
        """
        if self.use_lite_mode:
            return list(LITE_CACHE_IDENTIFIERS), list(LITE_SKIP_IDENTIFIERS)
        skip = list(self.skip_predict_identifiers or [])
        if self.cache_kinds is not None:
            picked = [re.escape(r.path) for r in regions if r.kind in self.cache_kinds]
            if not picked:
                raise ScheduleError(f"TaylorSeer cache_kinds={self.cache_kinds} but the model has no region of those "
                                    f"kinds (it has: {', '.join(sorted({r.kind for r in regions})) or 'none'})")
            return picked, skip
        return list(self.cache_identifiers or DEFAULT_CACHE_IDENTIFIERS), skip

    @property
    def factors_dtype(self) -> torch.dtype | None:
        return None if self.taylor_factors_dtype is None else DTYPES[self.taylor_factors_dtype]

    # --- construction ----------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "TaylorSeer":
        """A published setting (:data:`PRESETS`); keyword overrides replace fields."""
        key = name.lower()
        if key not in PRESETS:
            raise ScheduleError(f"unknown TaylorSeer preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})

    @classmethod
    def from_diffusers(cls, config) -> "TaylorSeer":
        """The technique of a diffusers ``TaylorSeerCacheConfig``."""
        return cls(cache_interval=config.cache_interval, disable_cache_before_step=config.disable_cache_before_step,
                   disable_cache_after_step=config.disable_cache_after_step, max_order=config.max_order,
                   taylor_factors_dtype=config.taylor_factors_dtype, cache_identifiers=config.cache_identifiers,
                   skip_predict_identifiers=config.skip_predict_identifiers, use_lite_mode=config.use_lite_mode)

    def to_diffusers(self, regions: Sequence[RegionRef] = ()):
        """The equivalent diffusers ``TaylorSeerCacheConfig`` (for ``transformer.enable_cache``); with
        ``cache_kinds``, the tagged ``regions`` (``opt.attention_regions``) name the modules."""
        from diffusers import TaylorSeerCacheConfig

        ids = self.cache_identifiers if self.cache_kinds is None else self.patterns(regions)[0]
        return TaylorSeerCacheConfig(cache_interval=self.cache_interval,
                                     disable_cache_before_step=self.disable_cache_before_step,
                                     disable_cache_after_step=self.disable_cache_after_step, max_order=self.max_order,
                                     taylor_factors_dtype=self.factors_dtype,
                                     skip_predict_identifiers=self.skip_predict_identifiers,
                                     cache_identifiers=ids, use_lite_mode=self.use_lite_mode)

    _FIELDS: ClassVar[tuple[str, ...]] = ("cache_interval", "disable_cache_before_step", "disable_cache_after_step",
                                          "max_order", "taylor_factors_dtype", "cache_identifiers",
                                          "skip_predict_identifiers", "use_lite_mode", "cache_kinds")

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._FIELDS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TaylorSeer":
        unknown = set(d) - set(cls._FIELDS)
        if unknown:
            raise ScheduleError(f"TaylorSeer JSON has unknown fields {sorted(unknown)}; known: {list(cls._FIELDS)}")
        return cls(**d)

    def __str__(self) -> str:
        after = "" if self.disable_cache_after_step is None else f", until {self.disable_cache_after_step}"
        mods = ("lite" if self.use_lite_mode else f"{'/'.join(self.cache_kinds)} regions" if self.cache_kinds else
                "default modules" if self.cache_identifiers is None else f"{len(self.cache_identifiers)} pattern(s)")
        return (f"TaylorSeer(every {self.cache_interval}, from {self.disable_cache_before_step}{after}, order "
                f"{self.max_order}, {self.taylor_factors_dtype or 'output dtype'}, {mods})")


@dataclass
class TaylorStep:
    """What one call does: ``mode`` ``"update"`` or ``"predict"``, ``orders`` (factors held before an update,
    factors read by a prediction) and ``gap`` (calls since the last refresh; None on the first)."""

    mode: str
    orders: int
    gap: int | None


@dataclass
class TaylorSeerPolicy:
    """The TaylorSeer step rule for one generation of one cache context (pure: no tensors).

    >>> p = TaylorSeerPolicy(TaylorSeer(max_order=1))
    >>> [(s.mode[0], s.orders, s.gap) for s in map(p.step, range(6))]
    [('u', 0, None), ('u', 1, 1), ('u', 2, 1), ('p', 2, 1), ('u', 2, 2), ('p', 2, 1)]
    """

    schedule: TaylorSeer
    updates: int = 0
    last_update: int | None = None
    steps: list[TaylorStep] = field(default_factory=list)

    def step(self, counter: int) -> TaylorStep:
        """Decide call ``counter`` (calls come in order: 0, 1, 2...)."""
        held = min(self.updates, self.schedule.max_order + 1)
        gap = None if self.last_update is None else counter - self.last_update
        if self.schedule.computes(counter):
            s = TaylorStep("update", held, gap)
            self.updates += 1
            self.last_update = counter
        else:
            s = TaylorStep("predict", held, gap)
        self.steps.append(s)
        return s


def taylor_phase(modules: Sequence[RegionRef], step: TaylorStep) -> TaylorPhase:
    """The phase graph a :class:`TaylorStep` runs over ``modules`` (anything with a ``path``)."""
    make = TaylorPhase.update if step.mode == "update" else TaylorPhase.predict
    return make(modules, step.orders)


def _as_region(m: TaylorModule, tagged: Region | None, captured: CapturedGraph) -> Region:
    """A picked module as the region reports show (kind from the tagging where it is a tagged region)."""
    by_name = {n.name: n for n in captured.gm.graph.nodes}
    return Region(path=m.path, module_type=tagged.module_type if tagged else "module",
                  kind=tagged.kind if tagged else "other", nodes=m.nodes, exits=m.exits, exit_specs=m.specs,
                  flops=sum(node_flops(by_name[n]) for n in m.nodes),
                  reason="zeroed on predict calls" if m.inactive else "extrapolated on predict calls")


@dataclass
class TaylorTarget(Target):
    """TaylorSeer's :class:`~graphpass.techniques.base.Target`: the picked ``modules`` (their outputs are
    extrapolated, or zeroed), shown as ``regions``; ``max_order`` and ``factors_dtype`` shape the phase graphs."""

    modules: list[TaylorModule] = field(default_factory=list)
    max_order: int = 1
    factors_dtype: torch.dtype | None = None


def taylor_target(captured: CapturedGraph, regions: list[Region], schedule: TaylorSeer) -> TaylorTarget:
    """The modules ``schedule`` picks in ``captured`` (by name, or by the tagged ``regions``' kinds); raises
    when it picks none, or nested ones."""
    active, inactive = schedule.patterns(regions)
    modules = taylor_modules(captured, graph_module_names(captured.gm), active, inactive)
    tagged = {r.path: r for r in regions}
    return TaylorTarget(regions=[_as_region(m, tagged.get(m.path), captured) for m in modules],
                        attention_regions=list(regions), modules=modules, max_order=schedule.max_order,
                        factors_dtype=schedule.factors_dtype)


def specialize_taylor(captured: CapturedGraph, target: TaylorTarget, phase: TaylorPhase) -> PhaseGraph:
    """One TaylorSeer phase graph (update or predict) of ``target``'s modules."""
    return specialize_taylor_phase(captured, target.modules, phase, max_order=target.max_order,
                                   factors_dtype=target.factors_dtype)


def _graph_device(captured: CapturedGraph) -> torch.device:
    """Where the captured model's weights live (the step gap is fed there, so no graph input crosses devices)."""
    for t in (*captured.gm.parameters(), *captured.gm.buffers()):
        return t.device
    return torch.device("cpu")


class TaylorSeerSteps(StepPolicy):
    """TaylorSeer's step policy: a :class:`TaylorSeerPolicy` per cache context, and the step gap handed to
    each phase graph as a per-call input (:attr:`~graphpass.techniques.Decision.feeds`), so one predict graph
    serves every gap. Decisions depend on the call counter alone: no host read, ever.

    >>> opt.policy.decide(call).feeds        # call 4 of diffusers' defaults: {'taylorseer:gap': tensor(2.)}
    """

    def __init__(self, schedule: TaylorSeer, target: TaylorTarget, captured: CapturedGraph):
        super().__init__(schedule, target)
        self.device = _graph_device(captured)
        self.rules: dict[str, TaylorSeerPolicy] = {}
        self._gaps: dict[int, torch.Tensor] = {}  # one tensor per gap value, made once on the device

    def plan(self, timesteps: list[float], positions: list[float]) -> Plan:
        """The phases of a generation over ``timesteps``: they depend on the call count alone."""
        return self.schedule.plan(self.target.modules, timesteps)

    def feeds(self, plan: Plan) -> list[Mapping[str, torch.Tensor]]:
        """The step gap of every call of ``plan`` (none on the first), as :meth:`decide` feeds it."""
        rule = TaylorSeerPolicy(self.schedule)
        return [self._feeds(rule.step(i)) for i in range(len(plan))]

    def _feeds(self, s: TaylorStep) -> Mapping[str, torch.Tensor]:
        return {} if s.gap is None else {GAP_KEY: self.gap(s.gap)}

    def gap(self, calls: int) -> torch.Tensor:
        """The gap ``calls`` as the 0-d float32 graph input."""
        if calls not in self._gaps:
            self._gaps[calls] = torch.tensor(float(calls), dtype=torch.float32, device=self.device)
        return self._gaps[calls]

    def decide(self, call: StepCall) -> Decision:
        if call.counter == 0:
            self.rules[call.context] = TaylorSeerPolicy(self.schedule)
        s = self.rules[call.context].step(call.counter)
        return Decision(taylor_phase(self.target.modules, s), feeds=self._feeds(s))


#: Exports as any static plan: the manifest records each call's step gap (:meth:`TaylorSeerSteps.feeds`) and the
#: loaded artefact feeds it back.
TAYLORSEER = register(Technique(
    name="TaylorSeer", schedules=(TaylorSeer,), target=taylor_target, specialize=specialize_taylor,
    policy=TaylorSeerSteps, export=Export()))
