"""Schedules are data about steps: which region kinds may be reused at which step.

A schedule never sees a graph. Given the regions of a model (anything with ``.path`` and ``.kind``) and
the timesteps of a generation, it yields a :class:`Plan`: the :class:`Phase` of every step, i.e. what each
region does at that step (compute, compute and store for a later step, or reuse the stored output).
The passes turn each distinct phase into a graph; the runtime executes the plan.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, Iterable, Protocol, Sequence

from ..errors import ScheduleError

#: Region kinds the tagger assigns and schedules may name. The first four attend over video tokens;
#: ``text`` attends over text/conditioning tokens only (e.g. a prompt refiner) and ``other`` has no video
#: tokens among its queries (an audio stream, reference features) or reads keys from another denoised
#: stream. Presets never reuse ``text`` or ``other``: a schedule reuses them only when it names them.
KINDS = ("spatial", "temporal", "cross", "joint", "mlp", "text", "other")


class Action(str, Enum):
    COMPUTE = "compute"  # run the region; nothing is kept
    STORE = "store"  # run the region and hand its outputs to the cache for a later step
    REUSE = "reuse"  # skip the region; read its outputs from the cache


class RegionRef(Protocol):
    path: str
    kind: str


@dataclass(frozen=True)
class Phase:
    """What every region does in one step. Only non-compute regions are listed, sorted by path, so the
    phase that computes everything is ``Phase(())`` and equal phases hash equal."""

    actions: tuple[tuple[str, Action], ...] = ()
    #: The cache keys it reads and stores are its regions' outputs (``Region.cache_keys`` of the regions it
    #: reuses and stores), which an export's manifest is checked against; False for a phase type that caches
    #: values of its own (TaylorSeer's factors).
    caches_region_outputs: ClassVar[bool] = True

    @staticmethod
    def of(actions: dict[str, Action]) -> "Phase":
        return Phase(tuple(sorted((p, Action(a)) for p, a in actions.items() if Action(a) != Action.COMPUTE)))

    def action(self, path: str) -> Action:
        for p, a in self.actions:
            if p == path:
                return a
        return Action.COMPUTE

    @property
    def reused(self) -> tuple[str, ...]:
        return tuple(p for p, a in self.actions if a == Action.REUSE)

    @property
    def stored(self) -> tuple[str, ...]:
        return tuple(p for p, a in self.actions if a == Action.STORE)

    def label(self) -> str:
        if not self.actions:
            return "compute-all"
        parts = []
        if self.reused:
            parts.append(f"reuse {len(self.reused)}")
        if self.stored:
            parts.append(f"store {len(self.stored)}")
        return ", ".join(parts)


@dataclass
class Plan:
    """The phase of every step of one generation, with the timesteps it was made for."""

    timesteps: list[float]
    phases: list[Phase]

    def distinct(self) -> list[Phase]:
        """Distinct phases in order of first use."""
        seen: dict[Phase, None] = {}
        for ph in self.phases:
            seen.setdefault(ph, None)
        return list(seen)

    def __len__(self) -> int:
        return len(self.phases)


#: Positions of a progress schedule run from PROGRESS_SCALE (first step) down to 0 (last step), like timesteps.
PROGRESS_SCALE = 1000.0


def progress_position(step_index: int, num_steps: int) -> float:
    """The value a progress-unit schedule reads at step ``step_index`` of ``num_steps``: falls from 1000 at
    the first step to 0 at the last, as timesteps do, so "the next value is lower" holds for both units.

    >>> [progress_position(i, 5) for i in range(5)]
    [1000.0, 750.0, 500.0, 250.0, 0.0]
    """
    if num_steps <= 1:
        return PROGRESS_SCALE
    return PROGRESS_SCALE * (1.0 - step_index / (num_steps - 1))


class Schedule(ABC):
    """Base of all schedules. Subclasses are dataclasses registered by ``type_name`` for JSON."""

    type_name: ClassVar[str] = ""
    _registry: ClassVar[dict[str, type["Schedule"]]] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        # Only a class that names itself is registered: a subclass inheriting its parent's name must not
        # take over the parent's JSON entry.
        name = cls.__dict__.get("type_name", "")
        if name:
            known = Schedule._registry.get(name)
            if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
                raise ScheduleError(f"schedule type name {name!r} of {cls.__qualname__} is already used by "
                                    f"{known.__module__}.{known.__qualname__}; give the class its own type_name")
            Schedule._registry[name] = cls

    # --- decisions -------------------------------------------------------------------------------
    @property
    def needs_trajectory(self) -> bool:
        """Whether the schedule decides from the step's position in the sampling trajectory rather than its
        timestep. The runtime then hands it :func:`progress_position` values in place of timesteps (known
        from a plan, or from a pipeline's ``cache_context(step_index=, num_inference_steps=)``), so its
        rules need no second code path."""
        return False

    @abstractmethod
    def kinds(self) -> set[str]:
        """Kinds this schedule may reuse; optimizing a model that lacks one of them is an error."""

    @abstractmethod
    def reuses(self, region: RegionRef, t: float, counter: int) -> bool:
        """Whether ``region`` reuses its stored output at the call numbered ``counter`` (0-based, one per
        model call of a generation) whose timestep is ``t``."""

    @abstractmethod
    def may_reuse_next(self, region: RegionRef, t: float, counter: int) -> bool:
        """Whether the call after ``counter`` (whose timestep is unknown but lower than ``t``) could reuse
        ``region``. Used when steps arrive one by one: a region is stored only when this says so."""

    def check_model(self, available_kinds: Iterable[str]) -> None:
        missing = sorted(self.kinds() - set(available_kinds))
        if missing:
            raise ScheduleError(
                f"{type(self).__name__} schedule reuses {', '.join(missing)} attention, but the model has no region of "
                f"that kind (it has: {', '.join(sorted(set(available_kinds))) or 'none'}). Remove those kinds from the "
                f"schedule, or override the tagging with kinds={{'<module path pattern>': '<kind>'}} if a region was "
                f"mis-tagged.")

    # --- plans -----------------------------------------------------------------------------------
    def plan(self, regions: Sequence[RegionRef], timesteps: Sequence[float]) -> Plan:
        """The phase of every step when all timesteps are known up front: a region is stored only at the
        compute step right before a reuse, so the cache holds exactly what a later step reads."""
        ts = [float(t) for t in timesteps]
        reuse = [{r.path: self.reuses(r, t, i) for r in regions} for i, t in enumerate(ts)]
        phases = []
        for i in range(len(ts)):
            acts = {}
            for r in regions:
                if reuse[i][r.path]:
                    acts[r.path] = Action.REUSE
                elif i + 1 < len(ts) and reuse[i + 1][r.path]:
                    acts[r.path] = Action.STORE
            phases.append(Phase.of(acts))
        return Plan(ts, phases)

    def step_phase(self, regions: Sequence[RegionRef], t: float, counter: int, cached: set[str]) -> Phase:
        """The phase of one step when timesteps arrive one by one. A reuse whose output is not cached
        (nothing computed it yet) computes instead."""
        acts = {}
        for r in regions:
            if self.reuses(r, t, counter) and r.path in cached:
                acts[r.path] = Action.REUSE
            elif self.may_reuse_next(r, t, counter):
                acts[r.path] = Action.STORE
        return Phase.of(acts)

    # --- serialisation ---------------------------------------------------------------------------
    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        ...

    @classmethod
    @abstractmethod
    def from_dict(cls, d: dict[str, Any]) -> "Schedule":
        ...

    def to_json(self, **kw) -> str:
        return json.dumps({"type": self.type_name, **self.to_dict()}, **kw)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(indent=2) + "\n")


def schedule_from_json(text_or_path: str | Path) -> Schedule:
    """Load any schedule from JSON text or a ``.json`` file path."""
    text = str(text_or_path)
    if not text.lstrip().startswith("{"):
        text = _read_schedule_file(Path(text))
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ScheduleError(f"schedule JSON is malformed ({e}); write it with Schedule.save() or to_json()") from e
    if not isinstance(d, dict):
        raise ScheduleError(f"schedule JSON must be an object such as {{\"type\": \"PAB\", \"spatial\": 2}}, got a "
                            f"{type(d).__name__}; write it with Schedule.save() or to_json()")
    kind = d.pop("type", None)
    d.pop("measured", None)  # figures `graphpass search` measured for the schedule: information, not a field
    if not isinstance(kind, str) or kind not in Schedule._registry:
        raise ScheduleError(f"unknown schedule type {kind!r}; known: {', '.join(sorted(Schedule._registry))}")
    try:
        return Schedule._registry[kind].from_dict(d)
    except (TypeError, AttributeError) as e:  # a field of the wrong JSON type (null, a list for an object...)
        raise ScheduleError(f"{kind} schedule JSON has a field of the wrong type ({e}): ranges are integers, "
                            f"\"window\" is a pair [lo, hi], \"windows\" an object such as {{\"cross\": [100, 900]}}; "
                            f"compare with the output of Schedule.to_json()") from None


def _read_schedule_file(p: Path) -> str:
    """The text of a schedule file, or a :class:`ScheduleError` saying why it cannot be one."""
    if not p.exists():
        raise ScheduleError(f"schedule file {p} does not exist; pass JSON text or an existing .json file")
    if p.is_dir():
        raise ScheduleError(f"schedule path {p} is a folder; pass a .json file (e.g. one written by "
                            f"Schedule.save() or `graphpass search`)")
    try:
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ScheduleError(f"schedule file {p} is not text (not UTF-8): pass a JSON file written by Schedule.save() "
                            f"or `graphpass search`") from None
    except OSError as e:
        raise ScheduleError(f"cannot read schedule file {p} ({e.strerror}); check the path and its permissions") from None


class ReplaysDecisions:
    """For a schedule whose ``decisions`` attribute holds one ``"C"`` (compute) or ``"R"`` (reuse) per model call
    of a generation (a frozen run, or a table decided from the config): the call numbered ``counter`` reuses when
    its letter is ``"R"``; calls past the end compute. Put it before the schedule's base class.

    >>> class Replay(ReplaysDecisions):
    ...     decisions = "CRC"
    >>> [Replay().reuses(None, 0.0, i) for i in range(4)]
    [False, True, False, False]
    """

    decisions: str

    def reuses(self, region: RegionRef, t: float, counter: int) -> bool:
        return counter < len(self.decisions) and self.decisions[counter] == "R"

    def may_reuse_next(self, region: RegionRef, t: float, counter: int) -> bool:
        return self.reuses(region, t, counter + 1)


def parse_decisions(decisions) -> str:
    """A replayed run's decisions as text: one ``"C"`` (compute) or ``"R"`` (reuse) per model call, from a string
    or a sequence of booleans (True: compute) or letters; the first must compute (nothing is cached yet).

    >>> parse_decisions("ccr"), parse_decisions([True, False])
    ('CCR', 'CR')
    """
    if isinstance(decisions, str):
        text = decisions.upper()
    else:
        try:
            text = "".join(("C" if d else "R") if isinstance(d, bool) else str(d).upper() for d in decisions)
        except TypeError:
            text = None
    if not text or set(text) - {"C", "R"}:
        raise ScheduleError(f"decisions={decisions!r}: give one 'C' (compute) or 'R' (reuse) per call, e.g. 'CCRRC'")
    if text[0] != "C":
        raise ScheduleError(f"decisions={text!r} start with a reuse; the first call has nothing cached and must "
                            f"compute ('C')")
    return text
