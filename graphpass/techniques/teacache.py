"""TeaCache (Liu et al., arXiv 2411.19108; ali-vilab/TeaCache) compiled into phase graphs.

The proxy of how much a call's output will change is the first block's timestep-modulated input ``m``
(what its first attention reads of the video tokens: ``norm1(h) * (1 + scale) + shift``). Per cache
context::

    calls 0 and N-1 compute (acc = 0)
    otherwise  acc += f(mean|m - m_prev| / mean|m_prev|)     # f: the model's fitted polynomial
               reuse iff acc < threshold, else compute and acc = 0

``m_prev`` is the previous call's ``m`` (reused calls included), so consecutive distances are summed; ``f``
is evaluated in float64 on the host and is not clamped (some fits go negative). A reuse adds the residual of
the whole chain of blocks, kept from the last computed call (``h_out = h_in + R``).

In graphpass a decided call runs a probe graph (embeddings and the first block's modulation, returning the
distance), reads it once on the host, then the rest of the call; see :mod:`graphpass.techniques.stepcache`.

Host reads (``tests/techniques/test_host_reads.py``): ONE per decided call, computed or reused; none on the
forced first and last calls. That is the minimum for this rule: the distance is the call's own modulated
input against the previous call's, so it exists only once the call has started, and the host must pick the
graph that finishes the call. A run's decisions replay as a static schedule with no read (``opt.freeze()``).

>>> t = TeaCache.preset("cogvideox-5b")
>>> round(t.rescale(0.1), 6)
0.090506
>>> schedule_from_json(t.to_json()) == t
True
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from ..errors import ScheduleError
from .stepcache import ProbePolicy, StepCacheSchedule, StepRule, adaptive_refusal, step_cache_technique
from ..schedules.adacache import FrozenAdaCache
from ..schedules.base import schedule_from_json  # noqa: F401 (doctest)
from .first_block_cache import check_threshold

#: Published polynomials (highest power first) and thresholds, from ali-vilab/TeaCache @7c10efc:
#: ``TeaCache4FLUX/teacache_flux.py``, ``TeaCache4HunyuanVideo/teacache_sample_video.py``,
#: ``TeaCache4CogVideoX1.5/teacache_sample_video.py``, ``TeaCache4Wan2.1/teacache_generate.py`` (the
#: time-embedding fits ``e``), ``TeaCache4Mochi``, ``TeaCache4LTX-Video``, ``eval/teacache/experiments/``
#: (Latte, Open-Sora, Open-Sora-Plan); thresholds from the README's speed/quality tables (the eval scripts'
#: 0.1 "slow" where the README gives none). The fits were made on each repository's own proxy input: FLUX,
#: HunyuanVideo, Mochi, LTX, Latte and Open-Sora on block 0's modulated norm (what graphpass measures);
#: CogVideoX and Wan2.1 on the time embedding, so on those models they rescale a related but different
#: distance.
COEFFICIENTS: dict[str, tuple[list[float], float]] = {
    "flux": ([4.98651651e+02, -2.83781631e+02, 5.58554382e+01, -3.82021401e+00, 2.64230861e-01], 0.25),
    "hunyuanvideo": ([7.33226126e+02, -4.01131952e+02, 6.75869174e+01, -3.14987800e+00, 9.61237896e-02], 0.1),
    "cogvideox-2b": ([-3.10658903e+01, 2.54732368e+01, -5.92380459e+00, 1.75769064e+00, -3.61568434e-03], 0.1),
    "cogvideox-5b": ([-1.53880483e+03, 8.43202495e+02, -1.34363087e+02, 7.97131516e+00, -5.23162339e-02], 0.1),
    "cogvideox1.5-5b": ([2.50210439e+02, -1.65061612e+02, 3.57804877e+01, -7.81551492e-01, 3.58559703e-02], 0.1),
    "cogvideox1.5-5b-i2v": ([1.22842302e+02, -1.04088754e+02, 2.62981677e+01, -3.06009921e-01, 3.71213220e-02],
                            0.1),
    "wan2.1-t2v-1.3b": ([2.39676752e+03, -1.31110545e+03, 2.01331979e+02, -8.29855975e+00, 1.37887774e-01], 0.08),
    "wan2.1-t2v-14b": ([-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404], 0.2),
    "wan2.1-i2v-480p": ([-3.02331670e+02, 2.23948934e+02, -5.25463970e+01, 5.87348440e+00, -2.01973289e-01], 0.2),
    "wan2.1-i2v-720p": ([-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683], 0.2),
    "mochi": ([-3.51241319e+03, 8.11675948e+02, -6.09400215e+01, 2.42429681e+00, 3.05291719e-03], 0.06),
    "ltx": ([2.14700694e+01, -1.28016453e+01, 2.31279151e+00, 7.92487521e-01, 9.69274326e-03], 0.03),
    "latte": ([-2.46434137e+03, 3.08044764e+02, 8.07447667e+01, -4.11385132e+00, 1.11001402e-01], 0.1),
    "opensora": ([2.17546007e+02, -1.18329252e+02, 2.68662585e+01, -4.59364272e-02, 4.84426240e-02], 0.1),
    "opensora-plan": ([2.05943668e+05, -1.48759286e+04, 3.06085986e+02, 1.31418080e+00, 2.39658469e-03], 0.1),
    "cosmos": ([2.71156237e+02, -9.19775607e+01, 2.24437250e+00, 2.08355751e+00, 1.41776330e-01], 0.1),
}


def polyval(coefficients: Sequence[float], x: float) -> float:
    """``coefficients[0] * x**(n-1) + ... + coefficients[-1]`` (Horner, float64), as ``np.poly1d``.

    >>> polyval([2.0, 0.0, 1.0], 3.0)
    19.0
    """
    y = 0.0
    for c in coefficients:
        y = y * x + c
    return y


@dataclass
class TeaCache(StepCacheSchedule):
    """TeaCache: reuse the chain's residual while the rescaled change of the modulated input stays small.

    Fields:
        threshold: accumulated rescaled distance below which a call reuses (``rel_l1_thresh``); higher reuses
            more. Published values are per model (:data:`COEFFICIENTS`), e.g. 0.1 ("slow") / 0.2 ("fast").
        coefficients: the rescaling polynomial, highest power first; ``[1.0, 0.0]`` is the identity (no
            published fit: calibrate one, or accumulate raw distances).
        num_inference_steps: calls per generation and cache context, for the forced last call; None: taken
            from ``opt.plan(timesteps)`` or the pipeline's ``cache_context(num_inference_steps=)``, else only
            the first call is forced.

    Example:
        >>> opt = graphpass.optimize(transformer, TeaCache.preset("hunyuanvideo"), example_kwargs=kw, timesteps=ts)
        >>> sample(opt); opt.decisions(), opt.records()
    """

    type_name: ClassVar[str] = "TeaCache"
    reference: ClassVar[str] = "previous"

    threshold: float = 0.1
    coefficients: list[float] = field(default_factory=lambda: [1.0, 0.0])
    num_inference_steps: int | None = None

    def __post_init__(self):
        self.threshold = check_threshold("TeaCache", self.threshold)
        try:
            coefs = [float(c) for c in self.coefficients]
        except (TypeError, ValueError):
            coefs = None
        if not coefs or any(not math.isfinite(c) for c in coefs):
            raise ScheduleError(f"TeaCache coefficients={self.coefficients!r}: give the rescaling polynomial as "
                                f"finite numbers, highest power first, e.g. {COEFFICIENTS['hunyuanvideo'][0]}")
        self.coefficients = coefs
        n = self.num_inference_steps
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ScheduleError(f"TeaCache num_inference_steps={n!r} must be an integer >= 1 or None")

    def steps_per_generation(self) -> int | None:
        return self.num_inference_steps

    @property
    def probe(self) -> str:
        return "modulated"

    def rescale(self, distance: float) -> float:
        """The fitted polynomial at a relative L1 distance."""
        return polyval(self.coefficients, distance)

    def rule(self, num_steps: int | None) -> "TeaCacheRule":
        return TeaCacheRule(self, num_steps or self.num_inference_steps)

    def freeze(self, decisions: str) -> FrozenAdaCache:
        """The decisions as a :class:`~graphpass.FrozenAdaCache` (the same graphs: a reuse adds the chain's
        residual)."""
        return FrozenAdaCache(decisions)

    @classmethod
    def preset(cls, name: str, **overrides) -> "TeaCache":
        """A model's published polynomial and threshold (:data:`COEFFICIENTS`; from ali-vilab/TeaCache @7c10efc,
        Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model", arXiv
        2411.19108); overrides replace fields, e.g. ``TeaCache.preset("hunyuanvideo", threshold=0.15)``."""
        if name.lower() not in COEFFICIENTS:
            raise ScheduleError(f"unknown TeaCache preset {name!r}; known: {', '.join(COEFFICIENTS)}")
        coefs, thr = COEFFICIENTS[name.lower()]
        return cls(**{"coefficients": list(coefs), "threshold": thr, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "coefficients": self.coefficients,
                "num_inference_steps": self.num_inference_steps}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TeaCache":
        known = {"threshold", "coefficients", "num_inference_steps"}
        unknown = set(d) - known
        if unknown:
            raise ScheduleError(f"TeaCache JSON has unknown fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def __str__(self) -> str:
        if self.coefficients == [1.0, 0.0]:
            return f"TeaCache(threshold={self.threshold:g}, raw distances)"
        return f"TeaCache(threshold={self.threshold:g}, degree {len(self.coefficients) - 1})"


class TeaCacheRule(StepRule):
    """The rule of one context (see the module docstring).

    >>> p = TeaCacheRule(TeaCache(threshold=0.3), num_steps=5)
    >>> p.forced(0), p.decide(1, 0.1), p.decide(2, 0.15), p.decide(3, 0.1), p.forced(4)
    (True, True, True, False, True)
    """

    def __init__(self, schedule: TeaCache, num_steps: int | None):
        super().__init__()
        self.schedule = schedule
        self.n = num_steps
        self.acc = 0.0

    def forced(self, i: int) -> bool:
        if i == 0 or (self.n is not None and i >= self.n - 1):
            self.acc = 0.0
            return True
        return False

    def _reuse(self, i: int, value: float) -> bool:
        self.acc += self.schedule.rescale(value)
        if self.acc < self.schedule.threshold:
            return True
        self.acc = 0.0
        return False


TEACACHE = step_cache_technique("TeaCache", TeaCache, ProbePolicy, refusal=adaptive_refusal("TeaCache"))
