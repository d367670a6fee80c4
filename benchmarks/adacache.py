"""AdaCache (fast, slow, fast+MoReg, calibrated) and PAB against the baseline on the shipped VDT model (CPU).

Every variant samples the same seeds (one video each, label of the physics video of that seed, DDIM with
batched classifier-free guidance: one model call of batch 2 per step). For each seed all variants run one
after another in a rotating order, so load changes on a shared machine hit them alike. Reported per variant:
seconds per video, wall-clock speedup, steps whose blocks were computed (AdaCache) and the FLOP speedup, and
PSNR / SSIM of the video against the baseline's (mean over seeds).

The calibrated rows ("cal.") run ``graphpass calibrate`` (slow codebook, target 1.5x in steps computed) on
OTHER seeds (100, 101, 102) than the ones evaluated. "outputs" rows cache the attention/MLP outputs and re-gate
them on reuse steps (``cache_unit="outputs"``) instead of the blocks' residual (published). Also printed: what a reuse step costs against a full step, in FLOPs
(graphpass.passes.flops) and in wall time (median of repeated calls of the two phase graphs).

    python benchmarks/adacache.py                    # vdt-s (shipped weights), 30 steps, seeds 0 1 2
    python benchmarks/adacache.py --steps 30 --seeds 0 1 2 3 --threads 2
    python benchmarks/adacache.py --no-calibrate     # published codebooks and PAB only

Without the shipped weights it falls back to vdt-tiny with random weights and says so.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def load_model(name: str):
    """(model, label): the shipped vdt-s, else vdt-tiny with random weights (and a note saying so)."""
    from graphpass import models, workloads

    if name == "vdt-s" and not models.weights_path("vdt-s").is_file():
        print("NOTE: graphpass/models/weights/vdt-s.safetensors not found; falling back to vdt-tiny with random "
              "weights: the figures below show the code running, not the quality on a trained model")
        name = "vdt-tiny"
    for attempt in range(3):  # the weights file may be rewritten by a running training job
        try:
            model = workloads.load_model(name)
            return model, name if name == "vdt-s" else f"{name} (random weights)"
        except models.WeightsError:
            if attempt == 2:
                raise
            time.sleep(5)


def reuse_cost(opt, kwargs, reps: int) -> tuple[float, float]:
    """(FLOP share, wall-time share) of a reuse step against a full compute step of a ResidualModel."""
    from graphpass.schedules.base import Action, Phase

    full = opt.phase_graph(Phase())
    store = opt.phase_graph(Phase.of({opt.span.path: Action.STORE}))
    reuse = opt.phase_graph(Phase.of({opt.span.path: Action.REUSE}))
    flat = opt.captured.flatten_call(kwargs)

    def median(fn):
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    with torch.no_grad():
        cached = store.gm(*flat)[store.num_user_outputs:]
        t_full = median(lambda: full.gm(*flat))
        t_reuse = median(lambda: reuse.gm(*flat, *cached))
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
    p.add_argument("--iters", type=int, default=6, help="bisection runs of each calibration")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import graphpass
    from graphpass.eval.calibrate import calibrate, labels_for
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
                 "AdaCache-fast+MoReg": graphpass.AdaCache.preset("fast", moreg=mo),
                 "AdaCache-slow, outputs": graphpass.AdaCache.preset("slow", cache_unit="outputs")}
    base_opt = graphpass.optimize(model, schedules["AdaCache-fast"], example_kwargs=kwargs, timesteps=ts)
    if not args.no_calibrate:
        for row, unit, moreg in (("AdaCache-slow cal.", "residual", False),
                                 ("AdaCache-slow cal., outputs", "outputs", False),
                                 ("AdaCache-slow+MoReg cal., outputs", "outputs", True)):
            print(f"calibrating {row} (slow codebook, target 1.5x in steps) on seeds {args.calibration_seeds} ...",
                  flush=True)
            cal = calibrate(model, kwargs, ts, seeds=args.calibration_seeds, target_speedup=1.5, codebook="slow",
                            moreg=moreg, cache_unit=unit, guidance=args.guidance, iters=args.iters,
                            log=lambda s: None)
            print(f"  -> {cal.schedule}: on the calibration seeds {cal.chosen.speedup:.2f}x (steps), "
                  f"PSNR {cal.chosen.mean_psnr:.2f} dB", flush=True)
            schedules[row] = cal.schedule
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

    costs = {unit: reuse_cost(base_opt.with_schedule(graphpass.AdaCache(cache_unit=unit)), kwargs, args.reps)
             for unit in ("residual", "outputs")}
    k = len(args.seeds)
    print(f"\nmodel {label}; {n} DDIM steps, guidance {args.guidance}, seeds {args.seeds}, {args.threads} thread(s); "
          f"one call = batch 2 (cond + uncond)")
    for unit, (flop_share, wall_share) in costs.items():
        print(f"reuse step, cache_unit={unit!r}: {flop_share:.1%} of a full step's FLOPs, {wall_share:.1%} of its "
              f"wall time (median of {args.reps} calls)")
    print(f"\n{'variant':<36} {'s/video':>8} {'speedup':>8} {'FLOP x':>7} {'steps computed':>16} {'PSNR dB':>8} "
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
        print(f"{name:<36} {s:>8.2f} {base_s / s:>7.2f}x {n * k * full_flops / flops[name]:>6.2f}x {comp:>16} "
              f"{q:>8} {ss:>7}")
    for name, s in schedules.items():
        print(f"  {name}: {s}")


if __name__ == "__main__":
    main()
