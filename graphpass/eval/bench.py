"""One speed/quality table over step-caching methods for one model and a set of seeds.

Every method samples the same seeds with the same sampler; PSNR/SSIM compare each video with the baseline's
video of the same seed (:mod:`graphpass.eval.metrics`), and for the VDT physics models the physics check
(:mod:`graphpass.eval.physics`) scores each video on its own. Methods:

* ``baseline``: the model as is. ``graphpass-noreuse``: graphpass's phase graph with nothing reused (what
  running the captured graph alone costs or saves).
* ``pab246``, ``pab357``, ``pab579``: the published PAB ranges (spatial, temporal, cross) with the default
  window; ``pab-<preset>``: the model type's published preset (:data:`MODEL_PRESETS`).
* ``searched``: a schedule written by ``graphpass search`` (given as a file; with several files, one row
  ``searched-<file stem>`` each).
* ``adacache-slow``, ``adacache-fast``, ``adacache-fast-moreg``: AdaCache with the published 30-step codebooks
  (and MoReg), when :mod:`graphpass.schedules.adacache` is present.
* ``taylorseer``, ``taylorseer-order2``: :class:`~graphpass.TaylorSeer` on the tagged attention regions (the
  "regions" preset: diffusers' defaults, interval 5 from call 3, first order; and second order);
  ``easycache``, ``easycache-0.1``, ``easycache-0.2``: :class:`~graphpass.EasyCache` at Wan2.1's threshold
  0.05 and a sweep, its 10 forced steps of 50 scaled to the run's length (:func:`technique_variants`).
* ``fbc``, ``fbc-0.1``, ``fbc-0.2``: :class:`~graphpass.FirstBlockCache` at diffusers' threshold 0.05 and a
  sweep; ``magcache``, ``magcache-0.12``, ``magcache-0.24``: :class:`~graphpass.MagCache` at diffusers' settings
  (threshold 0.06, 3 skips, retention 0.2) and a threshold sweep; ``teacache-0.02``, ``teacache-0.05``,
  ``teacache``: :class:`~graphpass.TeaCache` at thresholds 0.02, 0.05 and 0.1 (the published "slow" setting of
  most video models; with a model's own polynomial the scale of the accumulated distance differs, so the sweep
  goes down from it).
  MagCache's ratios and TeaCache's polynomial are the model's own, measured by
  :mod:`graphpass.eval.coefficients` on one seed that is not benched (:func:`calibration_seed`); a polynomial
  that predicts negative changes in its own range (:meth:`~graphpass.eval.coefficients.TeaCacheFit.negative_at`)
  is replaced by raw distances, and the row's schedule says so.
* ``diffusers-pab``, ``diffusers-fbc``, ``diffusers-magcache``, ``diffusers-taylorseer``,
  ``diffusers-fastercache``: diffusers' own cache hooks (``transformer.enable_cache``) for diffusers models:
  Pyramid Attention Broadcast (same ranges and window as the model's preset), First Block Cache (threshold
  0.05), MagCache (diffusers' defaults: threshold 0.06, 3 skips, retention 0.2; magnitude ratios from
  diffusers' own calibration run of seed 0, :func:`~graphpass.eval.coefficients.diffusers_mag_ratios`),
  TaylorSeer (the config of the ``taylorseer`` row, naming the same modules: equal outputs, so the rows
  compare speed alone) and FasterCache (diffusers' documented CogVideoX example settings). A method that does
  not apply to the model gets a row with its ``status`` saying why.

Figures per method: seconds per video (fastest seed; wall time and process CPU time, the steadier figure on a
shared machine), speedup over the baseline, ideal FLOP speedup (FLOPs
of the baseline's steps over those of the phase graphs run; graphpass methods only), peak cache bytes
(graphpass methods), PSNR, SSIM, physics.

Example::

    >>> wl = Workload.from_name("latte-tiny", num_steps=10)
    >>> res = bench(wl, seeds=[0], methods=["baseline", "pab246", "diffusers-pab"], progress=False)
    >>> [r["method"] for r in res.rows]
    ['baseline', 'pab246', 'diffusers-pab']
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import GraphpassError, InputError
from ..schedules.adacache import AdaCache, MoReg
from ..schedules.base import Schedule
from ..schedules.pab import PAB
from ..techniques.easycache import EasyCache
from ..techniques.first_block_cache import FirstBlockCache
from ..techniques.magcache import MagCache
from ..techniques.taylorseer import TaylorSeer
from ..techniques.teacache import TeaCache
from .coefficients import diffusers_mag_ratios, fit_teacache, magcache_ratios
from .harness import Baseline, ComputeAll, Measurement, Workload, save_figure

#: The published PAB preset that fits each model family (VDT blocks are spatial -> temporal -> cross -> MLP
#: with adaLN, the Open-Sora STDiT layout).
MODEL_PRESETS = {"vdt": "open-sora", "latte": "latte", "cogvideox": "cogvideox"}
PAB_PRESETS = ("pab246", "pab357", "pab579")
FIELDS = ("sec_per_video", "speedup", "cpu_sec_per_video", "cpu_speedup", "ideal_speedup", "cache_peak_bytes",
          "psnr", "ssim", "physics")


def model_preset(workload: Workload) -> str:
    """The PAB preset of ``workload``'s model type (``"latte"`` for Latte, ``"open-sora"`` for VDT...)."""
    name = type(workload.model).__name__.lower()
    for family, preset in MODEL_PRESETS.items():
        if family in name or workload.name.startswith(family):
            return preset
    return "pab246"


def _adacache_variants(num_steps: int) -> dict[str, Any]:
    return {"adacache-slow": AdaCache.preset("slow"), "adacache-fast": AdaCache.preset("fast"),
            "adacache-fast-moreg": AdaCache.preset("fast", moreg=MoReg.for_steps(num_steps))}


#: diffusers' cache hooks with a bench row (``diffusers-<kind>``).
DIFFUSERS_HOOKS = ("pab", "fbc", "magcache", "taylorseer", "fastercache")


def technique_variants(num_steps: int) -> dict[str, Schedule]:
    """The rows of the techniques at their presets and a threshold sweep. EasyCache's warm-up is Wan2.1's 10
    forced steps of 50, scaled to ``num_steps``.

    >>> sorted(technique_variants(30))
    ['easycache', 'easycache-0.1', 'easycache-0.2', 'taylorseer', 'taylorseer-order2']
    >>> technique_variants(30)["easycache"].warmup_steps
    6
    """
    warm = max(2, round(num_steps * 10 / 50))
    return {"taylorseer": TaylorSeer.preset("regions"), "taylorseer-order2": TaylorSeer.preset("regions", max_order=2),
            "easycache": EasyCache.preset("wan2.1", warmup_steps=warm),
            "easycache-0.1": EasyCache.preset("wan2.1", threshold=0.1, warmup_steps=warm),
            "easycache-0.2": EasyCache.preset("wan2.1", threshold=0.2, warmup_steps=warm)}


#: Rows of the techniques that need the model's own constants (:func:`calibrated_variants`), and their thresholds.
CALIBRATED = {"fbc": 0.05, "fbc-0.1": 0.1, "fbc-0.2": 0.2,
              "magcache": 0.06, "magcache-0.12": 0.12, "magcache-0.24": 0.24,
              "teacache-0.02": 0.02, "teacache-0.05": 0.05, "teacache": 0.1}


def calibration_seed(seeds: Sequence[int]) -> int:
    """The seed whose run measures MagCache's ratios and TeaCache's polynomial: one past the benched seeds, so
    no row is judged on the video it was calibrated on.

    >>> calibration_seed([0, 1, 2])
    3
    """
    return max(int(s) for s in seeds) + 1


def calibrated_variants(workload: Workload, methods: Sequence[str], seed: int) -> dict[str, Schedule]:
    """The schedules of the :data:`CALIBRATED` rows among ``methods``. MagCache's magnitude ratios and TeaCache's
    rescaling polynomial are measured on ``seed`` (one full run each, only when a row of that technique is
    asked for); MagCache keeps diffusers' other settings (3 skips, retention 0.2)."""
    wanted = [m for m in methods if m in CALIBRATED]
    out: dict[str, Schedule] = {m: FirstBlockCache(CALIBRATED[m]) for m in wanted if m.startswith("fbc")}
    if any(m.startswith("magcache") for m in wanted):
        ratios = magcache_ratios(workload, seed)
        out.update({m: MagCache(threshold=CALIBRATED[m], mag_ratios=ratios, num_inference_steps=workload.num_steps)
                    for m in wanted if m.startswith("magcache")})
    if any(m.startswith("teacache") for m in wanted):
        fit = fit_teacache(workload, [seed])
        # a fit that predicts negative changes would reuse without end: accumulate raw distances instead
        coefficients = [1.0, 0.0] if fit.negative_at() is not None else fit.coefficients
        out.update({m: TeaCache(threshold=CALIBRATED[m], coefficients=coefficients,
                                num_inference_steps=workload.num_steps)
                    for m in wanted if m.startswith("teacache")})
    return out


def searched_methods(schedule_paths: str | Path | Sequence[str | Path] | None) -> dict[str, Path]:
    """Method name per searched schedule file: ``searched`` for one file, ``searched-<file stem>`` for several."""
    if schedule_paths is None:
        return {}
    paths = [Path(schedule_paths)] if isinstance(schedule_paths, (str, Path)) else [Path(p) for p in schedule_paths]
    if len(paths) == 1:
        return {"searched": paths[0]}
    return {f"searched-{p.stem}": p for p in paths}


def available_methods(workload: Workload,
                      schedule_paths: str | Path | Sequence[str | Path] | None = None) -> list[str]:
    """Every method that has a row for ``workload`` (diffusers hooks only for diffusers models)."""
    names = ["baseline", "graphpass-noreuse", *PAB_PRESETS, f"pab-{model_preset(workload)}"]
    names += list(searched_methods(schedule_paths))
    names += list(_adacache_variants(workload.num_steps))
    names += list(technique_variants(workload.num_steps))
    names += list(CALIBRATED)
    if workload.family == "diffusers":
        names += [f"diffusers-{k}" for k in DIFFUSERS_HOOKS]
    return list(dict.fromkeys(names))


def _diffusers_config(kind: str, workload: Workload, adapter_ref: dict):
    from diffusers import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig,
                           PyramidAttentionBroadcastConfig)

    if kind not in DIFFUSERS_HOOKS:
        raise _NotApplicable(f"n/a: no diffusers hook {kind!r}; known: {', '.join(DIFFUSERS_HOOKS)}")
    if kind == "fbc":
        return FirstBlockCacheConfig(threshold=0.05)
    if kind == "magcache":
        return MagCacheConfig(num_inference_steps=workload.num_steps, mag_ratios=diffusers_mag_ratios(workload))
    if kind == "taylorseer":
        return technique_variants(workload.num_steps)["taylorseer"].to_diffusers(workload.regions)
    if kind == "fastercache":  # diffusers' documented example (CogVideoX)
        return FasterCacheConfig(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681),
                                 current_timestep_callback=lambda: adapter_ref["adapter"].current_timestep,
                                 attention_weight_callback=lambda _: 0.3, unconditional_batch_skip_range=5,
                                 unconditional_batch_timestep_skip_range=(-1, 781),
                                 tensor_format=workload._layout)
    p = PAB.preset(model_preset(workload))
    win = lambda k: tuple(int(v) for v in p.window_of(k))  # noqa: E731
    kw = {}
    if "Latte" in type(workload.model).__name__:
        # re.search against module names: anchored, so temporal blocks do not match the spatial identifier
        kw = dict(spatial_attention_block_identifiers=(r"^transformer_blocks\.",),
                  temporal_attention_block_identifiers=(r"^temporal_transformer_blocks\.",),
                  cross_attention_block_identifiers=(r"^transformer_blocks\.",))
    return PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=p.spatial or p.joint, temporal_attention_block_skip_range=p.temporal,
        cross_attention_block_skip_range=p.cross, spatial_attention_timestep_skip_range=win("spatial"),
        temporal_attention_timestep_skip_range=win("temporal"), cross_attention_timestep_skip_range=win("cross"),
        current_timestep_callback=lambda: adapter_ref["adapter"].current_timestep, **kw)


def _measure_diffusers(workload: Workload, kind: str, baseline: Baseline) -> Measurement:
    model = workload.model
    ref: dict[str, Any] = {}
    model.enable_cache(_diffusers_config(kind, workload, ref))
    try:
        def fn(**kw):
            with model.cache_context("batched_cfg"):
                return model(**kw)

        ref["adapter"] = workload.adapt(fn, on_new_generation=model._reset_stateful_cache)
        return workload.measure(fn, baseline, adapted=ref["adapter"])
    finally:
        model.disable_cache()


@dataclass
class BenchResult:
    """The table: one row per method (``method``, ``schedule``, ``status`` and the :data:`FIELDS`)."""

    model: str
    seeds: list[int]
    num_steps: int
    threads: int
    rows: list[dict[str, Any]] = field(default_factory=list)

    def row(self, method: str) -> dict[str, Any]:
        for r in self.rows:
            if r["method"] == method:
                return r
        raise KeyError(f"no row {method!r}; rows: {[r['method'] for r in self.rows]}")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "seeds": self.seeds, "num_steps": self.num_steps, "threads": self.threads,
                "timing": "seconds per video = fastest seed (wall; cpu = process CPU time); speedup = baseline "
                          "seconds / method seconds",
                "rows": self.rows}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    def best_at(self, min_psnr: float, speed: str = "cpu_speedup") -> dict[str, Any] | None:
        """The fastest measured method (by ``speed``: ``"cpu_speedup"``, ``"speedup"`` or ``"ideal_speedup"``)
        whose mean PSNR is at least ``min_psnr`` dB (a lossless method's is inf); None when no method reaches it.
        The baseline row (no PSNR: it is the reference) does not compete.

        >>> r = BenchResult("m", [0], 10, 1, rows=[
        ...     {"method": "a", "status": "ok", "psnr": 31.0, "cpu_speedup": 1.5},
        ...     {"method": "b", "status": "ok", "psnr": 27.0, "cpu_speedup": 2.5},
        ...     {"method": "c", "status": "n/a", "psnr": None, "cpu_speedup": None}])
        >>> r.best_at(30)["method"], r.best_at(25)["method"], r.best_at(40)
        ('a', 'b', None)
        """
        if speed not in ("cpu_speedup", "speedup", "ideal_speedup"):
            raise InputError(f"best_at speed={speed!r}: use 'cpu_speedup', 'speedup' or 'ideal_speedup'")
        ok = [r for r in self.rows if r["status"] == "ok" and r.get("psnr") is not None and r["psnr"] >= min_psnr
              and r.get(speed) is not None]
        return max(ok, key=lambda r: r[speed], default=None)

    def markdown(self) -> str:
        """The table in Markdown (PSNR of the baseline is shown as ``inf``: identical by definition)."""
        head = ("| method | s/video | speedup | CPU s/video | CPU speedup | ideal FLOP speedup | cache peak | PSNR dB "
                "| SSIM | physics |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        lines = [head]
        for r in self.rows:
            if r["status"] != "ok":
                lines.append(f"| {r['method']} | {r['status']} |  |  |  |  |  |  |  |  |")
                continue
            psnr = "inf" if r["psnr"] is None else f"{r['psnr']:.2f}"
            ideal = "-" if r["ideal_speedup"] is None else f"{r['ideal_speedup']:.2f}x"
            cache = "-" if r["cache_peak_bytes"] is None else _fmt_bytes(r["cache_peak_bytes"])
            phys = "-" if r["physics"] is None else f"{r['physics']:.3f}"
            lines.append(f"| {r['method']} | {r['sec_per_video']:.2f} | {r['speedup']:.2f}x | "
                         f"{r['cpu_sec_per_video']:.2f} | {r['cpu_speedup']:.2f}x | {ideal} | {cache} | "
                         f"{psnr} | {r['ssim']:.4f} | {phys} |")
        return "\n".join(lines)


def _fmt_bytes(b: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return str(b)


def _row(method: str, schedule: str, m: Measurement) -> dict[str, Any]:
    d = m.to_dict()
    return {"method": method, "schedule": schedule, "status": "ok", **{k: d[k] for k in FIELDS},
            "psnr_per_seed": d["psnr_per_seed"]}


def bench(workload: Workload, seeds: Sequence[int] = (0, 1), methods: Sequence[str] | None = None, *,
          schedule_path: str | Path | Sequence[str | Path] | None = None, progress: bool = True) -> BenchResult:
    """Measure every method (default: :func:`available_methods`) on ``seeds``. ``schedule_path``: one or more
    schedule files from ``graphpass search`` (rows named by :func:`searched_methods`)."""
    from tqdm.auto import tqdm

    seeds = [int(s) for s in seeds]
    known = available_methods(workload, schedule_path)
    methods = list(methods) if methods else known
    unknown = [m for m in methods if m not in known and not m.startswith(("adacache", "diffusers-"))
               and m not in technique_variants(workload.num_steps) and m not in CALIBRATED]
    if unknown:
        raise InputError(f"unknown bench method(s) {unknown} for {workload.name}; available: {', '.join(known)}"
                         + ("" if schedule_path else " (give a searched schedule file for 'searched')"))
    baseline = workload.baseline(seeds, progress=progress)
    ada = _adacache_variants(workload.num_steps)
    techs = technique_variants(workload.num_steps)
    unmeasured: dict[str, str] = {}  # rows whose calibration failed (e.g. no block chain), and why
    for technique in ("fbc", "magcache", "teacache"):
        rows = [m for m in methods if m in CALIBRATED and m.startswith(technique)]
        try:
            techs.update(calibrated_variants(workload, rows, calibration_seed(seeds)))
        except GraphpassError as e:
            unmeasured.update({m: f"n/a: {e}" for m in rows})
    searched = searched_methods(schedule_path)
    result = BenchResult(workload.name, seeds, workload.num_steps, torch.get_num_threads())
    for method in tqdm(methods, desc=f"{workload.name} bench", disable=not progress):
        if method == "baseline":
            continue  # filled in at the end, with its re-timing
        try:
            if method.startswith("diffusers-"):
                if workload.family != "diffusers":
                    raise _NotApplicable(f"n/a: diffusers hooks need a diffusers model ({workload.name} is not one)")
                kind = method.split("-", 1)[1]
                try:
                    m = _measure_diffusers(workload, kind, baseline)
                except _NotApplicable:
                    raise
                except Exception as e:  # the hook's own failure on this architecture
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    raise _NotApplicable(f"n/a: diffusers {kind} hook fails on {type(workload.model).__name__}: "
                                         f"{first}") from e
                result.rows.append(_row(method, _diffusers_schedule(kind, workload), m))
                continue
            if method.startswith("adacache"):
                if method not in ada:
                    raise _NotApplicable("n/a: graphpass.schedules.adacache is not available")
                sched = ada[method]
            elif method in unmeasured:
                raise _NotApplicable(unmeasured[method])
            elif method in techs:
                sched = techs[method]
            elif method == "graphpass-noreuse":
                sched = ComputeAll()
            elif method in searched:
                from .search import load_searched

                sched, _ = load_searched(searched[method])
            elif method.startswith("pab-"):
                sched = PAB.preset(method[4:])
            else:
                sched = PAB.preset(method)
            try:
                opt = workload.optimize(sched)
            except Exception as e:  # e.g. a schedule that names a kind the model lacks
                raise _NotApplicable(f"n/a: {e}") from e
            result.rows.append(_row(method, str(sched), workload.measure(opt, baseline)))
        except _NotApplicable as e:
            result.rows.append({"method": method, "schedule": "", "status": str(e), **{k: None for k in FIELDS}})
    # time the baseline again after the methods and keep the fastest run: the table's speedups are relative
    # to the baseline's best time, not to a run slowed by other load
    again = workload.baseline(seeds, progress=False)
    baseline.seconds = [min(a, b) for a, b in zip(baseline.seconds, again.seconds)]
    baseline.cpu_seconds = [min(a, b) for a, b in zip(baseline.cpu_seconds, again.cpu_seconds)]
    for r in result.rows:
        if r["status"] == "ok":
            r["speedup"] = baseline.sec_per_video / r["sec_per_video"]
            r["cpu_speedup"] = baseline.cpu_sec_per_video / r["cpu_sec_per_video"]
    if "baseline" in methods:
        result.rows.insert(0, {"method": "baseline", "schedule": "model as is", "status": "ok",
                               "sec_per_video": baseline.sec_per_video, "speedup": 1.0,
                               "cpu_sec_per_video": baseline.cpu_sec_per_video, "cpu_speedup": 1.0,
                               "ideal_speedup": 1.0,
                               "cache_peak_bytes": 0, "psnr": None, "ssim": 1.0,
                               "physics": workload.physics_of(baseline.videos),
                               "psnr_per_seed": [None] * len(seeds)})
    order = {m: i for i, m in enumerate(methods)}
    result.rows.sort(key=lambda r: order[r["method"]])
    return result


class _NotApplicable(Exception):
    pass


def _diffusers_schedule(kind: str, workload: Workload) -> str:
    if kind == "fbc":
        return "FirstBlockCacheConfig(threshold=0.05)"
    if kind == "magcache":
        return "MagCacheConfig(threshold=0.06, max_skip_steps=3, retention_ratio=0.2; ratios calibrated on seed 0)"
    if kind == "taylorseer":
        return f"TaylorSeerCacheConfig as {technique_variants(workload.num_steps)['taylorseer']}"
    if kind == "fastercache":
        return "FasterCacheConfig(spatial range 2 in (-1, 681), uncond range 5 in (-1, 781), weight 0.3)"
    return f"PyramidAttentionBroadcastConfig as {PAB.preset(model_preset(workload))}"


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (psnr, speedup) no other point beats on both (higher is better), by PSNR."""
    idx = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in idx:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot_bench(result: BenchResult, path: str | Path, speed: str = "wall") -> Path:
    """Speedup against PSNR per method: measured (filled; ``speed`` = ``"wall"`` or ``"cpu"`` time) and ideal
    FLOPs (hollow), with the Pareto front of the measured speedups. The baseline (identical videos, infinite
    PSNR) is drawn at the right edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if speed not in ("wall", "cpu"):
        raise InputError(f"speed={speed!r}: plot 'wall' or 'cpu' speedups")
    key = "speedup" if speed == "wall" else "cpu_speedup"
    ok = [r for r in result.rows if r["status"] == "ok"]
    finite = [r["psnr"] for r in ok if r["psnr"] is not None]
    top = (max(finite) + 5) if finite else 60.0
    xs = [top if r["psnr"] is None else r["psnr"] for r in ok]
    cmap = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (r, x) in enumerate(zip(ok, xs)):
        col = cmap(i % 20)
        ax.scatter([x], [r[key]], color=col, zorder=3, label=r["method"])
        if r["ideal_speedup"] is not None and r["method"] != "baseline":
            ax.scatter([x], [r["ideal_speedup"]], facecolors="none", edgecolors=col, zorder=3)
            ax.plot([x, x], [r[key], r["ideal_speedup"]], color=col, lw=0.6, ls=":")
        ax.annotate(r["method"], (x, r[key]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    front = pareto_front([(x, r[key]) for x, r in zip(xs, ok)])
    ax.plot([xs[i] for i in front], [ok[i][key] for i in front], color="k", lw=1, ls="--",
            label=f"Pareto front ({speed} time)")
    ax.set_xlabel("PSNR vs baseline (dB; baseline drawn at the right edge)")
    ax.set_ylabel(f"speedup (filled: {speed} time, hollow: ideal FLOPs)")
    ax.set_title(f"{result.model}: {result.num_steps} steps, seeds {result.seeds}, {result.threads} thread(s)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)


__all__ = ["bench", "BenchResult", "available_methods", "searched_methods", "model_preset", "plot_bench",
           "pareto_front", "technique_variants", "MODEL_PRESETS", "DIFFUSERS_HOOKS"]
