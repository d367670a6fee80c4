"""Results of the shipped model: change analysis, searched schedules vs the published PAB presets, the table.

Runs, for one model (default vdt-s, its shipped weights):

1. ``graphpass analyze``: the attention change per step and the stable windows (search seeds);
2. for each preset P in --match (default pab246, pab579): P's mean PSNR on the search seeds, then
   ``graphpass search --min-psnr <that PSNR>``: the fastest schedule of the search space as good as P;
3. ``graphpass bench`` over every method and the searched schedules, on the bench seeds (a superset of the
   search seeds, so the searched schedules are also judged on videos they were not chosen on);
4. writes ``--md`` (default docs/results.md): tables, plots and the commands that reproduce each step; the
   files of each step go to ``--out`` (``analyze/``, ``at-<preset>-psnr.json``, ``bench/``), as the commands write
   them.

    python benchmarks/eval_results.py                    # vdt-s, shipped weights, 1 thread
    python benchmarks/eval_results.py --weights runs/ck.safetensors --md /tmp/results.md --out /tmp/results
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vdt-s")
    ap.add_argument("--weights", default=None, help="VDT checkpoint instead of the shipped weights")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--search-seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--bench-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--match", nargs="+", default=["pab246", "pab579"], help="presets whose PSNR the search keeps")
    ap.add_argument("--max-evals", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="docs/results", help="folder for the files of each step")
    ap.add_argument("--md", default="docs/results.md", help="the Markdown report")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from graphpass.eval.analyze import analyze, plot_analysis, summary_table
    from graphpass.eval.bench import bench, plot_bench
    from graphpass.eval.harness import Workload
    from graphpass.eval.search import SearchConfig, search

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    wl = Workload.from_name(args.model, num_steps=args.steps, weights=args.weights)
    seeds = list(args.search_seeds)
    wopt = f" --weights {args.weights}" if args.weights else ""
    common = f"{args.model} --steps {args.steps} --threads {args.threads}{wopt}"

    analysis = analyze(wl, seeds)
    analysis.save(out / "analyze" / "analysis.json")
    plot_analysis(analysis, out / "analyze" / "analysis.png")
    print(summary_table(analysis), flush=True)

    base = wl.baseline(seeds)
    searches = []
    for preset in args.match:
        m = wl.measure(wl.optimize(preset), base)
        if not math.isfinite(m.psnr):
            print(f"{preset} reproduces the baseline exactly on this model; nothing to match", flush=True)
            continue
        target = math.floor(m.psnr * 100) / 100
        res = search(wl, SearchConfig(min_psnr=target, max_evals=args.max_evals), seeds, analysis=analysis,
                     baseline=base)
        path = res.save(out / f"at-{preset}-psnr.json")
        searches.append((preset, m, res, path))
        print(f"{preset}: PSNR {m.psnr:.2f} ideal {m.ideal_speedup:.2f}x -> searched {res.schedule}: PSNR "
              f"{res.measurement.psnr:.2f} ideal {res.measurement.ideal_speedup:.2f}x "
              f"({len(res.evaluated)} sampled)", flush=True)

    table = bench(wl, args.bench_seeds, schedule_path=[p for *_, p in searches])
    table.save(out / "bench" / "bench.json")
    (out / "bench" / "bench.md").write_text(table.markdown() + "\n")
    plot_bench(table, out / "bench" / "bench.png", speed="cpu")
    print(table.markdown(), flush=True)

    minutes = (time.perf_counter() - t_start) / 60
    write_markdown(out, args, wl, analysis, searches, table, common, minutes)
    print(f"wrote {args.md} ({minutes:.1f} min)")
    return 0


#: Quality floors (mean PSNR to the baseline, dB) at which the report names the fastest method.
FLOORS = (30.0, 25.0)


def best_lines(table) -> list[str]:
    """One line per quality floor: the fastest method (CPU time, and by FLOPs) whose mean PSNR reaches it."""
    lines = ["| PSNR at least | fastest (CPU time) | CPU speedup | PSNR | fastest (FLOPs) | ideal speedup | PSNR |",
             "|---:|---|---:|---:|---|---:|---:|"]
    for floor in FLOORS:
        cpu, ideal = table.best_at(floor, "cpu_speedup"), table.best_at(floor, "ideal_speedup")
        if cpu is None:
            lines.append(f"| {floor:g} dB | none | | | none | | |")
            continue
        lines.append(f"| {floor:g} dB | {cpu['method']} | {cpu['cpu_speedup']:.2f}x | {cpu['psnr']:.2f} | "
                     f"{ideal['method']} | {ideal['ideal_speedup']:.2f}x | {ideal['psnr']:.2f} |")
    return ["Fastest method at each quality floor (mean PSNR over the bench seeds):", "", *lines]


def write_markdown(out, args, wl, analysis, searches, table, common, minutes) -> None:
    import os

    from graphpass.eval.analyze import RULE, summary_table

    md = Path(args.md)
    rel = Path(os.path.relpath(out, md.parent))

    ss = " ".join(map(str, args.search_seeds))
    bs = " ".join(map(str, args.bench_seeds))
    lines = [f"# Results: {wl.name}, {wl.num_steps} DDIM steps, CPU, {args.threads} thread(s)", ""]
    if args.weights:
        lines += [f"Weights: `{args.weights}`.", ""]
    lines += ["## Attention change per step", "",
              f"![attention change per step]({rel}/analyze/analysis.png)", "",
              "```", summary_table(analysis), "```", "",
              f"Recorded by {analysis.recording}; figures are the mean over seeds {analysis.seeds} and over the "
              f"regions of each kind. Stable window rule: {RULE} (frac {analysis.frac}).", "",
              "## Speed and quality", "",
              f"Seeds {table.seeds} (the searches used seeds {args.search_seeds}). PSNR/SSIM: against the baseline "
              f"video of the same seed. s/video: fastest seed, wall time; CPU s/video: process CPU time, steadier "
              f"on this shared machine. Ideal FLOP speedup: FLOPs of the baseline's steps over those of the "
              f"phase graphs run.", "", table.markdown(), "",
              f"![speedup vs PSNR]({rel}/bench/bench.png)", "",
              "Plot: CPU-time speedup (filled) and ideal FLOP speedup (hollow) against PSNR; dashed: the Pareto "
              "front of the CPU-time speedups.", "",
              *best_lines(table), "",
              "## Searched schedules against the presets at equal PSNR", "",
              "| preset | preset PSNR (search seeds) | preset ideal | searched schedule | searched PSNR "
              "(search seeds) | searched ideal | evaluated |", "|---|---:|---:|---|---:|---:|---:|"]
    for preset, m, res, _ in searches:
        lines.append(f"| {preset} | {m.psnr:.2f} | {m.ideal_speedup:.2f}x | `{res.schedule}` | "
                     f"{res.measurement.psnr:.2f} | {res.measurement.ideal_speedup:.2f}x | {len(res.evaluated)} |")
    lines += ["", "## Reproduce", "", "```bash",
              f"graphpass analyze {common} --seeds {ss} --out {out}/analyze"]
    for preset, m, res, path in searches:
        lines.append(f"graphpass search {common} --seeds {ss} --min-psnr {res.target['min_psnr']} "
                     f"--max-evals {args.max_evals} --analysis {out}/analyze/analysis.json --out {path}")
    paths = " ".join(str(p) for *_, p in searches)
    lines += [f"graphpass bench {common} --seeds {bs} --schedule {paths} --plot-speed cpu --out {out}/bench",
              "```", "",
              f"or all at once (about {minutes:.0f} min here): `python benchmarks/eval_results.py --out {out} "
              f"--md {md}{' --weights ' + args.weights if args.weights else ''}`", ""]
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps({
        "searches": [{"preset": p, "preset_psnr": m.psnr, "preset_ideal_speedup": m.ideal_speedup,
                      "searched": res.to_dict()} for p, m, res, _ in searches]}, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
