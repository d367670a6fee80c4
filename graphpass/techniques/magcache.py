"""MagCache (Ma et al., arXiv 2506.09045; diffusers ``MagCacheConfig``) compiled into phase graphs.

The residual of the whole chain of blocks, ``R = h_out - h_in``, changes in magnitude by a ratio
``g[s] = mean ||R_s||_2 / ||R_{s-1}||_2`` that is nearly the same for every prompt of a model, so a
calibration run (``calibrate=True``) measures it once. Generation then decides from the table alone (the
diffusers rule, per cache context)::

    rs = int(retention_ratio * num_inference_steps + 0.5)      # calls before rs always compute
    for call s >= rs:  ratio *= g[s]; steps += 1; err += |1 - ratio|
        reuse iff a residual is cached and err <= threshold and steps <= max_skip_steps
        else compute and reset ratio, steps, err to 1, 0, 0

A reuse call adds the residual of the last computed call to the chain's input (``h_out = h_in + R``). The
accumulators are float32, as diffusers' tensors are. A table of another length is resampled to
``num_inference_steps`` by nearest index (``round(i * (L - 1) / (N - 1))``, halves to even).

In graphpass the decisions are known before sampling: the plan is static (no host read at all, like PAB)
and the same plan exports to ONNX. Calibration computes every call and measures the ratio inside the graph;
the ratios are read once, at the end (``opt.records()``).

>>> m = MagCache(mag_ratios=[1.0, 1.0, 0.99, 0.97, 0.9, 0.8], num_inference_steps=6, retention_ratio=0.2)
>>> m.decisions   # call 0 retained; 1-3 reuse (err 0, 0.01, 0.05); 4 would be a 4th reuse in a row (K=3)
'CRRRCC'
>>> schedule_from_json(m.to_json()) == m
True
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from ..errors import ScheduleError
from ..passes.capture import CapturedGraph
from .base import StaticPlan, StepPolicy
from .stepcache import CalibrationPolicy, FrozenStepCache, StepCacheSchedule, StepCacheTarget, step_cache_technique
from ..schedules.base import RegionRef, ReplaysDecisions, schedule_from_json  # noqa: F401 (doctest)
from .first_block_cache import check_threshold

#: diffusers' ``FLUX_MAG_RATIOS`` (FLUX.1-dev, 28 steps; the same as MagCache4FLUX).
FLUX_MAG_RATIOS = [1.0, 1.21094, 1.11719, 1.07812, 1.0625, 1.03906, 1.03125, 1.03906, 1.02344, 1.03125, 1.02344,
                   0.98047, 1.01562, 1.00781, 1.0, 1.00781, 1.0, 1.00781, 1.0, 1.0, 0.99609, 0.99609, 0.98047,
                   0.98828, 0.96484, 0.95703, 0.93359, 0.89062]
#: Zehong-Ma/MagCache @8715292, ``MagCache4HunyuanVideo/magcache_sample_video.py``: HunyuanVideo T2V, 50 steps,
#: 720p and 544p tables (threshold 0.24, K 6, retention 0.2 there; 0.12/K4 for higher quality).
HUNYUAN_720P_MAG_RATIOS = [1.0, 1.0754, 1.27807, 1.11596, 1.09504, 1.05188, 1.00844, 1.05779, 1.00657, 1.04142,
                           1.03101, 1.00679, 1.02556, 1.00908, 1.06949, 1.05438, 1.02214, 1.02321, 1.03019, 1.00779,
                           1.03381, 1.01886, 1.01161, 1.02968, 1.00544, 1.02822, 1.00689, 1.02119, 1.0105, 1.01044,
                           1.01572, 1.02972, 1.0094, 1.02368, 1.0226, 0.98965, 1.01588, 1.02146, 1.0018, 1.01687,
                           0.99436, 1.00283, 1.01139, 0.97122, 0.98251, 0.94513, 0.97656, 0.90943, 0.85703, 0.75456]
HUNYUAN_544P_MAG_RATIOS = [1.0, 1.06971, 1.29073, 1.11245, 1.09596, 1.05233, 1.01415, 1.05672, 1.00848, 1.03632,
                           1.02974, 1.00984, 1.03028, 1.00681, 1.06614, 1.05022, 1.02592, 1.01776, 1.02985, 1.00726,
                           1.03727, 1.01502, 1.00992, 1.03371, 0.9976, 1.02742, 1.0093, 1.01869, 1.00815, 1.01461,
                           1.01152, 1.03082, 1.0061, 1.02162, 1.01999, 0.99063, 1.01186, 1.0217, 0.99947, 1.01711,
                           0.9904, 1.00258, 1.00878, 0.97039, 0.97686, 0.94315, 0.97728, 0.91154, 0.86139, 0.76592]

#: Published settings: (ratios, threshold, max_skip_steps, retention_ratio, num_inference_steps).
PRESETS: dict[str, tuple[list[float], float, int, float, int]] = {
    "flux": (FLUX_MAG_RATIOS, 0.06, 3, 0.2, 28),  # diffusers' defaults
    "flux-fast": (FLUX_MAG_RATIOS, 0.24, 5, 0.1, 28),  # MagCache4FLUX README, about 2.8x
    "hunyuanvideo-720p": (HUNYUAN_720P_MAG_RATIOS, 0.24, 6, 0.2, 50),
    "hunyuanvideo-544p": (HUNYUAN_544P_MAG_RATIOS, 0.24, 6, 0.2, 50),
    "hunyuanvideo-720p-slow": (HUNYUAN_720P_MAG_RATIOS, 0.12, 4, 0.2, 50),
}


def resample(ratios: Sequence[float], length: int) -> list[float]:
    """A ratio table resampled to ``length`` entries by nearest index, exactly as diffusers does (float32
    positions, rounding halves to even; one entry keeps the last).

    >>> resample([1.0, 2.0, 3.0], 5)       # positions 0, 0.5, 1, 1.5, 2: halves go to the even index
    [1.0, 1.0, 2.0, 3.0, 3.0]
    """
    src = torch.tensor([float(r) for r in ratios])
    if length == 1:
        return src[-1:].tolist()
    grid = torch.arange(length, dtype=torch.float32) * ((len(src) - 1) / (length - 1))
    return src[torch.round(grid).long()].tolist()


def magcache_decisions(ratios: Sequence[float], threshold: float, max_skip_steps: int, retention_ratio: float,
                       num_steps: int) -> str:
    """``"C"``/``"R"`` per call under diffusers' rule (see the module docstring), in float32.

    >>> magcache_decisions([1.0, 1.0, 1.0, 0.5], 0.06, 3, 0.0, 4)
    'CRRC'
    """
    f32 = np.float32
    ratio, err, steps, have_residual = f32(1.0), f32(0.0), 0, False
    rs = int(retention_ratio * num_steps + 0.5)
    out = []
    for s in range(num_steps):
        reuse = False
        if s >= rs:
            ratio = f32(ratio * f32(ratios[s] if s < len(ratios) else 1.0))
            steps += 1
            err = f32(err + abs(f32(1.0) - ratio))
            reuse = have_residual and err <= f32(threshold) and steps <= max_skip_steps
            if not reuse:
                ratio, err, steps = f32(1.0), f32(0.0), 0
        have_residual = have_residual or not reuse
        out.append("R" if reuse else "C")
    return "".join(out)


@dataclass
class MagCache(ReplaysDecisions, StepCacheSchedule):
    """MagCache: reuse the chain's residual while the accumulated magnitude-ratio error stays small.

    Fields (diffusers ``MagCacheConfig``):
        threshold: largest accumulated error ``sum |1 - prod g|`` of a reuse; higher reuses more (default
            0.06).
        max_skip_steps: most reuses in a row (K in the paper; default 3).
        retention_ratio: fraction of the first calls that always compute (default 0.2: 6 of 28).
        num_inference_steps: calls per generation and cache context; the table is resampled to it
            (default 28).
        mag_ratios: the model's magnitude ratios, one per call starting with 1.0 (see :data:`PRESETS`, or
            calibrate); required unless ``calibrate``.
        calibrate: compute every call and measure the ratios (``opt.records()`` after a generation).

    Example:
        >>> cal = graphpass.optimize(model, MagCache(calibrate=True, num_inference_steps=20), example_kwargs=kw)
        >>> sample(cal); ratios = cal.records()
        >>> opt = graphpass.optimize(model, MagCache(mag_ratios=ratios, num_inference_steps=20), example_kwargs=kw)
    """

    type_name: ClassVar[str] = "MagCache"
    first_stream: ClassVar[bool] = True

    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    num_inference_steps: int = 28
    mag_ratios: list[float] | None = None
    calibrate: bool = False
    decisions: str = field(init=False, repr=False, compare=False, default="")

    def __post_init__(self):
        self.threshold = check_threshold("MagCache", self.threshold)
        for name, lo in (("max_skip_steps", 0), ("num_inference_steps", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ScheduleError(f"MagCache {name}={v!r} must be an integer >= {lo}")
        r = self.retention_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1:
            raise ScheduleError(f"MagCache retention_ratio={r!r} must be a fraction in [0, 1] of the calls that "
                                f"always compute first")
        self.retention_ratio = float(r)
        if not isinstance(self.calibrate, bool):
            raise ScheduleError(f"MagCache calibrate={self.calibrate!r} must be True or False")
        if self.mag_ratios is None:
            if not self.calibrate:
                raise ScheduleError("MagCache needs mag_ratios (the model's magnitude ratios): use a preset "
                                    f"(MagCache.preset(...): {', '.join(PRESETS)}), or calibrate once with "
                                    "MagCache(calibrate=True, num_inference_steps=N) and pass opt.records()")
            self.decisions = "C" * self.num_inference_steps
            return
        ratios = self.mag_ratios.tolist() if isinstance(self.mag_ratios, torch.Tensor) else self.mag_ratios
        try:
            ratios = [float(g) for g in ratios]
        except (TypeError, ValueError):
            raise ScheduleError(f"MagCache mag_ratios={self.mag_ratios!r}: give a list of numbers, one per "
                                f"call, e.g. opt.records() of a calibrating run") from None
        if not ratios or any(not math.isfinite(g) or g <= 0 for g in ratios):
            raise ScheduleError(f"MagCache mag_ratios must be finite ratios > 0, one per call (got {ratios[:4]}...)")
        self.mag_ratios = ratios
        table = ratios if len(ratios) == self.num_inference_steps else resample(ratios, self.num_inference_steps)
        self.decisions = "C" * self.num_inference_steps if self.calibrate else magcache_decisions(
            table, self.threshold, self.max_skip_steps, self.retention_ratio, self.num_inference_steps)

    def steps_per_generation(self) -> int | None:
        return self.num_inference_steps

    @property
    def probe(self) -> str:
        return "ratio" if self.calibrate else "none"

    def freeze(self, decisions: str | None = None) -> "FrozenMagCache":
        """The decisions (by default the table's) as a :class:`FrozenMagCache`. MagCache's own plan is
        already static and exports as it is; the frozen form replays any decisions."""
        return FrozenMagCache(decisions or self.decisions)

    # --- construction ----------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "MagCache":
        """Published ratios and settings (Ma et al., "MagCache: Fast Video Generation with Magnitude-Aware
        Cache", arXiv 2506.09045; tables from diffusers' ``FLUX_MAG_RATIOS`` and Zehong-Ma/MagCache @8715292):
        ``"flux"`` (diffusers' defaults), ``"flux-fast"``,
        ``"hunyuanvideo-720p"``, ``"hunyuanvideo-544p"``, ``"hunyuanvideo-720p-slow"``; keyword overrides
        replace fields (e.g. ``num_inference_steps=30`` resamples the table)."""
        if name.lower() not in PRESETS:
            raise ScheduleError(f"unknown MagCache preset {name!r}; known: {', '.join(PRESETS)}")
        ratios, thr, k, r, n = PRESETS[name.lower()]
        return cls(**{"mag_ratios": list(ratios), "threshold": thr, "max_skip_steps": k, "retention_ratio": r,
                      "num_inference_steps": n, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "max_skip_steps": self.max_skip_steps,
                "retention_ratio": self.retention_ratio, "num_inference_steps": self.num_inference_steps,
                "mag_ratios": self.mag_ratios, "calibrate": self.calibrate}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MagCache":
        known = {"threshold", "max_skip_steps", "retention_ratio", "num_inference_steps", "mag_ratios", "calibrate"}
        unknown = set(d) - known
        if unknown:
            raise ScheduleError(f"MagCache JSON has unknown fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def __str__(self) -> str:
        if self.calibrate:
            return f"MagCache(calibrate, {self.num_inference_steps} steps)"
        return (f"MagCache(threshold={self.threshold:g}, K={self.max_skip_steps}, retention={self.retention_ratio:g}; "
                f"{self.decisions})")


@dataclass
class FrozenMagCache(FrozenStepCache):
    """MagCache with fixed decisions (``"C"``/``"R"`` per call): a reuse adds the video tokens' cached
    residual to the chain's input and passes the other hidden states through, as :class:`MagCache` does.

    Fields:
        decisions: one ``"C"`` or ``"R"`` per model call of a generation; the first must be ``"C"``.

    >>> schedule_from_json(FrozenMagCache("CCRRC").to_json())
    FrozenMagCache(decisions='CCRRC')
    """

    type_name: ClassVar[str] = "MagCacheFrozen"
    first_stream: ClassVar[bool] = True


def magcache_policy(schedule: MagCache, target: StepCacheTarget, captured: CapturedGraph) -> StepPolicy:
    """A calibrating MagCache measures every call (:class:`~graphpass.techniques.stepcache.CalibrationPolicy`);
    otherwise its table is a static plan (no host read; it exports)."""
    return CalibrationPolicy(schedule, target, captured) if schedule.calibrate else StaticPlan(schedule, target)


MAGCACHE = step_cache_technique("MagCache", MagCache, magcache_policy)
FROZEN_MAGCACHE = step_cache_technique("FrozenMagCache", FrozenMagCache)
