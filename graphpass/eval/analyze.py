"""How much each attention region's output changes from one denoising step to the next.

PAB rests on one observation: in the middle of a denoising run, attention outputs barely change between
consecutive steps, cross attention least, spatial attention most (Zhao et al., the U-shaped curve). This
module measures it for any model graphpass can capture.

Recording (no Python hooks on the model): the model is compiled with :class:`RecordAll`, a schedule whose
every step is one phase graph that computes every region and *stores* every region's output, so the
executor hands each region's exit tensors to its cache after each call. The recorder reads them from the
cache, compares them with the previous step's and keeps only the running figures.

Figures, for step ``s >= 1`` of ``S`` (the change from step ``s - 1`` to step ``s``), per region ``r`` with
exits concatenated into one vector ``o_s``:

* ``mse[s]    = mean((o_s - o_{s-1})**2)``
* ``rel_l1[s] = sum|o_s - o_{s-1}| / sum|o_{s-1}|``

averaged over the seeds, then per kind as the mean over that kind's regions.

Stable window rule (per kind, on the kind's mean ``rel_l1`` curve ``c[1..S-1]``)::

    m = running median of c over 3 steps (s-1, s, s+1; 2 at the ends)   # one noisy step does not split a run
    threshold = min(m) + frac * (max(m) - min(m))          # frac = 0.25 by default
    stable steps = the longest run of consecutive steps s with m[s] <= threshold
                   (ties: the run with the lowest mean of m)
    window (lo, hi) = (t[last + 1] or 0, t[first - 1])     # PAB's exclusive lo < t < hi

so a PAB schedule with that window may reuse the kind exactly on the stable steps (a step may reuse when its
change from the step before is small). ``frac = 1`` makes every step after the first stable.

Example::

    >>> wl = Workload.from_name("latte-tiny", num_steps=10)
    >>> a = analyze(wl, seeds=[0], progress=False)
    >>> sorted(a.kinds)
    ['cross', 'mlp', 'spatial', 'temporal']
    >>> lo, hi = a.stable_window("spatial").window
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import InputError
from ..schedules.base import Action, Phase, Plan, RegionRef, Schedule
from ..techniques import register
from ..techniques.pab import attention_technique
from .harness import Workload, save_figure

#: Default fraction of a kind's range of change below which a step counts as stable.
DEFAULT_FRAC = 0.25

RULE = ("per kind, m = 3-step running median of the kind's mean relative-L1 change curve; threshold = min(m) + "
        "frac * (max(m) - min(m)); stable steps = longest run of consecutive steps with m <= threshold (ties: lowest "
        "mean); window (lo, hi) = (timestep after the run or 0, timestep before the run), exclusive as in PAB")


class RecordAll(Schedule):
    """Every step computes every region and stores its outputs (nothing is reused). Used to read each
    region's output after every call from the executor's cache, without hooks on the model."""

    def kinds(self) -> set[str]:
        return set()

    def reuses(self, region: RegionRef, t: float, counter: int) -> bool:
        return False

    def may_reuse_next(self, region: RegionRef, t: float, counter: int) -> bool:
        return True  # step by step: store every region at every step

    def plan(self, regions: Sequence[RegionRef], timesteps: Sequence[float]) -> Plan:
        phase = Phase.of({r.path: Action.STORE for r in regions})
        return Plan([float(t) for t in timesteps], [phase] * len(timesteps))

    def to_dict(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RecordAll":
        return cls()

    def __str__(self) -> str:
        return "RecordAll()"


register(attention_technique("RecordAll", RecordAll))


@dataclass
class StableWindow:
    """The stable steps of one kind.

    Fields:
        first_step, last_step: the run of stable steps (indices into the sampler's steps, inclusive).
        window: ``(lo, hi)`` timesteps for a PAB window that reuses exactly on those steps.
        threshold: the (3-step median) change at or below which a step counted as stable.
        frac: the fraction of the kind's range that set the threshold.
    """

    first_step: int
    last_step: int
    window: tuple[float, float]
    threshold: float
    frac: float

    def to_dict(self) -> dict[str, Any]:
        return {"first_step": self.first_step, "last_step": self.last_step, "window": list(self.window),
                "threshold": self.threshold, "frac": self.frac}


def median3(curve: Sequence[float]) -> list[float]:
    """Running median over 3 consecutive values (the 2 available at each end: their mean)."""
    out = []
    for i in range(len(curve)):
        w = sorted(curve[max(0, i - 1):i + 2])
        out.append(w[1] if len(w) == 3 else sum(w) / len(w))
    return out


def stable_window(curve: Sequence[float], timesteps: Sequence[float], frac: float = DEFAULT_FRAC) -> StableWindow:
    """Apply the stable window rule (module docstring) to ``curve[i]`` = change at step ``i + 1``."""
    if not 0.0 <= frac <= 1.0:
        raise InputError(f"frac={frac}: the stable-window fraction is in [0, 1] (0.25 by default)")
    if len(curve) != len(timesteps) - 1 or not curve:
        raise InputError(f"a change curve has one value per step after the first: got {len(curve)} values for "
                         f"{len(timesteps)} timesteps")
    curve = median3(curve)
    lo_c, hi_c = min(curve), max(curve)
    thr = lo_c + frac * (hi_c - lo_c)
    runs, start = [], None
    for i, c in enumerate(list(curve) + [math.inf]):
        if c <= thr and start is None:
            start = i
        elif c > thr and start is not None:
            runs.append((start, i - 1))
            start = None
    a, b = min(runs, key=lambda r: (-(r[1] - r[0]), sum(curve[r[0]:r[1] + 1]) / (r[1] - r[0] + 1)))
    first, last = a + 1, b + 1  # curve index i is step i + 1
    lo = float(timesteps[last + 1]) if last + 1 < len(timesteps) else 0.0
    return StableWindow(first, last, (lo, float(timesteps[first - 1])), thr, frac)


@dataclass
class ChangeAnalysis:
    """Step-to-step change of every region's output (see the module docstring for the figures).

    Fields:
        model: the workload's name.
        timesteps: the sampler's timesteps, one per step.
        seeds: the seeds averaged over.
        regions: per region: ``path``, ``kind``, ``mse`` and ``rel_l1`` (lists, entry ``i`` = step ``i + 1``).
        kinds: per kind: ``mse`` and ``rel_l1`` (mean over the kind's regions) and ``stable`` (the window).
        frac: the stable-window fraction used for ``kinds[k]["stable"]``.
        recording: how the region outputs were read.
    """

    model: str
    timesteps: list[float]
    seeds: list[int]
    regions: list[dict[str, Any]]
    kinds: dict[str, dict[str, Any]]
    frac: float = DEFAULT_FRAC
    recording: str = "phase graph storing every region (graphpass RecordAll schedule), read from the cache"

    @property
    def steps(self) -> list[int]:
        return list(range(1, len(self.timesteps)))

    def curve(self, kind: str, metric: str = "rel_l1") -> list[float]:
        if kind not in self.kinds:
            raise InputError(f"the analysis of {self.model} has no {kind!r} regions (kinds: {', '.join(self.kinds)})")
        return self.kinds[kind][metric]

    def stable_window(self, kind: str, frac: float | None = None) -> StableWindow:
        return stable_window(self.curve(kind), self.timesteps, self.frac if frac is None else frac)

    def to_dict(self) -> dict[str, Any]:
        kinds = {k: {**v, "stable": self.stable_window(k).to_dict()} for k, v in self.kinds.items()}
        return {"model": self.model, "timesteps": self.timesteps, "steps": self.steps, "seeds": self.seeds,
                "recording": self.recording, "rule": RULE, "frac": self.frac, "kinds": kinds,
                "regions": self.regions}

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ChangeAnalysis":
        d = json.loads(Path(path).read_text())
        kinds = {k: {m: v[m] for m in ("mse", "rel_l1")} for k, v in d["kinds"].items()}
        return cls(d["model"], d["timesteps"], d["seeds"], d["regions"], kinds, d["frac"], d["recording"])


class _Recorder:
    """Drop-in callable around a RecordAll-compiled model: after each call, reads every region's stored
    output from the cache and accumulates its change from the previous call."""

    def __init__(self, opt, n_steps: int):
        self.opt = opt
        self.prev: dict[str, torch.Tensor] = {}
        self.sum_mse = {r.path: torch.zeros(n_steps - 1, dtype=torch.float64) for r in opt.regions}
        self.sum_rel = {r.path: torch.zeros(n_steps - 1, dtype=torch.float64) for r in opt.regions}
        self.step = 0

    def start(self) -> None:
        self.prev.clear()
        self.step = 0

    def __call__(self, **kwargs):
        out = self.opt(**kwargs)
        cache = self.opt.state().cache
        for r in self.opt.regions:
            cur = torch.cat([cache.get(k).detach().double().flatten() for k in r.cache_keys])
            if self.step > 0:
                prev = self.prev[r.path]
                d = cur - prev
                self.sum_mse[r.path][self.step - 1] += float((d * d).mean())
                self.sum_rel[r.path][self.step - 1] += float(d.abs().sum() / prev.abs().sum().clamp_min(1e-30))
            self.prev[r.path] = cur
        self.step += 1
        return out


def analyze(workload: Workload, seeds: Sequence[int] = (0, 1), frac: float = DEFAULT_FRAC,
            progress: bool = True) -> ChangeAnalysis:
    """Sample one video per seed with every region recorded; return the change figures."""
    from tqdm.auto import tqdm

    seeds = [int(s) for s in seeds]
    if not seeds:
        raise InputError("analyze needs at least one seed")
    opt = workload.optimize(RecordAll())
    n = workload.num_steps
    if n < 3:
        raise InputError(f"analyze needs at least 3 sampling steps to find a window, got {n}")
    rec = _Recorder(opt, n)
    call = workload.adapt(rec)
    for s in tqdm(seeds, desc=f"{workload.name} analyze", disable=not progress, leave=False):
        rec.start()
        opt.reset()
        workload.generate(rec, s, adapted=call)
        if rec.step != n:
            raise InputError(f"the sampler made {rec.step} model calls for {n} steps; analyze expects one call per "
                             f"step (classifier-free guidance batched in one call)")
    regions, kinds = [], {}
    for r in opt.regions:
        mse = (rec.sum_mse[r.path] / len(seeds)).tolist()
        rel = (rec.sum_rel[r.path] / len(seeds)).tolist()
        regions.append({"path": r.path, "kind": r.kind, "mse": mse, "rel_l1": rel})
    for k in dict.fromkeys(r["kind"] for r in regions):
        mine = [r for r in regions if r["kind"] == k]
        kinds[k] = {m: [sum(r[m][i] for r in mine) / len(mine) for i in range(n - 1)] for m in ("mse", "rel_l1")}
    return ChangeAnalysis(workload.name, workload.timesteps, seeds, regions, kinds, frac)


def plot_analysis(analysis: ChangeAnalysis, path: str | Path, metric: str = "rel_l1") -> Path:
    """One panel per kind: the kind's mean change per step (thin lines: its regions), log scale, the stable
    window shaded and the threshold dashed. Written as PNG with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(analysis.kinds)
    fig, axes = plt.subplots(len(kinds), 1, figsize=(7, 2.2 * len(kinds) + 0.6), sharex=True, squeeze=False)
    steps = analysis.steps
    label = {"rel_l1": "relative L1 change", "mse": "MSE change"}[metric]
    for ax, k in zip(axes[:, 0], kinds):
        for r in analysis.regions:
            if r["kind"] == k:
                ax.plot(steps, r[metric], color="0.75", lw=0.8)
        ax.plot(steps, analysis.curve(k, metric), color="C0", lw=2, label=f"{k} (mean of regions)")
        w = analysis.stable_window(k)
        ax.axvspan(w.first_step - 0.5, w.last_step + 0.5, color="C2", alpha=0.2,
                   label=f"stable steps {w.first_step}-{w.last_step}, t in ({w.window[0]:g}, {w.window[1]:g})")
        if metric == "rel_l1":
            ax.axhline(w.threshold, color="C3", ls="--", lw=1, label=f"threshold {w.threshold:.3g}")
        ax.set_yscale("log")
        ax.set_ylabel(label, fontsize=8)
        ax.legend(fontsize=7, loc="best", framealpha=0.7)
    axes[-1, 0].set_xlabel("sampling step (change from the step before)")
    fig.suptitle(f"{analysis.model}: attention output change per step ({len(analysis.seeds)} seeds)", fontsize=10)
    return save_figure(fig, path)


def summary_table(analysis: ChangeAnalysis) -> str:
    """Plain-text table: per kind, the change at the start, the middle minimum, the end, and the window."""
    rows = [f"{'kind':<9s} {'first':>9s} {'min':>9s} {'last':>9s}  stable steps   window (lo, hi)"]
    for k in analysis.kinds:
        c = analysis.curve(k)
        w = analysis.stable_window(k)
        rows.append(f"{k:<9s} {c[0]:9.3g} {min(c):9.3g} {c[-1]:9.3g}  {w.first_step:>3d}-{w.last_step:<3d}"
                    f"        ({w.window[0]:g}, {w.window[1]:g})")
    return "\n".join(rows)
