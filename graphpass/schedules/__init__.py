"""Schedules: data about which regions reuse at which step (no graphs here)."""
from .base import KINDS, Action, Phase, Plan, Schedule, schedule_from_json
from .pab import PAB

__all__ = ["KINDS", "Action", "Phase", "Plan", "Schedule", "schedule_from_json", "PAB"]
