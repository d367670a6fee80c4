"""AdaCache (Kahatapitiya et al., arXiv 2411.02397) and MoReg as schedules: a per-video step cache.

On a *compute* step every transformer block runs and the blocks' residual is cached; on a *reuse* step the
blocks are skipped and their cached residual is added (embedders and the final layer always run;
``cache_unit="outputs"`` caches the attention/MLP outputs instead and re-applies the current step's gates).
After each compute step one distance is measured on one residual (default: the temporal-attention residual of
the middle block)::

    c = ||r_now - r_cached||_1 / ||r_cached||_1 / k          (k = steps since the previous compute)

and the codebook maps ``c`` to the number of steps until the next compute: the first entry whose bound is
above ``c`` (the largest bound also covers larger distances). With MoReg (motion regularisation), inside its
step window::

    m  = ||r[f+1] - r[f]||_1 / (||r[1:]||_1 + ||r[:-1]||_1)      (frame differences of r_now)
    m  = (m / 0.385) ** 8 ; mg = 10 * (m - m_prev) / k ; c = c * (m + |mg|)

(outside the window ``m = 1``; ``m_prev`` starts at 1). The first ``always_compute_first`` and the last
``always_compute_last`` steps always compute; a compute step that has nothing to compare with yet (the
first) is followed by another compute, as in the reference implementation.

Batches: one call runs one phase graph for the whole batch, so one decision covers every sample of a call;
it is taken on the MAXIMUM over samples of the per-sample metric (the sample that changes most decides).
With batched classifier-free guidance the cond and uncond halves are samples of one call and therefore always
follow the same decision; separate cond/uncond calls decide independently in their own
``opt.cache_context``.

A schedule here is data plus the pure decision rule (:class:`AdaptiveDecider`); the graphs are built by
:mod:`graphpass.passes.residuals`, and :mod:`graphpass.techniques.adacache` declares how the runtime drives
them.

>>> s = AdaCache.preset("slow")
>>> s.steps_for(0.1), s.steps_for(0.5)
(2, 1)
>>> schedule_from_json(s.to_json()) == s
True
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from ..errors import ScheduleError
from .base import (Action, Phase, Plan, RegionRef, ReplaysDecisions, Schedule, parse_decisions,  # noqa: F401
                   schedule_from_json)  # (doctest)

#: Published codebooks (distance upper bound -> steps until the next compute).
CODEBOOKS: dict[str, dict[float, int]] = {
    "100-step": {0.03: 12, 0.05: 10, 0.07: 8, 0.09: 6, 0.11: 4, 1.0: 3},
    "fast": {0.08: 6, 0.16: 5, 0.24: 4, 0.32: 3, 0.40: 2, 1.0: 1},  # 30 steps
    "slow": {0.08: 3, 0.16: 2, 1.0: 1},  # 30 steps
}
#: What a reuse step adds: see AdaCache.cache_unit.
CACHE_UNITS = ("residual", "outputs")
#: Published MoReg step windows (1-based step numbers, inclusive) by number of sampling steps.
MOREG_WINDOWS: dict[int, tuple[int, int]] = {100: (10, 90), 30: (4, 26)}


@dataclass(frozen=True)
class ResidualPhase(Phase):
    """A phase of residual caching: ``actions`` names the block span (STORE: compute and cache the blocks'
    residual; REUSE: add the cached residual instead of running the blocks; absent: compute, keep nothing);
    ``metric`` says what happens to the metric residual: ``"none"``, ``"store"`` (return it for the next
    compute step) or ``"measure"`` (compare it with the cached one, return the distance statistics and the
    new residual)."""

    metric: str = "none"

    def label(self) -> str:
        base = super().label()
        return base if self.metric == "none" else f"{base}, metric {self.metric}"


@dataclass
class MoReg:
    """Motion regularisation of the AdaCache metric (published defaults).

    Fields:
        window: ``(first, last)`` step numbers, counted from 1 and inclusive, in which the motion score is
            used; outside it the score is 1. Published: ``(10, 90)`` for 100 steps, ``(4, 26)`` for 30
            (:meth:`for_steps`).
        normaliser: motion score that maps to 1 (``m / normaliser``); published 0.385.
        exponent: power applied to the normalised score, so high motion grows fast; published 8.
        gradient_factor: weight of the motion gradient ``(m - m_prev) / k``; published 10.
        strides: frame strides whose differences are averaged; published ``(1,)`` (adjacent frames).

    >>> MoReg().factor(0.385, 1.0, k=1, step=50)       # m = 1, no change from m_prev = 1
    (1.0, 1.0)
    """

    window: tuple[int, int] = (10, 90)
    normaliser: float = 0.385
    exponent: float = 8.0
    gradient_factor: float = 10.0
    strides: tuple[int, ...] = (1,)

    def __post_init__(self):
        try:
            lo, hi = (int(x) for x in self.window)
        except (TypeError, ValueError):
            raise ScheduleError(f"MoReg window={self.window!r}: give (first, last) step numbers, e.g. (10, 90)") from None
        if not 1 <= lo <= hi:
            raise ScheduleError(f"MoReg window=({lo}, {hi}): need 1 <= first <= last (1-based step numbers)")
        self.window = (lo, hi)
        for name in ("normaliser", "exponent"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0 or not math.isfinite(v):
                raise ScheduleError(f"MoReg {name}={v!r} must be a positive number")
        g = self.gradient_factor
        if not isinstance(g, (int, float)) or isinstance(g, bool) or g < 0 or not math.isfinite(g):
            raise ScheduleError(f"MoReg gradient_factor={g!r} must be a number >= 0")
        strides = tuple(self.strides)
        if not strides or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in strides):
            raise ScheduleError(f"MoReg strides={self.strides!r} must be integers >= 1, e.g. (1,)")
        self.strides = strides
        self.normaliser, self.exponent, self.gradient_factor = float(self.normaliser), float(self.exponent), float(g)

    @classmethod
    def for_steps(cls, num_steps: int, **overrides) -> "MoReg":
        """Published window for 100 or 30 steps; otherwise the 100-step window scaled to ``num_steps``."""
        w = MOREG_WINDOWS.get(num_steps) or (max(1, round(num_steps * 0.1)), max(1, round(num_steps * 0.9)))
        return cls(**{"window": w, **overrides})

    def factor(self, motion: float, prev: float, k: int, step: int) -> tuple[float, float]:
        """``(m + |mg|, m)`` for a raw motion score at 1-based ``step``, ``k`` steps after the previous compute;
        the second value is the next call's ``prev``."""
        lo, hi = self.window
        m = (motion / self.normaliser) ** self.exponent if lo <= step <= hi else 1.0
        mg = self.gradient_factor * (m - prev) / k
        return m + abs(mg), m

    def to_dict(self) -> dict[str, Any]:
        return {"window": list(self.window), "normaliser": self.normaliser, "exponent": self.exponent,
                "gradient_factor": self.gradient_factor, "strides": list(self.strides)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MoReg":
        unknown = set(d) - {"window", "normaliser", "exponent", "gradient_factor", "strides"}
        if unknown:
            raise ScheduleError(f"MoReg JSON has unknown fields {sorted(unknown)}")
        d = dict(d)
        if "window" in d:
            d["window"] = tuple(d["window"])
        if "strides" in d:
            d["strides"] = tuple(d["strides"])
        return cls(**d)


class ResidualSchedule(Schedule):
    """Base of schedules that cache the residual of the whole chain of transformer blocks (their technique:
    :mod:`graphpass.techniques.adacache`)."""

    def kinds(self) -> set[str]:
        return set()  # caches whole blocks, whatever attention kinds they hold

    @staticmethod
    def _check_unit(unit) -> str:
        if unit not in CACHE_UNITS:
            raise ScheduleError(f"cache_unit={unit!r}: one of {', '.join(CACHE_UNITS)} ('residual': the blocks' "
                                f"pre-summed residual, as published; 'outputs': attention/MLP outputs re-gated by "
                                f"the current step)")
        return unit


def _check_codebook(codebook) -> dict[float, int]:
    if isinstance(codebook, dict):
        items = list(codebook.items())
    else:
        try:
            items = [tuple(p) for p in codebook]
        except TypeError:
            items = None
        if items is None or any(len(p) != 2 for p in items):
            raise ScheduleError(f"codebook={codebook!r}: give a dict {{distance bound: steps until next compute}}, "
                                f"e.g. {CODEBOOKS['slow']}")
    if not items:
        raise ScheduleError("codebook is empty: give at least one {distance bound: steps}, e.g. {1.0: 1}")
    out: dict[float, int] = {}
    for bound, steps in items:
        try:
            b = float(bound)
        except (TypeError, ValueError):
            raise ScheduleError(f"codebook bound {bound!r} is not a number") from None
        if not b > 0 or not math.isfinite(b):
            raise ScheduleError(f"codebook bound {bound!r} must be a finite distance > 0")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ScheduleError(f"codebook entry {bound!r}: {steps!r}: steps until the next compute must be an "
                                f"integer >= 1 (1 = compute the next step too)")
        if b in out:
            raise ScheduleError(f"codebook bound {b:g} appears twice")
        out[b] = steps
    out = dict(sorted(out.items()))
    steps = list(out.values())
    for (b0, s0), (b1, s1) in zip(out.items(), list(out.items())[1:]):
        if s1 > s0:
            raise ScheduleError(f"codebook gives {s1} steps for distances up to {b1:g} but only {s0} up to {b0:g}: "
                                f"a larger distance (more change) must not reuse longer; steps must not grow with "
                                f"the bound ({steps})")
    return out


@dataclass
class AdaCache(ResidualSchedule):
    """Adaptive caching: reuse the blocks' residual for as many steps as the measured change allows.

    Fields:
        codebook: ``{distance upper bound: steps until the next compute}``; the first bound above the metric
            picks the entry, the largest bound also covers larger distances. ``1`` means compute the next
            step too. Default: the published 30-step "fast" codebook.
        metric_at: where the distance is measured: a region path (``"blocks.1.temporal_attn"``: what that
            attention adds to the hidden state, gate included; for a joint region over text and video
            tokens, what it adds to the video tokens), a block path (``"blocks.1"``: the block's output minus
            input; for a two-stream block, of its video tokens), or a block's position in the chain of blocks (an int; for Latte spatial and
            temporal blocks alternate). None: the published default, the temporal-attention residual of the
            middle block (the middle block's residual for models without temporal attention).
        always_compute_first: steps computed at the start whatever the metric (>= 1: the first step has no
            residual to reuse). Published 1.
        always_compute_last: steps computed at the end. Published 2. Needs the sampler's timesteps
            (``graphpass.optimize(..., timesteps=...)`` or ``opt.plan(timesteps)``) when > 0.
        moreg: a :class:`MoReg` to scale the metric by the video's motion, or None.
        cache_unit: what a reuse step adds. ``"residual"`` (published): one pre-summed residual of the whole
            chain of blocks per hidden state the model reads after it (video tokens; text tokens too when
            they are read), gates included (``h_out = h_in + R``; the reference caches per block the attention
            and cross+MLP residuals, whose sum this is). ``"outputs"``: the raw output of every attention/MLP
            region inside the blocks; a reuse step still runs the blocks' adaLN gates and skip adds, so the
            cached outputs are re-gated with the current step's timestep (as PAB's faithful variant), for about
            the same cost (a few small linears and element-wise ops) and one cached tensor per region.

    Example:
        >>> opt = graphpass.optimize(model, AdaCache.preset("slow"), example_kwargs=kw, timesteps=ts)
        >>> video = sample(opt, labels=labels, num_steps=len(ts))
        >>> replay = opt.schedule.freeze(opt.decisions())     # the run's decisions as a static schedule
    """

    type_name: ClassVar[str] = "AdaCache"

    codebook: dict[float, int] = field(default_factory=lambda: dict(CODEBOOKS["fast"]))
    metric_at: str | int | None = None
    always_compute_first: int = 1
    always_compute_last: int = 2
    moreg: MoReg | None = None
    cache_unit: str = "residual"

    def __post_init__(self):
        self.codebook = _check_codebook(self.codebook)
        self.cache_unit = self._check_unit(self.cache_unit)
        for name, lo in (("always_compute_first", 1), ("always_compute_last", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ScheduleError(f"AdaCache {name}={v!r} must be an integer >= {lo}")
        m = self.metric_at
        if m is not None and not (isinstance(m, str) and m) and not (isinstance(m, int) and not isinstance(m, bool)
                                                                       and m >= 0):
            raise ScheduleError(f"AdaCache metric_at={m!r}: give a block or region path such as 'blocks.1' or "
                                f"'blocks.1.temporal_attn', a block position >= 0, or None for the default")
        if isinstance(self.moreg, dict):
            self.moreg = MoReg.from_dict(self.moreg)
        if self.moreg is not None and not isinstance(self.moreg, MoReg):
            raise ScheduleError(f"AdaCache moreg={self.moreg!r} must be a graphpass.MoReg(...) or None")

    # --- decisions -------------------------------------------------------------------------------
    def steps_for(self, metric: float) -> int:
        """Steps until the next compute for a (normalised, regularised) metric value; NaN counts as large."""
        for bound, steps in self.codebook.items():
            if metric < bound:
                return steps
        return list(self.codebook.values())[-1]

    def reuses(self, region: RegionRef, t: float, counter: int) -> bool:
        return False  # decided at run time from the measured metric; see AdaptiveDecider

    def may_reuse_next(self, region: RegionRef, t: float, counter: int) -> bool:
        return True

    def plan(self, regions: Sequence[RegionRef], timesteps: Sequence[float]) -> Plan:
        """The plan known before running: every measured distance taken as larger than every bound (so each
        decision is the last codebook entry). The real plan depends on the video; see ``opt.decisions()``."""
        (span,) = regions
        dec = AdaptiveDecider(self, span.path, len(timesteps))
        phases, have_residual = [], False
        for i in range(len(timesteps)):
            ph = dec.phase(i, have_residual=have_residual, have_metric=dec.metric_step is not None)
            dec.begin(i, ph)
            if ph.metric == "measure":
                dec.observe([math.inf], None if self.moreg is None else [math.inf])
            a = ph.action(span.path)
            have_residual = a == Action.STORE or (a == Action.REUSE and have_residual)
            phases.append(ph)
        return Plan([float(t) for t in timesteps], phases)

    def freeze(self, decisions: str | Sequence[bool] | Sequence[str]) -> "FrozenAdaCache":
        """A static schedule replaying ``decisions`` (``"CCRRC..."``, or per step True/"C" = compute, False/"R"
        = reuse), e.g. ``opt.decisions()`` after an adaptive run."""
        return FrozenAdaCache(decisions=decisions, cache_unit=self.cache_unit)

    # --- construction ----------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "AdaCache":
        """A published codebook: ``"100-step"`` (alias ``"default"``), ``"fast"`` or ``"slow"`` (30 steps);
        keyword overrides replace fields, e.g. ``AdaCache.preset("fast", moreg=MoReg.for_steps(30))``."""
        key = {"default": "100-step", "100": "100-step"}.get(name.lower(), name.lower())
        if key not in CODEBOOKS:
            raise ScheduleError(f"unknown AdaCache preset {name!r}; known: {', '.join(CODEBOOKS)}")
        return cls(**{"codebook": dict(CODEBOOKS[key]), **overrides})

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"codebook": [[b, s] for b, s in self.codebook.items()], "metric_at": self.metric_at,
                             "always_compute_first": self.always_compute_first,
                             "always_compute_last": self.always_compute_last, "cache_unit": self.cache_unit}
        if self.moreg is not None:
            d["moreg"] = self.moreg.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdaCache":
        known = {"codebook", "metric_at", "always_compute_first", "always_compute_last", "moreg", "cache_unit"}
        unknown = set(d) - known
        if unknown:
            raise ScheduleError(f"AdaCache JSON has unknown fields {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        if isinstance(d.get("moreg"), dict):
            d["moreg"] = MoReg.from_dict(d["moreg"])
        return cls(**d)

    def __str__(self) -> str:
        cb = ", ".join(f"<{b:g}:{s}" for b, s in self.codebook.items())
        extra = f", moreg={self.moreg.window}" if self.moreg else ""
        extra += ", outputs" if self.cache_unit == "outputs" else ""
        return f"AdaCache({cb}; first {self.always_compute_first}, last {self.always_compute_last}{extra})"




@dataclass
class FrozenAdaCache(ReplaysDecisions, ResidualSchedule):
    """A static residual-caching schedule: an explicit compute ('C') or reuse ('R') per model call, e.g. the
    decisions of an adaptive run, replayed like PAB (no metric, no host sync). Calls past the end compute.

    Fields:
        decisions: one character per model call of a generation, ``"C"`` or ``"R"``; the first must be ``"C"``.
        cache_unit: what a reuse step adds, as in :class:`AdaCache` (``"residual"`` or ``"outputs"``).

    >>> FrozenAdaCache("CCRC").reuses(None, 500.0, 2)
    True
    """

    type_name: ClassVar[str] = "AdaCacheFrozen"

    decisions: str = "C"
    cache_unit: str = "residual"

    def __post_init__(self):
        self.decisions = parse_decisions(self.decisions)
        self.cache_unit = self._check_unit(self.cache_unit)

    @property
    def computed_steps(self) -> int:
        return self.decisions.count("C")

    def to_dict(self) -> dict[str, Any]:
        return {"decisions": self.decisions, "cache_unit": self.cache_unit}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FrozenAdaCache":
        unknown = set(d) - {"decisions", "cache_unit"}
        if unknown:
            raise ScheduleError(f"AdaCacheFrozen JSON has unknown fields {sorted(unknown)}")
        return cls(**d)

    def __str__(self) -> str:
        unit = ", outputs" if self.cache_unit == "outputs" else ""
        return f"FrozenAdaCache({self.decisions}: {self.computed_steps}/{len(self.decisions)} computed{unit})"


@dataclass
class StepRecord:
    """What AdaCache measured and decided at one compute step.

    step: 0-based step (model call) index; k: steps since the previous compute; distance: per-sample raw
    distance ``||r - r_cached||_1 / ||r_cached||_1``; motion: per-sample raw MoReg score (None without MoReg);
    metric: the value looked up in the codebook (max over samples of distance / k * MoReg factor);
    steps: the codebook's answer (steps until the next compute).
    """

    step: int
    k: int
    distance: list[float]
    motion: list[float] | None
    metric: float
    steps: int


class AdaptiveDecider:
    """The AdaCache decision rule for one generation (pure Python: no tensors, no graphs).

    Steps are 0-based model calls. For each step the runtime asks :meth:`phase` what it does and reports the
    choice with :meth:`begin`; after a measuring step it passes the graph's statistics to :meth:`observe`,
    which picks the next compute step from the codebook. ``num_steps`` None means unknown (then
    ``always_compute_last`` must be 0).

    Which compute steps measure: step ``i`` decides when step ``i + 1`` may reuse; it measures when a metric
    residual of an earlier compute is cached, else it only stores its own (and the next step computes, like
    the reference's initial rate of 1). A step also stores its metric residual when step ``i + 1`` will decide.
    """

    def __init__(self, schedule: AdaCache, span_path: str, num_steps: int | None):
        if num_steps is None and schedule.always_compute_last:
            raise ScheduleError("AdaCache keeps the last steps computed but the number of steps is unknown: pass "
                                "timesteps= to graphpass.optimize (or call opt.plan(timesteps)) with the sampler's "
                                "timesteps, or set always_compute_last=0")
        self.schedule = schedule
        self.span = span_path
        self.n = num_steps
        self.next_compute = 0
        self.metric_step: int | None = None  # the compute step whose metric residual is cached
        self.pending: tuple[int, int] | None = None  # (measuring step, k) awaiting observe()
        self.prev_motion: list[float] | None = None
        self.records: list[StepRecord] = []

    @property
    def _end(self) -> float:
        """First step of the always-computed tail."""
        return math.inf if self.n is None else self.n - self.schedule.always_compute_last

    def may_reuse(self, i: int) -> bool:
        """Whether step ``i`` lies where the codebook may make it reuse."""
        return self.schedule.always_compute_first <= i < self._end

    def phase(self, i: int, *, have_residual: bool, have_metric: bool) -> ResidualPhase:
        """The phase of step ``i``. ``have_residual``: the blocks' residual is cached; ``have_metric``: a metric
        residual of an earlier compute step is cached."""
        if self.may_reuse(i) and i < self.next_compute and have_residual:
            return _phase(self.span, Action.REUSE, "none")
        if self.may_reuse(i + 1):  # this step's decision matters
            return _phase(self.span, Action.STORE, "measure" if have_metric else "store")
        return _phase(self.span, Action.COMPUTE, "store" if self.may_reuse(i + 2) else "none")

    def begin(self, i: int, phase: ResidualPhase) -> None:
        """Step ``i`` runs ``phase``."""
        if phase.metric == "measure":
            self.pending = (i, i - self.metric_step)
        elif phase.metric == "store" and self.may_reuse(i + 1):
            self.next_compute = i + 1  # nothing to compare with yet: compute the next step too
        if phase.metric != "none":
            self.metric_step = i

    def needs_metric(self, i: int) -> bool:
        """Whether a cached metric residual can still be read at step ``i`` or later."""
        return self.may_reuse(i + 1)

    def observe(self, distance: Sequence[float], motion: Sequence[float] | None) -> StepRecord:
        """Decide after the pending measuring step: ``distance`` (and ``motion`` with MoReg) per sample."""
        if self.pending is None:
            raise ScheduleError("observe() without a measuring step")
        (i, k), self.pending = self.pending, None
        values = [float(d) / k for d in distance]
        mo = self.schedule.moreg
        if mo is not None:
            if motion is None:
                raise ScheduleError("MoReg needs the motion score of the measured residual")
            prev = self.prev_motion or [1.0] * len(values)
            facs, ms = zip(*(mo.factor(float(m), p, k, i + 1) for m, p in zip(motion, prev)))
            values = [v * f for v, f in zip(values, facs)]
            self.prev_motion = list(ms)
        metric = math.nan if any(math.isnan(v) for v in values) else max(values)
        steps = self.schedule.steps_for(metric)
        self.next_compute = i + steps
        rec = StepRecord(step=i, k=k, distance=[float(d) for d in distance],
                         motion=None if motion is None else [float(m) for m in motion], metric=metric, steps=steps)
        self.records.append(rec)
        return rec


def _phase(span: str, action: Action, metric: str) -> ResidualPhase:
    return ResidualPhase(actions=Phase.of({span: action}).actions, metric=metric)
