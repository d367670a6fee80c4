"""Search a PAB schedule for one model: the fastest that keeps a PSNR, or the best that reaches a speedup.

Candidates come from the change analysis (:mod:`graphpass.eval.analyze`):

* ranges per kind follow the pyramid: ``cross >= temporal >= spatial`` (kinds the model has; a ``joint`` model
  has only the joint range), each from 1 (always compute) to ``max_range``;
* windows per kind are the kind's stable windows at a *level*: the stable-window rule run with the fraction
  ``fracs[level]`` (wider windows at higher levels; ``frac = 1`` allows reuse at every step but the first).

Search (every candidate checked by sampling the seeds; the ideal FLOP speedup of every candidate is known
beforehand from its plan and the FLOPs of its phase graphs, without sampling):

1. *Bracket.* Sort the space by ideal speedup (the "ladder"; PSNR falls roughly as it rises) and bisect it for
   the boundary of the target: with ``min_psnr`` the last candidate whose mean PSNR over the seeds is still
   >= ``min_psnr``; with ``speedup`` the first that reaches it (wall or CPU time, bisected; or, with
   ``speedup_metric="ideal"``, known without sampling: the first candidate at or above it).
2. *Refine.* Climb from there through neighbours (one kind's range +-1 keeping the pyramid, or the window
   level +-1), sampling only those that could do better (with ``min_psnr``: a higher ideal speedup), to the
   best one meeting the target, until none is better or ``max_evals`` candidates were sampled.

The answer is the sampled candidate that meets the target with the highest ideal FLOP speedup (``min_psnr``)
or the highest mean PSNR (``speedup``). Every figure reported is measured (PSNR/SSIM against the baseline
videos of the same seeds, wall time against the baseline's).

Example::

    >>> wl = Workload.from_name("latte-tiny", num_steps=10)
    >>> res = search(wl, SearchConfig(min_psnr=30), seeds=[0], progress=False)
    >>> res.measurement.psnr >= 30
    True
    >>> path = res.save("schedule.json")   # graphpass.schedule_from_json(path) loads it
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import InputError, SearchError
from ..schedules.pab import PAB
from .analyze import ChangeAnalysis, analyze
from .harness import Baseline, Measurement, Workload

#: Kinds a PAB search may reuse; the first three form the pyramid (ranges non-decreasing in this order).
PYRAMID = ("spatial", "temporal", "cross")
SEARCH_KINDS = PYRAMID + ("joint",)


@dataclass
class SearchConfig:
    """What to search for, and over what.

    Fields:
        min_psnr: keep the mean PSNR over the seeds (dB, vs the baseline videos) at least this; maximise the
            ideal FLOP speedup. Exactly one of ``min_psnr`` and ``speedup`` is given.
        speedup: reach at least this speedup; maximise the mean PSNR.
        speedup_metric: ``"wall"`` (seconds per video, baseline / schedule), ``"cpu"`` (the same in process CPU
            seconds, steadier on a shared machine) or ``"ideal"`` (FLOPs of the baseline steps / FLOPs of the
            phase graphs run): which speedup ``speedup`` refers to.
        kinds: kinds the search may reuse (those the model has are used); add ``"mlp"`` to also broadcast MLPs
            (outside the pyramid).
        max_range: largest broadcast range tried for any kind.
        fracs: stable-window fractions, one per window level (increasing: each level widens the windows).
        max_evals: most candidates sampled.
    """

    min_psnr: float | None = None
    speedup: float | None = None
    speedup_metric: str = "wall"
    kinds: tuple[str, ...] = SEARCH_KINDS
    max_range: int = 8
    fracs: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 1.0)
    max_evals: int = 40

    def __post_init__(self):
        if (self.min_psnr is None) == (self.speedup is None):
            raise InputError("give exactly one search target: min_psnr (e.g. 30 dB) or speedup (e.g. 1.4)")
        if self.speedup_metric not in ("wall", "cpu", "ideal"):
            raise InputError(f"speedup_metric={self.speedup_metric!r}: choose 'wall', 'cpu' or 'ideal'")
        if self.speedup is not None and self.speedup <= 1:
            raise InputError(f"speedup={self.speedup}: a target speedup is above 1 (e.g. 1.4)")
        if list(self.fracs) != sorted(self.fracs) or not self.fracs:
            raise InputError(f"fracs={self.fracs}: give increasing stable-window fractions, e.g. (0.1, 0.25, 0.5, 1)")
        if self.max_range < 2:
            raise InputError(f"max_range={self.max_range}: at least 2 (a range of 1 never reuses)")

    @property
    def target(self) -> dict[str, Any]:
        if self.min_psnr is not None:
            return {"min_psnr": self.min_psnr}
        return {"speedup": self.speedup, "speedup_metric": self.speedup_metric}


@dataclass(frozen=True)
class Candidate:
    """A point of the search space: a broadcast range per kind and a window level."""

    ranges: tuple[tuple[str, int], ...]
    level: int

    def range_of(self, kind: str) -> int:
        return dict(self.ranges).get(kind, 1)

    def reuses(self) -> bool:
        return any(r > 1 for _, r in self.ranges)

    def schedule(self, analysis: ChangeAnalysis, fracs: Sequence[float]) -> PAB:
        used = [k for k, r in self.ranges if r > 1]
        wins = {k: analysis.stable_window(k, fracs[self.level]).window for k in used}
        window = wins[used[0]]
        return PAB(**{k: r for k, r in self.ranges if r > 1}, window=window,
                   windows={k: w for k, w in wins.items() if w != window})


@dataclass
class Evaluated:
    candidate: Candidate
    schedule: PAB
    measurement: Measurement

    def to_dict(self, fracs: Sequence[float]) -> dict[str, Any]:
        return {"ranges": dict(self.candidate.ranges), "frac": fracs[self.candidate.level],
                "schedule": json.loads(self.schedule.to_json()), **_figures(self.measurement)}


def _figures(m: Measurement) -> dict[str, Any]:
    d = m.to_dict()
    return {k: d[k] for k in ("psnr", "ssim", "ideal_speedup", "speedup", "sec_per_video", "cpu_speedup",
                              "cpu_sec_per_video", "cache_peak_bytes", "psnr_per_seed", "physics")}


@dataclass
class SearchResult:
    """The chosen schedule and what was measured.

    Fields:
        schedule: the best :class:`~graphpass.PAB` found.
        measurement: its figures on the seeds (PSNR/SSIM vs the baseline, wall and ideal speedup, cache peak).
        baseline_sec_per_video: the baseline's seconds per video on this machine.
        target: the search target (``min_psnr`` or ``speedup`` with its metric).
        seeds, num_steps, model: what was sampled.
        evaluated: every candidate sampled, in order, with its figures.
        windows: the analysis's stable windows per kind at each level.
    """

    schedule: PAB
    measurement: Measurement
    baseline_sec_per_video: float
    target: dict[str, Any]
    seeds: list[int]
    num_steps: int
    model: str
    evaluated: list[dict[str, Any]] = field(default_factory=list)
    windows: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The schedule's JSON (loadable with :func:`graphpass.schedule_from_json`) plus ``measured``."""
        d = json.loads(self.schedule.to_json())
        d["measured"] = {"model": self.model, "seeds": self.seeds, "num_steps": self.num_steps,
                         "target": self.target, "baseline_sec_per_video": self.baseline_sec_per_video,
                         **_figures(self.measurement), "windows": self.windows, "evaluated": self.evaluated}
        return d

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path


def _pyramid_ok(r: dict[str, int]) -> bool:
    pyr = [r[p] for p in PYRAMID if p in r]
    return pyr == sorted(pyr)


def _range_grid(kinds: Sequence[str], max_range: int) -> list[tuple[tuple[str, int], ...]]:
    """Every assignment of ranges 1..max_range to ``kinds`` that keeps the pyramid and reuses something."""
    import itertools

    out = []
    for values in itertools.product(range(1, max_range + 1), repeat=len(kinds)):
        r = dict(zip(kinds, values))
        if _pyramid_ok(r) and max(values) > 1:
            out.append(tuple(sorted(r.items())))
    return out


def _moves(c: Candidate, kinds: Sequence[str], cfg: SearchConfig, same_windows) -> list[Candidate]:
    """One kind's range +-1 (keeping the pyramid, within 1..max_range) or the window level +-1 (skipping
    levels whose windows equal the current ones: ``same_windows(level_a, level_b)``)."""
    out = []
    for k in kinds:
        for d in (1, -1):
            r = dict(c.ranges)
            r[k] += d
            if 1 <= r[k] <= cfg.max_range and _pyramid_ok(r):
                out.append(Candidate(tuple(sorted(r.items())), c.level))
    for d in (1, -1):
        lv = c.level + d
        while 0 <= lv < len(cfg.fracs) and same_windows(lv, c.level):
            lv += d
        if 0 <= lv < len(cfg.fracs):
            out.append(Candidate(c.ranges, lv))
    return out


def _meets(m: Measurement, cfg: SearchConfig) -> bool:
    if cfg.min_psnr is not None:
        return m.psnr >= cfg.min_psnr
    s = {"wall": m.speedup, "cpu": m.cpu_speedup, "ideal": m.ideal_speedup}[cfg.speedup_metric]
    return s >= cfg.speedup


def search(workload: Workload, config: SearchConfig, seeds: Sequence[int] = (0, 1), *,
           analysis: ChangeAnalysis | None = None, baseline: Baseline | None = None,
           progress: bool = True) -> SearchResult:
    """Search a PAB schedule for ``workload`` meeting ``config``'s target on ``seeds`` (module docstring)."""
    from tqdm.auto import tqdm

    seeds = [int(s) for s in seeds]
    if analysis is None:
        analysis = analyze(workload, seeds, progress=progress)
    if baseline is None:
        baseline = workload.baseline(seeds, progress=progress)
    if baseline.seeds != seeds:
        raise InputError(f"baseline seeds {baseline.seeds} differ from search seeds {seeds}")
    kinds = [k for k in config.kinds if k in analysis.kinds]
    if not kinds:
        raise SearchError(f"{workload.name} has none of the kinds the search may reuse ({', '.join(config.kinds)}); "
                          f"it has {', '.join(analysis.kinds)}")
    cfg = config
    cache: dict[Candidate, Evaluated] = {}
    order: list[Evaluated] = []
    bar = tqdm(total=cfg.max_evals, desc=f"{workload.name} search", disable=not progress, leave=False)

    def evaluate(c: Candidate) -> Evaluated | None:
        if c in cache:
            return cache[c]
        if len(order) >= cfg.max_evals:
            return None
        sched = c.schedule(analysis, cfg.fracs)
        opt = workload.optimize(sched)
        ev = Evaluated(c, sched, workload.measure(opt, baseline))
        ev.measurement.videos = []  # keep memory flat over a long search
        cache[c] = ev
        order.append(ev)
        bar.update(1)
        bar.set_postfix_str(f"{sched} psnr {ev.measurement.psnr:.1f} ideal {ev.measurement.ideal_speedup:.2f}x")
        return ev

    # the space, each candidate's ideal FLOP speedup from its plan (no sampling), sorted by it
    space: dict[str, Candidate] = {}
    for ranges in _range_grid(kinds, cfg.max_range):
        for level in range(len(cfg.fracs)):
            c = Candidate(ranges, level)
            space.setdefault(c.schedule(analysis, cfg.fracs).to_json(), c)  # levels with equal windows: once
    ideal = {c: workload.ideal_speedup(c.schedule(analysis, cfg.fracs)) for c in space.values()}
    ladder = sorted(space.values(), key=lambda c: (ideal[c], c.level, c.ranges))
    canonical = {key: c for key, c in space.items()}

    def canon(c: Candidate) -> Candidate | None:
        return canonical.get(c.schedule(analysis, cfg.fracs).to_json()) if c.reuses() else None

    def same_windows(a: int, b: int) -> bool:
        return all(analysis.stable_window(k, cfg.fracs[a]).window == analysis.stable_window(k, cfg.fracs[b]).window
                   for k in kinds)

    def ok(c: Candidate) -> bool | None:
        e = evaluate(c)
        return None if e is None else _meets(e.measurement, cfg)

    try:
        # 1. bracket: bisect the ladder for the boundary of the target (PSNR falls and speed rises along it)
        start = None
        if cfg.speedup is not None and cfg.speedup_metric == "ideal":
            start = next((c for c in ladder if ideal[c] >= cfg.speedup), None)
            if start is not None:
                evaluate(start)
        else:
            lo, hi = -1, len(ladder)  # min_psnr: ladder[lo] meets it; speedup: ladder[hi] does
            while hi - lo > 1:
                mid = (lo + hi) // 2
                met = ok(ladder[mid])
                if met is None:
                    break
                if met == (cfg.min_psnr is not None):
                    lo = mid
                else:
                    hi = mid
            idx = lo if cfg.min_psnr is not None else hi
            if 0 <= idx < len(ladder) and ladder[idx] in cache and _meets(cache[ladder[idx]].measurement, cfg):
                start = ladder[idx]
        # 2. refine: climb to better neighbours (one range +-1 keeping the pyramid, or the window level +-1)
        best = start
        while best is not None and len(order) < cfg.max_evals:
            moves = [n for n in (canon(m) for m in _moves(best, kinds, cfg, same_windows)) if n is not None
                     and n not in cache]
            if cfg.min_psnr is not None:
                moves = [n for n in moves if ideal[n] > ideal[best]]  # only a faster schedule can improve
            elif cfg.speedup_metric == "ideal":
                moves = [n for n in moves if ideal[n] >= cfg.speedup]
            better = None
            for n in sorted(moves, key=lambda n: -ideal[n] if cfg.min_psnr is not None else ideal[n]):
                e = evaluate(n)
                if e is None or not _meets(e.measurement, cfg):
                    continue
                key = ((e.measurement.ideal_speedup, e.measurement.psnr) if cfg.min_psnr is not None
                       else (e.measurement.psnr, e.measurement.ideal_speedup))
                cur = cache[best if better is None else better].measurement
                ref = (cur.ideal_speedup, cur.psnr) if cfg.min_psnr is not None else (cur.psnr, cur.ideal_speedup)
                if key > ref:
                    better = n
            if better is None:
                break
            best = better
    finally:
        bar.close()

    ok = [e for e in order if _meets(e.measurement, cfg)]
    if not ok:
        what = (f"mean PSNR >= {cfg.min_psnr:g} dB" if cfg.min_psnr is not None
                else f"{cfg.speedup_metric} speedup >= {cfg.speedup:g}x")
        raise SearchError(f"no PAB schedule among the {len(order)} sampled reaches {what} on seeds {seeds} for "
                          f"{workload.name}; relax the target, raise max_evals/max_range, or add 'mlp' to the kinds")
    if cfg.min_psnr is not None:
        pick = max(ok, key=lambda e: (e.measurement.ideal_speedup, e.measurement.psnr))
    else:
        pick = max(ok, key=lambda e: (e.measurement.psnr, e.measurement.ideal_speedup))
    windows = {k: {str(f): list(analysis.stable_window(k, f).window) for f in cfg.fracs} for k in kinds}
    return SearchResult(schedule=pick.schedule, measurement=pick.measurement,
                        baseline_sec_per_video=baseline.sec_per_video, target=cfg.target, seeds=seeds,
                        num_steps=workload.num_steps, model=workload.name,
                        evaluated=[e.to_dict(cfg.fracs) for e in order], windows=windows)


def load_searched(path: str | Path) -> tuple[PAB, dict[str, Any]]:
    """A searched schedule file: (the schedule, its ``measured`` figures)."""
    from ..schedules.base import schedule_from_json

    p = Path(path)
    if not p.is_file():
        raise InputError(f"schedule file {p} does not exist; write one with `graphpass search MODEL --out {p}`")
    d = json.loads(p.read_text())
    measured = d.get("measured", {})
    return schedule_from_json(p), measured


__all__ = ["SearchConfig", "SearchResult", "SearchError", "search", "load_searched"]
