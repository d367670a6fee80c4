"""Human-readable reports of an optimized model: regions, phases, plan; phase graphs as code and DOT."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch.fx as fx

from ..passes.capture import CapturedGraph
from ..passes.elide import collective_info, collective_nodes
from ..passes.flops import graph_flops
from ..passes.hoist import Hoisting
from ..passes.specialize import PhaseGraph
from ..passes.tag import Region
from ..schedules.base import Action, Phase, Plan, Schedule
from ..techniques import StepPolicy
from .cache import frees


class Inspected(Protocol):
    """What a report reads of an optimized model (:class:`~graphpass.OptimizedModel` is one, and calls
    :func:`report` from ``opt.inspect()``)."""

    captured: CapturedGraph
    regions: list[Region]
    schedule: Schedule
    current_plan: Plan | None
    parallel: Any
    hoisting: Hoisting | None
    policy: StepPolicy

    def contexts(self) -> dict[str, Any]: ...

    def records(self, context: str | None = None) -> list: ...

    def preview_plan(self, timesteps: Sequence[float]) -> Plan: ...

    def phase_graph(self, phase: Phase) -> PhaseGraph: ...

_KIND_COLOUR = {"spatial": "lightblue", "temporal": "palegreen", "cross": "khaki", "joint": "plum",
                "mlp": "lightsalmon"}


def _fmt_flops(f: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if f >= div:
            return f"{f / div:.2f}{unit}"
    return f"{f:.0f}"


def _fmt_bytes(b: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= div:
            return f"{b / div:.2f} {unit}"
    return f"{b:.0f} B"


def default_timesteps(n: int = 50) -> list[float]:
    """DDIM-style timesteps on the 0..1000 scale, used when no plan or trace is known."""
    step = 1000 // n
    return [float(t) for t in range((n - 1) * step + 1, -1, -step)][:n]


def _dynamic_line(dynamic_dims) -> str:
    if not dynamic_dims:
        return "shapes: static (those of the example call)"
    free = "; ".join(f"{n} dims {', '.join(f'{i}={sym}' for i, sym in dims.items())}" for n, dims in dynamic_dims.items())
    return f"shapes: free sizes {free} (dims sharing a symbol are equal; FLOPs below at the example shapes)"


def report(opt: Inspected, folder: str | None = None, timesteps: Sequence[float] | None = None) -> str:
    full = graph_flops(opt.captured.gm)
    lines = [f"graphpass: {opt.captured.model_type} with {opt.schedule}",
             f"captured graph: {sum(1 for n in opt.captured.gm.graph.nodes if n.op not in ('placeholder', 'output'))}"
             f" nodes, {_fmt_flops(full)}FLOP per call; inputs: "
             + ", ".join(f"{n} {s}" for n, s in zip(opt.captured.input_names, opt.captured.input_specs)),
             _dynamic_line(opt.captured.dynamic_dims),
             "", f"regions ({len(opt.regions)}):",
             f"  {'path':<42} {'kind':<9} {'output shape':<22} {'FLOP':>9} {'share':>6}  why"]
    for r in opt.regions:
        shape = "; ".join("x".join(map(str, s.shape)) for s in r.exit_specs)
        lines.append(f"  {r.path:<42} {r.kind:<9} {shape:<22} {_fmt_flops(r.flops):>9} {r.flops / full:>6.1%}  "
                     f"{r.reason}")

    plan = None
    traced = [st.trace for st in opt.contexts().values() if st.trace]
    if timesteps is not None:
        plan = opt.preview_plan(timesteps)
        source = "given timesteps"
    elif opt.current_plan is not None:
        plan, source = opt.current_plan, "opt.plan(...)"
    elif traced:
        plan = opt.preview_plan([t for t, _ in max(traced, key=len)])
        source = "timesteps of the last generation"
    else:
        plan = opt.preview_plan(default_timesteps())
        source = "50 DDIM-spaced timesteps (no plan or call yet)"

    adaptive = opt.policy.adaptive
    phases = opt.policy.possible_phases(plan)
    ids = {ph: i for i, ph in enumerate(phases)}
    last = _last_generation(opt) if adaptive else None
    if adaptive:
        counted = (f"runs in the last generation of context {last[0]!r}" if last else
                   "no generation ran yet: runs unknown")
        lines += ["", f"phases ({len(phases)} a call may run; {counted}):", f"  {opt.policy.describe()}"]
    else:
        lines += ["", f"phases ({len(phases)}, from {source}):"]
    lines.append(f"  {'id':<3} {'nodes':>6} {'attn':>5} {'FLOP':>9} {'share':>6} {'steps':>5}  reuse / store")
    runs = _runs(plan, last)
    total = 0.0
    for ph in phases:
        pg = opt.phase_graph(ph)
        steps = runs.get(ph, 0)
        total += steps * pg.flops
        kinds_r = _kind_counts(opt, ph, Action.REUSE)
        kinds_s = _kind_counts(opt, ph, Action.STORE)
        shown = steps if not adaptive or last else "-"
        lines.append(f"  P{ids[ph]:<2} {pg.node_count:>6} {pg.attention_ops():>5} {_fmt_flops(pg.flops):>9} "
                     f"{pg.flops / full:>6.1%} {shown:>5}  reuse[{kinds_r or '-'}] store[{kinds_s or '-'}]  "
                     f"{ph.label()}")
    if not adaptive:
        n = len(plan)
        lines.append(f"  plan FLOP share {total / (n * full):.1%} -> ideal speedup {n * full / total:.2f}x over {n} "
                     f"steps")
    elif last:
        n = len(last[1].trace)
        lines.append(f"  last generation FLOP share {total / (n * full):.1%} -> ideal speedup {n * full / total:.2f}x "
                     f"over {n} calls (probes included)")
    lines += _communication(opt, plan, phases, ids)
    lines += _hoisted(opt, plan, phases, ids)

    if adaptive:
        lines += _decisions(opt, ids)
    else:
        lines += _static_plan(opt, plan, ids)

    if folder is not None:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        for ph in phases:
            pg = opt.phase_graph(ph)
            stem = out / f"phase{ids[ph]}"
            stem.with_suffix(".py").write_text(f"# phase P{ids[ph]}: {ph.label()}\n# reuse: {list(ph.reused)}\n"
                                               f"# store: {list(ph.stored)}\n" + pg.gm.code)
            stem.with_suffix(".dot").write_text(to_dot(pg.gm, opt.regions, f"P{ids[ph]}"))
        (out / "report.txt").write_text("\n".join(lines) + "\n")
        lines.append(f"\nwrote {len(phases)} phase graphs (.py, .dot) and report.txt to {out}")
    return "\n".join(lines)


def _static_plan(opt, plan: Plan, ids: dict[Phase, int]) -> list[str]:
    """Per step of a static plan: its timestep, phase and the cache held after it (the runtime's freeing rule)."""
    lines = ["", "plan (step: timestep -> phase, cache held after the step):"]
    held = 0
    keys_bytes = {r.path: r.exit_bytes for r in opt.regions}
    cache: set[str] = set()
    row = []
    for i, (t, ph) in enumerate(zip(plan.timesteps, plan.phases)):
        nxt = plan.phases[i + 1] if i + 1 < len(plan.phases) else Phase(())
        for r in opt.regions:
            if ph.action(r.path) == Action.STORE:
                cache.add(r.path)
            elif frees(ph.action(r.path), nxt.action(r.path)):  # the runtime's rule, on a plan
                cache.discard(r.path)
        held = sum(keys_bytes[p] for p in cache)
        row.append(f"{i:>3}: t={t:>6.1f} P{ids[ph]:<2} {_fmt_bytes(held):>10}")
        if len(row) == 3:
            lines.append("  " + "   ".join(row))
            row = []
    if row:
        lines.append("  " + "   ".join(row))
    return lines


def _last_generation(opt) -> tuple[str, Any] | None:
    """(name, state) of the cache context whose last generation ran the most calls; None before any call."""
    traced = [(name, st) for name, st in opt.contexts().items() if st.trace]
    return max(traced, key=lambda c: len(c[1].trace)) if traced else None


def _runs(plan: Plan, last: tuple[str, Any] | None) -> dict[Phase, int]:
    """Runs of each phase: in the plan, or in the last generation that ran (probes included)."""
    phases = plan.phases if last is None else [ph for _, ph in last[1].trace] + [ph for _, ph in last[1].probes]
    runs: dict[Phase, int] = {}
    for ph in phases:
        runs[ph] = runs.get(ph, 0) + 1
    return runs


def _decisions(opt, ids: dict[Phase, int]) -> list[str]:
    """What a run-time policy decided in the last generation of each cache context: ``C``/``R`` per call, the
    phases each call ran (``P1+P3``: a probe, then the phase finishing the call) and what it measured.

        >>> print("\n".join(_decisions(opt, ids)))         # First Block Cache after one generation
        <BLANKLINE>
        decisions (taken at run time: before a run every call is planned to compute):
          context 'cond_uncond': CRRRCRRRCRCR (8 of 12 calls reused, 11 probed)
            0: t=1000.0 P0           1: t= 920.0 P1+P3        2: t= 840.0 P1+P3
            3: t= 760.0 P1+P3        4: t= 680.0 P1+P2        5: t= 600.0 P1+P3
          ...
          measured (11): step=1 value=0.0623 reuse=True; step=2 value=0.09651 reuse=True; ...
    """
    lines = ["", "decisions (taken at run time: before a run every call is planned to compute):"]
    traced = {name: st for name, st in opt.contexts().items() if st.trace}
    if not traced:
        return lines + ["  none yet: run a generation, then call inspect() again to see them"]
    for name, st in traced.items():
        d = "".join("R" if ph.reused else "C" for _, ph in st.trace)
        probes = dict(st.probes)
        lines.append(f"  context {name!r}: {d} ({d.count('R')} of {len(d)} calls reused, {len(probes)} probed)")
        cells = [f"{i:>3}: t={t:>6.1f} " + "+".join(_phase_id(ids, p) for p in (probes.get(i), ph) if p is not None)
                 for i, (t, ph) in enumerate(st.trace)]
        lines += ["  " + "   ".join(f"{c:<22}" for c in cells[k:k + 3]).rstrip() for k in range(0, len(cells), 3)]
        records = opt.records(name)
        if records:
            shown = "; ".join(_record(r) for r in records[:6])
            lines.append(f"  measured ({len(records)}): {shown}{'; ...' if len(records) > 6 else ''}")
    return lines


def _phase_id(ids: dict[Phase, int], ph: Phase) -> str:
    return f"P{ids[ph]}" if ph in ids else f"({ph.label()})"


def _record(r: Any) -> str:
    """One policy record as ``field=value`` pairs (floats to 4 significant digits)."""
    if not dataclasses.is_dataclass(r):
        return str(r)
    return " ".join(f"{f.name}={_short(getattr(r, f.name))}" for f in dataclasses.fields(r))


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(map(_short, v)) + "]"
    return str(v)


def _collective_bytes(node: fx.Node) -> int:
    """Bytes this rank sends to other ranks per run of a collective node (recorded by the pass that made it,
    else from the shapes: an all-to-all keeps 1/world of its input, an all-gather sends its input to each)."""
    info = collective_info(node)
    if info is not None:
        return info.bytes_sent
    v = node.args[0].meta.get("val")
    nbytes = v.numel() * v.element_size() if v is not None else 0
    if "all_to_all" in str(node.target):
        w = max(len(node.args[2]), 1)
        return nbytes * (w - 1) // w
    if "all_gather" in str(node.target):
        return nbytes * (node.args[1] - 1)
    return nbytes


def _communication(opt, plan, phases, ids) -> list[str]:
    """Per phase: collectives kept and removed (by elide_collectives), and their bytes per step."""
    everything = collective_nodes(opt.captured.gm.graph)
    if not everything:
        return []
    par = opt.parallel
    who = f"rank {par.rank} of {par.world_size}" if par is not None else "this rank"
    lines = ["", f"communication per step ({who}; bytes sent to other ranks):",
             f"  {'id':<3} {'kept':>5} {'bytes':>10} {'removed':>8} {'bytes':>10}  removed around"]
    total = full = 0
    every_bytes = sum(_collective_bytes(c) for c in everything)
    by_kind = []
    for ph in phases:
        k = collective_nodes(opt.phase_graph(ph).gm.graph)  # with any the phase adds (a metric all-reduce)
        kept = {c.name for c in k}
        r = [c for c in everything if c.name not in kept]
        kb, rb = sum(map(_collective_bytes, k)), sum(map(_collective_bytes, r))
        steps = sum(1 for p in plan.phases if p == ph)
        total, full = total + steps * kb, full + steps * every_bytes
        where = sorted({collective_info(c).region for c in r if collective_info(c) is not None} - {""})
        lines.append(f"  P{ids[ph]:<2} {len(k):>5} {_fmt_bytes(kb):>10} {len(r):>8} {_fmt_bytes(rb):>10}  "
                     f"{', '.join(where) or ('-' if not r else 'regions reused in this phase')}")
        by_kind.append(f"  P{ids[ph]} kept: {_by_role(k)}; removed: {_by_role(r)}")
    saved = 1 - total / full if full else 0.0
    lines.append(f"  plan: {_fmt_bytes(total)} per generation, {saved:.1%} less than without reuse "
                 f"({_fmt_bytes(full)})")
    return lines + ["  by kind and role (per step):"] + by_kind


def _by_role(nodes: list) -> str:
    """``all_to_all/enter 6 (12.00 KiB), all_gather/gather 1 (4.00 KiB)``: collectives counted by what they
    do (kind and role recorded by the pass that made them)."""
    groups: dict[str, list] = {}
    for c in nodes:
        info = collective_info(c)
        key = f"{info.kind}/{info.role}" if info is not None else str(c.target).split(".")[-2]
        groups.setdefault(key, []).append(c)
    return ", ".join(f"{k} {len(v)} ({_fmt_bytes(sum(map(_collective_bytes, v)))})" for k, v in groups.items()) \
        or "-"


def _hoisted(opt, plan, phases, ids) -> list[str]:
    """What hoisting computes once per generation and cache context, and the FLOPs it takes off each step."""
    if opt.hoisting is None:
        return ["", "hoisted: nothing (hoist=False, parallel=, or no step-invariant value costs FLOPs)"]
    values = opt.hoisting.values_info()
    held = sum(v.nbytes for v in values.values())
    lines = ["", f"hoisted ({len(values)} step-invariant values, computed once per generation and cache context; "
                 f"prologue {_fmt_flops(opt.hoisting.prologue_flops)}FLOP, holds {_fmt_bytes(held)} per context):",
             f"  {'value':<16} {'shape':<18} {'FLOP':>9}  from"]
    for v in values.values():
        lines.append(f"  {v.name:<16} {'x'.join(map(str, v.shape)):<18} {_fmt_flops(v.flops):>9}  {v.source}")
    saved = 0
    row = []
    for ph in phases:
        pg = opt.phase_graph(ph)
        cut = opt.hoisting.step_graph(pg).saved_flops
        saved += cut * sum(1 for p in plan.phases if p == ph)
        row.append(f"P{ids[ph]} {_fmt_flops(cut)} ({cut / max(pg.flops, 1):.1%})")
    lines.append("  saved per step: " + ", ".join(row))
    lines.append(f"  plan: {_fmt_flops(saved)}FLOP saved per generation and context, for one prologue run of "
                 f"{_fmt_flops(opt.hoisting.prologue_flops)}FLOP")
    return lines


def _kind_counts(opt, ph: Phase, action: Action) -> str:
    counts: dict[str, int] = {}
    for r in opt.regions:
        if ph.action(r.path) == action:
            counts[r.kind] = counts.get(r.kind, 0) + 1
    return " ".join(f"{k}:{v}" for k, v in counts.items())


def to_dot(gm: fx.GraphModule, regions, name: str = "G") -> str:
    """Graphviz DOT of a graph, nodes filled by the kind of the region they belong to."""
    owner = {n: r for r in regions for n in r.nodes}
    out = [f'digraph "{name}" {{', "  rankdir=TB; node [shape=box, style=filled, fontsize=9];"]
    for n in gm.graph.nodes:
        r = owner.get(n.name)
        colour = _KIND_COLOUR.get(r.kind, "white") if r else ("lightgrey" if n.op == "placeholder" else "white")
        label = n.name if n.op != "call_function" else f"{n.name}\\n{getattr(n.target, '__name__', n.target)}"
        out.append(f'  "{n.name}" [label="{label}", fillcolor="{colour}"];')
        for a in n.all_input_nodes:
            out.append(f'  "{a.name}" -> "{n.name}";')
    out.append("}")
    return "\n".join(out) + "\n"
