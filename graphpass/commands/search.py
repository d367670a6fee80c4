"""``graphpass search``: find a PAB schedule for a model that keeps a PSNR or reaches a speedup, by sampling."""
from __future__ import annotations

from .analyze import add_workload_args, workload_from_args
from .checks import output_file, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("search", help="search PAB ranges and windows (from the change analysis) that meet a PSNR or "
                       "speedup target on the seeds; write the best schedule with its measured figures")
    add_workload_args(p)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--min-psnr", type=float, default=None, help="keep mean PSNR >= this (dB); maximise speed")
    target.add_argument("--speedup", type=float, default=None, help="reach this speedup; maximise PSNR")
    p.add_argument("--speedup-metric", choices=("wall", "cpu", "ideal"), default="wall",
                   help="what --speedup measures: wall time, process CPU time (steadier on a shared machine) or "
                   "ideal FLOPs")
    p.add_argument("--analysis", default=None, help="analysis.json from `graphpass analyze` (default: run it)")
    p.add_argument("--kinds", nargs="+", default=None, help="kinds to reuse (default: spatial temporal cross joint)")
    p.add_argument("--max-range", type=positive_int, default=8, help="largest broadcast range tried")
    p.add_argument("--max-evals", type=positive_int, default=40, help="most candidate schedules sampled")
    p.add_argument("--out", type=output_file, default="schedule.json", help="schedule JSON (loadable by graphpass.schedule_from_json)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..eval.analyze import ChangeAnalysis
    from ..eval.search import SearchConfig, search
    from ..errors import InputError

    wl = workload_from_args(args)
    kw = {} if args.kinds is None else {"kinds": tuple(args.kinds)}
    cfg = SearchConfig(min_psnr=args.min_psnr, speedup=args.speedup, speedup_metric=args.speedup_metric,
                       max_range=args.max_range, max_evals=args.max_evals, **kw)
    analysis = None
    if args.analysis:
        analysis = ChangeAnalysis.load(args.analysis)
        if analysis.model != wl.name or len(analysis.timesteps) != wl.num_steps:
            raise InputError(f"{args.analysis} analyses {analysis.model} over {len(analysis.timesteps)} steps, not "
                             f"{wl.name} over {wl.num_steps}; re-run `graphpass analyze {wl.name} --steps "
                             f"{wl.num_steps}`")
    res = search(wl, cfg, args.seeds, analysis=analysis, progress=not args.quiet)
    path = res.save(args.out)
    m = res.measurement
    print(f"{wl.name}: best of {len(res.evaluated)} sampled schedules for {res.target} on seeds {res.seeds}:")
    print(f"  {res.schedule}")
    print(f"  PSNR {m.psnr:.2f} dB, SSIM {m.ssim:.4f}, ideal FLOP speedup {m.ideal_speedup:.2f}x, wall speedup "
          f"{m.speedup:.2f}x ({m.sec_per_video:.2f} s vs {res.baseline_sec_per_video:.2f} s per video), CPU "
          f"speedup {m.cpu_speedup:.2f}x")
    print(f"wrote {path}")
    return 0
