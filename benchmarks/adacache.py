"""AdaCache (fast, slow, fast+MoReg, calibrated) and PAB against the baseline on the shipped VDT model (CPU).

Every variant samples the same seeds (one video each, label of the physics video of that seed, DDIM with
batched classifier-free guidance: one model call of batch 2 per step). For each seed all variants run one
after another in a rotating order, so load changes on a shared machine hit them alike. Reported per variant:
seconds per video, wall-clock speedup, steps whose blocks were computed (AdaCache) and the FLOP speedup, and
PSNR / SSIM of the video against the baseline's (mean over seeds).

The calibrated row runs ``graphpass calibrate`` (slow codebook, target 1.5x in steps computed) on OTHER seeds
(100, 101, 102) than the ones evaluated. Also printed: what a reuse step costs against a full step, in FLOPs
(graphpass.passes.flops) and in wall time (median of repeated calls of the two phase graphs).

    python benchmarks/adacache.py                    # vdt-s (shipped weights), 30 steps, seeds 0 1 2
    python benchmarks/adacache.py --steps 30 --seeds 0 1 2 3 --threads 2
    python benchmarks/adacache.py --no-calibrate     # published codebooks and PAB only

Without the shipped weights it falls back to vdt-tiny and says so (random adaLN-Zero weights: every block is
the identity, so the figures mean nothing beyond the code running).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def load_model(name: str):
    from graphpass import models

    if name == "vdt-s" and not models.weights_path("vdt-s").is_file():
        print("NOTE: graphpass/models/weights/vdt-s.safetensors not found; falling back to vdt-tiny (random weights: "
              "adaLN-Zero makes every block the identity, the figures below say nothing about quality)")
        return models.create("vdt-tiny"), "vdt-tiny (random)"
    for attempt in range(3):  # the file may be rewritten by a running training job
        try:
            return (models.load(name) if name == "vdt-s" else models.create(name)), name
        except models.WeightsError:
            if attempt == 2:
                raise
            time.sleep(5)


def reuse_cost(opt, kwargs, reps: int) -> tuple[float, float]:
    """(FLOP share, wall-time share) of a reuse step against a full compute step."""
    from graphpass.schedules.base import Action, Phase

    full = opt.phase_graph(Phase())
    reuse = opt.phase_graph(Phase.of({opt.span.path: Action.REUSE}))
    flat = opt.captured.flatten_call(kwargs)
    with torch.no_grad():
        residual = opt.phase_graph(Phase.of({opt.span.path: Action.STORE})).gm(*flat)[-1]

        def median(fn):
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return statistics.median(ts)

        t_full = median(lambda: full.gm(*flat))
        t_reuse = median(lambda: reuse.gm(*flat, residual))
    return reuse.flops / full.flops, t_reuse / t_full


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vdt-s")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pab", nargs="*", default=["pab246", "pab357"], help="PAB presets to compare")
    p.add_argument("--no-calibrate", action="store_true", help="skip the calibrated AdaCache row")
    p.add_argument("--calibration-seeds", type=int, nargs="+", default=[100, 101, 102])
    p.add_argument("--reps", type=int, default=20, help="calls per phase graph for the reuse-step cost")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import graphpass
    from graphpass.commands.calibrate import calibrate, labels_for
    from graphpass.eval.metrics import psnr, ssim
    from graphpass.models.sampler import ddim_timesteps, sample
    from graphpass.passes.flops import graph_flops

    model, label = load_model(args.model)
    cfg = model.config
    kwargs = dict(hidden_states=torch.randn(2, cfg.num_frames, cfg.in_channels, cfg.image_size, cfg.image_size),
                  timestep=torch.full((2,), 981.0), encoder_hidden_states=torch.zeros(2, cfg.cond_len, dtype=torch.long),
                  cond_mask=torch.zeros(2, cfg.num_frames))
    ts = [float(t) for t in ddim_timesteps(args.steps)]
    n = args.steps
    mo = graphpass.MoReg.for_steps(n)

    schedules = {"AdaCache-fast": graphpass.AdaCache.preset("fast"),
                 "AdaCache-slow": graphpass.AdaCache.preset("slow"),
                 "AdaCache-fast+MoReg": graphpass.AdaCache.preset("fast", moreg=mo)}
    base_opt = graphpass.optimize(model, schedules["AdaCache-fast"], example_kwargs=kwargs, timesteps=ts)
    if not args.no_calibrate:
        print(f"calibrating (slow codebook, target 1.5x in steps) on seeds {args.calibration_seeds} ...")
        cal = calibrate(model, kwargs, ts, seeds=args.calibration_seeds, target_speedup=1.5, codebook="slow",
                        guidance=args.guidance, log=lambda s: None)
        print(f"  -> {cal.schedule}: on the calibration seeds {cal.chosen.speedup:.2f}x (steps), "
              f"PSNR {cal.chosen.mean_psnr:.2f} dB")
        schedules["AdaCache-slow (calibrated)"] = cal.schedule
        cal_mo = calibrate(model, kwargs, ts, seeds=args.calibration_seeds, target_speedup=1.5, codebook="slow",
                           moreg=True, guidance=args.guidance, log=lambda s: None)
        print(f"  -> {cal_mo.schedule}: on the calibration seeds {cal_mo.chosen.speedup:.2f}x (steps), "
              f"PSNR {cal_mo.chosen.mean_psnr:.2f} dB")
        schedules["AdaCache-slow+MoReg (calibrated)"] = cal_mo.schedule
    runners = {"baseline": model}
    for name, s in schedules.items():
        runners[name] = base_opt.with_schedule(s)
    for preset in args.pab:
        runners[f"PAB {preset}"] = graphpass.optimize(model, graphpass.PAB.preset(preset), example_kwargs=kwargs,
                                                       timesteps=ts)
    full_flops = graph_flops(base_opt.captured.gm)

    videos = {k: [] for k in runners}
    secs = {k: 0.0 for k in runners}
    computed = {k: [] for k in runners}
    flops = {k: 0.0 for k in runners}
    names = list(runners)
    for j, seed in enumerate(args.seeds):
        for name in names[j % len(names):] + names[:j % len(names)]:
            fn = runners[name]
            t0 = time.perf_counter()
            v = sample(fn, labels=labels_for(model, seed)[None], num_steps=n, guidance_scale=args.guidance, seed=seed,
                       progress=False)[0]
            secs[name] += time.perf_counter() - t0
            videos[name].append(v)
            if hasattr(fn, "state"):
                trace = fn.state().trace
                flops[name] += sum(fn.phase_graph(ph).flops for _, ph in trace)
                if hasattr(fn, "decisions"):
                    computed[name].append(fn.decisions().count("C"))
            else:
                flops[name] += n * full_flops

    flop_share, wall_share = reuse_cost(base_opt, kwargs, args.reps)
    k = len(args.seeds)
    print(f"\nmodel {label}; {n} DDIM steps, guidance {args.guidance}, seeds {args.seeds}, {args.threads} thread(s); "
          f"one call = batch 2 (cond + uncond)")
    print(f"reuse step (blocks skipped, embedders + final layer + one add): {flop_share:.1%} of a full step's FLOPs, "
          f"{wall_share:.1%} of its wall time (median of {args.reps} calls)")
    print(f"\n{'variant':<34} {'s/video':>8} {'speedup':>8} {'FLOP x':>7} {'steps computed':>16} {'PSNR dB':>8} "
          f"{'SSIM':>7}")
    base_s = secs["baseline"] / k
    for name in names:
        s = secs[name] / k
        if name == "baseline":
            q, ss = "-", "-"
        else:
            ps = [psnr(a, b) for a, b in zip(videos[name], videos["baseline"])]
            sm = [ssim(a, b) for a, b in zip(videos[name], videos["baseline"])]
            q, ss = f"{sum(ps) / k:.2f}", f"{sum(sm) / k:.4f}"
        comp = "/".join(map(str, computed[name])) if computed[name] else ("all" if name == "baseline" else "-")
        print(f"{name:<34} {s:>8.2f} {base_s / s:>7.2f}x {n * k * full_flops / flops[name]:>6.2f}x {comp:>16} "
              f"{q:>8} {ss:>7}")
    for name, s in schedules.items():
        print(f"  {name}: {s}")


if __name__ == "__main__":
    main()
