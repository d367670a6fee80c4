"""Sequence parallelism (DSP) with and without PAB: communication and wall time per generated video.

Run on N ranks (CPU, gloo; one thread per rank)::

    torchrun --nproc_per_node 2 benchmarks/parallel.py                    # vdt-s, pab246, 30 steps
    torchrun --nproc_per_node 2 benchmarks/parallel.py --steps 50 --reps 5 --schedule latte

Every variant samples one video with the DDIM sampler (batched classifier-free guidance: one model call of
batch 2 per step) from the same seed:

* ``1 process``  graphpass on rank 0 alone (the other ranks wait), without reuse and with the PAB schedule;
* ``DSP``        frames split over the ranks, all-to-alls around every temporal attention, no reuse;
* ``DSP+PAB``    the same with the PAB schedule: steps that reuse a temporal attention skip both of its
  all-to-alls (elided from those phases' graphs).

"no reuse" is the schedule with its window moved where no timestep enters (its plan computes everything).
Communication is counted as it runs (``graphpass.runtime.parallel.count_collectives``): calls per rank and
bytes sent to other ranks, summed over the ranks; "ctrl" is the per-call agreement (one all-reduce of 5
numbers). Wall time: median over ``--reps`` loops (variants in a rotating order per repetition, so load
changes on a shared machine hit them alike), slowest rank. max|d| compares the video with the single-process
video of the same schedule.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vdt-s", help="workload: vdt-s (shipped weights) or vdt-tiny")
    ap.add_argument("--schedule", default="pab246", help="PAB preset: pab246, pab357, latte, open-sora, ...")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = ap.parse_args()

    if "RANK" not in os.environ:
        raise SystemExit("run under torchrun: torchrun --nproc_per_node 2 benchmarks/parallel.py")
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    import graphpass
    from graphpass import PAB, SequenceParallel, workloads
    from graphpass.models.sampler import sample
    from graphpass.runtime.parallel import count_collectives

    name = args.model
    if name == "vdt-s" and not graphpass.models.weights_path("vdt-s").is_file():
        name = "vdt-tiny"
        if rank == 0:
            print("NOTE: vdt-s weights not found; using vdt-tiny (random weights): communication and timings only")
    model, kwargs, timesteps = workloads.example_call(name, batch=2, num_steps=args.steps)
    pab = PAB.preset(args.schedule)
    never = PAB.preset(args.schedule, window=(2000.0, 3000.0))
    cfg = model.config
    shape = (cfg.num_frames, cfg.in_channels, cfg.image_size, cfg.image_size)
    labels = kwargs["encoder_hidden_states"][:1]

    variants: dict[str, tuple[object, bool]] = {}  # label -> (model, runs on every rank)
    build_s = {}
    for label, sched in (("no reuse", never), ("PAB", pab)):
        if rank == 0:
            t0 = time.perf_counter()
            variants[f"1 process, {label}"] = (graphpass.optimize(model, sched, example_kwargs=kwargs,
                                                                  timesteps=timesteps), False)
            build_s[f"1 process, {label}"] = time.perf_counter() - t0
        else:
            variants[f"1 process, {label}"] = (None, False)
        t0 = time.perf_counter()
        dsp = "DSP" if label == "no reuse" else "DSP+PAB"
        variants[dsp] = (graphpass.optimize(model, sched, example_kwargs=kwargs, timesteps=timesteps,
                                            parallel=SequenceParallel()), True)
        build_s[dsp] = time.perf_counter() - t0

    def run(opt):
        return sample(opt, labels=labels, num_steps=args.steps, seed=0, progress=False, shape=shape)

    videos, comm, times = {}, {}, {k: [] for k in variants}
    for label, (opt, everyone) in variants.items():  # warm-up loop, counted communication, the video
        dist.barrier()
        if everyone or rank == 0:
            with count_collectives() as counts:
                videos[label] = run(opt)
            comm[label] = counts
        dist.barrier()
    order = list(variants)
    for rep in range(args.reps):
        for label in order[rep % len(order):] + order[:rep % len(order)]:
            opt, everyone = variants[label]
            dist.barrier()
            t0 = time.perf_counter()
            if everyone or rank == 0:
                run(opt)
            dt = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            times[label].append(float(dt))

    def total(label, kind, field):  # summed over ranks
        c = comm.get(label)
        v = torch.tensor([float(getattr(c, field)[kind]) if c is not None else 0.0])
        dist.all_reduce(v)
        return float(v)

    rows = []
    for label, (opt, everyone) in variants.items():
        a2a_calls = comm[label].calls["all_to_all"] if label in comm else 0
        row = (label, world if everyone else 1, a2a_calls, total(label, "all_to_all", "bytes"),
               total(label, "all_gather", "bytes"), total(label, "all_reduce", "bytes"), statistics.median(times[label]))
        rows.append(row)
    if rank != 0:
        dist.destroy_process_group()
        return
    base = next(r for r in rows if r[0] == "1 process, no reuse")[-1]
    ref = {"DSP": videos["1 process, no reuse"], "DSP+PAB": videos["1 process, PAB"]}
    mib = 2.0 ** 20
    print(f"\n{name}, {args.schedule} ({pab}), {args.steps} steps, {world} ranks x {args.threads} thread(s), "
          f"frames {list(variants['DSP'][0].sharded.frames.sizes)}, median of {args.reps}")
    print(f"{'variant':<22} {'ranks':>5} {'a2a/rank':>8} {'a2a MiB':>8} {'gather MiB':>10} {'ctrl KiB':>8} "
          f"{'s/video':>8} {'speedup':>7} {'max|d|':>9} {'build s':>7}")
    for label, ranks, calls, a2a, gather, ctrl, t in rows:
        d = float((videos[label] - ref[label]).abs().max()) if label in ref else 0.0
        print(f"{label:<22} {ranks:>5} {calls:>8} {a2a / mib:>8.2f} {gather / mib:>10.2f} {ctrl / 1024:>8.2f} "
              f"{t:>8.2f} {base / t:>6.2f}x {d:>9.2e} {build_s.get(label, 0):>7.1f}")
    dsp, both = (next(r for r in rows if r[0] == k) for k in ("DSP", "DSP+PAB"))
    print(f"\nDSP+PAB vs DSP: all-to-all calls {both[2]} vs {dsp[2]} per rank ({1 - both[2] / dsp[2]:.0%} fewer), "
          f"bytes {both[3] / mib:.2f} vs {dsp[3] / mib:.2f} MiB ({1 - both[3] / dsp[3]:.0%} less); "
          f"all communication {(both[3] + both[4]) / mib:.2f} vs {(dsp[3] + dsp[4]) / mib:.2f} MiB")
    report = variants["DSP+PAB"][0].inspect().split("\n\n")
    print("\nDSP+PAB, from opt.inspect():\n" + next(b for b in report if b.startswith("communication")))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
