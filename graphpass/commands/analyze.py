"""``graphpass analyze``: how much each attention kind's output changes per denoising step; stable windows."""
from __future__ import annotations

from .checks import non_negative_int, output_folder, positive_int


def add_workload_args(p) -> None:
    """Arguments every evaluation command shares (model, steps, seeds, weights, threads)."""
    p.add_argument("model", help="model name: vdt-s (shipped weights), vdt-tiny (random), latte-tiny (random), or a "
                   "diffusers model folder (save_pretrained: config.json + weights)")
    p.add_argument("--steps", type=positive_int, default=50, help="DDIM sampling steps per video")
    p.add_argument("--seeds", type=non_negative_int, nargs="+", default=[0, 1], help="one video per seed")
    p.add_argument("--weights", default=None, help="VDT checkpoint to use instead of the shipped weights")
    p.add_argument("--threads", type=non_negative_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def workload_from_args(args):
    import torch

    from ..eval.harness import Workload

    if args.threads:
        torch.set_num_threads(args.threads)
    return Workload.from_name(args.model, num_steps=args.steps, weights=args.weights)


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="measure the step-to-step change of every attention region's output, find "
                       "the stable window per kind, plot it (PNG) and write the numbers (JSON)")
    add_workload_args(p)
    p.add_argument("--frac", type=float, default=0.25, help="stable-window threshold as a fraction of the kind's "
                   "range of change (see graphpass.eval.analyze)")
    p.add_argument("--out", type=output_folder, default="out/analyze", help="folder for analysis.json and analysis.png")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..eval.analyze import analyze, plot_analysis, summary_table

    wl = workload_from_args(args)
    a = analyze(wl, args.seeds, frac=args.frac, progress=not args.quiet)
    out = Path(args.out)
    a.save(out / "analysis.json")
    plot_analysis(a, out / "analysis.png")
    print(f"{wl.name}: {wl.num_steps} steps, seeds {a.seeds}; relative L1 change of region outputs per step "
          f"(recorded by {a.recording})")
    print(summary_table(a))
    print(f"wrote {out / 'analysis.json'} and {out / 'analysis.png'}")
    return 0
