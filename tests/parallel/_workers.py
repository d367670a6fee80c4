"""What each rank runs in the parallel tests (spawned by tests/parallel/_launch.py); each function returns a
dict of measurements that the tests check in the parent process.

* :func:`dsp_checks`: DSP on VDT-tiny (4 frames: 2 + 2) and diffusers Latte (3 frames: 2 + 1), without reuse
  (against eager) and with PAB (against single-process PAB); collectives counted at run time against the
  phase graphs and the plan; keep_sharded (Latte, uneven); inspect(); reduce_metric; and the errors (a bad
  input on one rank, ranks out of step, different input values on the ranks, a wrong world size).
* :func:`rank_death_checks`: rank 1 kills itself mid-generation; rank 0's next call must fail clearly and soon.
* :func:`ulysses_checks`: a small joint-attention model that splits heads over the ranks with the same
  collective ops (Ulysses): numerics against the unsplit model and the four all-to-alls a reuse removes.
* :func:`ulysses_all`: ``SequenceParallel`` in Ulysses mode on tiny diffusers Wan (also with 3 heads and
  45 tokens), CogVideoX (text tokens before the video; also with rotary embeddings written in place into
  the video part of q and k), HunyuanVideo (text after it, padded text masked) and VDT (forced Ulysses): outputs with and without PAB against single-process runs, collectives counted
  per call against the phase graphs, what each rank caches.
* :func:`parallel_checks`: every check above but the rank deaths, and the residual-caching, pipeline and
  Inductor checks, in one spawn: each model is captured once per rank (:func:`optimize_shared`) and each
  reference run made once.
"""
from __future__ import annotations

import functools
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import LatteTransformer3DModel  # noqa: F401  (imported once here, before the ranks fork)
from torch import nn

import graphpass
from conftest import DDIM_50, make_case, run_loop
from graphpass import PAB, AdaCache, FrozenAdaCache, ParallelError, SequenceParallel
from graphpass.passes.elide import collective_info, collective_nodes
from graphpass.runtime import parallel as sp
from graphpass.runtime.backends import InductorRunner
from graphpass.runtime.parallel import count_collectives, plan_reuse_savings
from reference_pab import ReferencePAB

sys.path.insert(0, str(Path(__file__).parent.parent / "adacache"))
sys.path.insert(0, str(Path(__file__).parent.parent / "pipelines"))
from _launch import launch_once  # noqa: E402
from adacache_helpers import run_reference  # noqa: E402
from tiny_pipelines import PIPES  # noqa: E402

#: 10 calls from 981 down to 81: the first and last outside the PAB window below, reuse in between.
TIMESTEPS = DDIM_50[::5]
#: 10 calls above the window: nothing is reused (plain DSP).
ABOVE = [999.0 - 9 * i for i in range(10)]
PAB_SCHEDULE = PAB(temporal=2, cross=2, window=(100, 900))

#: The reused modules, written from the model code (not from graphpass's tagging), for the reference PAB.
REFERENCE_MODULES = {
    "vdt": {f"blocks.{i}.{m}": k for i in range(2) for m, k in (("temporal_attn", "temporal"),
                                                                ("cross_attn", "cross"))},
    "latte": {**{f"temporal_transformer_blocks.{i}.attn1": "temporal" for i in range(2)},
              **{f"transformer_blocks.{i}.attn2": "cross" for i in range(2)}},
}


def _warm_up_export() -> None:
    """The first torch.export in a process costs seconds of one-time setup; pay it once, before forking."""
    torch.export.export(nn.Linear(2, 2), (torch.zeros(1, 2),), strict=False)


_warm_up_export()


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _counts(c) -> dict:
    return {"calls": dict(c.calls), "bytes": dict(c.bytes)}


def _error(fn) -> str | None:
    try:
        fn()
    except ParallelError as e:
        return str(e)
    return None


#: name -> (whole-model capture, its regions), from the first ``graphpass.optimize`` of that model on this rank.
_CAPTURES: dict[str, tuple] = {}


def optimize_shared(name: str, model, schedule, kwargs: dict, parallel: SequenceParallel, timesteps=None,
                    backend: str = "eager"):
    """``graphpass.optimize(model, schedule, example_kwargs=kwargs, timesteps=..., parallel=..., backend=...)``,
    capturing each model ``name`` once per rank: the first call is that public call; later ones build the
    same capture and regions for their schedule and ``parallel`` (what optimize does after capturing), so a
    model is not captured again by every check that runs it. ``model`` is a fresh model of the same seeded
    weights as the captured one.

        >>> kw = make_case("vdt").kwargs()
        >>> a = optimize_shared("vdt", make_case("vdt").model, PAB_SCHEDULE, kw, SequenceParallel())  # captures
        >>> b = optimize_shared("vdt", make_case("vdt").model, FrozenAdaCache("CR"), kw,
        ...                     SequenceParallel(mode="ulysses"))                                 # builds
        >>> a.global_captured is b.global_captured
        True
    """
    if name not in _CAPTURES:
        opt = graphpass.optimize(model, schedule, example_kwargs=kwargs, timesteps=timesteps, parallel=parallel,
                                 backend=backend)
        _CAPTURES[name] = (opt.global_captured, opt.global_regions)
        return opt
    captured, regions = _CAPTURES[name]
    opt = sp.build(model, captured, regions, schedule, sp.connect(parallel, schedule), timestep_arg="timestep",
                   backend=backend)
    if timesteps is not None:
        opt.plan(timesteps)
    return opt


def all_checks(rank: int, world_size: int) -> dict:
    return {"dsp": dsp_checks(rank, world_size), "ulysses": ulysses_checks(rank, world_size)}


def _reference_pab(case) -> list[torch.Tensor]:
    """Single-process PAB on the eager model (module outputs broadcast by tests/reference_pab.py)."""
    ref = ReferencePAB(case.model, REFERENCE_MODULES[case.name], ranges={"temporal": PAB_SCHEDULE.temporal,
                                                                         "cross": PAB_SCHEDULE.cross},
                       window=PAB_SCHEDULE.window)
    try:
        return run_loop(ref, case.kwargs(), TIMESTEPS)
    finally:
        ref.restore()


def dsp_checks(rank: int, world_size: int) -> dict:
    """Per model, one DSP model with a PAB schedule runs two generations: one above the reuse window (plain
    DSP, against eager) and one through it (DSP + PAB, against a single-process PAB reference)."""
    res: dict = {"rank": rank}
    for name in ("vdt", "latte"):
        case = make_case(name)
        eager = run_loop(case.model, case.kwargs(), ABOVE)
        single_pab = _reference_pab(case)
        opt = optimize_shared(name, case.model, PAB_SCHEDULE, case.kwargs(), SequenceParallel(), TIMESTEPS)
        for label, ts, ref in (("dsp", ABOVE, eager), ("dsp+pab", TIMESTEPS, single_pab)):
            with count_collectives() as counted:
                out = run_loop(opt, case.kwargs(), ts)
            res[name, label] = dict(diff=_max_diff(out, ref), counted=_counts(counted),
                                    shapes_match=all(o.shape == r.shape for o, r in zip(out, ref)))
        run_loop(opt, case.kwargs(), TIMESTEPS[:1])  # stop after the first (storing) step: what is cached?
        glob = {k: math.prod(s.shape) for r in opt.global_regions for k, s in zip(r.cache_keys, r.exit_specs)}
        cache = opt.state().cache
        res[name, "cache"] = [(k, cache.get(k).numel(), glob[k]) for k in cache.keys()]
        res[name] = dict(
            frames=opt.sharded.frames.sizes, predicted=_counts(opt.communication()),
            plan_savings=_counts(plan_reuse_savings(opt)),
            temporal_reuses=sum(1 for ph in opt.current_plan.phases for p in ph.reused
                                if any(r.path == p and r.kind == "temporal" for r in opt.regions)),
            temporal_regions=sum(1 for r in opt.regions if r.kind == "temporal"),
            roles=sorted(collective_info(n).role for n in collective_nodes(opt.captured.gm.graph)))
        if name == "vdt":
            res["inspect"] = opt.inspect()
            res["errors"] = _error_checks(rank, opt, case, run_loop(case.model, case.kwargs(), TIMESTEPS[:1]))
        else:
            res["keep_sharded"] = _keep_sharded(opt, case, single_pab, world_size)
    res["reduce_metric"] = (opt.parallel.reduce_metric(rank + 0.5),
                            opt.parallel.reduce_metric(torch.tensor([float(rank), -float(rank)])).tolist())
    return res


def _keep_sharded(whole, case, single_pab, world_size: int) -> dict:
    """The same capture, sharded again with keep_sharded (no second capture)."""
    session = sp.connect(SequenceParallel(keep_sharded=True, world_size=world_size), PAB_SCHEDULE)
    opt = sp.build(case.model, whole.global_captured, whole.global_regions, PAB_SCHEDULE, session,
                   timestep_arg="timestep", backend="eager")
    opt.plan(TIMESTEPS)
    kw = case.kwargs()
    kw["hidden_states"] = opt.parallel.shard(kw["hidden_states"])
    with count_collectives() as counted:
        out = run_loop(opt, kw, TIMESTEPS)
    mine = [opt.parallel.shard(o) for o in single_pab]
    return dict(diff=_max_diff(out, mine), local_shape=tuple(out[0].shape), counted=_counts(counted),
                gathered_diff=float((opt.parallel.gather(out[-1]) - single_pab[-1]).abs().max()))


def _error_checks(rank: int, opt, case, first_eager) -> dict:
    out: dict = {}
    bad = case.kwargs()
    if rank == 1:  # one rank passes a video of the wrong shape
        bad["hidden_states"] = bad["hidden_states"][:, :3]
    out["bad_input"] = _error(lambda: opt(**bad))
    kw = case.kwargs()  # the ranks are still in step: a good call runs
    kw["timestep"] = torch.full_like(kw["timestep"], TIMESTEPS[0])
    out["after_error_diff"] = float((opt(**kw) - first_eager[0]).abs().max())
    skew = case.kwargs()
    skew["timestep"] = torch.full_like(skew["timestep"], TIMESTEPS[rank])  # ranks at different steps
    out["out_of_step"] = _error(lambda: opt(**skew))
    seeded = case.kwargs()  # each rank draws its own noise, from a per-rank seed: the classic mistake
    seeded["hidden_states"] = torch.randn(seeded["hidden_states"].shape, generator=torch.Generator().manual_seed(
        100 + rank))
    seeded["timestep"] = torch.full_like(seeded["timestep"], TIMESTEPS[1])
    out["per_rank_seed"] = _error(lambda: opt(**seeded))
    opt.parallel.config.check_inputs = False  # turned off alike on every rank: the call runs, unchecked
    try:
        out["unchecked"] = _error(lambda: opt(**seeded))
    finally:
        opt.parallel.config.check_inputs = True
    out["world_size"] = _error(lambda: graphpass.optimize(case.model, PAB_SCHEDULE, example_kwargs=case.kwargs(),
                                                          parallel=SequenceParallel(world_size=3)))
    return out


# --- Ulysses (heads split) ------------------------------------------------------------------------
def _a2a(t: torch.Tensor, group: str, world: int) -> torch.Tensor:
    c10d = torch.ops._c10d_functional
    return c10d.wait_tensor(c10d.all_to_all_single(t, [1] * world, [1] * world, group))


class UlyssesAttention(nn.Module):
    """Self-attention over a sequence split across ranks: an all-to-all each for q, k and v gives every rank
    the whole sequence for its share of the heads; a fourth returns the output to the sequence split."""

    def __init__(self, dim: int, heads: int, group: str | None, world: int):
        super().__init__()
        self.heads, self.group, self.world = heads, group, world
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def _to_heads(self, t):  # (B, S/W, D) -> (B, H/W, S, hd)
        b, s, d = t.shape
        w, h = self.world, self.heads
        t = t.reshape(b, s, w, h // w, d // h)
        if w > 1:
            t = _a2a(t.permute(2, 1, 0, 3, 4).contiguous(), self.group, w)  # block j -> rank j; row i from rank i
            t = t.permute(2, 0, 1, 3, 4)
        return t.reshape(b, w * s, h // w, d // h).transpose(1, 2)

    def _to_sequence(self, o):  # (B, H/W, S, hd) -> (B, S/W, D)
        b, hw, n, hd = o.shape
        w = self.world
        o = o.transpose(1, 2).reshape(b, w, n // w, hw, hd)
        if w > 1:
            o = _a2a(o.permute(1, 2, 0, 3, 4).contiguous(), self.group, w).permute(2, 1, 0, 3, 4)
        else:
            o = o.permute(0, 2, 1, 3, 4)
        return o.reshape(b, n // w, w * hw * hd)

    def forward(self, x):
        q, k, v = self._to_heads(self.q(x)), self._to_heads(self.k(x)), self._to_heads(self.v(x))
        return self.out(self._to_sequence(nn.functional.scaled_dot_product_attention(q, k, v)))


class Mlp(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, group, world):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = UlyssesAttention(dim, heads, group, world)
        self.mlp = Mlp(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UlyssesDiT(nn.Module):
    """hidden_states (B, S/W, 4): this rank's tokens; timestep (B,) on 0..1000."""

    def __init__(self, group: str | None = None, world: int = 1, dim: int = 16, heads: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.temb, self.outp = nn.Linear(4, dim), nn.Linear(1, dim), nn.Linear(dim, 4)
        self.blocks = nn.ModuleList([Block(dim, heads, group, world) for _ in range(2)])

    def forward(self, hidden_states, timestep):
        x = self.inp(hidden_states) + self.temb(timestep[:, None] / 1000.0)[:, None]
        for blk in self.blocks:
            x = blk(x)
        return self.outp(x)


def ulysses_checks(rank: int, world_size: int) -> dict:
    schedule = PAB(joint=2, window=(100, 900))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 4, generator=g)
    kw_full = dict(hidden_states=x, timestep=torch.full((2,), 500.0))
    s = x.shape[1] // world_size
    kw = dict(hidden_states=x[:, rank * s:(rank + 1) * s], timestep=torch.full((2,), 500.0))
    mine = lambda outs: [o[:, rank * s:(rank + 1) * s] for o in outs]  # noqa: E731

    full = UlyssesDiT().eval()
    split = UlyssesDiT(dist.group.WORLD.group_name, world_size).eval()
    eager_full = run_loop(full, kw_full, TIMESTEPS)
    eager_split = run_loop(split, kw, TIMESTEPS)
    ref = ReferencePAB(full, {f"blocks.{i}.attn": "joint" for i in range(2)}, ranges={"joint": 2},
                       window=schedule.window)
    single_out = run_loop(ref, kw_full, TIMESTEPS)
    ref.restore()
    opt = graphpass.optimize(split, schedule, example_kwargs=kw, timesteps=TIMESTEPS)
    with count_collectives() as counted:
        out = run_loop(opt, kw, TIMESTEPS)
    every = {n.name for n in collective_nodes(opt.captured.gm.graph)}
    phases = []
    for ph in opt.current_plan.distinct():
        kept = {n.name for n in collective_nodes(opt.phase_graph(ph).gm.graph)}
        phases.append(dict(reused=[p for p in ph.reused if p.endswith(".attn")], removed=len(every - kept),
                           steps=sum(1 for p in opt.current_plan.phases if p == ph)))
    return dict(eager_diff=_max_diff(eager_split, mine(eager_full)), pab_diff=_max_diff(out, mine(single_out)),
                collectives=len(every), phases=phases, counted=_counts(counted),
                kinds=sorted({r.kind for r in opt.regions}))


# --- a rank that dies -------------------------------------------------------------------------------
def rank_death_checks(rank: int, world_size: int, check_calls: bool = True) -> dict:
    """Two calls of a generation on both ranks, then rank 1 is killed (SIGKILL: no clean-up, no goodbye);
    rank 0 makes the third call and a fourth, and reports what each raised and how long it took. With
    ``check_calls`` the loss shows in the agreement all-reduce; without, in the graph's own all-to-all."""
    import os
    import signal
    import time

    case = make_case("vdt")
    opt = graphpass.optimize(case.model, PAB_SCHEDULE, example_kwargs=case.kwargs(), timesteps=TIMESTEPS,
                             parallel=SequenceParallel(check_calls=check_calls))
    run_loop(opt, case.kwargs(), TIMESTEPS[:2])
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    out: dict = {}
    for label, t in (("third", TIMESTEPS[2]), ("fourth", TIMESTEPS[3])):
        kw = case.kwargs()
        kw["timestep"] = torch.full_like(kw["timestep"], t)
        t0 = time.monotonic()
        out[label] = _error(lambda: opt(**kw))
        out[label + "_seconds"] = time.monotonic() - t0
    return out


def rank_death_checks_unchecked(rank: int, world_size: int) -> dict:
    return rank_death_checks(rank, world_size, check_calls=False)


# --- Ulysses on joint-attention models -------------------------------------------------------------
#: The joint attention modules of each model, written from the model code, for the reference PAB.
JOINT_MODULES = {
    "wan": [f"blocks.{i}.attn1" for i in range(2)],
    "wan-odd": [f"blocks.{i}.attn1" for i in range(2)],
    "cogvideox": [f"transformer_blocks.{i}.attn1" for i in range(2)],
    "cogvideox-rope": [f"transformer_blocks.{i}.attn1" for i in range(2)],
    "hunyuan": ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"],
}
JOINT_SCHEDULE = PAB(joint=2, window=(100, 900))
VDT_ULYSSES_SCHEDULE = PAB(temporal=2, cross=2, window=(100, 900))


def _wan_odd():
    """Wan with 3 heads (not divisible by 2 ranks) and 3 frames of 3x5 tokens (45 tokens: 30 + 15)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=12,
                                  in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=72,
                                  num_layers=2).eval()

    def kwargs():
        g = torch.Generator().manual_seed(2)
        return dict(hidden_states=torch.randn(2, 4, 3, 6, 10, generator=g), timestep=torch.full((2,), 999),
                    encoder_hidden_states=torch.randn(2, 5, 16, generator=g), return_dict=False)
    return model, kwargs


def joint_case(name: str):
    """(model, kwargs factory) of a tiny joint-attention model."""
    if name == "wan-odd":
        return _wan_odd()
    if name in ("vdt", "cogvideox"):
        case = make_case(name)
        return case.model, case.kwargs
    from zoo import ZOO

    z = ZOO[{"hunyuan": "hunyuan-video"}.get(name, name)]
    return z.build(), z.kwargs


def _per_call_counts(opt, kwargs, timesteps) -> tuple[list, list]:
    """Outputs and the collectives counted during each call."""
    kw, x, outs, per_call = dict(kwargs), kwargs["hidden_states"], [], []
    from conftest import first, step

    with torch.no_grad():
        for t in timesteps:
            kw["hidden_states"], kw["timestep"] = x, torch.full_like(kwargs["timestep"], t)
            with count_collectives() as c:
                out = opt(**kw)
            outs.append(first(out))
            per_call.append(_counts(c))
            x = step(x, out)
    return outs, per_call


def _joint_schedule(name: str) -> PAB:
    return VDT_ULYSSES_SCHEDULE if name == "vdt" else JOINT_SCHEDULE


@functools.lru_cache(maxsize=None)
def joint_references(name: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(eager outputs above the PAB window, single-process module-level PAB outputs through it) of the
    joint-attention model ``name``, made once per rank for the Ulysses and the ring checks (read only)."""
    model, kwargs = joint_case(name)
    vdt = name == "vdt"
    modules = REFERENCE_MODULES["vdt"] if vdt else {p: "joint" for p in JOINT_MODULES[name]}
    ranges = {"temporal": 2, "cross": 2} if vdt else {"joint": 2}
    eager = run_loop(model, kwargs(), ABOVE)
    ref = ReferencePAB(model, modules, ranges=ranges, window=_joint_schedule(name).window)
    try:
        return eager, run_loop(ref, kwargs(), TIMESTEPS)
    finally:
        ref.restore()


def ulysses_model_checks(rank: int, world_size: int, name: str, mode: str | None = None) -> dict:
    """One joint-attention model in Ulysses mode (or ``mode``): without reuse (above the window) against
    eager, with PAB against single-process PAB on the eager model; collectives counted per call against the
    phase graphs."""
    model, kwargs = joint_case(name)
    schedule = _joint_schedule(name)
    eager, single_pab = joint_references(name)
    opt = optimize_shared(name, model, schedule, kwargs(), SequenceParallel(
        mode=mode or ("ulysses" if name == "vdt" else "auto")), TIMESTEPS)
    res: dict = {"rank": rank, "mode": opt.sharded.mode, "frames": opt.sharded.frames.sizes}
    outs = {}
    for label, ts, want in (("plain", ABOVE, eager), ("pab", TIMESTEPS, single_pab)):
        outs[label], per_call = _per_call_counts(opt, kwargs(), ts)
        res[label] = dict(rel=_rel(outs[label], want), per_call=per_call)
    plan = opt.current_plan
    res["predicted"] = [_counts(_phase_counts(opt, ph)) for ph in plan.phases]
    res["plan_savings"] = _counts(plan_reuse_savings(opt))
    res["reused"] = [sorted(ph.reused) for ph in plan.phases]
    res["attention"] = sorted(r.path for r in opt.regions if r.kind in ("joint", "temporal"))
    joint = {n for r in opt.regions if r.kind == "joint" for n in r.nodes}
    attention = [n.name for n in opt.global_captured.gm.graph.nodes
                 if n.target == torch.ops.aten.scaled_dot_product_attention.default and n.name in joint]
    local = {n.name: n for n in opt.captured.gm.graph.nodes}  # the attention result keeps its node's name
    res["attention_heads"] = sorted({int(local[a].meta["val"].shape[1]) for a in attention})
    res["model_heads"] = sorted({int(n.meta["val"].shape[1]) for n in opt.global_captured.gm.graph.nodes
                                 if n.name in attention})
    res["full_phase"] = [(collective_info(n).kind, collective_info(n).role) for n in
                         collective_nodes(opt.captured.gm.graph)]
    every_joint = [ph for ph in plan.distinct() if set(res["attention"]) <= set(ph.reused)]
    res["all_reused_phase"] = [(collective_info(n).kind, collective_info(n).role, collective_info(n).region)
                               for ph in every_joint[:1] for n in collective_nodes(opt.phase_graph(ph).gm.graph)]
    res["roles"] = [(collective_info(n).region, collective_info(n).role, collective_info(n).kind)
                    for n in collective_nodes(opt.captured.gm.graph)]
    res["inspect"] = opt.inspect()
    run_loop(opt, kwargs(), TIMESTEPS[:1])
    glob = {k: math.prod(s.shape) for r in opt.global_regions for k, s in zip(r.cache_keys, r.exit_specs)}
    cache = opt.state().cache
    res["cache"] = [(k, cache.get(k).numel(), glob[k]) for k in cache.keys()]
    if name == "wan" and mode is None:
        res["diffusers_cp"] = _rel(outs["plain"], _diffusers_ulysses(kwargs))
    return res


def _rel(outs, wants) -> float:
    return max(float((o - w).abs().max() / w.abs().max()) for o, w in zip(outs, wants))


def _diffusers_ulysses(kwargs) -> list[torch.Tensor]:
    """The same loop on a fresh model under diffusers' own context parallelism
    (``ContextParallelConfig(ulysses_degree=2)``, hooks on the eager model). diffusers 0.42.1 places each rank
    on ``rank % torch.accelerator.device_count()``, a division by zero without an accelerator; with the count
    reported as 1 its CPU/gloo path runs unchanged."""
    from diffusers import ContextParallelConfig

    model, _ = joint_case("wan")
    count = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=dist.get_world_size()))
    finally:
        torch.accelerator.device_count = count
    return run_loop(model, kwargs(), ABOVE)


def _phase_counts(opt, ph):
    out = sp.CollectiveCounts()
    for _, info in opt.collectives(ph)[0]:
        out.add(info.kind, info.bytes_sent)
    return out


ULYSSES_MODELS = ("wan", "wan-odd", "cogvideox", "cogvideox-rope", "hunyuan", "vdt")
#: Models whose joint attention also attends over text tokens (concatenated into the sequence).
TEXT_MODELS = ("cogvideox", "cogvideox-rope", "hunyuan")


RING_MODELS = ("wan-odd", "cogvideox", "hunyuan")


def ulysses_all(rank: int, world_size: int) -> dict:
    return {name: ulysses_model_checks(rank, world_size, name) for name in ULYSSES_MODELS}


def ring_all(rank: int, world_size: int) -> dict:
    return {name: ulysses_model_checks(rank, world_size, name, mode="ring") for name in RING_MODELS}


# --- residual caching (AdaCache) --------------------------------------------------------------------
#: The transformer blocks of each model, written from the model code, for the module-level reference.
RESIDUAL_BLOCKS = {"vdt": [f"blocks.{i}" for i in range(2)],
                   "cogvideox": [f"transformer_blocks.{i}" for i in range(2)]}
#: Fixed decisions (FrozenAdaCache): reuse at 5 of the 10 steps.
FROZEN_DECISIONS = "CCRRCRCRRC"
#: A codebook whose bound lies among the tiny models' distances (about 0.10 to 0.24 on these 10 steps), so
#: the adaptive run both reuses and computes.
ADAPTIVE_SCHEDULE = AdaCache(codebook={0.125: 2, 1.0: 1})


def _cache_shares(opt, schedule) -> list:
    """(key, elements this rank caches, elements of the whole model's tensor) of each cached tensor."""
    whole = opt.technique.target(opt.global_captured, opt.global_regions, schedule)
    glob = {k: math.prod(s.shape) for r in whole.regions for k, s in zip(r.cache_keys, r.exit_specs)}
    cache = opt.state().cache
    return [(k, cache.get(k).numel(), glob[k]) for k in cache.keys() if k in glob]


def _traced_counts(opt) -> list:
    """The collectives each call of the last generation should have run: those its phase graph keeps."""
    return [_counts(_phase_counts(opt, ph)) for _, ph in opt.state().trace]


def residual_model_checks(rank: int, world_size: int, name: str) -> dict:
    """AdaCache on ``name`` split over the ranks (mode "auto": DSP for VDT, Ulysses for CogVideoX): fixed
    decisions against the module-level block-residual reference; adaptive decisions against a
    single-process run (decisions, distances) and its outputs against the reference for those decisions;
    collectives counted per call against each call's phase graph; what each rank caches."""
    model, kwargs = joint_case(name)
    blocks = RESIDUAL_BLOCKS[name]
    res: dict = {"rank": rank}
    frozen = FrozenAdaCache(FROZEN_DECISIONS)
    opt = optimize_shared(name, model, frozen, kwargs(), SequenceParallel(), TIMESTEPS)
    outs, per_call = _per_call_counts(opt, kwargs(), TIMESTEPS)
    ref = run_reference(joint_case(name)[0], kwargs(), TIMESTEPS, FROZEN_DECISIONS, blocks=blocks)
    res["mode"] = opt.sharded.mode
    res["frames"] = opt.sharded.frames.sizes
    res["frozen"] = dict(rel=_rel(outs, ref), decisions=opt.decisions(), per_call=per_call,
                         predicted=_traced_counts(opt),
                         eager_rel=_rel(run_loop(model, kwargs(), TIMESTEPS), ref),
                         full=[(collective_info(n).kind, collective_info(n).role)
                               for n in collective_nodes(opt.captured.gm.graph)])
    run_loop(opt, kwargs(), TIMESTEPS[:2])  # the second step stores the residual: what is cached?
    res["frozen"]["cache"] = _cache_shares(opt, frozen)
    res["inspect"] = opt.inspect()

    # the same capture, optimized again (what graphpass.optimize would capture anew): one process, 2 ranks
    single = graphpass.OptimizedModel(model, opt.global_captured, opt.global_regions, ADAPTIVE_SCHEDULE)
    single.plan(TIMESTEPS)
    single_outs = run_loop(single, kwargs(), TIMESTEPS)
    par = sp.build(model, opt.global_captured, opt.global_regions, ADAPTIVE_SCHEDULE,
                   sp.connect(SequenceParallel(), ADAPTIVE_SCHEDULE), timestep_arg="timestep", backend="eager")
    par.plan(TIMESTEPS)
    outs, per_call = _per_call_counts(par, kwargs(), TIMESTEPS)
    ref = run_reference(joint_case(name)[0], kwargs(), TIMESTEPS, par.decisions(), blocks=blocks)
    res["adaptive"] = dict(
        decisions=par.decisions(), single_decisions=single.decisions(), rel=_rel(outs, ref),
        single_rel=_rel(outs, single_outs), distances=[r.distance for r in par.records()],
        single_distances=[r.distance for r in single.records()], metric_reads=par.metric_reads,
        per_call=per_call, predicted=_traced_counts(par), metric=par.metric.path,
        metric_held=par.sharded.held.get(par.metric.node or par.metric.block_io[1]), inspect=par.inspect())
    replay = par.with_schedule(par.freeze())  # the decisions, frozen, on the same sharded graphs
    res["adaptive"]["replay_diff"] = _max_diff(run_loop(replay, kwargs(), TIMESTEPS), outs)
    res["adaptive"]["replay"] = (type(replay).__name__, replay.decisions())
    return res


def refusal_checks(rank: int, world_size: int) -> dict:
    """Techniques SequenceParallel does not drive, and MoReg (frame differences across ranks), are refused
    on every rank with a ParallelError. The first two are refused before the capture; MoReg once the chain
    of blocks is carried to each rank's graph (VDT's capture is the residual checks')."""
    case = make_case("vdt")
    out = {}
    for label, schedule in (("fbc", graphpass.FirstBlockCache(threshold=0.1)),
                            ("teacache", graphpass.TeaCache(threshold=0.1))):
        out[label] = _error(lambda: graphpass.optimize(case.model, schedule, example_kwargs=case.kwargs(),
                                                       parallel=SequenceParallel()))
    out["moreg"] = _error(lambda: optimize_shared("vdt", case.model, AdaCache(moreg=graphpass.MoReg(window=(1, 10))),
                                                  case.kwargs(), SequenceParallel()))
    bad = case.kwargs()  # rank 1's capture fails (a video of 2 channels for a model of 3): no rank may wait
    if rank == 1:
        bad["hidden_states"] = bad["hidden_states"][:, :, :2]
    t0 = time.monotonic()
    out["capture"] = _error(lambda: graphpass.optimize(case.model, PAB_SCHEDULE, example_kwargs=bad,
                                                       parallel=SequenceParallel()))
    out["capture_seconds"] = time.monotonic() - t0
    return out


def residual_all(rank: int, world_size: int) -> dict:
    return {**{name: residual_model_checks(rank, world_size, name) for name in RESIDUAL_BLOCKS},
            "refused": refusal_checks(rank, world_size)}


# --- the diffusers pipeline entry point -------------------------------------------------------------
PIPELINE_SCHEDULE = PAB(joint=2, window=(100, 800))


def _hooked_pipeline_latents(steps: int) -> torch.Tensor:
    """One process: the tiny CogVideoX pipeline with diffusers' own Pyramid Attention Broadcast hook on its
    joint attentions (PAB's "spatial" slot: full 3D attention, as diffusers' reference code treats it)."""
    from diffusers import PyramidAttentionBroadcastConfig

    case = PIPES["cogvideox"]()
    pipe = case.pipe
    config = PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=PIPELINE_SCHEDULE.joint,
        spatial_attention_timestep_skip_range=PIPELINE_SCHEDULE.window,
        spatial_attention_block_identifiers=[rf"^transformer_blocks\.{i}\.attn1$" for i in range(2)],
        temporal_attention_block_identifiers=[r"^$"], cross_attention_block_identifiers=[r"^$"],
        current_timestep_callback=lambda: pipe.current_timestep)
    pipe.transformer.enable_cache(config)
    return case.run(steps=steps)


def pipeline_checks(rank: int, world_size: int, steps: int = 10) -> dict:
    """``optimize_pipeline(pipe, PAB, parallel=SequenceParallel())`` on the tiny CogVideoX pipeline (batched
    classifier-free guidance; 3 latent frames: 2 + 1), every rank running the pipeline with the same seed:
    two generations (the first captures at its first call; the second is counted) against the
    single-process pipeline with diffusers' PAB hook, and the plain pipeline to show reuse changed the
    latents."""
    case = PIPES["cogvideox"]()
    plain = case.run(steps=steps)
    graphpass.optimize_pipeline(case.pipe, PIPELINE_SCHEDULE, parallel=SequenceParallel())
    first = case.run(steps=steps)
    with count_collectives() as counted:
        second = case.run(steps=steps)
    opt = case.pipe.transformer.optimized
    ref = _hooked_pipeline_latents(steps)
    (trace,) = [st.trace for st in opt.contexts().values() if st.trace]  # batched cond/uncond: one context
    return dict(rel=(_rel([first], [ref]), _rel([second], [ref])), plain_rel=_rel([plain], [ref]),
                mode=opt.sharded.mode, frames=opt.sharded.frames.sizes, calls=len(trace),
                reusing=sum(1 for _, ph in trace if ph.reused), counted=_counts(counted),
                predicted=_counts(opt.communication()), planned=len(opt.current_plan))


# --- backend="inductor" ------------------------------------------------------------------------------
INDUCTOR_TIMESTEPS = TIMESTEPS[2:6]  # 4 calls inside the PAB window: compute, reuse, compute, reuse


def inductor_checks(rank: int, world_size: int) -> dict:
    """Ulysses on tiny Wan with PAB, each phase graph (collectives included) compiled by Inductor, against a
    single-process module-level PAB on the eager model."""
    model, kwargs = joint_case("wan")
    opt = optimize_shared("wan", model, JOINT_SCHEDULE, kwargs(), SequenceParallel(), INDUCTOR_TIMESTEPS,
                          backend="inductor")
    out = run_loop(opt, kwargs(), INDUCTOR_TIMESTEPS)
    ref = ReferencePAB(model, {p: "joint" for p in JOINT_MODULES["wan"]}, ranges={"joint": 2},
                       window=JOINT_SCHEDULE.window)
    try:
        single = run_loop(ref, kwargs(), INDUCTOR_TIMESTEPS)
    finally:
        ref.restore()
    runners = list(opt._runners.values())
    return dict(rel=_rel(out, single), decisions=opt.decisions(), mode=opt.sharded.mode,
                compiled=[isinstance(r, InductorRunner) and r._compiled is not None for r in runners],
                phases=len(opt.current_plan.distinct()),
                kept=[len(opt.collectives(ph)[0]) for ph in opt.current_plan.distinct()])


def parallel_checks(rank: int, world_size: int) -> dict:
    """One spawn for every check but the rank deaths, keyed by test module. The residual checks run first, so
    VDT and CogVideoX are captured by ``graphpass.optimize`` with AdaCache; DSP then captures Latte, Ulysses
    Wan, Wan-odd, CogVideoX-rope and HunyuanVideo with PAB; the rest reuse those captures."""
    residual = residual_all(rank, world_size)
    return {"dsp": all_checks(rank, world_size), "ulysses": ulysses_all(rank, world_size),
            "ring": ring_all(rank, world_size),
            "cache_pipeline_inductor": {**residual, "pipeline": pipeline_checks(rank, world_size),
                                        "inductor": inductor_checks(rank, world_size)}}


def parallel_results(part: str) -> list[dict]:
    """Per rank, the ``part`` of :func:`parallel_checks`'s results ("dsp", "ulysses", "ring",
    "cache_pipeline_inductor"), from one spawn per test process (bounded: a hang fails after 900 s)."""
    return [r[part] for r in launch_once(parallel_checks, world_size=2, timeout=900, preload=("_workers",))]
