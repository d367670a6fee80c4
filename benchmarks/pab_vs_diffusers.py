"""graphpass PAB against diffusers' PAB hook on a random-weight LatteTransformer3DModel (CPU).

Three variants run in one process on the same inputs and the same 30-step loop (DDIM-spaced timesteps,
each step feeding ``x - 0.1 * eps`` back as the next input), advanced in lockstep (step i of each variant,
in rotating order) so that load changes on a shared machine hit all three alike; "wall s" sums the model
calls of one generation:

* ``baseline``  the diffusers model as is;
* ``diffusers`` diffusers' Pyramid Attention Broadcast hooks (``transformer.enable_cache``) with the block
  identifiers set explicitly, so ``temporal_transformer_blocks.N.attn1`` gets the temporal range (with the
  default identifiers it matches the spatial identifier ``transformer_blocks`` first and gets the spatial one);
* ``graphpass`` ``graphpass.optimize`` with the same schedule, planned up front, eager phase graphs.

Schedule: spatial 2, temporal 3, cross 6, window (100, 800). The "ideal" speedup is the FLOP ratio of the
full graph to the phase graphs the plan runs (graphpass's FLOP count; the hooks skip the same modules, so it
is the ideal of both). Run::

    python benchmarks/pab_vs_diffusers.py               # default size, 1 thread
    python benchmarks/pab_vs_diffusers.py --threads 2 --layers 4 --size 32
    python benchmarks/pab_vs_diffusers.py --profile     # where the time of the phase graphs goes
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

SCHEDULE = dict(spatial=2, temporal=3, cross=6, window=(100, 800))


def build(args):
    from diffusers import LatteTransformer3DModel

    torch.manual_seed(0)
    model = LatteTransformer3DModel(
        num_attention_heads=args.heads, attention_head_dim=args.head_dim, in_channels=4, out_channels=8,
        num_layers=args.layers, sample_size=args.size, patch_size=2, cross_attention_dim=args.heads * args.head_dim,
        caption_channels=64, num_embeds_ada_norm=1000, norm_type="ada_norm_single", video_length=args.frames).eval()
    g = torch.Generator().manual_seed(1)
    kwargs = dict(hidden_states=torch.randn(args.batch, 4, args.frames, args.size, args.size, generator=g),
                  timestep=torch.full((args.batch,), 999, dtype=torch.long),
                  encoder_hidden_states=torch.randn(args.batch, 16, 64, generator=g), return_dict=False)
    return model, kwargs


def lockstep(calls, kwargs, timesteps, on_step):
    """One generation of every variant, advanced step by step together so that load changes on a shared
    machine hit all of them alike (the order rotates each step). Returns per variant the outputs of every
    step, the summed wall time of its calls and their summed CPU time (this process, one thread: less
    sensitive than wall time to other jobs on the machine)."""
    xs = {name: kwargs["hidden_states"] for name in calls}
    outs = {name: [] for name in calls}
    secs = {name: 0.0 for name in calls}
    cpu = {name: 0.0 for name in calls}
    names = list(calls)
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            on_step(t)
            for name in names[i % len(names):] + names[:i % len(names)]:
                kw = dict(kwargs, hidden_states=xs[name], timestep=torch.full_like(kwargs["timestep"], t))
                t0, c0 = time.perf_counter(), time.process_time()
                out = calls[name](**kw)[0]
                secs[name] += time.perf_counter() - t0
                cpu[name] += time.process_time() - c0
                outs[name].append(out)
                xs[name] = xs[name] - 0.1 * out[:, :4]
    return outs, secs, cpu


def diffusers_pab(model, current):
    """Enable diffusers' PAB hooks with the schedule above; returns the per-module ranges it assigned."""
    from diffusers import PyramidAttentionBroadcastConfig
    from diffusers.hooks import HookRegistry

    lo_hi = tuple(int(v) for v in SCHEDULE["window"])
    model.enable_cache(PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=SCHEDULE["spatial"],
        temporal_attention_block_skip_range=SCHEDULE["temporal"],
        cross_attention_block_skip_range=SCHEDULE["cross"],
        spatial_attention_timestep_skip_range=lo_hi, temporal_attention_timestep_skip_range=lo_hi,
        cross_attention_timestep_skip_range=lo_hi,
        # re.search against module names: anchor them so temporal blocks do not match the spatial identifier.
        spatial_attention_block_identifiers=(r"^transformer_blocks\.",),
        temporal_attention_block_identifiers=(r"^temporal_transformer_blocks\.",),
        cross_attention_block_identifiers=(r"^transformer_blocks\.",),
        current_timestep_callback=lambda: current["t"]))
    ranges = {}
    for name, mod in model.named_modules():
        reg = getattr(mod, "_diffusers_hook", None)
        hook = reg.get_hook("pyramid_attention_broadcast") if isinstance(reg, HookRegistry) else None
        if hook is not None:
            ranges[name] = hook.block_skip_range
    return ranges


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=16, help="latent height = width")
    ap.add_argument("--batch", type=int, default=2, help="2 = one video with batched classifier-free guidance")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--reps", type=int, default=3, help="generations per variant (the median is reported)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="also profile the ops of the graphpass loop")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import graphpass
    from graphpass.models.sampler import ddim_timesteps
    from graphpass.passes.flops import graph_flops

    model, kwargs = build(args)
    timesteps = [int(t) for t in ddim_timesteps(args.steps)]
    t0 = time.perf_counter()
    opt = graphpass.optimize(model, graphpass.PAB(**SCHEDULE), example_kwargs=kwargs, timesteps=timesteps)
    build_s = time.perf_counter() - t0
    plan = opt.current_plan
    full = graph_flops(opt.captured.gm) * len(plan)
    planned = sum(opt.phase_graph(ph).flops for ph in plan.phases)
    ideal = full / planned

    current = {"t": 0}
    hooked = copy.deepcopy(model)  # the baseline stays hook-free; same weights
    ranges = diffusers_pab(hooked, current)
    expect = {r.path: SCHEDULE.get(r.kind) for r in opt.regions if SCHEDULE.get(r.kind)}
    if ranges != expect:
        raise SystemExit(f"diffusers hooks got ranges {ranges}, graphpass regions {expect}: schedules differ")

    def set_t(t):
        current["t"] = t

    calls = {"baseline": model, "diffusers": hooked, "graphpass": opt}
    times = {name: [] for name in calls}
    cpu_times = {name: [] for name in calls}
    lockstep(calls, kwargs, timesteps[:2], set_t)  # warm-up
    for _ in range(args.reps):
        hooked._reset_stateful_cache()
        opt.reset()
        outs, secs, cpu = lockstep(calls, kwargs, timesteps, set_t)
        for name, s in secs.items():
            times[name].append(s)
            cpu_times[name].append(cpu[name])

    diff = max(float((a - b).abs().max()) for a, b in zip(outs["graphpass"], outs["diffusers"]))
    vs_base = max(float((a - b).abs().max()) for a, b in zip(outs["graphpass"], outs["baseline"]))
    base = statistics.median(times["baseline"])
    base_cpu = statistics.median(cpu_times["baseline"])
    print(f"LatteTransformer3DModel random weights: {args.layers} layers, {args.heads} heads x {args.head_dim}, "
          f"{args.frames} frames, latent {args.size}x{args.size}, batch {args.batch}; {args.steps} steps; "
          f"{torch.get_num_threads()} thread(s); graphpass optimize+plan {build_s:.1f} s, "
          f"{len(plan.distinct())} phase graphs")
    print(f"schedule {graphpass.PAB(**SCHEDULE)}; FLOP per generation: full {full / 1e9:.2f} G, "
          f"planned {planned / 1e9:.2f} G")
    print(f"{'variant':<10} {'wall s (median of ' + str(args.reps) + ')':>22} {'speedup':>8} {'ideal':>6} "
          f"{'achieved/ideal':>15} {'cpu s':>7} {'cpu speedup':>12} {'cpu achieved/ideal':>19}")
    for name, ts in times.items():
        med, cmed = statistics.median(ts), statistics.median(cpu_times[name])
        sp, csp = base / med, base_cpu / cmed
        if name == "baseline":
            print(f"{name:<10} {med:>22.2f} {sp:>7.2f}x {'':>6} {'':>15} {cmed:>7.2f} {csp:>11.2f}x {'':>19}")
        else:
            print(f"{name:<10} {med:>22.2f} {sp:>7.2f}x {ideal:>5.2f}x {sp / ideal:>15.2f} {cmed:>7.2f} {csp:>11.2f}x "
                  f"{csp / ideal:>19.2f}")
    print(f"max |graphpass - diffusers hook| over all steps: {diff:.3g}  (graphpass vs baseline: {vs_base:.3g})")

    if args.profile:
        profile(opt, kwargs, timesteps, set_t)


def profile(opt, kwargs, timesteps, set_t):
    """Top ops of one graphpass generation; time against FLOPs per phase; the executor's own overhead."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    from graphpass import Phase

    opt.reset()
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        lockstep({"graphpass": opt}, kwargs, timesteps, set_t)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))

    # Per phase: step time relative to the compute-all phase, against the FLOP ratio (1.0 = time follows FLOPs).
    plan = opt.current_plan
    flat = [opt.captured.flatten_call(dict(kwargs, timestep=torch.full_like(kwargs["timestep"], t))) for t in timesteps]
    full_pg = opt.phase_graph(Phase(()))
    specs = {key: spec for r in opt.regions for key, spec in zip(r.cache_keys, r.exit_specs)}
    rows = []
    with torch.no_grad():
        for ph in plan.distinct():
            pg = opt.phase_graph(ph)
            cache = [torch.randn(specs[key].shape) for key in pg.cache_inputs]
            ratio = []
            for _ in range(3):  # interleave with the full graph so load changes cancel
                t0 = time.perf_counter()
                full_pg.gm(*flat[0])
                a = time.perf_counter() - t0
                t0 = time.perf_counter()
                pg.gm(*flat[0], *cache)
                ratio.append((time.perf_counter() - t0) / a)
            rows.append((ph.label(), plan.phases.count(ph), pg.flops / full_pg.flops, statistics.median(ratio),
                         pg.attention_ops()))
    print(f"{'phase':<28} {'steps':>5} {'FLOP':>6} {'time':>6} {'SDPA':>5}   (relative to the compute-all phase)")
    for label, n, f, r, a in rows:
        print(f"{label:<28} {n:>5} {f:>6.2f} {r:>6.2f} {a:>5}")

    # Executor overhead: a call through OptimizedModel minus the same phase graph called directly.
    kw = dict(kwargs, timestep=torch.full_like(kwargs["timestep"], timesteps[0]))
    first = opt.phase_graph(plan.phases[0])  # what the executor runs for the first step
    direct, wrapped = [], []
    with torch.no_grad():
        for _ in range(5):
            t0 = time.perf_counter()
            first.gm(*flat[0])
            direct.append(time.perf_counter() - t0)
            opt.reset()
            t0 = time.perf_counter()
            opt(**kw)
            wrapped.append(time.perf_counter() - t0)
    d, w = statistics.median(direct), statistics.median(wrapped)
    print(f"first step's phase graph: {d * 1e3:.1f} ms called directly, {w * 1e3:.1f} ms through OptimizedModel "
          f"(medians of 5; difference {1e3 * (w - d):+.1f} ms per call)")


if __name__ == "__main__":
    main()
