"""Per-step time of the eager, Inductor and ONNX Runtime backends, baseline (no reuse) against PAB, on CPU.

For the shipped model (vdt-s; vdt-tiny with a note when its weights are missing) every variant samples one
video with the DDIM sampler (batched classifier-free guidance: one model call of batch 2 per step):

* ``nn.Module``            the model itself;
* ``eager``                graphpass's phase graphs run as FX graphs;
* ``inductor``             one ``torch.compile`` per phase graph (compile time = first call of each phase);
* ``onnxruntime``          the per-phase ONNX export (``graphpass.export``) run by :func:`graphpass.load`;
* ``onnxruntime 1-file``   the single-file export (ONNX ``If`` per reusable region), PAB only.

"baseline" is a schedule whose window no timestep enters: its plan is the compute-all phase at every step.
Each variant's sampling loop runs ``--reps`` times, variants in a rotating order per repetition (load changes
on a shared machine hit them alike; one warm-up loop each first); the table gives the median per-step time,
the speedup against the ``nn.Module`` baseline, the max |difference| of the video against the eager variant of
the same schedule, and the compile/export seconds per phase. Then the exported folders' sizes: weights stored once in
``weights.bin`` against what a weights file per phase would hold.

    python benchmarks/backends.py                       # vdt-s, pab246, 30 steps, 1 thread
    python benchmarks/backends.py --steps 50 --reps 5 --threads 2
    python benchmarks/backends.py --model vdt-tiny --no-inductor
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def pick_model(name: str) -> str:
    from graphpass import models

    if name == "vdt-s" and not models.weights_path("vdt-s").is_file():
        print("NOTE: graphpass/models/weights/vdt-s.safetensors not found; using vdt-tiny (random weights): the "
              "timings show the mechanics only")
        return "vdt-tiny"
    return name


def sampler_fn(model, labels, shape, steps: int):
    from graphpass.models.sampler import sample

    def run():
        return sample(model, labels=labels, num_steps=steps, seed=0, progress=False, shape=shape)

    return run


def timed_first_loop(opt, run) -> tuple[torch.Tensor, list[float]]:
    """Run one sampling loop, timing the first call of each phase (compile or session setup + one step)."""
    firsts: dict = {}
    orig = opt.forward

    def forward(*a, **k):
        n_before = len(opt._runners)
        t0 = time.perf_counter()
        out = orig(*a, **k)
        if len(opt._runners) > n_before:
            firsts[len(firsts)] = time.perf_counter() - t0
        return out

    opt.forward = forward
    try:
        video = run()
    finally:
        del opt.forward
    return video, list(firsts.values())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def main(argv=None) -> None:
    import graphpass
    from graphpass import PAB
    from graphpass.workloads import example_call

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vdt-s")
    ap.add_argument("--schedule", default="pab246", help="PAB preset of the reuse rows")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime intra-op threads")
    ap.add_argument("--no-inductor", action="store_true", help="skip torch.compile (slow to compile on CPU)")
    ap.add_argument("--out", default=None, help="keep the exported folders here (default: a temporary folder)")
    ap.add_argument("--warm-cache", action="store_true", help="let Inductor reuse its on-disk caches (default: "
                    "cold compiles, so the compile column is what a fresh machine pays)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch._dynamo.reset()
    if not args.warm_cache:
        from torch._functorch import config as functorch_config
        from torch._inductor import config as inductor_config

        inductor_config.fx_graph_cache = False
        functorch_config.enable_autograd_cache = False

    name = pick_model(args.model)
    model, kw, timesteps = example_call(name, batch=2, num_steps=args.steps)
    cfg = model.config
    shape = tuple(kw["hidden_states"].shape[1:])
    labels = torch.randint(1, cfg.vocab_size, (1, cfg.cond_len), generator=torch.Generator().manual_seed(0))
    out_root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="graphpass-bench-"))
    schedules = {"baseline": PAB(spatial=2, window=(-2.0, -1.0)),  # no timestep inside: never reuses
                 args.schedule: PAB.preset(args.schedule)}

    variants: dict[tuple[str, str], dict] = {}  # (schedule, backend) -> {"run", "setup", "video"}
    variants[("baseline", "nn.Module")] = {"run": sampler_fn(model, labels, shape, args.steps), "setup": []}
    for sname, sched in schedules.items():
        eager = graphpass.optimize(model, sched, example_kwargs=kw, timesteps=timesteps)
        phases = len(eager.current_plan.distinct())
        print(f"{sname}: {phases} distinct phases over {args.steps} steps")
        variants[(sname, "eager")] = {"run": sampler_fn(eager, labels, shape, args.steps), "setup": [],
                                      "phases": phases}
        if not args.no_inductor:
            ind = graphpass.optimize(model, sched, example_kwargs=kw, timesteps=timesteps, backend="inductor")
            run = sampler_fn(ind, labels, shape, args.steps)
            video, firsts = timed_first_loop(ind, run)
            variants[(sname, "inductor")] = {"run": run, "setup": firsts, "phases": phases, "video": video}
        layouts = [("onnxruntime", False)] + ([("onnxruntime 1-file", True)] if sname != "baseline" else [])
        for label, single in layouts:
            folder = out_root / f"{sname}{'-single' if single else ''}"
            graphpass.export(eager, folder, single_file=single, overwrite=True)
            m = graphpass.exporters.manifest.read_manifest(folder)
            secs = ([m["single_file"]["export_seconds"]] if single else [e["export_seconds"] for e in m["phases"]])
            loaded = graphpass.load(folder, threads=args.threads)
            variants[(sname, label)] = {"run": sampler_fn(loaded, labels, shape, args.steps), "setup": secs,
                                        "phases": phases, "folder": folder, "manifest": m}

    keys = list(variants)
    for k in keys:  # warm-up: ONNX Runtime sessions are created on a phase's first call
        if "video" not in variants[k]:
            variants[k]["video"] = variants[k]["run"]()
    times: dict = {k: [] for k in keys}
    for rep in range(args.reps):
        order = keys[rep % len(keys):] + keys[:rep % len(keys)]
        for k in order:
            t0 = time.perf_counter()
            video = variants[k]["run"]()
            times[k].append((time.perf_counter() - t0) / args.steps)
            variants[k]["video"] = video

    base = statistics.median(times[("baseline", "nn.Module")])
    print(f"\n{name}, {args.steps} DDIM steps (batch 2 per call), {args.threads} thread(s), median of {args.reps}; "
          f"torch {torch.__version__}")
    head = (f"{'schedule':<10} {'backend':<20} {'phases':>6} {'ms/step':>9} {'speedup':>8} {'max|diff|':>10} "
            f"{'setup s/phase (mean / max)':>28}")
    print(head)
    print("-" * len(head))
    for k in keys:
        sname, backend = k
        v = variants[k]
        ref = variants.get((sname, "eager"), variants[("baseline", "nn.Module")])["video"]
        diff = float((v["video"] - ref).abs().max())
        ms = statistics.median(times[k]) * 1e3
        setup = v["setup"]
        setup_s = f"{statistics.mean(setup):.2f} / {max(setup):.2f}" if setup else "-"
        kind = {"inductor": " compile", "onnxruntime": " export", "onnxruntime 1-file": " export"}.get(backend, "")
        print(f"{sname:<10} {backend:<20} {v.get('phases', 1):>6} {ms:>9.2f} {base * 1e3 / ms:>7.2f}x {diff:>10.2e} "
              f"{setup_s + kind:>28}")

    print("\nexported folders (ONNX, weights deduplicated into one weights.bin):")
    for k in keys:
        if "folder" not in variants[k]:
            continue
        v = variants[k]
        w = v["manifest"]["weights"]
        onnx_files = sum(p.stat().st_size for p in v["folder"].glob("*.onnx"))
        print(f"  {k[0]:<10} {k[1]:<20} folder {fmt_bytes(folder_bytes(v['folder'])):>10}  (graph files "
              f"{fmt_bytes(onnx_files)}, weights.bin {fmt_bytes(w['stored_bytes'])}; a weights file per phase "
              f"would hold {fmt_bytes(w['referenced_bytes'])}, folder {fmt_bytes(onnx_files + w['referenced_bytes'])})")
    if not args.out:
        print(f"(exports written under {out_root}; pass --out to keep them somewhere else)")


if __name__ == "__main__":
    main()
