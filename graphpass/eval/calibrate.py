"""AdaCache calibration: tune codebook thresholds for a model from a few baseline runs.

The published thresholds were tuned by hand per model ("1-2 h per model"); :func:`calibrate` does it by
measurement:

1. sample the baseline on a few seeds through an AdaCache that always computes (its outputs equal the
   model's), recording the distance metric (and the MoReg motion score) of every step;
2. with ``moreg=True``, set the MoReg normaliser to the mean motion score measured in its window (so typical
   motion maps to 1 for this model);
3. keep the codebook's steps (``codebook="fast" | "slow" | "100-step"``) and scale its distance bounds by one
   factor, searched by bisection on real runs of the same seeds: the smallest factor reaching
   ``target_speedup`` (in steps computed), or the largest keeping the mean PSNR against the baseline at
   ``target_psnr``;
4. return the schedule and what was measured. Re-running the schedule on the same seeds computes the reported
   number of steps (runs are deterministic).

    >>> model, kwargs, timesteps = graphpass.workloads.example_call("vdt-s", batch=2, num_steps=30)
    >>> cal = calibrate(model, kwargs, timesteps, seeds=[0, 1, 2], target_speedup=1.5)
    >>> cal.schedule.save("schedule.json")

The command line is ``graphpass calibrate`` (:mod:`graphpass.commands.calibrate`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..api import optimize
from ..errors import GraphpassError
from ..models.physics import PhysicsParams, generate
from ..models.sampler import sample
from ..schedules.adacache import CODEBOOKS, AdaCache, MoReg
from .metrics import psnr, ssim


@dataclass
class Trial:
    """One evaluated codebook: the bound scale, steps computed per seed, speedup (steps), PSNR/SSIM per seed."""

    scale: float
    computed: list[int]
    speedup: float
    psnr: list[float]
    ssim: list[float]

    @property
    def mean_psnr(self) -> float:
        return sum(self.psnr) / len(self.psnr)


@dataclass
class Calibration:
    """What :func:`calibrate` measured and chose.

    schedule: the proposed AdaCache; chosen: the trial it came from (its computed steps are what re-running
    the schedule on the same seeds computes); metrics: per seed, the decision metric of every measured step of
    the baseline (k = 1); motion: per seed, the raw MoReg motion score per measured step (max over the batch);
    trials: every run of the search, in order; target: ``("speedup" | "psnr", value)``; reached: whether the
    chosen trial meets it.
    """

    schedule: Any
    chosen: Trial
    steps: int
    seeds: list[int]
    metrics: list[list[float]]
    motion: list[list[float]]
    trials: list[Trial] = field(default_factory=list)
    target: tuple[str, float] = ("speedup", 1.0)
    reached: bool = False


# --- sampling helpers (shared with benchmarks/adacache.py) ------------------------------------------------
def labels_for(model, seed: int) -> torch.Tensor:
    """The label of the physics video generated from ``seed``, at the model's video size: the 'prompt'."""
    cfg = model.config
    return generate(seed, PhysicsParams(size=cfg.image_size, num_frames=cfg.num_frames)).labels


def sample_seeds(fn: Callable, model, seeds: Sequence[int], num_steps: int, guidance: float = 2.0,
                 after_each: Callable[[], None] | None = None) -> list[torch.Tensor]:
    """One video per seed, sampled with ``fn`` (the model or an optimized model) by the DDIM sampler."""
    videos = []
    for s in seeds:
        videos.append(sample(fn, labels=labels_for(model, s)[None], num_steps=num_steps, guidance_scale=guidance,
                             seed=s, progress=False)[0])
        if after_each is not None:
            after_each()
    return videos


def run_schedule(opt, model, seeds: Sequence[int], num_steps: int, guidance: float = 2.0):
    """Videos, steps computed per seed and AdaCache records per seed for a :class:`ResidualModel`."""
    computed, records = [], []

    def note():
        computed.append(opt.decisions().count("C"))
        records.append(opt.records())

    videos = sample_seeds(opt, model, seeds, num_steps, guidance, after_each=note)
    return videos, computed, records


def _scaled(codebook: dict[float, int], scale: float) -> dict[float, int]:
    return {float(f"{b * scale:.6g}"): n for b, n in codebook.items()}


# --- calibration -----------------------------------------------------------------------------------------
def calibrate(model, example_kwargs: dict, timesteps: Sequence[float], *, seeds: Sequence[int] = (0, 1, 2),
              target_speedup: float | None = None, target_psnr: float | None = None, codebook: str = "fast",
              moreg: bool = False, metric_at: str | int | None = None, cache_unit: str = "residual",
              guidance: float = 2.0, iters: int = 8, log: Callable[[str], None] = print) -> Calibration:
    """Propose an AdaCache for ``model`` meeting one target (see the module docstring)."""
    if (target_speedup is None) == (target_psnr is None):
        raise GraphpassError("give exactly one target: target_speedup (e.g. 1.5) or target_psnr (e.g. 30)")
    if codebook not in CODEBOOKS:
        raise GraphpassError(f"unknown codebook {codebook!r}; known: {', '.join(CODEBOOKS)}")
    if target_speedup is not None and not target_speedup >= 1:
        raise GraphpassError(f"target_speedup={target_speedup} must be >= 1")
    n = len(timesteps)
    seeds = list(seeds)
    mo = MoReg.for_steps(n) if moreg else None

    # 1. baseline through an AdaCache that always computes: the model's outputs plus every step's metric.
    probe = AdaCache(codebook={1.0: 1}, metric_at=metric_at, moreg=mo, cache_unit=cache_unit)
    opt = optimize(model, probe, example_kwargs=example_kwargs, timesteps=timesteps)
    baseline, computed, records = run_schedule(opt, model, seeds, n, guidance)
    metrics = [[r.metric for r in recs] for recs in records]
    motion = [[max(r.motion) for r in recs] if mo else [] for recs in records]
    log(f"baseline: {len(seeds)} seeds x {n} steps; metric at {opt.metric.path} ({opt.metric.kind} residual "
        f"{opt.metric.spec}); {sum(computed)} model calls")
    log("  step  distance/k (mean over seeds, max over batch)" + ("   motion" if mo else ""))
    for j, rec in enumerate(records[0]):
        d = sum(r[j].metric if mo is None else max(r[j].distance) / r[j].k for r in records) / len(records)
        line = f"  {rec.step:>4}  {d:.4f}"
        if mo:
            line += f"   {sum(m[j] for m in motion) / len(motion):.4f}"
        log(line)

    # 2. MoReg normaliser: the mean motion score in its window maps to 1.
    if mo is not None:
        lo, hi = mo.window
        inside = [max(r.motion) for recs in records for r in recs if lo <= r.step + 1 <= hi]
        if inside and sum(inside) > 0:
            mo = MoReg(window=mo.window, normaliser=sum(inside) / len(inside), exponent=mo.exponent,
                       gradient_factor=mo.gradient_factor, strides=mo.strides)
        log(f"MoReg: normaliser {mo.normaliser:.4f} (mean motion in steps {lo}..{hi}; published 0.385)")
        # the decision metric with the calibrated normaliser, re-derived from the recorded values
        metrics = [[_metric_with(mo, recs, j) for j in range(len(recs))] for recs in records]

    # 3. bisection on the scale of the codebook's bounds, on real runs.
    base = CODEBOOKS[codebook]
    flat = [m for ms in metrics for m in ms if math.isfinite(m) and m > 0] or [1e-3]
    s_lo = min(flat) / max(base) / 2
    s_hi = max(flat) / min(base) * 2
    trials: list[Trial] = []

    def evaluate(scale: float) -> Trial:
        sched = AdaCache(codebook=_scaled(base, scale), metric_at=metric_at, moreg=mo, cache_unit=cache_unit)
        videos, comp, _ = run_schedule(opt.with_schedule(sched), model, seeds, n, guidance)
        tr = Trial(scale, comp, n * len(seeds) / sum(comp), [psnr(v, b) for v, b in zip(videos, baseline)],
                   [ssim(v, b) for v, b in zip(videos, baseline)])
        trials.append(tr)
        log(f"  scale {scale:9.4g}: computed {comp} -> {tr.speedup:.2f}x, PSNR {tr.mean_psnr:.2f} dB")
        return tr

    if target_speedup is not None:
        def ok(tr: Trial) -> bool:
            return tr.speedup >= target_speedup
        # more reuse as the scale grows: find the smallest scale that is fast enough
        want_low = True
    else:
        def ok(tr: Trial) -> bool:
            return tr.mean_psnr >= target_psnr
        want_low = False  # the largest scale that is still accurate enough
    log(f"search over bound scales [{s_lo:.3g}, {s_hi:.3g}] of the {codebook!r} codebook {base}:")
    lo_t, hi_t = evaluate(s_lo), evaluate(s_hi)
    good, bad = (hi_t, lo_t) if want_low else (lo_t, hi_t)
    if ok(good) and not ok(bad):
        for _ in range(iters):
            mid = math.sqrt(good.scale * bad.scale)
            tr = evaluate(mid)
            if ok(tr):
                good = tr
            else:
                bad = tr
    feasible = [t for t in trials if ok(t)]
    if feasible:
        chosen = min(feasible, key=lambda t: t.scale) if want_low else max(feasible, key=lambda t: t.scale)
    else:  # unreachable target: the closest trial
        chosen = max(trials, key=lambda t: t.speedup if want_low else t.mean_psnr)
    schedule = AdaCache(codebook=_scaled(base, chosen.scale), metric_at=metric_at, moreg=mo, cache_unit=cache_unit)
    target = ("speedup", target_speedup) if target_speedup is not None else ("psnr", target_psnr)
    return Calibration(schedule=schedule, chosen=chosen, steps=n, seeds=seeds, metrics=metrics, motion=motion,
                       trials=trials, target=target, reached=bool(feasible))


def _metric_with(mo, recs, j: int) -> float:
    """The decision metric of record ``j`` of a run recomputed with MoReg ``mo`` (k and motion as recorded)."""
    prev = [1.0] * len(recs[0].distance)
    for r in recs[:j + 1]:
        facs, ms = zip(*(mo.factor(m, p, r.k, r.step + 1) for m, p in zip(r.motion, prev)))
        prev = list(ms)
    r = recs[j]
    return max(d / r.k * f for d, f in zip(r.distance, facs))
