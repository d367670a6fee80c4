"""Pyramid Attention Broadcast (Zhao et al., ICLR 2025) as a schedule.

Inside a timestep window, an attention region computes its output at one step and broadcasts it to the
next ``range - 1`` steps. Each kind has its own range (spatial shortest, cross longest: the "pyramid").
Rule, as in the reference code: at model call ``counter`` (0 at the start of a generation, +1 per call)
with timestep ``t``, a region of kind ``k`` reuses iff ``lo_k < t < hi_k and counter % range_k != 0``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import ScheduleError
from .base import KINDS, PROGRESS_SCALE, RegionRef, Schedule

DEFAULT_WINDOW = (100.0, 800.0)
WINDOW_UNITS = ("timestep", "progress")

# Published defaults (reference code): ranges per kind and the window (lo, hi) on the 0..1000 scale.
PRESETS: dict[str, dict[str, Any]] = {
    "open-sora": dict(spatial=2, temporal=4, cross=6, window=(450, 930)),
    "latte": dict(spatial=2, temporal=3, cross=6, window=(100, 800)),
    "open-sora-plan": dict(spatial=2, temporal=4, cross=6, window=(100, 850)),
    # 3D full attention; the reference treats it as "spatial" with range 2.
    "cogvideox": dict(joint=2, window=(100, 850)),
}


# Presets for families the PAB paper does not cover: graphpass's defaults, not published figures. They follow
# the paper's rule for 3D full attention (CogVideoX: ``joint`` range 2 in (100, 850)) and its pyramid for
# text cross-attention (``cross`` range 6). None reuses ``text`` or ``other`` regions (a prompt refiner, an
# audio stream): those change with the inputs the broadcast rule was never measured on, so a schedule reuses
# them only when it names them, e.g. ``PAB.preset("ltx2", other=2)``.
FAMILY_PRESETS: dict[str, dict[str, Any]] = {
    "wan": dict(joint=2, cross=6, window=(100, 850)),  # self-attention over all tokens + text cross-attention
    "skyreels-v2": dict(joint=2, cross=6, window=(100, 850)),  # Wan's blocks
    "hunyuanvideo": dict(joint=2, window=(100, 850)),  # dual/single-stream joint attention (text inside)
    "ltx-video": dict(joint=2, cross=6, window=(100, 850)),
    "ltx2": dict(joint=2, cross=6, window=(100, 850)),  # video stream only; audio attention is "other"
    "mochi": dict(joint=2, window=(100, 850)),  # joint attention with text inside
    "allegro": dict(joint=2, cross=6, window=(100, 850)),
    "sana-video": dict(joint=2, cross=6, window=(100, 850)),  # linear joint attention + softmax cross
}


@dataclass
class PAB(Schedule):
    """Pyramid Attention Broadcast schedule.

    Fields:
        spatial, temporal, cross, joint, mlp: broadcast range per region kind: the region computes every
            ``range``-th call inside its window and reuses its last output otherwise. ``None`` or ``1`` means
            the kind is always computed.
        text, other: ranges for attention over no video tokens (a prompt refiner's self-attention; an audio
            stream, reference features). No preset sets them: ``PAB(text=2, ...)`` must name them.
        window: ``(lo, hi)`` timestep window (exclusive) in which reuse is allowed, on the model's timestep
            scale (0..1000 for DDPM/DDIM-trained models). Outside it, every region computes and the cache
            of the kind is dropped.
        windows: per-kind window overriding ``window``, e.g. ``{"cross": (100, 900)}``.
        window_unit: what windows measure. ``"timestep"`` (default, the published presets): the model's
            timestep as the sampler passes it. ``"progress"``: the fraction of the sampling trajectory done,
            0.0 at the first step and 1.0 at the last, e.g. ``window=(0.15, 0.85)`` reuses in the stable middle
            of sampling on any sampler (DDIM, or flow matching whose shifted ``sigma * 1000`` timesteps crowd
            near 1000). Progress needs the trajectory: ``opt.plan(timesteps)``, :func:`graphpass.optimize_pipeline`
            (plans every generation from the pipeline's scheduler), or a pipeline that passes
            ``cache_context(..., step_index=, num_inference_steps=)``.

    Example:
        >>> s = PAB(spatial=2, temporal=4, cross=6, window=(100, 800))
        >>> PAB.preset("pab246") == PAB(spatial=2, temporal=4, cross=6)
        True
    """

    type_name = "PAB"

    spatial: int | None = None
    temporal: int | None = None
    cross: int | None = None
    joint: int | None = None
    mlp: int | None = None
    window: tuple[float, float] = DEFAULT_WINDOW
    windows: dict[str, tuple[float, float]] = field(default_factory=dict)
    text: int | None = None
    other: int | None = None
    window_unit: str = "timestep"

    def __post_init__(self):
        if self.window_unit not in WINDOW_UNITS:
            raise ScheduleError(f"PAB window_unit={self.window_unit!r}: one of {', '.join(WINDOW_UNITS)}")
        for k in KINDS:
            r = getattr(self, k)
            if r is None:
                continue
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ScheduleError(f"PAB {k}={r!r}: a broadcast range must be an integer >= 1 (1 = always compute)")
        self.window = self._check_window("window", self.window)
        unknown = set(self.windows) - set(KINDS)
        if unknown:
            raise ScheduleError(f"PAB windows names unknown kinds {sorted(unknown)}; kinds are {', '.join(KINDS)}")
        self.windows = {k: self._check_window(f"windows[{k!r}]", w) for k, w in self.windows.items()}
        if self.window_unit == "progress":
            self._check_progress()
        if not self.kinds():
            raise ScheduleError(f"PAB schedule reuses nothing: give at least one of {'/'.join(KINDS)} a range >= 2, "
                                f"e.g. PAB(spatial=2, temporal=4, cross=6)")

    @staticmethod
    def _check_window(name, w) -> tuple[float, float]:
        try:
            lo, hi = (float(x) for x in w)
        except (TypeError, ValueError):
            raise ScheduleError(f"PAB {name}={w!r}: a window is a pair (lo, hi) of timesteps") from None
        if not lo < hi:
            raise ScheduleError(f"PAB {name}=({lo:g}, {hi:g}): lo must be below hi (reuse happens for lo < t < hi)")
        return (lo, hi)

    def _check_progress(self) -> None:
        for name, (lo, hi) in [("window", self.window), *((f"windows[{k!r}]", w) for k, w in self.windows.items())]:
            if lo < 0 or hi > 1:
                raise ScheduleError(f"PAB {name}=({lo:g}, {hi:g}) with window_unit='progress': a window is a pair of "
                                    f"fractions of the trajectory within [0, 1], e.g. (0.15, 0.85)")

    # --- Schedule --------------------------------------------------------------------------------
    def range_of(self, kind: str) -> int:
        return getattr(self, kind, None) or 1

    def window_of(self, kind: str) -> tuple[float, float]:
        """The window of ``kind`` on the axis the rules read: timesteps, or for progress windows the
        position ``1000 * (1 - progress)``, which falls over the trajectory as timesteps do."""
        lo, hi = self.windows.get(kind, self.window)
        if self.window_unit == "progress":
            return (PROGRESS_SCALE * (1 - hi), PROGRESS_SCALE * (1 - lo))
        return (lo, hi)

    @property
    def needs_trajectory(self) -> bool:
        return self.window_unit == "progress"

    def kinds(self) -> set[str]:
        return {k for k in KINDS if self.range_of(k) > 1}

    def reuses(self, region: RegionRef, t: float, counter: int) -> bool:
        r = self.range_of(region.kind)
        lo, hi = self.window_of(region.kind)
        return r > 1 and lo < t < hi and counter % r != 0

    def may_reuse_next(self, region: RegionRef, t: float, counter: int) -> bool:
        r = self.range_of(region.kind)
        lo, _ = self.window_of(region.kind)
        # The next timestep is below t: it can be inside the window only if t is above lo.
        return r > 1 and t > lo and (counter + 1) % r != 0

    # --- construction ----------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "PAB":
        """A named schedule; keyword overrides replace fields.

        Published PAB defaults: ``"open-sora"`` (spatial 2, temporal 4, cross 6), ``"latte"`` (2, 3, 6),
        ``"open-sora-plan"`` (2, 4, 6), ``"cogvideox"`` (joint 2), or ``"pabXYZ"`` (spatial X, temporal Y,
        cross Z; default window).

        Other families (graphpass defaults, window (100, 850)): ``"wan"``, ``"skyreels-v2"``, ``"ltx-video"``,
        ``"ltx2"``, ``"allegro"``, ``"sana-video"`` reuse joint (2) and cross (6); ``"hunyuanvideo"`` and
        ``"mochi"`` reuse joint (2) only (their text tokens are inside the joint attention). No preset reuses
        ``text`` or ``other`` regions. A preset naming a kind the model lacks fails ``check_model``.

            >>> print(PAB.preset("ltx2"))
            PAB(cross=6@(100,850), joint=2@(100,850))
            >>> PAB.preset("ltx2", other=2).kinds() == {"joint", "cross", "other"}
            True
        """
        key = name.lower().replace("_", "-")
        if key in PRESETS:
            kw = dict(PRESETS[key])
        elif key in FAMILY_PRESETS:
            kw = dict(FAMILY_PRESETS[key])
        elif m := re.fullmatch(r"pab-?(\d)(\d)(\d)", key):
            kw = dict(spatial=int(m[1]), temporal=int(m[2]), cross=int(m[3]))
        else:
            known = ", ".join([*PRESETS, *FAMILY_PRESETS])
            raise ScheduleError(f"unknown PAB preset {name!r}; known: {known}, or 'pabXYZ' such as 'pab246' "
                                f"(spatial 2, temporal 4, cross 6)")
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: getattr(self, k) for k in KINDS if getattr(self, k) is not None}
        d["window"] = list(self.window)
        if self.windows:
            d["windows"] = {k: list(w) for k, w in self.windows.items()}
        if self.window_unit != "timestep":
            d["window_unit"] = self.window_unit
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PAB":
        unknown = set(d) - set(KINDS) - {"window", "windows", "window_unit"}
        if unknown:
            raise ScheduleError(f"PAB JSON has unknown fields {sorted(unknown)}")
        d = dict(d)
        if "window" in d:
            d["window"] = tuple(d["window"])
        if "windows" in d:
            d["windows"] = {k: tuple(w) for k, w in d["windows"].items()}
        return cls(**d)

    def __str__(self) -> str:
        parts = []
        for k in KINDS:
            if self.range_of(k) > 1:
                lo, hi = self.windows.get(k, self.window)
                parts.append(f"{k}={self.range_of(k)}@({lo:g},{hi:g})")
        unit = "" if self.window_unit == "timestep" else ", progress"
        return "PAB(" + ", ".join(parts) + unit + ")"
