"""``graphpass export``: write a model's phases under a schedule as ONNX files or TensorRT engines.

    graphpass export --model vdt-s --schedule pab246 --steps 50 --out out/vdt-s-onnx
    graphpass export --model vdt-s --schedule pab246 --steps 50 --out out/vdt-s-trt --format tensorrt --precision fp16
"""
from __future__ import annotations

from .checks import positive_int, schedule_arg


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export the phases of a model's plan (ONNX per phase + shared weights, or "
                       "TensorRT engines) with a manifest; run them with graphpass.load(folder)")
    p.add_argument("--model", default="vdt-s", help="shipped model name (vdt-s, vdt-tiny, latte-tiny) or a diffusers "
                   "model folder (save_pretrained: config.json + weights, e.g. a pipeline's transformer/ folder)")
    p.add_argument("--schedule", type=schedule_arg, default="pab246",
                   help="PAB preset name (pab246, latte, open-sora...) or a JSON file")
    p.add_argument("--steps", type=positive_int, default=50, help="sampling steps of the plan exported (DDIM timesteps)")
    p.add_argument("--batch", type=positive_int, default=2,
                   help="batch of the exported graphs (2 = one video with batched CFG)")
    p.add_argument("--out", required=True, help="output folder: new or empty, or an earlier export with --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace the earlier graphpass export in --out (only "
                   "once the new one is complete; a folder holding other files is never touched)")
    p.add_argument("--format", choices=["onnx", "tensorrt"], default="onnx", help="artefact format (default onnx)")
    p.add_argument("--layout", choices=["single-file", "per-phase"], default=None, help="ONNX: one graph with an "
                   "If per reusable region (default) or one file per phase")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32", help="TensorRT kernel precision")
    p.add_argument("--keep-weights", action="store_true", help="TensorRT: embed weights in every engine instead of "
                   "weight-stripped engines refitted from the shared ONNX weights")
    p.set_defaults(func=run)


def _fmt_bytes(n: int) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def run(args) -> int:
    from pathlib import Path

    from ..api import optimize
    from ..exporters import TensorRTConfig, check_destination, export
    from ..exporters.manifest import read_manifest
    from ..workloads import example_call

    check_destination(args.out, args.overwrite)  # before building and capturing the model
    trt = None
    if args.format == "tensorrt":
        trt = TensorRTConfig(precision=args.precision, strip_weights=not args.keep_weights)
    model, kwargs, timesteps = example_call(args.model, batch=args.batch, num_steps=args.steps)
    sched = args.schedule
    opt = optimize(model, sched, example_kwargs=kwargs, timesteps=timesteps)
    folder = export(opt, args.out, format=args.format, tensorrt=trt,
                    single_file=None if args.layout is None else args.layout == "single-file",
                    overwrite=args.overwrite)
    m = read_manifest(folder, verify=False)
    n = len(m["phases"])
    print(f"exported {args.model} under {sched} ({args.steps} steps, {n} phase{'s' * (n != 1)}) to {folder}/")
    for e in m["phases"]:
        t = e.get("export_seconds")
        extra = f", engine {e['engine']} built in {e['build_seconds']:.1f} s" if "engine" in e else ""
        print(f"  phase {e['id']}: {e['label']:<22} {e['file']}"
              + (f"  exported in {t:.1f} s" if t is not None else "") + extra)
    w = m["weights"]
    total = sum((Path(folder) / f).stat().st_size for f in m["files"])
    print(f"weights stored once: {_fmt_bytes(w['stored_bytes'])} in {w['file']} (the phase files reference "
          f"{_fmt_bytes(w['referenced_bytes'])} in total); folder {_fmt_bytes(total)}")
    if trt is not None:  # what the engines hold on the device (one engine for every phase by default)
        from ..exporters.tensorrt import engine_plan

        print(engine_plan(Path(folder), m, trt).describe(trt.precision))
    print(f"run it with: graphpass.load({str(folder)!r})")
    return 0
