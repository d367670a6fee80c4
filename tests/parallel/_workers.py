"""What each rank runs in the parallel tests (spawned by tests/parallel/_launch.py); each function returns a
dict of measurements that the tests check in the parent process.

* :func:`dsp_checks`: DSP (and DSP + PAB) on VDT-tiny (4 frames: 2 + 2) and Latte (3 frames: 2 + 1) against
  single-process runs, collectives counted at run time, keep_sharded, inspect(), reduce_metric, and the
  errors (a bad input on one rank, ranks out of step, a wrong world size).
* :func:`ulysses_checks`: a small joint-attention model that splits heads over the ranks with the same
  collective ops (Ulysses): numerics against the unsplit model and the four all-to-alls a reuse removes.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import graphpass
from conftest import DDIM_50, make_case, run_loop
from graphpass import PAB, ParallelError, SequenceParallel
from graphpass.passes.elide import collective_nodes
from graphpass.runtime.parallel import count_collectives, plan_reuse_savings

#: 10 calls from 981 down to 81: the first and last outside the PAB window below, reuse in between.
TIMESTEPS = DDIM_50[::5]
PAB_SCHEDULE = PAB(spatial=2, temporal=3, cross=4, window=(100, 900))
NEVER = PAB(temporal=2, window=(2000, 3000))  # no call is in the window: plain DSP


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


def dsp_checks(rank: int, world_size: int) -> dict:
    res: dict = {"rank": rank}
    for name in ("vdt", "latte"):
        case = make_case(name)
        eager = run_loop(case.model, case.kwargs(), TIMESTEPS)
        single = graphpass.optimize(case.model, PAB_SCHEDULE, example_kwargs=case.kwargs(), timesteps=TIMESTEPS)
        single_out = run_loop(single, case.kwargs(), TIMESTEPS)
        for label, schedule, ref in (("dsp", NEVER, eager), ("dsp+pab", PAB_SCHEDULE, single_out)):
            opt = graphpass.optimize(case.model, schedule, example_kwargs=case.kwargs(), timesteps=TIMESTEPS,
                                     parallel=SequenceParallel())
            with count_collectives() as counted:
                out = run_loop(opt, case.kwargs(), TIMESTEPS)
            res[name, label] = dict(
                diff=_max_diff(out, ref), shapes_match=all(o.shape == r.shape for o, r in zip(out, ref)),
                frames=opt.sharded.frames.sizes, counted=_counts(counted), predicted=_counts(opt.communication()),
                plan_savings=_counts(plan_reuse_savings(opt)),
                temporal_reuses=sum(1 for ph in opt.current_plan.phases for p in ph.reused
                                    if any(r.path == p and r.kind == "temporal" for r in opt.regions)),
                collectives=len(collective_nodes(opt.captured.gm.graph)))
            if name == "vdt" and label == "dsp+pab":
                res["inspect"] = opt.inspect()
            if name == "vdt" and label == "dsp":
                res["errors"] = _error_checks(rank, opt, case, eager)
        if name == "vdt":
            res["keep_sharded"] = _keep_sharded(case, single_out)
    res["reduce_metric"] = (opt.parallel.reduce_metric(rank + 0.5),
                            opt.parallel.reduce_metric(torch.tensor([float(rank), -float(rank)])).tolist())
    return res


def _keep_sharded(case, single_out) -> dict:
    opt = graphpass.optimize(case.model, PAB_SCHEDULE, example_kwargs=case.kwargs(), timesteps=TIMESTEPS,
                             parallel=SequenceParallel(keep_sharded=True, world_size=2))
    kw = case.kwargs()
    kw["hidden_states"] = opt.parallel.shard(kw["hidden_states"])
    with count_collectives() as counted:
        out = run_loop(opt, kw, TIMESTEPS)
    mine = [opt.parallel.shard(o) for o in single_out]
    return dict(diff=_max_diff(out, mine), local_shape=tuple(out[0].shape), counted=_counts(counted),
                gathered_diff=float((opt.parallel.gather(out[-1]) - single_out[-1]).abs().max()))


def _error_checks(rank: int, opt, case, eager) -> dict:
    out: dict = {}
    bad = case.kwargs()
    if rank == 1:  # one rank passes a video of the wrong shape
        bad["hidden_states"] = bad["hidden_states"][:, :3]
    out["bad_input"] = _error(lambda: opt(**bad))
    kw = case.kwargs()  # the ranks are still in step: a good call runs
    kw["timestep"] = torch.full_like(kw["timestep"], TIMESTEPS[0])
    out["after_error_diff"] = float((opt(**kw) - eager[0]).abs().max())
    skew = case.kwargs()
    skew["timestep"] = torch.full_like(skew["timestep"], TIMESTEPS[rank])  # ranks at different steps
    out["out_of_step"] = _error(lambda: opt(**skew))
    out["world_size"] = _error(lambda: graphpass.optimize(case.model, NEVER, example_kwargs=case.kwargs(),
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
    single = graphpass.optimize(full, schedule, example_kwargs=kw_full, timesteps=TIMESTEPS)
    single_out = run_loop(single, kw_full, TIMESTEPS)
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
