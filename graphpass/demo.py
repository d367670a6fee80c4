"""End-to-end demo: sample physics videos with vdt-s, baseline vs optimized.

    graphpass demo --out out/demo --num-videos 4 --steps 50

Generates a mix of tasks (unconditional from a label, future-frame prediction
given the first frames of a generator video), writes MP4/GIF per video plus
side-by-sides, and prints seconds per video, speedup, PSNR/SSIM against the
baseline and the physics plausibility score.

Optimized column hook: pass ``optimize_fn(model) -> callable`` that returns a
drop-in replacement called exactly like the model
(``fn(hidden_states=..., timestep=..., encoder_hidden_states=..., cond_mask=...)``).
With ``optimize_fn=None`` only the baseline row is printed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .eval.metrics import psnr, ssim
from .eval.physics import evaluate
from .models import load
from .models.physics import PhysicsParams, decode_label, generate
from .models.sampler import sample
from .models.video_io import side_by_side, write_video

NUM_GIVEN = 4  # frames given for the future-prediction task


@dataclass
class DemoTask:
    name: str
    seed: int
    labels: torch.Tensor
    cond_frames: torch.Tensor | None
    cond_mask: torch.Tensor | None
    reference: torch.Tensor  # generator video the label came from


def make_tasks(num_videos: int, num_frames: int, size: int, base_seed: int = 2024) -> list[DemoTask]:
    """Alternate unconditional (label only) and future prediction (first NUM_GIVEN frames given)."""
    tasks = []
    params = PhysicsParams(size=size, num_frames=num_frames)
    for i in range(num_videos):
        ref = generate(base_seed + i, params)
        if i % 2 == 0:
            tasks.append(DemoTask("label", base_seed + i, ref.labels, None, None, ref.video))
        else:
            given = min(NUM_GIVEN, num_frames // 2)
            m = torch.zeros(num_frames)
            m[:given] = 1
            tasks.append(DemoTask(f"predict({given} given)", base_seed + i, ref.labels, ref.video, m, ref.video))
    return tasks


def _generated_frames(task: DemoTask) -> torch.Tensor:
    """Indices of the frames the sampler generated (not given as conditioning)."""
    if task.cond_mask is None:
        return torch.arange(task.reference.shape[0])
    return (task.cond_mask == 0).nonzero().flatten()


def _run_one(fn, task: DemoTask, num_steps: int, guidance_scale: float, shape) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    video = sample(fn, labels=task.labels[None],
                   cond_frames=None if task.cond_frames is None else task.cond_frames[None],
                   cond_mask=None if task.cond_mask is None else task.cond_mask[None],
                   num_steps=num_steps, guidance_scale=guidance_scale, seed=task.seed, progress=False,
                   shape=shape)[0]
    return video, time.perf_counter() - t0


def run(out_dir: str | Path = "out/demo", num_videos: int = 4, num_steps: int = 50, schedule=None,
        optimize_fn: Callable | None = None, guidance_scale: float = 2.0, threads: int | None = 1,
        model_name: str = "vdt-s", write: bool = True, model=None) -> dict:
    """Run the demo; returns the summary per sampler as a dict. ``schedule`` is passed through
    to ``optimize_fn`` as ``optimize_fn(model, schedule=schedule)`` when given; ``model``
    overrides loading the shipped ``model_name`` weights. ``threads`` defaults to 1: this model's
    small matmuls gain little from a second thread, and on a busy machine two synchronising
    threads were 30x slower (measured: 7 s vs 220 s per video); None keeps torch's setting."""
    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out_dir)
    model = load(model_name) if model is None else model.eval()
    cfg = model.config
    shape = (cfg.num_frames, cfg.in_channels, cfg.image_size, cfg.image_size)
    tasks = make_tasks(num_videos, cfg.num_frames, cfg.image_size)

    # ---- optimized column hook -------------------------------------------------
    opt_fn = None
    if optimize_fn is not None:
        opt_fn = optimize_fn(model, schedule=schedule) if schedule is not None else optimize_fn(model)
    # ----------------------------------------------------------------------------

    # Warm-up so the timings exclude one-off first-call costs (allocations, lazy compilation).
    # The optimized callable gets a full-length run: it may plan per step of a num_steps schedule.
    _run_one(model, tasks[0], 2, guidance_scale, shape)
    if opt_fn is not None:
        _run_one(opt_fn, tasks[0], num_steps, guidance_scale, shape)
    rows = {"baseline": {"sec": [], "psnr": [], "ssim": [], "physics": []}}
    if opt_fn is not None:
        rows["optimized"] = {"sec": [], "psnr": [], "ssim": [], "physics": []}
    for i, task in enumerate(tasks):
        base, sec = _run_one(model, task, num_steps, guidance_scale, shape)
        r = rows["baseline"]
        r["sec"].append(sec)
        r["psnr"].append(math.inf)
        r["ssim"].append(1.0)
        r["physics"].append(evaluate(base).plausibility)
        panels = [task.reference, base]
        if opt_fn is not None:
            opt, osec = _run_one(opt_fn, task, num_steps, guidance_scale, shape)
            o = rows["optimized"]
            o["sec"].append(osec)
            gen = _generated_frames(task)  # given frames are copied: identical by construction
            o["psnr"].append(psnr(opt[gen], base[gen]))
            o["ssim"].append(ssim(opt[gen], base[gen]))
            o["physics"].append(evaluate(opt).plausibility)
            panels.append(opt)
            if write:
                write_video(opt, out_dir / f"{i:02d}_optimized")
        if write:
            write_video(base, out_dir / f"{i:02d}_baseline")
            write_video(side_by_side(*panels), out_dir / f"{i:02d}_side_by_side")
        print(f"[{i + 1}/{len(tasks)}] {task.name:<20s} {decode_label(task.labels)}", flush=True)

    base_sec = sum(rows["baseline"]["sec"]) / len(tasks)
    ref_phys = sum(evaluate(t.reference).plausibility for t in tasks) / len(tasks)
    header = f"{'sampler':<10s} {'s/video':>8s} {'speedup':>8s} {'PSNR dB':>8s} {'SSIM':>6s} {'physics':>8s}"
    print(f"\nvdt-s, {num_steps} DDIM steps, CFG {guidance_scale}, {len(tasks)} videos, "
          f"{torch.get_num_threads()} threads (side-by-sides: generator | baseline"
          f"{' | optimized' if opt_fn is not None else ''})")
    print(header)
    summary = {}
    for name, r in rows.items():
        sec = sum(r["sec"]) / len(tasks)
        ps = sum(r["psnr"]) / len(tasks)
        ss = sum(r["ssim"]) / len(tasks)
        ph = sum(r["physics"]) / len(tasks)
        summary[name] = {"sec_per_video": sec, "speedup": base_sec / sec, "psnr": ps, "ssim": ss, "physics": ph}
        print(f"{name:<10s} {sec:8.2f} {base_sec / sec:7.2f}x {ps:8.2f} {ss:6.3f} {ph:8.3f}")
    print(f"{'generator':<10s} {'':>8s} {'':>8s} {'':>8s} {'':>6s} {ref_phys:8.3f}")
    summary["generator"] = {"physics": ref_phys}
    if write:
        print(f"videos in {out_dir}/")
    return summary
