"""The registry: schedule types -> techniques.

>>> technique_for(graphpass.AdaCache.preset("slow")).name
'AdaCache'
>>> technique_for(object())
ScheduleError: no caching technique is registered for object ...
"""
from __future__ import annotations

from ..errors import ScheduleError
from ..schedules.base import Schedule
from .base import Technique

_BY_SCHEDULE: dict[type, Technique] = {}


def register(technique: Technique) -> Technique:
    """Make ``technique`` serve its schedule types; returns it. Registering the same technique again is a
    no-op; another technique for a type already served is an error (one schedule type, one technique)."""
    for cls in technique.schedules:
        known = _BY_SCHEDULE.get(cls)
        if known is not None and known is not technique:
            raise ScheduleError(f"{cls.__name__} is already served by the technique {known.name!r}; give "
                                f"{technique.name!r} its own schedule type (a subclass is fine)")
    for cls in technique.schedules:
        _BY_SCHEDULE[cls] = technique
    return technique


def technique_for(schedule: Schedule) -> Technique:
    """The technique serving ``schedule``: that of its class, else of the nearest base class registered."""
    for cls in type(schedule).__mro__:
        technique = _BY_SCHEDULE.get(cls)
        if technique is not None:
            return technique
    known = ", ".join(sorted(c.__name__ for c in _BY_SCHEDULE)) or "none"
    raise ScheduleError(f"no caching technique is registered for {type(schedule).__name__} (registered schedule "
                        f"types: {known}); declare one with graphpass.techniques.register(Technique(schedules="
                        f"({type(schedule).__name__},), ...)), see docs/architecture.md")


def techniques() -> list[Technique]:
    """Every registered technique, once each, in order of registration."""
    return list(dict.fromkeys(_BY_SCHEDULE.values()))
