"""What ``graphpass analyze``, ``search`` and ``bench`` run: a model, its sampler, and measurements.

A :class:`Workload` is one model plus the way videos are sampled from it. Every sampled video goes through
the project's DDIM sampler (:func:`graphpass.models.sampler.sample`, batched classifier-free guidance: one
model call of batch 2 per step), with the model replaced by any drop-in callable: the model itself (the
baseline), an :class:`~graphpass.OptimizedModel`, or the model with diffusers cache hooks.

* VDT models are called as the sampler calls them.
* diffusers video transformers (Latte, layout ``(B, C, F, H, W)``; CogVideoX, ``(B, F, C, H, W)``) are called
  through :class:`DiffusersAdapter`, which turns the sampler's call into the transformer's: the latent is
  permuted to the model's layout, the label ids become fixed random text embeddings (id 0, the null label of
  the unconditional half, embeds to zeros), the timestep becomes int64, and the noise prediction is the first
  ``C`` output channels (Latte also predicts a variance).

Example (a tiny random Latte, 4 steps)::

    >>> wl = Workload.from_name("latte-tiny", num_steps=4)
    >>> base = wl.baseline(seeds=[0], progress=False)
    >>> m = wl.measure(wl.optimize("latte"), base)
    >>> round(m.ideal_speedup, 2) >= 1.0
    True
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import ArtefactError, InputError
from ..passes.capture import CapturedGraph, capture
from ..passes.specialize import specialize_phase
from ..passes.tag import Region, tag_attention
from ..runtime.executor import OptimizedModel
from ..schedules.base import Phase, Schedule
from ..techniques import register
from ..techniques.pab import attention_technique
from ..workloads import check_samplable, vdt_example_kwargs
from .metrics import psnr, ssim

#: Text embedding width of the label-id -> embedding table used for diffusers models without one.
_VOCAB = 16
#: Arguments of a diffusers transformer call that the sampler's call provides (the others are the example's).
_SAMPLER_ARGS = ("hidden_states", "timestep", "encoder_hidden_states", "return_dict")


class DiffusersAdapter:
    """Calls a diffusers video transformer (or a drop-in replacement of one) the way the sampler calls a VDT.

    Fields:
        fn: the transformer or its replacement, called with keyword arguments and ``return_dict=False``.
        layout: ``"BCFHW"`` (Latte) or ``"BFCHW"`` (CogVideoX): the transformer's latent layout.
        embeddings: ``(vocab, L_text, D)`` table; a call's text embedding is the row of its first label id;
            row 0 is zeros (the null label of the unconditional half of guidance).
        timestep_dtype: dtype of the timestep the transformer was captured with (int64 for diffusers).
        fixed: the transformer's other arguments, passed unchanged on every call (rotary tables, text masks,
            pooled projections... of the example call).
        on_new_generation: called before the first call of each generation (a timestep not below the previous
            call's: sampler timesteps strictly decrease), e.g. to reset the state of diffusers cache hooks.
        current_timestep: the timestep of the call in flight (diffusers cache hooks read it through
            ``current_timestep_callback``).
    """

    def __init__(self, fn: Callable, layout: str, embeddings: torch.Tensor, timestep_dtype: torch.dtype,
                 on_new_generation: Callable[[], None] | None = None, fixed: dict[str, Any] | None = None):
        self.fn, self.layout, self.embeddings, self.timestep_dtype = fn, layout, embeddings, timestep_dtype
        self.fixed = dict(fixed or {})
        self.on_new_generation = on_new_generation
        self.current_timestep: int | None = None

    def __call__(self, *, hidden_states, timestep, encoder_hidden_states, cond_mask=None):
        x = hidden_states.permute(0, 2, 1, 3, 4) if self.layout == "BCFHW" else hidden_states
        text = self.embeddings[encoder_hidden_states[:, 0].long()]
        t = timestep.to(self.timestep_dtype)
        now = int(float(t.flatten()[0]))
        if self.on_new_generation is not None and (self.current_timestep is None or now >= self.current_timestep):
            self.on_new_generation()
        self.current_timestep = now
        out = self.fn(hidden_states=x.contiguous(), timestep=t, encoder_hidden_states=text.contiguous(),
                      return_dict=False, **self.fixed)
        out = out[0] if isinstance(out, (tuple, list)) else out
        c = hidden_states.shape[2]
        if self.layout == "BCFHW":
            return out[:, :c].permute(0, 2, 1, 3, 4)
        return out[:, :, :c]


@dataclass
class Baseline:
    """The unaccelerated videos of a workload, one per seed, and the wall and process-CPU seconds each took."""

    seeds: list[int]
    videos: list[torch.Tensor]
    seconds: list[float]
    cpu_seconds: list[float]

    @property
    def sec_per_video(self) -> float:
        """The fastest seed's seconds (every seed samples the same shapes; the minimum is the figure least
        disturbed by other load on the machine)."""
        return min(self.seconds)

    @property
    def cpu_sec_per_video(self) -> float:
        return min(self.cpu_seconds)


@dataclass
class Measurement:
    """Figures of one sampler against a :class:`Baseline`, over the same seeds.

    Fields:
        sec_per_video: wall seconds to sample one video (all steps, with guidance): the fastest seed's.
        speedup: baseline seconds / these seconds.
        cpu_sec_per_video, cpu_speedup: the same in process CPU seconds (fastest seed). On a machine shared
            with other jobs, CPU time counts only this process's work, so with one torch thread it is the
            steadier figure; on an idle machine it equals wall time.
        ideal_speedup: FLOPs of the baseline's steps / FLOPs of the phase graphs this sampler ran (``None`` when
            the sampler is not a graphpass model, e.g. diffusers hooks).
        cache_peak_bytes: most bytes the graphpass cache held at once during a generation (max over seeds;
            ``None`` when not measurable).
        psnr, ssim: mean over seeds of the per-video metric vs the baseline video (psnr ``inf`` = identical).
        psnr_per_seed: the per-video PSNRs.
        physics: mean physics plausibility (:mod:`graphpass.eval.physics`) for VDT physics models, else ``None``.
        videos: the sampled videos (not serialised).
    """

    sec_per_video: float
    speedup: float
    cpu_sec_per_video: float
    cpu_speedup: float
    ideal_speedup: float | None
    cache_peak_bytes: int | None
    psnr: float
    ssim: float
    psnr_per_seed: list[float]
    physics: float | None = None
    videos: list[torch.Tensor] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"sec_per_video": self.sec_per_video, "speedup": self.speedup,
                "cpu_sec_per_video": self.cpu_sec_per_video, "cpu_speedup": self.cpu_speedup,
                "ideal_speedup": self.ideal_speedup,
                "cache_peak_bytes": self.cache_peak_bytes, "psnr": json_float(self.psnr), "ssim": self.ssim,
                "psnr_per_seed": [json_float(p) for p in self.psnr_per_seed], "physics": self.physics}


def json_float(x: float | None) -> float | None:
    """``inf``/``nan`` as ``None`` so the JSON we write is strict JSON (``None`` PSNR = identical videos)."""
    return None if x is None or not math.isfinite(x) else float(x)


class ComputeAll(Schedule):
    """Never reuses: the phase graph that computes every region at every step. Its row in a table separates
    what running the captured graph costs or saves from what reuse saves."""

    def kinds(self) -> set[str]:
        return set()

    def reuses(self, region, t: float, counter: int) -> bool:
        return False

    def may_reuse_next(self, region, t: float, counter: int) -> bool:
        return False

    def to_dict(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ComputeAll":
        return cls()

    def __str__(self) -> str:
        return "ComputeAll()"


register(attention_technique("ComputeAll", ComputeAll))


@dataclass
class Workload:
    """One model and its sampler.

    Fields:
        name: the model's name in tables (``vdt-s``, ``latte-tiny``...).
        model: the ``nn.Module`` in eval mode.
        example_kwargs: one real call's keyword arguments (batch 2 = one video with batched guidance); the
            graphs are captured with them.
        num_steps: DDIM steps per video.
        family: ``"vdt"`` (called as the sampler calls it) or ``"diffusers"`` (through :class:`DiffusersAdapter`).
        guidance_scale: classifier-free guidance scale of the sampler.
        physics: whether the physics plausibility check applies (VDT models trained on the physics world).
    """

    name: str
    model: torch.nn.Module
    example_kwargs: dict[str, Any]
    num_steps: int
    family: str = "vdt"
    guidance_scale: float = 2.0
    physics: bool = False

    # --- construction ----------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, num_steps: int = 50, weights: str | Path | None = None) -> "Workload":
        """The workload of a model name (``vdt-s``, ``vdt-tiny``, ``latte-tiny``). ``weights``: a VDT
        checkpoint to load instead of the shipped one (e.g. a training checkpoint)."""
        from .. import models
        from ..workloads import example_call

        if weights is not None:
            if not name.startswith("vdt-"):
                raise InputError(f"weights= applies to VDT models only, not {name!r}")
            try:
                model = models.load(name, path=weights)
            except (models.WeightsError, KeyError) as e:
                raise ArtefactError(str(e)) from e
            kwargs = vdt_example_kwargs(model)
        else:
            try:
                model, kwargs, _ = example_call(name, batch=2, num_steps=num_steps)
            except models.WeightsError as e:
                raise ArtefactError(f"{e} (or pass weights=/--weights PATH to use a training checkpoint)") from e
        family = "vdt" if name.startswith("vdt-") else "diffusers"
        if family == "diffusers":
            check_samplable(model, kwargs)
        return cls(name=name, model=model, example_kwargs=kwargs, num_steps=num_steps, family=family,
                   physics=family == "vdt")

    # --- sampling --------------------------------------------------------------------------------
    @cached_property
    def timesteps(self) -> list[float]:
        from ..models.sampler import ddim_timesteps

        return [float(t) for t in ddim_timesteps(self.num_steps)]

    @cached_property
    def _video_shape(self) -> tuple[int, int, int, int]:
        """(F, C, H, W) of one sampled video, in the sampler's layout."""
        x = self.example_kwargs["hidden_states"]
        if self.family == "vdt":
            return tuple(x.shape[1:])
        b, a1, a2, h, w = x.shape
        return (a2, a1, h, w) if self._layout == "BCFHW" else (a1, a2, h, w)

    @cached_property
    def _layout(self) -> str:
        return "BFCHW" if "CogVideoX" in type(self.model).__name__ else "BCFHW"

    @cached_property
    def _embeddings(self) -> torch.Tensor:
        text = self.example_kwargs["encoder_hidden_states"]
        g = torch.Generator().manual_seed(1234)
        table = torch.randn(_VOCAB, text.shape[1], text.shape[2], generator=g) * 0.5
        table[0] = 0
        return table

    def adapt(self, fn: Callable, on_new_generation: Callable[[], None] | None = None) -> Callable:
        """``fn`` (the model or a drop-in replacement) as the sampler calls it."""
        if self.family == "vdt":
            return fn
        fixed = {k: v for k, v in self.example_kwargs.items() if k not in _SAMPLER_ARGS}
        return DiffusersAdapter(fn, self._layout, self._embeddings, self.example_kwargs["timestep"].dtype,
                                on_new_generation, fixed)

    def labels(self, seed: int) -> torch.Tensor:
        """(1, L) label ids of the video of ``seed``: the physics world's caption for VDT models, random ids
        (never the null id 0) for diffusers models."""
        if self.family == "vdt":
            from ..models.physics import PhysicsParams, generate

            f, _, h, _ = self._video_shape
            return generate(int(seed), PhysicsParams(size=h, num_frames=f)).labels[None]
        g = torch.Generator().manual_seed(int(seed))
        return torch.randint(1, _VOCAB, (1, 1), generator=g)

    def generate(self, fn: Callable, seed: int, adapted: Callable | None = None) -> torch.Tensor:
        """One video (F, C, H, W) in [-1, 1] sampled with ``fn`` in place of the model."""
        from ..models.sampler import sample

        call = adapted if adapted is not None else self.adapt(fn)
        return sample(call, labels=self.labels(seed), num_steps=self.num_steps, guidance_scale=self.guidance_scale,
                      seed=int(seed), progress=False, shape=self._video_shape)[0]

    # --- graphs ----------------------------------------------------------------------------------
    @cached_property
    def captured(self) -> CapturedGraph:
        return capture(self.model, self.example_kwargs)

    @cached_property
    def regions(self) -> list[Region]:
        return tag_attention(self.captured)

    @cached_property
    def step_flops(self) -> int:
        """FLOPs of one step that computes every region (the baseline's step)."""
        return specialize_phase(self.captured, self.regions, Phase()).flops

    def optimize(self, schedule: Schedule | str) -> OptimizedModel:
        """:func:`graphpass.optimize` of this workload's model (default options, planned for the sampler's
        timesteps), sharing one capture across schedules."""
        from ..schedules.pab import PAB

        if isinstance(schedule, str):
            schedule = PAB.preset(schedule)
        schedule.check_model({r.kind for r in self.regions})
        opt = OptimizedModel(self.model, self.captured, self.regions, schedule)  # the schedule's technique runs
        opt.plan(self.timesteps)
        return opt

    @cached_property
    def _phase_flops(self) -> dict[Phase, int]:
        """FLOPs of each phase graph specialized so far (a plan names few distinct phases)."""
        return {}

    def ideal_speedup(self, schedule: Schedule) -> float:
        """FLOPs of the baseline's steps over those of ``schedule``'s planned phase graphs (no sampling)."""
        plan = schedule.plan(self.regions, self.timesteps)
        total = 0
        for ph in plan.phases:
            if ph not in self._phase_flops:
                self._phase_flops[ph] = specialize_phase(self.captured, self.regions, ph).flops
            total += self._phase_flops[ph]
        return len(plan) * self.step_flops / total

    def kinds(self) -> list[str]:
        """Region kinds of the model, in graph order of first appearance."""
        return list(dict.fromkeys(r.kind for r in self.regions))

    # --- measurements ----------------------------------------------------------------------------
    def baseline(self, seeds: Sequence[int], progress: bool = True) -> Baseline:
        """Sample every seed with the unmodified model (after one short warm-up run)."""
        from tqdm.auto import tqdm

        self._warm_up(self.model)
        videos, secs, cpus = [], [], []
        for s in tqdm(list(seeds), desc=f"{self.name} baseline", disable=not progress, leave=False):
            t0, c0 = time.perf_counter(), time.process_time()
            videos.append(self.generate(self.model, s))
            secs.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
        return Baseline(list(seeds), videos, secs, cpus)

    def measure(self, fn: Callable, baseline: Baseline, *, adapted: Callable | None = None) -> Measurement:
        """Sample the baseline's seeds with ``fn`` (an :class:`OptimizedModel`, or the model with cache hooks
        installed) and compare. ``adapted``: a prepared sampler-convention callable wrapping ``fn``."""
        call = adapted if adapted is not None else self.adapt(fn)
        self._warm_up(fn, call)
        videos, secs, cpus, flops, peak = [], [], [], [], 0
        for s in baseline.seeds:
            t0, c0 = time.perf_counter(), time.process_time()
            videos.append(self.generate(fn, s, adapted=call))
            secs.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            if isinstance(fn, OptimizedModel):
                st = fn.state()
                flops.append(sum(fn.phase_graph(ph).flops for _, ph in st.trace))
                peak = max(peak, st.cache.peak_nbytes)
        p = [psnr(v, b) for v, b in zip(videos, baseline.videos)]
        q = [ssim(v, b) for v, b in zip(videos, baseline.videos)]
        sec = min(secs)
        ideal = None
        if flops:
            ideal = self.num_steps * self.step_flops * len(flops) / sum(flops)
        cpu = min(cpus)
        return Measurement(sec_per_video=sec, speedup=baseline.sec_per_video / sec, cpu_sec_per_video=cpu,
                           cpu_speedup=baseline.cpu_sec_per_video / cpu, ideal_speedup=ideal,
                           cache_peak_bytes=peak if isinstance(fn, OptimizedModel) else None,
                           psnr=sum(p) / len(p), ssim=sum(q) / len(q), psnr_per_seed=p, physics=self.physics_of(videos),
                           videos=videos)

    def physics_of(self, videos: Sequence[torch.Tensor]) -> float | None:
        """Mean physics plausibility of ``videos`` for physics-world models, else ``None``."""
        if not self.physics:
            return None
        from .physics import evaluate

        return sum(evaluate(v).plausibility for v in videos) / len(videos)

    def _warm_up(self, fn: Callable, call: Callable | None = None) -> None:
        """One model call at the first timestep (as the sampler makes it), so timings exclude first-call
        costs; a graphpass model is reset afterwards."""
        call = call or self.adapt(fn)
        f = self._video_shape
        labels = self.labels(0)
        with torch.no_grad():
            call(hidden_states=torch.zeros(2, *f), timestep=torch.full((2,), self.timesteps[0]),
                 encoder_hidden_states=torch.cat([labels, torch.zeros_like(labels)]),
                 cond_mask=torch.zeros(2, f[0]))
        if isinstance(fn, OptimizedModel):
            fn.reset()


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
