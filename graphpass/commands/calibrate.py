"""``graphpass calibrate``: measure the per-model constants of the step caches that need them (the logic is
in :mod:`graphpass.eval.calibrate` and :mod:`graphpass.eval.coefficients`; this module parses and prints).

``--method adacache`` (default) tunes AdaCache codebook thresholds; ``--method teacache`` fits TeaCache's
rescaling polynomial for a model without published coefficients; ``--method magcache`` measures MagCache's
magnitude ratios (usable as diffusers' ``MagCacheConfig(mag_ratios=...)``)::

    graphpass calibrate --method teacache --model out/wan-folder --steps 30 --seeds 0 1 --out teacache.json
    graphpass calibrate --method magcache --model latte-tiny --steps 28 --seeds 0 --out magcache.json

AdaCache:

The published thresholds were tuned by hand per model ("1-2 h per model"); this does it by measurement:

1. sample the baseline on a few seeds through an AdaCache that always computes (its outputs equal the
   model's), recording the distance metric (and the MoReg motion score) of every step;
2. with ``--moreg``, set the MoReg normaliser to the mean motion score measured in its window (so typical
   motion maps to 1 for this model);
3. keep the codebook's steps (``--codebook fast|slow|100-step``) and scale its distance bounds by one factor,
   searched by bisection on real runs of the same seeds: the smallest factor reaching ``--target-speedup``
   (in steps computed), or the largest keeping the mean PSNR against the baseline at ``--target-psnr``;
4. write the schedule JSON and print what was measured. Re-running the schedule on the same seeds computes
   the reported number of steps (runs are deterministic).

    graphpass calibrate --model vdt-s --steps 30 --seeds 0 1 2 --target-speedup 1.5 --out schedule.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ..errors import GraphpassError, InputError
from ..eval.calibrate import calibrate
from ..eval.coefficients import fit_teacache, magcache_ratios
from ..eval.harness import Workload
from ..workloads import example_call
from .checks import non_negative_int, output_file, positive_int


#: What ``--method`` calibrates, and the file written by default.
METHODS = ("adacache", "teacache", "magcache")
DEFAULT_OUT = {"adacache": "schedule.json", "teacache": "teacache.json", "magcache": "magcache.json"}


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="measure per-model constants: AdaCache thresholds (writes the schedule), "
                       "TeaCache polynomial coefficients, MagCache magnitude ratios")
    p.add_argument("--method", choices=METHODS, default="adacache", help="what to calibrate (default adacache)")
    p.add_argument("--model", default="vdt-s", help="model name (vdt-s uses the shipped weights); teacache and "
                   "magcache also take a diffusers model folder (save_pretrained)")
    p.add_argument("--steps", type=positive_int, default=30, help="DDIM sampling steps")
    p.add_argument("--seeds", type=non_negative_int, nargs="+", default=[0, 1, 2], help="seeds (each one video and label)")
    p.add_argument("--degree", type=positive_int, default=4, help="teacache: degree of the polynomial (published 4)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-speedup", type=float, help="adacache: reach this speedup in steps computed")
    target.add_argument("--target-psnr", type=float, help="keep this mean PSNR (dB) against the baseline")
    p.add_argument("--codebook", default="fast", help="codebook whose steps are kept: fast, slow, 100-step")
    p.add_argument("--moreg", action="store_true", help="use MoReg (its normaliser is calibrated too)")
    p.add_argument("--metric-at", default=None, help="block or region path to measure at (default: published)")
    p.add_argument("--cache-unit", default="residual", choices=["residual", "outputs"],
                   help="what a reuse step adds: the blocks' residual (published) or re-gated attention/MLP outputs")
    p.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale")
    p.add_argument("--iters", type=non_negative_int, default=8, help="bisection runs after the two bracketing runs")
    p.add_argument("--threads", type=non_negative_int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=output_file, default=None, help="JSON to write (default: schedule.json for adacache, "
                   "<method>.json otherwise)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out = args.out or DEFAULT_OUT[args.method]
    if args.method != "adacache":
        return run_coefficients(args)
    if args.target_speedup is None and args.target_psnr is None:
        raise InputError("calibrate --method adacache needs a target: --target-speedup X (steps computed) or "
                         "--target-psnr DB (mean PSNR against the baseline)")
    if not args.model.startswith("vdt-"):
        raise GraphpassError(f"calibrate samples with the VDT sampler; --model must be a VDT model (vdt-s, vdt-tiny), "
                             f"got {args.model!r}")
    model, kwargs, timesteps = example_call(args.model, batch=2, num_steps=args.steps)
    metric_at = args.metric_at
    if metric_at is not None and metric_at.isdigit():
        metric_at = int(metric_at)
    cal = calibrate(model, kwargs, timesteps, seeds=args.seeds, target_speedup=args.target_speedup,
                    target_psnr=args.target_psnr, codebook=args.codebook, moreg=args.moreg, metric_at=metric_at,
                    cache_unit=args.cache_unit, guidance=args.guidance, iters=args.iters)
    cal.schedule.save(args.out)
    c = cal.chosen
    kind, value = cal.target
    print(f"\n{'reached' if cal.reached else 'NOT reached'}: target {kind} {value:g}")
    print(f"schedule: {cal.schedule}")
    print(f"on seeds {cal.seeds}: computed {c.computed} of {cal.steps} steps -> speedup {c.speedup:.2f}x (steps); "
          f"PSNR {', '.join(f'{p:.2f}' for p in c.psnr)} dB (mean {c.mean_psnr:.2f}); "
          f"SSIM {', '.join(f'{s:.4f}' for s in c.ssim)}")
    print(f"wrote {args.out}")
    return 0


def run_coefficients(args) -> int:
    """TeaCache coefficients or MagCache ratios of ``args.model``, printed and written as JSON."""
    wl = Workload.from_name(args.model, num_steps=args.steps, weights=None)
    if args.method == "teacache":
        fit = fit_teacache(wl, args.seeds, degree=args.degree)
        result = {"model": wl.name, "steps": wl.num_steps, "seeds": list(args.seeds), **fit.to_dict()}
        print(f"{wl.name}: TeaCache polynomial of degree {fit.degree} fitted on {len(fit.input_changes)} step pairs "
              f"({len(args.seeds)} seed(s) x {wl.num_steps} steps), input = relative L1 change of node {fit.probe} "
              f"(the first block's timestep-modulated input); rms error {fit.rms_error:.3g}")
        print(f"coefficients (highest power first): {fit.coefficients}")
        if fit.negative_at() is not None:
            print(f"warning: the polynomial predicts a negative change at input change {fit.negative_at():.4g}, "
                  f"inside the fitted range: TeaCache would lower its accumulated distance there and reuse without "
                  f"end. Fit on more seeds, lower --degree, or use raw distances (coefficients [1.0, 0.0])",
                  file=sys.stderr)
    else:
        ratios = magcache_ratios(wl, args.seeds[0])
        result = {"model": wl.name, "method": "magcache", "num_inference_steps": wl.num_steps, "seed": args.seeds[0],
                  "mag_ratios": ratios}
        print(f"{wl.name}: MagCache magnitude ratios over {wl.num_steps} steps (seed {args.seeds[0]}): {ratios}")
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0
