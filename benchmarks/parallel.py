"""Sequence parallelism (DSP, Ulysses) with and without PAB: communication and wall time per generated video.

Run on N ranks (CPU, gloo; one thread per rank)::

    torchrun --nproc_per_node 2 benchmarks/parallel.py                    # vdt-s, pab246, 30 steps
    torchrun --nproc_per_node 2 benchmarks/parallel.py --steps 50 --reps 5 --schedule latte
    torchrun --nproc_per_node 2 benchmarks/parallel.py --model wan        # joint attention: Ulysses

``--model wan`` compares, on a small diffusers Wan (joint 3D attention), one process with and without PAB
against Ulysses (sequence split by frames, all-to-alls between sequence and heads around every joint
attention) and ring attention (keys and values passed round the ranks), each with and without
``PAB(joint=2)``: a step that reuses a joint attention skips its four all-to-alls (ring: its exchanges).
``Ulysses+AdaCache`` (``--adacache``, a codebook preset) skips the whole chain of blocks at the steps its
measured distance allows, and with them every all-to-all inside; the distance's sums are all-reduced in the
measuring graph (the "ar" column). Flow-matching Euler sampling from the same noise; the table counts
all-to-all, all-gather and in-graph all-reduce calls per rank and bytes summed over the ranks per video.

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


def joint_model(frames: int, size: int) -> tuple[torch.nn.Module, dict]:
    """A small diffusers Wan (joint 3D self-attention; random weights: communication and timings only)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=24,
                                  in_channels=16, out_channels=16, text_dim=64, freq_dim=64, ffn_dim=192,
                                  num_layers=4).eval()
    g = torch.Generator().manual_seed(1)
    kwargs = dict(hidden_states=torch.randn(2, 16, frames, size, size, generator=g),
                  timestep=torch.full((2,), 999, dtype=torch.int64),
                  encoder_hidden_states=torch.randn(2, 16, 64, generator=g), return_dict=False)
    return model, kwargs


def joint_main(args, rank: int, world: int) -> None:
    """Ulysses vs Ulysses+PAB on a joint-attention model (Wan): communication and seconds per video."""
    import graphpass
    from graphpass import PAB, AdaCache, SequenceParallel
    from graphpass.runtime.parallel import count_collectives

    model, kwargs = joint_model(args.frames, args.size)
    timesteps = [float(int(999.0 * (1 - i / args.steps))) for i in range(args.steps)]  # the int timesteps Wan gets
    pab = PAB(joint=args.joint_range, window=(100, 900))
    never = PAB(joint=args.joint_range, window=(2000.0, 3000.0))
    ada = AdaCache.preset(args.adacache)

    def sample(opt):  # flow-matching Euler from the same noise
        kw, x = dict(kwargs), kwargs["hidden_states"]
        with torch.no_grad():
            for i, t in enumerate(timesteps):
                kw["hidden_states"], kw["timestep"] = x, torch.full((2,), int(t), dtype=torch.int64)
                dt = (t - (timesteps[i + 1] if i + 1 < len(timesteps) else 0.0)) / 1000.0
                x = x - dt * opt(**kw)[0]
        return x

    variants = {}
    if rank == 0:
        variants["1 process, no reuse"] = graphpass.optimize(model, never, example_kwargs=kwargs, timesteps=timesteps)
        variants["1 process, PAB"] = graphpass.optimize(model, pab, example_kwargs=kwargs, timesteps=timesteps)
        variants["1 process, AdaCache"] = graphpass.optimize(model, ada, example_kwargs=kwargs, timesteps=timesteps)
    for label, sched, mode in (("Ulysses", never, "ulysses"), ("Ulysses+PAB", pab, "ulysses"),
                               ("Ring", never, "ring"), ("Ring+PAB", pab, "ring"),
                               ("Ulysses+AdaCache", ada, "ulysses")):
        variants[label] = graphpass.optimize(model, sched, example_kwargs=kwargs, timesteps=timesteps,
                                             parallel=SequenceParallel(mode=mode))
    labels = ["1 process, no reuse", "1 process, PAB", "1 process, AdaCache", "Ulysses", "Ulysses+PAB", "Ring",
              "Ring+PAB", "Ulysses+AdaCache"]
    videos, comm, times = {}, {}, {k: [] for k in labels}
    for label in labels:
        dist.barrier()
        if label in variants:
            with count_collectives() as counts:
                videos[label] = sample(variants[label])
            comm[label] = counts
        dist.barrier()
    for rep in range(args.reps):
        for label in labels[rep % len(labels):] + labels[:rep % len(labels)]:
            dist.barrier()
            t0 = time.perf_counter()
            if label in variants:
                sample(variants[label])
            dt = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            times[label].append(float(dt))

    def total(label, kind):  # bytes summed over ranks
        c = comm.get(label)
        v = torch.tensor([float(c.bytes[kind]) if c is not None else 0.0])
        dist.all_reduce(v)
        return float(v)

    def graph_reduces(label):  # all-reduces the graphs ran: on several ranks, all but one agreement per call
        if label not in comm:
            return 0
        return comm[label].calls["all_reduce"] - (len(timesteps) if variants[label].parallel is not None else 0)

    rows = [(label, comm[label].calls["all_to_all"] if label in comm else 0,
             comm[label].calls["all_gather"] if label in comm else 0, graph_reduces(label), total(label, "all_to_all"),
             total(label, "all_gather"), statistics.median(times[label])) for label in labels]
    by_label = {row[0]: row for row in rows}
    if rank != 0:
        return
    opt = variants["Ulysses+PAB"]
    joint = [r.path for r in opt.regions if r.kind == "joint"]
    reused = sum(1 for ph in opt.current_plan.phases for p in ph.reused if p in joint)
    share = reused / (len(joint) * len(timesteps))
    base = rows[0][-1]
    ref = {"Ulysses": videos["1 process, no reuse"], "Ulysses+PAB": videos["1 process, PAB"],
           "Ring": videos["1 process, no reuse"], "Ring+PAB": videos["1 process, PAB"],
           "Ulysses+AdaCache": videos["1 process, AdaCache"]}
    kib = 1024.0
    tokens = args.frames * (args.size // 2) ** 2
    print(f"\nWan (4 heads x 24, 4 blocks, random weights), {args.frames} frames of {args.size}x{args.size} latents "
          f"({tokens} tokens), {pab}, {args.steps} steps, {world} ranks x {args.threads} thread(s), frames "
          f"{list(opt.sharded.frames.sizes)}, median of {args.reps}")
    print(f"{'variant':<20} {'a2a/rank':>8} {'ag/rank':>7} {'ar/rank':>7} {'a2a KiB':>9} {'gather KiB':>10} "
          f"{'s/video':>8} {'speedup':>7} {'max|d|':>9}")
    for label, a2a, ag, ar, a2a_b, ag_b, t in rows:
        d = float((videos[label] - ref[label]).abs().max()) if label in ref else 0.0
        print(f"{label:<20} {a2a:>8} {ag:>7} {ar:>7} {a2a_b / kib:>9.1f} {ag_b / kib:>10.1f} {t:>8.2f} "
              f"{base / t:>6.2f}x {d:>9.2e}")
    for plain, reuse in (("Ulysses", "Ulysses+PAB"), ("Ring", "Ring+PAB")):
        plain, reuse = by_label[plain], by_label[reuse]
        print(f"\n{reuse[0]} vs {plain[0]}: all-to-all calls {reuse[1]} vs {plain[1]} per rank "
              f"({1 - reuse[1] / plain[1]:.0%} fewer), bytes {reuse[4] / kib:.1f} vs {plain[4] / kib:.1f} KiB "
              f"({1 - reuse[4] / plain[4]:.0%} less); the plan reuses {share:.0%} of the joint-attention steps", end="")
    plain, cached = by_label["Ulysses"], by_label["Ulysses+AdaCache"]
    decisions = variants["Ulysses+AdaCache"].decisions()
    print(f"\n{cached[0]} vs {plain[0]}: all-to-all calls {cached[1]} vs {plain[1]} per rank "
          f"({1 - cached[1] / plain[1]:.0%} fewer); decisions {decisions} (the blocks skipped at "
          f"{decisions.count('R') / len(decisions):.0%} of the steps, as on one process: "
          f"{variants['1 process, AdaCache'].decisions()})")
    report = opt.inspect().split("\n\n")
    print("\nUlysses+PAB, from opt.inspect():\n" + next(b for b in report if b.startswith("communication")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vdt-s", help="workload: vdt-s (shipped weights), vdt-tiny, or wan (joint "
                                                     "attention, Ulysses)")
    ap.add_argument("--frames", type=int, default=4, help="wan: latent frames")
    ap.add_argument("--size", type=int, default=16, help="wan: latent height and width")
    ap.add_argument("--joint-range", type=int, default=2, help="wan: PAB broadcast range of joint attention")
    ap.add_argument("--adacache", default="fast", help="wan: AdaCache codebook preset (fast, slow, 100-step)")
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

    if args.model == "wan":
        joint_main(args, rank, world)
        dist.destroy_process_group()
        return
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
