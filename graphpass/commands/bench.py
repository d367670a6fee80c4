"""``graphpass bench``: one speed/quality table over step-caching methods for a model, with a Pareto plot."""
from __future__ import annotations

from .analyze import add_workload_args, workload_from_args
from .checks import output_folder, schedule_file


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="table of seconds per video, speedup, ideal FLOP speedup, cache memory, "
                       "PSNR, SSIM and physics over methods (baseline, PAB presets, searched, AdaCache, diffusers "
                       "hooks); JSON, Markdown and a speedup-vs-PSNR PNG")
    add_workload_args(p)
    p.add_argument("--methods", nargs="+", default=None, help="methods to run (default: all that apply)")
    p.add_argument("--schedule", type=schedule_file, nargs="+", default=None, help="schedule JSON file(s) from `graphpass search` (the "
                   "'searched' row; several files: one 'searched-<stem>' row each)")
    p.add_argument("--plot-speed", choices=("wall", "cpu"), default="wall", help="speedup plotted against PSNR: "
                   "wall time, or process CPU time (steadier on a machine shared with other jobs)")
    p.add_argument("--out", type=output_folder, default="out/bench", help="folder for bench.json, bench.md and bench.png")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..eval.bench import bench, plot_bench

    wl = workload_from_args(args)
    res = bench(wl, args.seeds, args.methods, schedule_path=args.schedule, progress=not args.quiet)
    out = Path(args.out)
    res.save(out / "bench.json")
    table = res.markdown()
    (out / "bench.md").write_text(table + "\n")
    plot_bench(res, out / "bench.png", speed=args.plot_speed)
    print(f"{wl.name}: {wl.num_steps} DDIM steps, seeds {res.seeds}, {res.threads} thread(s); PSNR/SSIM vs the "
          f"baseline video of each seed; s/video = fastest seed")
    print(table)
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'}")
    return 0
