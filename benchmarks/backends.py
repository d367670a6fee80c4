"""Per-step time of the eager, Inductor and ONNX Runtime backends, baseline (no reuse) against PAB, on CPU.

For the shipped model (vdt-s; vdt-tiny with a note when its weights are missing) every variant samples one
video with the DDIM sampler (batched classifier-free guidance: one model call of batch 2 per step):

* ``nn.Module``            the model itself;
* ``eager``                graphpass's phase graphs run as FX graphs;
* ``inductor``             one ``torch.compile`` per phase graph (compile time = first call of each phase);
* ``onnxruntime``          the default ONNX export (``graphpass.export``: one file with an ``If`` per reused
                           region when the plan reuses any, else the one phase's file) run by
                           :func:`graphpass.load` (its default :class:`~graphpass.exporters.ort_runner.OrtOptions`:
                           one shared copy of the weights, one shared arena, IO binding);
* ``onnxruntime unshared`` the same folder with ONNX Runtime's own session defaults
                           (``OrtOptions.unshared()``: weights, packed weights and arena per session), PAB only;
* ``onnxruntime no warm-up`` the default row loaded with ``warmup=False`` (sessions built by the first
                           generation), PAB only;
* ``onnxruntime per-phase`` the per-phase export (one ONNX file and session per phase), PAB only.

"baseline" is a schedule whose window no timestep enters: its plan is the compute-all phase at every step.
Each variant's sampling loop runs ``--reps`` times, variants in a rotating order per repetition (load changes
on a shared machine hit them alike; one warm-up loop each first); the table gives the median per-step wall
time and CPU time (``time.process_time``: with one thread it is the compute a step costs, which other
processes on a shared machine inflate far less than wall time), the speedups (wall; CPU) against the
``nn.Module`` baseline, the max |difference| of the video against the eager variant of the same schedule,
and the compile/export seconds per phase.

Then, per variant, a fresh subprocess (so that variants do not share allocator state or imports) measures
what a user pays once: the load time (model + ``graphpass.optimize`` for the in-process backends,
``graphpass.load`` of the exported folder, warm-up included, for ONNX Runtime), the first and second generations'
per-step CPU time (the first after load is the one a fresh server pays), and the **peak RSS added** by
loading + one generation: the process's peak resident set
(``VmHWM`` of ``/proc/self/status``, reset through ``/proc/self/clear_refs`` after the imports and before the
load) minus its resident set just before the load. Then the exported folders' sizes: weights stored once
in ``weights.bin`` against what a weights file per phase would hold.

    python benchmarks/backends.py                       # vdt-s, pab246, 30 steps, 1 thread
    python benchmarks/backends.py --steps 50 --reps 5 --threads 2
    python benchmarks/backends.py --model vdt-tiny --no-inductor
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # measure this checkout's graphpass, not an installed one (the children get it too)

#: Rows that export a folder (the others load one of these).
EXPORTED_ROWS = ("onnxruntime", "onnxruntime per-phase")


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


def sampling_inputs(name: str) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The class labels and video shape every variant samples (from the config: no weights are loaded)."""
    from graphpass.models import CONFIGS

    cfg = CONFIGS[name]
    labels = torch.randint(1, cfg.vocab_size, (1, cfg.cond_len), generator=torch.Generator().manual_seed(0))
    return labels, (cfg.num_frames, cfg.in_channels, cfg.image_size, cfg.image_size)


def ort_options(preset: str, threads: int):
    from graphpass.exporters.ort_runner import OrtOptions

    return (OrtOptions.unshared if preset == "unshared" else OrtOptions)(threads=threads)


# --- one variant in a fresh process: load time, first generation, peak RSS ----------------------------
def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_once(spec: dict) -> dict:
    """In this (fresh) process: load the variant ``spec`` describes and sample twice; return load seconds, the
    first and second generations' ms/step and the peak RSS added by loading + the first (bytes)."""
    import graphpass
    import onnxruntime  # noqa: F401  (imported before the baseline RSS, like torch: not the variant's cost)
    from graphpass import PAB

    torch.set_num_threads(spec["threads"])
    labels, shape = sampling_inputs(spec["model"])
    before = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak RSS) to the current RSS
    t0 = time.perf_counter()
    if spec["folder"]:
        model = graphpass.load(spec["folder"], ort_options=ort_options(spec["ort"], spec["threads"]),
                               warmup=spec.get("warmup", True))
    else:
        from graphpass.workloads import example_call

        model, kw, timesteps = example_call(spec["model"], batch=2, num_steps=spec["steps"])
        if spec["backend"] != "nn.Module":
            sched = PAB.preset(spec["schedule"]) if spec["schedule"] != "baseline" else PAB(spatial=2, window=(-2., -1.))
            model = graphpass.optimize(model, sched, example_kwargs=kw, timesteps=timesteps, backend=spec["backend"])
    load_s = time.perf_counter() - t0
    run = sampler_fn(model, labels, shape, spec["steps"])
    gens = []
    for _ in range(2):  # the first generation (what a fresh server pays), then the second (steady state)
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        gens.append(((time.perf_counter() - t0) / spec["steps"] * 1e3, (time.process_time() - c0) / spec["steps"] * 1e3))
        if len(gens) == 1:
            peak = _status_bytes("VmHWM") - before
    return {"load_s": load_s, "first_ms": gens[0][0], "first_cpu_ms": gens[0][1], "second_cpu_ms": gens[1][1],
            "peak_bytes": peak}


def measure_in_subprocess(spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--measure", json.dumps(spec)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"measuring {spec['schedule']}/{spec['backend']} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


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
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # child mode: one variant, JSON out
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure_once(json.loads(args.measure))))
        return
    torch.set_num_threads(args.threads)
    torch._dynamo.reset()
    if not args.warm_cache:
        from torch._functorch import config as functorch_config
        from torch._inductor import config as inductor_config

        inductor_config.fx_graph_cache = False
        functorch_config.enable_autograd_cache = False

    name = pick_model(args.model)
    model, kw, timesteps = example_call(name, batch=2, num_steps=args.steps)
    labels, shape = sampling_inputs(name)
    out_root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="graphpass-bench-"))
    schedules = {"baseline": PAB(spatial=2, window=(-2.0, -1.0)),  # no timestep inside: never reuses
                 args.schedule: PAB.preset(args.schedule)}

    variants: dict[tuple[str, str], dict] = {}  # (schedule, backend) -> {"run", "setup", "video", "child"}
    child = {"model": name, "steps": args.steps, "threads": args.threads, "folder": None, "ort": "default"}
    variants[("baseline", "nn.Module")] = {"run": sampler_fn(model, labels, shape, args.steps), "setup": [],
                                           "child": child | {"schedule": "baseline", "backend": "nn.Module"}}
    for sname, sched in schedules.items():
        eager = graphpass.optimize(model, sched, example_kwargs=kw, timesteps=timesteps)
        phases = len(eager.current_plan.distinct())
        print(f"{sname}: {phases} distinct phases over {args.steps} steps")
        variants[(sname, "eager")] = {"run": sampler_fn(eager, labels, shape, args.steps), "setup": [],
                                      "phases": phases, "child": child | {"schedule": sname, "backend": "eager"}}
        if not args.no_inductor:
            ind = graphpass.optimize(model, sched, example_kwargs=kw, timesteps=timesteps, backend="inductor")
            run = sampler_fn(ind, labels, shape, args.steps)
            video, firsts = timed_first_loop(ind, run)
            variants[(sname, "inductor")] = {"run": run, "setup": firsts, "phases": phases, "video": video,
                                             "child": child | {"schedule": sname, "backend": "inductor"}}
        layouts = [("onnxruntime", None, "default")]  # None: the layout graphpass.export picks
        if sname != "baseline":
            layouts += [("onnxruntime no warm-up", None, "default"), ("onnxruntime unshared", None, "unshared"),
                        ("onnxruntime per-phase", False, "default")]
        for label, single, preset in layouts:
            folder = out_root / f"{sname}{'-per-phase' if single is False else ''}"
            if label in EXPORTED_ROWS:  # the other rows load the folder exported above
                graphpass.export(eager, folder, single_file=single, overwrite=True)
            m = graphpass.exporters.manifest.read_manifest(folder)
            secs = ([m["single_file"]["export_seconds"]] if m.get("single_file")
                    else [e["export_seconds"] for e in m["phases"]])
            loaded = graphpass.load(folder, ort_options=ort_options(preset, args.threads))
            variants[(sname, label)] = {"run": sampler_fn(loaded, labels, shape, args.steps), "setup": secs,
                                        "phases": phases, "folder": folder, "manifest": m,
                                        "child": child | {"schedule": sname, "backend": label, "folder": str(folder),
                                                          "ort": preset, "warmup": label != "onnxruntime no warm-up"}}

    keys = list(variants)
    for k in keys:  # warm-up loop of every variant (Inductor's was its timed first loop)
        if "video" not in variants[k]:
            variants[k]["video"] = variants[k]["run"]()
    wall: dict = {k: [] for k in keys}
    cpu: dict = {k: [] for k in keys}
    for rep in range(args.reps):
        order = keys[rep % len(keys):] + keys[:rep % len(keys)]
        for k in order:
            t0, c0 = time.perf_counter(), time.process_time()
            video = variants[k]["run"]()
            wall[k].append((time.perf_counter() - t0) / args.steps)
            cpu[k].append((time.process_time() - c0) / args.steps)
            variants[k]["video"] = video
    for k in keys:  # after the timed loops: the children's CPU time would skew them
        variants[k]["once"] = measure_in_subprocess(variants[k]["child"])

    report(variants, wall, cpu, name, args)


def report(variants: dict, wall: dict, cpu: dict, name: str, args) -> None:
    keys = list(variants)
    base_w = statistics.median(wall[("baseline", "nn.Module")])
    base_c = statistics.median(cpu[("baseline", "nn.Module")])
    print(f"\n{name}, {args.steps} DDIM steps (batch 2 per call), {args.threads} thread(s), median of {args.reps}; "
          f"torch {torch.__version__}")
    head = (f"{'schedule':<9} {'backend':<21} {'phases':>6} {'ms/step':>8} {'cpu ms':>7} {'speedup':>13} "
            f"{'max|diff|':>9} {'load s':>6} {'1st/2nd gen cpu':>15} {'peak RSS':>9} {'setup s/phase':>20}")
    print(head)
    print("-" * len(head))
    for k in keys:
        sname, backend = k
        v, once = variants[k], variants[k]["once"]
        ref = variants.get((sname, "eager"), variants[("baseline", "nn.Module")])["video"]
        diff = float((v["video"] - ref).abs().max())
        w, c = statistics.median(wall[k]), statistics.median(cpu[k])
        setup = v["setup"]
        setup_s = f"{statistics.mean(setup):.2f} / {max(setup):.2f}" if setup else "-"
        kind = {"inductor": " comp"}.get(backend, " exp" if setup else "")
        print(f"{sname:<9} {backend:<21} {v.get('phases', 1):>6} {w * 1e3:>8.1f} {c * 1e3:>7.1f} "
              f"{base_w / w:>5.2f}x;{base_c / c:>5.2f}x {diff:>9.1e} {once['load_s']:>6.2f} "
              f"{once['first_cpu_ms']:>7.1f}/{once['second_cpu_ms']:<7.1f} "
              f"{once['peak_bytes'] / 2**20:>5.0f} MiB {setup_s + kind:>20}")
    print("ms/step, cpu ms: steady state (median over reps); 1st/2nd gen cpu: CPU ms/step of the first and second "
          "generations in a fresh process after load (warm-up included in load s); peak RSS: added by load + first "
          "generation, in that process")
    check_deployment(variants, wall, cpu, args.schedule)

    print("\nexported folders (ONNX, weights deduplicated into one weights.bin):")
    for k in keys:
        if k[1] not in EXPORTED_ROWS:  # the other rows reuse those folders
            continue
        v = variants[k]
        w = v["manifest"]["weights"]
        onnx_files = sum(p.stat().st_size for p in v["folder"].glob("*.onnx"))
        print(f"  {k[0]:<10} {k[1]:<20} folder {fmt_bytes(folder_bytes(v['folder'])):>10}  (graph files "
              f"{fmt_bytes(onnx_files)}, weights.bin {fmt_bytes(w['stored_bytes'])}; a weights file per phase "
              f"would hold {fmt_bytes(w['referenced_bytes'])}, folder {fmt_bytes(onnx_files + w['referenced_bytes'])})")
    if not args.out:
        print(f"(exports written under {variants[keys[-1]]['folder'].parent}; pass --out to keep them elsewhere)")


def check_deployment(variants: dict, wall: dict, cpu: dict, schedule: str) -> None:
    """The default artefact against what PAB promises: its speedup under ONNX Runtime should be at least the
    no-reuse artefact's times the eager PAB speedup (within 10%), at most 1.25x the no-reuse peak memory."""
    ort, ort0 = (schedule, "onnxruntime"), ("baseline", "onnxruntime")
    print("\ndefault artefact (single file, shared weights) against the no-reuse artefact:")
    for label, t in (("wall", wall), ("cpu", cpu)):
        med = {k: statistics.median(v) for k, v in t.items()}
        eager_x = med[("baseline", "nn.Module")] / med[(schedule, "eager")]
        ort_x = med[ort0] / med[ort]
        print(f"  {label:<4}: PAB speedup under ONNX Runtime {ort_x:.2f}x, eager PAB speedup {eager_x:.2f}x; "
              f"ratio {ort_x / eager_x:.2f} (>= 0.90 wanted)")
    peak = variants[ort]["once"]["peak_bytes"] / variants[ort0]["once"]["peak_bytes"]
    print(f"  peak RSS: {peak:.2f}x the no-reuse artefact's (<= 1.25 wanted)")


if __name__ == "__main__":
    main()
