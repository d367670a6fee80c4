"""Caching techniques: one module each, registered by schedule type (see :mod:`.base` and
docs/architecture.md).

>>> technique_for(graphpass.PAB.preset("pab246")).name, technique_for(graphpass.FrozenAdaCache("CCR")).name
('PAB', 'FrozenAdaCache')
"""
from .base import (Decision, Export, Probe, StaticPlan, StepCall, StepPolicy, Target, Technique, static_plan,
                   tagged_regions)
from .registry import register, technique_for, techniques
from . import adacache, easycache, first_block_cache, magcache, pab, taylorseer, teacache  # noqa: F401,E402 (the built-in techniques register on import)

__all__ = ["Technique", "Target", "StepPolicy", "StaticPlan", "StepCall", "Decision", "Probe", "Export", "tagged_regions",
           "static_plan", "register", "technique_for", "techniques"]
