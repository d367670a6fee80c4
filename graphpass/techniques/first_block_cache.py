"""First Block Cache (ParaAttention; diffusers ``FirstBlockCacheConfig``) compiled into phase graphs.

Every call runs the first transformer block. Its residual on the hidden stream, ``r0 = head(h) - h``, is
compared with the one of the last fully computed call::

    d = mean|r0 - r0_ref| / mean|r0_ref|        (over every element, the whole batch)

and the call computes the other blocks when there is no reference yet or ``d > threshold``; otherwise it
reuses: ``h_out = head(h) + R_tail`` with ``R_tail = h_out - head(h)`` kept from the last computed call (one per
hidden state the model reads after the blocks). The reference ``r0_ref`` changes on computed calls only.
There is no warm-up, no forced last step and no skip limit (diffusers' semantics).

In graphpass a decided call runs a *probe* graph (embeddings, the first block and ``d``), reads ``d`` once
on the host, then the rest of the call (the other blocks, or one add per stream); see
:mod:`graphpass.techniques.stepcache`. Batched classifier-free guidance decides once for the batch (as the
hook does); separate cond/uncond calls decide in their own ``opt.cache_context``.

Host reads (``tests/techniques/test_host_reads.py``): ONE per decided call, whether it then computes or
reuses, and none on forced calls (the first, or any call before a reference exists). That is the minimum for
this rule: ``d`` is measured by the call's own first block, so no earlier call can know it, and which graph
finishes the call (the other blocks, or one add) must be chosen on the host. A run's decisions replay as
:class:`FrozenFirstBlockCache` with no read at all.

>>> FirstBlockCache.preset("paraattention").threshold
0.08
>>> schedule_from_json(FirstBlockCache(0.1).to_json()) == FirstBlockCache(0.1)
True
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import ScheduleError
from .stepcache import FrozenStepCache, ProbePolicy, StepCacheSchedule, StepRule, adaptive_refusal, step_cache_technique
from ..schedules.base import RegionRef, schedule_from_json  # noqa: F401 (doctest)

#: Published thresholds: diffusers' default, and ParaAttention's FLUX/HunyuanVideo setting (about 2x there).
PRESETS: dict[str, float] = {"default": 0.05, "paraattention": 0.08}


def check_threshold(owner: str, value, *, allow_zero: bool = True) -> float:
    """``value`` as a finite float >= 0 (> 0 unless ``allow_zero``), or a :class:`ScheduleError` naming
    ``owner``'s field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (
            value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ScheduleError(f"{owner} threshold={value!r} must be a finite number {bound} (higher reuses more)")
    return float(value)


@dataclass
class FirstBlockCache(StepCacheSchedule):
    """First Block Cache: reuse the blocks after the first while the first block's residual barely changes.

    Fields:
        threshold: relative L1 distance between the first block's residual and the one of the last computed
            call at or below which a call reuses the other blocks (diffusers ``threshold``, default 0.05;
            ParaAttention uses 0.08 on FLUX). 0 reuses only when the residual is unchanged.

    Example:
        >>> opt = graphpass.optimize(transformer, FirstBlockCache(0.05), example_kwargs=kw)
        >>> with opt.cache_context("cond"):
        ...     eps = opt(**kw)
        >>> opt.decisions("cond"), opt.freeze("cond")        # e.g. 'CCRC...', FrozenFirstBlockCache(...)
    """

    type_name: ClassVar[str] = "FirstBlockCache"
    keep_head: ClassVar[bool] = True
    reference: ClassVar[str] = "computed"

    threshold: float = 0.05

    def __post_init__(self):
        self.threshold = check_threshold("FirstBlockCache", self.threshold)

    @property
    def probe(self) -> str:
        return "head"

    def rule(self, num_steps: int | None) -> "FirstBlockCacheRule":
        return FirstBlockCacheRule(self.threshold)

    def freeze(self, decisions) -> "FrozenFirstBlockCache":
        """A static schedule replaying ``decisions`` (``"CCRC..."``), e.g. ``opt.decisions()``."""
        return FrozenFirstBlockCache(decisions)

    @classmethod
    def preset(cls, name: str) -> "FirstBlockCache":
        """``"default"`` (diffusers, 0.05) or ``"paraattention"`` (0.08)."""
        if name.lower() not in PRESETS:
            raise ScheduleError(f"unknown FirstBlockCache preset {name!r}; known: {', '.join(PRESETS)}")
        return cls(PRESETS[name.lower()])

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FirstBlockCache":
        unknown = set(d) - {"threshold"}
        if unknown:
            raise ScheduleError(f"FirstBlockCache JSON has unknown fields {sorted(unknown)}; known: ['threshold']")
        return cls(**d)

    def __str__(self) -> str:
        return f"FirstBlockCache(threshold={self.threshold:g})"


class FirstBlockCacheRule(StepRule):
    """The rule of one context: reuse iff ``d <= threshold`` (the call computes when no reference exists,
    which the runtime knows: the policy forces nothing).

    >>> p = FirstBlockCacheRule(0.05)
    >>> p.decide(1, 0.04), p.decide(2, 0.06)
    (True, False)
    """

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold

    def forced(self, i: int) -> bool:
        return False

    def _reuse(self, i: int, value: float) -> bool:
        return not value > self.threshold  # NaN computes


@dataclass
class FrozenFirstBlockCache(FrozenStepCache):
    """First Block Cache with fixed decisions: ``"C"`` computes every block (and keeps the other blocks'
    residual when a reuse follows), ``"R"`` runs the first block and adds that residual. No probe, no host
    read; exports to ONNX like :class:`~graphpass.FrozenAdaCache`. Calls past the end compute.

    Fields:
        decisions: one ``"C"`` or ``"R"`` per model call of a generation; the first must be ``"C"``.

    >>> FrozenFirstBlockCache("CRRC").reuses(None, 0.0, 1)
    True
    """

    type_name: ClassVar[str] = "FirstBlockCacheFrozen"
    keep_head: ClassVar[bool] = True


FIRST_BLOCK_CACHE = step_cache_technique("FirstBlockCache", FirstBlockCache, ProbePolicy,
                                         refusal=adaptive_refusal("FirstBlockCache"))
FROZEN_FIRST_BLOCK_CACHE = step_cache_technique("FrozenFirstBlockCache", FrozenFirstBlockCache)
