"""Sequence-parallel inference (DSP, Ulysses, ring) on torch.distributed, with communication elided by the graph.

Every rank runs the same script::

    # torchrun --nproc_per_node 2 script.py
    import torch.distributed as dist, graphpass
    dist.init_process_group("gloo")                      # "nccl" on GPUs
    opt = graphpass.optimize(model, graphpass.PAB.preset("latte"), example_kwargs=kw,
                             parallel=graphpass.SequenceParallel())
    out = opt(**kw)        # whole inputs in, whole outputs out, on every rank

Each rank captures the whole model, then :func:`~graphpass.passes.parallelize.parallelize` rewrites the
graph into that rank's graph: its share of the frames, with an all-to-all before and after every temporal
attention (DSP), or its share of the token sequence with all-to-alls between sequence and heads around
every joint attention (Ulysses; ring attention passes keys and values round instead), as
``SequenceParallel(mode=...)`` says (``"auto"``: DSP for spatial-temporal models, Ulysses for joint
attention). Each phase graph then goes through :func:`~graphpass.passes.elide.elide_collectives`: an
attention the phase reuses needs none of its collectives, and they disappear from that phase's graph.
Caches hold each rank's shard only.

Residual caching (AdaCache, FrozenAdaCache) works the same way: the chain of blocks is found on the whole
model's graph and carried to each rank's graph by node name (:func:`sharded_target`); a step that reuses the
blocks' residual skips every collective inside them (only the output gather is left), and each rank caches
its part of the residual.

Ranks must call the model in lockstep (same timesteps, same number of calls, same input values); with
``check_calls`` (the default) each call first checks that, and that every rank's inputs are valid, with one
small all-reduce (it carries a checksum of every input, ``check_inputs``), so an error or a mismatch on one
rank is raised on all ranks instead of leaving the others waiting in a collective or computing a wrong
result. A rank that dies during a call ends the call on the others with a :class:`ParallelError` as soon
as the process group notices (at once for a dead process; a hung one after the group's timeout,
``init_process_group(timeout=...)``); later calls raise it again without touching the broken group.

Adaptive schedules decide from a metric measured on each rank's shard; ranks must decide alike. AdaCache's
distance ``||r_now - r_prev||_1 / ||r_prev||_1`` is a ratio of sums over the residual: its measuring graph
all-reduces the numerator and denominator sums over the group before dividing (one small all-reduce in the
graph, no extra host read), so every rank reads the whole residual's distance, as one process would. A
policy that reads some other per-rank value can call ``opt.parallel.reduce_metric(value)`` (an all-reduce
max) instead.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import GraphpassError, InputError, ParallelError
from ..passes.capture import CapturedGraph, TensorSpec
from ..passes.elide import COLLECTIVE_OPS, collective_info, collective_nodes, describe_collectives
from ..passes.flops import node_flops
from ..passes.parallelize import MODES, ShardedGraph, parallelize
from ..passes.residuals import BlockSpan, MetricSite
from ..passes.specialize import PhaseGraph
from ..passes.tag import Region
from ..schedules.base import Phase, Plan, Schedule
from ..techniques import Target, technique_for, techniques
from ..techniques.residual import SpanTarget
from .executor import OptimizedModel

__all__ = ["SequenceParallel", "ParallelModel", "ParallelRuntime", "ParallelError", "count_collectives",
           "CollectiveCounts"]


@dataclass
class SequenceParallel:
    """Sequence parallelism over frames (DSP) or tokens (Ulysses, ring) for :func:`graphpass.optimize`
    (``parallel=``).

    Fields:
        mode: ``"dsp"``: frames split over the ranks, all-to-alls around temporal attention (spatial-temporal
            models: Latte, VDT, Open-Sora). ``"ulysses"``: the token sequence split over the ranks (by frames)
            everywhere, and around every attention op over the split sequence an all-to-all each for q, k and
            v from sequence to heads, and one for the output back (joint 3D attention: CogVideoX, Wan,
            HunyuanVideo); heads that do not divide by the ranks split unevenly (3 on 2 ranks: 2 + 1), text
            tokens concatenated into the sequence stay whole on every rank; with fewer heads than ranks an
            attention falls back to ring. ``"ring"``: the same split, but each attention keeps its queries and
            passes keys and values round the ranks (merging by log-sum-exp). ``"auto"`` (default): DSP for a
            model whose attention is only spatial, temporal and cross, Ulysses otherwise.
        group: the ``torch.distributed`` process group to split frames over; ``None`` = the default group
            (``torch.distributed.init_process_group`` must have been called, e.g. under ``torchrun``).
        keep_sharded: ``False``: every rank passes whole inputs and gets whole outputs (the graph takes its
            frames on entry and all-gathers the frames of the outputs on exit). ``True``: the video input is
            this rank's frames (``opt.parallel.shard(x)``) and outputs that carry frames are returned as this
            rank's frames, with no all-gather: a sampler can keep its latent sharded between steps and call
            ``opt.parallel.gather(x)`` once at the end. Other inputs are whole tensors in both modes.
        world_size: the number of ranks the caller expects; if set and the group has another size,
            ``optimize`` raises (on every rank). ``None`` accepts any size.
        frame_dim: the video input's frame dimension; ``None`` infers it (the dim whose size equals the
            sequence length of temporal attention; for Ulysses and ring, the first dim after the batch that
            can be split through the model: the frames of (B, C, F, H, W) or (B, F, C, H, W) latents).
        check_calls: before each call the ranks check, with one all-reduce of 5 numbers (and 2 per input with
            ``check_inputs``), that every rank's inputs are valid and that all ranks are at the same timestep
            and call of the generation. An error on one rank is then raised on all of them (a mismatch would
            otherwise wait forever in a collective). ``False`` skips the check.
        check_inputs: with ``check_calls``, also check that every rank was given the same input values (an
            exact checksum of each input's bytes, folded into the same all-reduce): ranks fed different values,
            e.g. noise drawn from a per-rank seed, would otherwise compute a silently wrong result. With
            ``keep_sharded`` the video input (this rank's frames) is left out. ``False`` skips it (it reads
            every input once per call).

    Example:
        >>> sp = SequenceParallel()                      # default group, whole tensors in and out
        >>> sp = SequenceParallel(mode="ring")           # keys and values round the ranks
        >>> sp = SequenceParallel(keep_sharded=True, world_size=2)
    """

    mode: str = "auto"
    group: Any = None
    keep_sharded: bool = False
    world_size: int | None = None
    frame_dim: int | None = None
    check_calls: bool = True
    check_inputs: bool = True


#: Markers of torch.distributed transport failures (gloo, NCCL) when a peer process is gone or silent; gloo
#: raises them as plain RuntimeErrors naming its transport, NCCL as DistBackendError.
_LOST_PEER = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out",
              "gloo/transport", "nccl")


def lost_rank(error: BaseException) -> bool:
    """Whether ``error`` says another rank of the process group is gone (died, killed, or silent past the
    group's timeout), as opposed to an error of this rank's own computation.

        >>> lost_rank(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.2]:4321"))
        True
        >>> lost_rank(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
        False
    """
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _LOST_PEER)


def checksum(x: torch.Tensor) -> float:
    """An exact checksum of a tensor's bytes: their position-weighted sum modulo 2**52 (so that a float64,
    the all-reduce's type, holds it exactly). Equal tensors give equal checksums on every rank and device;
    a changed byte, or two bytes swapped, changes it.

        >>> checksum(torch.tensor([1.0, 2.0])) == checksum(torch.tensor([1.0, 2.0]))
        True
        >>> checksum(torch.tensor([1.0, 2.0])) == checksum(torch.tensor([2.0, 1.0]))
        False
    """
    b = x.detach().contiguous().view(-1).view(torch.uint8).to(torch.int64)
    w = torch.arange(b.numel(), dtype=torch.int64, device=b.device) % 65521 + 1
    return float(int((b * w).sum()) % (1 << 52))


def _device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class ParallelRuntime:
    """The process-group side of a sequence-parallel model (``opt.parallel``): rank, frame split,
    agreement between ranks, and the :meth:`reduce_metric` hook for adaptive schedules."""

    def __init__(self, config: SequenceParallel):
        if not dist.is_available() or not dist.is_initialized():
            raise ParallelError("SequenceParallel needs torch.distributed: call torch.distributed.init_process_group"
                                "(...) on every rank first (torchrun sets up the environment for it), then "
                                "graphpass.optimize(..., parallel=graphpass.SequenceParallel())")
        self.config = config
        self.group = config.group if config.group is not None else dist.group.WORLD
        self.group_name: str = self.group.group_name
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.device = _device(self.group)
        self.sharded: ShardedGraph | None = None
        self.lost: ParallelError | None = None  # set when a rank was lost: the group cannot be used again

    # --- agreement -------------------------------------------------------------------------------
    def agree(self, error: BaseException | None, fingerprint: Any = None) -> None:
        """Collective: every rank learns whether any rank failed (and why) and whether their
        ``fingerprint`` differ; raises the same :class:`ParallelError` on every rank if so."""
        msg = None if error is None else f"{type(error).__name__}: {error}"
        got: list = [None] * self.world_size
        dist.all_gather_object(got, (msg, fingerprint), group=self.group)
        failed = [(r, m) for r, (m, _) in enumerate(got) if m is not None]
        if failed:
            lines = "; ".join(f"rank {r}: {m}" for r, m in failed)
            raise ParallelError(f"graphpass.optimize failed on {len(failed)} of {self.world_size} ranks ({lines})") \
                from error
        prints = [f for _, f in got]
        if any(f != prints[0] for f in prints):
            diff = ", ".join(f"rank {r}: {f}" for r, f in enumerate(prints))
            raise ParallelError(f"ranks optimized different things ({diff}); every rank must call graphpass.optimize "
                                f"with the same model, schedule, example input shapes and SequenceParallel options")

    def agree_call(self, error: BaseException | None, t: float, counter: int,
                   checksums: dict[str, float] | None = None) -> None:
        """Collective, once per call: one all-reduce (max) of [failed, t, -t, counter, -counter], then
        ``checksum, -checksum`` of every input in ``checksums`` (the same names, in the same order, on every
        rank): a maximum equal to minus the minimum means all ranks agree."""
        bad = error is not None
        sums = list((checksums or {}).values())
        vals = [t, -t, counter, -counter, *sums, *(-c for c in sums)]
        v = torch.tensor([float(bad), *(0.0 if bad else x for x in vals)], dtype=torch.float64, device=self.device)
        dist.all_reduce(v, op=dist.ReduceOp.MAX, group=self.group)
        failed, t_hi, t_lo, c_hi, c_lo, *rest = v.tolist()
        if failed:
            msgs: list = [None] * self.world_size
            dist.all_gather_object(msgs, None if error is None else f"{type(error).__name__}: {error}",
                                   group=self.group)
            lines = "; ".join(f"rank {r}: {m}" for r, m in enumerate(msgs) if m is not None)
            raise ParallelError(f"the call failed on rank(s) {[r for r, m in enumerate(msgs) if m is not None]} "
                                f"of {self.world_size}, so no rank ran it ({lines})") from error
        if t_hi != -t_lo or c_hi != -c_lo:
            raise ParallelError(f"ranks are out of step: timesteps {-t_lo:g}..{t_hi:g}, calls {-c_lo:g}..{c_hi:g} of "
                                f"the generation; call the optimized model on every rank with the same timestep, "
                                f"the same number of times")
        n = len(sums)
        differ = [name for name, hi, lo in zip(checksums or {}, rest[:n], rest[n:]) if hi != -lo]
        if differ:
            raise ParallelError(f"the ranks were given different values of {', '.join(differ)} (their checksums "
                                f"differ); every rank must pass the same inputs (e.g. draw noise from the same seed "
                                f"on every rank, or broadcast it from rank 0), or the result is silently wrong. "
                                f"SequenceParallel(check_inputs=False) turns this check off")

    def lose(self, error: BaseException, what: str) -> ParallelError:
        """The error to raise, on this rank and on every later call, once another rank is gone."""
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        self.lost = ParallelError(f"rank {self.rank} of {self.world_size}: another rank stopped during {what} (it "
                                  f"exited, was killed, or did not answer within the process group's timeout), so "
                                  f"this generation cannot finish; restart every rank (torchrun restarts them all). "
                                  f"torch.distributed said: {first}")
        return self.lost

    def reduce_metric(self, t: torch.Tensor | float) -> torch.Tensor | float:
        """All-reduce (max) of a metric over the ranks, so that every rank takes the same decision. For a
        value measured on this rank's shard that is not a ratio of sums (those are reduced inside the graph,
        see the module doc).

        >>> d = opt.parallel.reduce_metric(local_distance)   # same value on every rank
        """
        if isinstance(t, torch.Tensor):
            out = t.detach().to(self.device, torch.float64).clone()
            dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.group)
            return out.to(t.device, t.dtype)
        v = torch.tensor([float(t)], dtype=torch.float64, device=self.device)
        dist.all_reduce(v, op=dist.ReduceOp.MAX, group=self.group)
        return float(v.item())

    # --- frames ----------------------------------------------------------------------------------
    def _dim(self, x: torch.Tensor, dim: int | None) -> int:
        d = self.sharded.frame_dim if dim is None else dim
        return d + x.dim() if d < 0 else d

    def shard(self, x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
        """This rank's frames of a whole tensor (``dim``: its frame dim, default the video input's)."""
        d = self._dim(x, dim)
        fr = self.sharded.frames
        if x.shape[d] != fr.total:
            raise InputError(f"dim {d} of a {tuple(x.shape)} tensor has {x.shape[d]} frames, the model was split for "
                             f"{fr.total}; pass dim= for a tensor whose frames are elsewhere")
        return x.narrow(d, fr.offsets[self.rank], fr.sizes[self.rank])

    def gather(self, x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
        """The whole tensor from every rank's frames (the inverse of :meth:`shard`); collective."""
        d = self._dim(x, dim)
        fr = self.sharded.frames
        if x.shape[d] != fr.sizes[self.rank]:
            raise InputError(f"dim {d} of a {tuple(x.shape)} tensor has {x.shape[d]} frames, rank {self.rank} holds "
                             f"{fr.sizes[self.rank]}")
        fmax = max(fr.sizes)
        y = x.movedim(d, 0)
        pad = torch.zeros((fmax - y.shape[0], *y.shape[1:]), dtype=y.dtype, device=y.device)
        y = torch.cat([y, pad]).contiguous()
        parts = [torch.empty_like(y) for _ in range(self.world_size)]
        dist.all_gather(parts, y, group=self.group)
        return torch.cat([p[:n] for p, n in zip(parts, fr.sizes)]).movedim(0, d)


class ParallelModel(OptimizedModel):
    """An :class:`~graphpass.OptimizedModel` that runs this rank's sharded graphs (see the module doc).

    ``opt.parallel`` is the :class:`ParallelRuntime`; ``opt.global_captured`` and ``opt.global_regions`` the
    whole-model capture and its regions (``build`` them again with other options without re-capturing);
    ``opt.communication(plan)`` the collectives a plan runs on this rank.
    """

    def __init__(self, model: torch.nn.Module, sharded: ShardedGraph, global_captured: CapturedGraph,
                 global_regions: list[Region], schedule: Schedule, runtime: ParallelRuntime, *,
                 timestep_arg: str = "timestep", backend: str = "eager"):
        target = sharded_target(schedule, sharded, global_captured, global_regions, runtime.group_name)
        super().__init__(model, sharded.captured, sharded.regions, schedule, timestep_arg=timestep_arg,
                         backend=backend, target=target)
        self.parallel = runtime
        self.sharded = sharded
        self.global_captured = global_captured
        self.global_regions = global_regions

    def forward(self, *args, **kwargs):
        rt = self.parallel
        if rt.lost is not None:
            raise rt.lost
        where = self._call_label(kwargs)
        try:
            if rt.config.check_calls:
                self._agree(args, kwargs)
            return super().forward(*args, **kwargs)
        except RuntimeError as e:
            if not lost_rank(e):  # this rank's own failure: not a lost peer
                raise
            raise rt.lose(e, where) from e

    def _step_of(self, kwargs) -> tuple[float, int]:
        """(timestep, call number in the generation) of a call about to run."""
        t = self._timestep(kwargs)
        st = self._state()
        return t, 0 if st.last_t is not None and t > st.last_t else st.counter

    def _call_label(self, kwargs) -> str:
        """``call 3 of the generation (timestep 781)``, for messages; just ``a call`` for a malformed one."""
        try:
            t, counter = self._step_of(kwargs)
        except GraphpassError:
            return "a call"
        return f"call {counter + 1} of the generation (timestep {t:g})"

    def _agree(self, args, kwargs) -> None:
        """The ranks' per-call agreement (:meth:`ParallelRuntime.agree_call`): valid inputs everywhere, same
        step, same input values (``check_inputs``)."""
        err, t, counter, sums = None, 0.0, 0, {}
        try:
            if args:
                raise InputError(f"call the optimized model with keyword arguments only (got {len(args)} "
                                 f"positional); the capture's inputs are {self.captured.input_names}")
            flat = self.captured.flatten_call(kwargs)
            t, counter = self._step_of(kwargs)
            sums = self._input_checksums(flat)
        except GraphpassError as e:
            err, sums = e, dict.fromkeys(self._checked_inputs(), 0.0)  # same vector length on every rank
        self.parallel.agree_call(err, t, counter, sums)

    def _checked_inputs(self) -> list[str]:
        """Inputs whose values every rank must share: all of them, but this rank's frames with keep_sharded."""
        skip = self.sharded.video_input if self.sharded.keep_sharded else None
        return [n for n in self.captured.input_names if n != skip] if self.parallel.config.check_inputs else []

    def _input_checksums(self, flat: list[torch.Tensor]) -> dict[str, float]:
        by_name = dict(zip(self.captured.input_names, flat))
        return {n: checksum(by_name[n]) for n in self._checked_inputs()}

    def phase_graph(self, phase: Phase) -> PhaseGraph:
        """The phase graph, its collectives described: those the phase adds to the sharded graph (the
        all-reduce of an adaptive technique's distance sums) are tagged like the pass's own
        (:func:`~graphpass.passes.elide.describe_collectives`), so reports and counts see them."""
        built = phase in self._phase_graphs
        pg = super().phase_graph(phase)
        if not built:
            metric = self.target.metric
            describe_collectives(pg.gm.graph, region=metric.path if metric is not None else "", role="metric")
        return pg

    # --- communication ---------------------------------------------------------------------------
    def collectives(self, phase: Phase) -> tuple[list[Any], list[Any]]:
        """(kept, removed) collectives of a phase graph, as (node name, CollectiveInfo) pairs: kept are
        those its graph runs (with any the phase adds, such as the metric all-reduce of a measuring step),
        removed those of the full sharded graph that elision took out."""
        kept = [(n.name, collective_info(n)) for n in collective_nodes(self.phase_graph(phase).gm.graph)]
        kept_names = {name for name, _ in kept}
        everything = [(n.name, collective_info(n)) for n in collective_nodes(self.captured.gm.graph)]
        return kept, [c for c in everything if c[0] not in kept_names]

    def communication(self, plan: Plan | None = None) -> "CollectiveCounts":
        """Collectives (calls and bytes this rank sends) that a generation following ``plan`` (default: the
        current plan) runs, read from the phase graphs."""
        plan = plan or self.current_plan
        if plan is None:
            raise GraphpassError("no plan: call opt.plan(timesteps) first or pass a plan")
        out = CollectiveCounts()
        for ph in plan.phases:
            for _, info in self.collectives(ph)[0]:
                out.add(info.kind, info.bytes_sent)
        return out

    def with_schedule(self, schedule: Schedule) -> "ParallelModel":
        """This rank's graphs run under another schedule (no capture, no sharding, no collective), planned for
        the same timesteps; every rank calls it alike. E.g. replay an adaptive run's decisions on the ranks:
        ``opt.with_schedule(opt.freeze())``."""
        technique = technique_for(schedule)
        if not technique.parallel:
            raise ParallelError(f"{type(schedule).__name__} is run by the {technique.name} technique, which "
                                f"SequenceParallel does not drive; run it on one process")
        opt = ParallelModel(self.model, self.sharded, self.global_captured, self.global_regions, schedule,
                            self.parallel, timestep_arg=self.timestep_arg, backend=self.backend)
        if self._plan is not None:
            opt.plan(self._plan.timesteps)
        return opt

    def __repr__(self) -> str:
        return (f"ParallelModel({self.captured.model_type}, {self.schedule}, rank {self.parallel.rank} of "
                f"{self.parallel.world_size}, frames {list(self.sharded.frames.sizes)})")


def sharded_target(schedule: Schedule, sharded: ShardedGraph, global_captured: CapturedGraph,
                   global_regions: list[Region], group_name: str) -> Target:
    """What the schedule's technique acts on in this rank's graph.

    Attention techniques (PAB) find it in the sharded graph itself. A residual technique's chain of blocks is
    found on the whole model's graph (in the sharded one the collectives hide which node enters each block)
    and carried over by node name, which sharding keeps, with this rank's shapes: each rank caches its part
    of the residual. Its metric residual must be held in parts or whole on every rank (``"split"`` or
    ``"whole"`` in :attr:`~graphpass.passes.parallelize.ShardedGraph.held`); its distance sums are then
    all-reduced over ``group_name`` inside the measuring graph, so every rank decides alike.

        >>> t = sharded_target(AdaCache.preset("slow"), sharded, whole, whole_regions, "0")
        >>> t.span.specs[0].shape, t.metric.group        # VDT-tiny, 4 frames on 2 ranks: 2 each
        ((2, 2, 16, 32), '0')
    """
    technique = technique_for(schedule)
    whole = technique.target(global_captured, global_regions, schedule)
    if whole.span is None:
        return technique.target(sharded.captured, sharded.regions, schedule)
    if not isinstance(whole, SpanTarget):
        raise ParallelError(f"{technique.name} acts on the chain of blocks through a {type(whole).__name__}, which "
                            f"SequenceParallel cannot carry to each rank's graph; run {type(schedule).__name__} on "
                            f"one process")
    if whole.strides:
        raise ParallelError(f"{type(schedule).__name__} with MoReg measures motion between neighboring frames, "
                            f"which sequence parallelism puts on different ranks; use moreg=None with parallel=, "
                            f"or run it on one process")
    nodes = {n.name: n for n in sharded.captured.gm.graph.nodes}
    span = _local_span(whole.span, nodes, sharded.regions)
    metric = whole.metric
    if metric is not None:
        metric = _local_metric(metric, nodes, sharded, group_name)
    return replace(whole, regions=[span.as_region(whole.cache_unit)], attention_regions=list(sharded.regions),
                   span=span, metric=metric)


def _spec(node: fx.Node) -> TensorSpec:
    v = node.meta["val"]
    return TensorSpec(tuple(int(s) for s in v.shape), v.dtype)


def _local_span(span: BlockSpan, nodes: dict[str, fx.Node], regions: list[Region]) -> BlockSpan:
    """``span`` (found on the whole graph) in this rank's graph: same nodes, local shapes, local regions
    (a temporal region's exits are its exit all-to-alls there)."""
    flops = sum(node_flops(nodes[n]) for n in span.nodes)
    region = replace(span.region, exit_specs=[_spec(nodes[e]) for e in span.region.exits], flops=flops)
    by_path = {r.path: r for r in regions}
    return replace(span, specs=[_spec(nodes[o]) for _, o in span.streams], flops=flops, region=region,
                   inner=[by_path[r.path] for r in span.inner])


def _local_metric(metric: MetricSite, nodes: dict[str, fx.Node], sharded: ShardedGraph,
                  group_name: str) -> MetricSite:
    """The metric site in this rank's graph, its distance sums all-reduced over ``group_name``."""
    names = [metric.node] if metric.kind == "region" else list(metric.block_io)
    held = {sharded.held.get(n, "whole") for n in names}
    if len(held) > 1 or held == {"segment"}:
        raise ParallelError(f"the metric residual at {metric.path} holds whole text tokens beside this rank's part "
                            f"of the video tokens ({', '.join(sorted(held))}), so sums over the ranks would count "
                            f"the text once per rank; measure where the video tokens are alone, e.g. "
                            f"AdaCache(metric_at=<a block or region of the video stream>)")
    return replace(metric, spec=_spec(nodes[names[-1]]), group=group_name)  # a block's: its output's shape


def connect(config: SequenceParallel, schedule: Schedule) -> ParallelRuntime:
    """Join the process group before anything is captured; collective (every rank calls it). The ranks
    check the options against the group and agree on them, so a wrong world size fails at once, on all ranks."""
    if not isinstance(config, SequenceParallel):
        raise TypeError(f"parallel= takes a graphpass.SequenceParallel, got {type(config).__name__}")
    rt = ParallelRuntime(config)
    err = None
    technique = technique_for(schedule)
    if not technique.parallel:
        drives = ", ".join(t.name for t in techniques() if t.parallel)
        err = ParallelError(f"{type(schedule).__name__} is run by the {technique.name} technique, which "
                            f"SequenceParallel does not drive (it drives {drives}); use one of those schedules "
                            f"with parallel=, or run {type(schedule).__name__} on one process")
    elif config.mode not in MODES:
        err = ParallelError(f"SequenceParallel(mode={config.mode!r}) is not a mode; choose one of {', '.join(MODES)}")
    elif config.world_size is not None and config.world_size != rt.world_size:
        err = ParallelError(f"SequenceParallel(world_size={config.world_size}) but the process group has "
                            f"{rt.world_size} ranks; launch {config.world_size} processes (torchrun "
                            f"--nproc_per_node {config.world_size}) or drop world_size=")
    rt.agree(err, (schedule.to_json(), config.mode, config.keep_sharded, config.frame_dim, config.check_calls,
                   config.check_inputs,
                   rt.world_size))
    return rt


def build(model: torch.nn.Module, captured: CapturedGraph, regions: list[Region], schedule: Schedule,
          rt: ParallelRuntime, *, timestep_arg: str, backend: str, video_input: str | None = None) -> ParallelModel:
    """Shard ``captured`` for this rank and wrap it; collective (every rank calls it after :func:`connect`)."""
    config = rt.config
    err, sharded = None, None
    try:
        sharded = parallelize(captured, regions, rank=rt.rank, world_size=rt.world_size, group_name=rt.group_name,
                              video_input=video_input, frame_dim=config.frame_dim, keep_sharded=config.keep_sharded,
                              mode=config.mode)
    except GraphpassError as e:
        err = e
    rt.agree(err, (captured.model_type, [(n, str(s)) for n, s in zip(captured.input_names, captured.input_specs)]))
    rt.sharded = sharded
    return ParallelModel(model, sharded, captured, regions, schedule, rt, timestep_arg=timestep_arg, backend=backend)


# --- counting collectives at run time --------------------------------------------------------------
class CollectiveCounts:
    """Calls and bytes sent to other ranks, per collective kind (``all_to_all``, ``all_gather``,
    ``all_reduce``, ``other``)."""

    def __init__(self):
        self.calls: Counter = Counter()
        self.bytes: Counter = Counter()

    def add(self, kind: str, nbytes: int) -> None:
        self.calls[kind] += 1
        self.bytes[kind] += nbytes

    def __repr__(self) -> str:
        return "CollectiveCounts(" + ", ".join(f"{k}: {self.calls[k]} calls, {self.bytes[k]} B"
                                               for k in sorted(self.calls)) + ")"


def _group_rank(name: str) -> int:
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name).rank()


class _Counting(TorchDispatchMode):
    def __init__(self, counts: CollectiveCounts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c10d = torch.ops._c10d_functional
        if func == c10d.all_to_all_single.default:
            x, _, in_splits, name = args
            row = x.numel() // max(x.shape[0], 1) if x.dim() else 1
            me = _group_rank(name)
            self.counts.add("all_to_all", (x.numel() - in_splits[me] * row) * x.element_size())
        elif func == c10d.all_gather_into_tensor.default:
            x, size = args[0], args[1]
            self.counts.add("all_gather", x.numel() * x.element_size() * (size - 1))
        elif func in COLLECTIVE_OPS or (func.namespace == "c10d" and not func.__name__.startswith("wait")):
            kind = "all_reduce" if "allreduce" in func.__name__ or "all_reduce" in func.__name__ else "other"
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
            self.counts.add(kind, sum(t.numel() * t.element_size() for t in tensors))
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_collectives():
    """Count the collectives this process runs inside the block (calls, and bytes sent to other ranks),
    as they are dispatched, not as planned::

        with count_collectives() as counts:
            for t in timesteps: opt(hidden_states=x, timestep=t, ...)
        counts.calls["all_to_all"], counts.bytes["all_to_all"]
    """
    counts = CollectiveCounts()
    with _Counting(counts):
        yield counts


def plan_reuse_savings(opt: ParallelModel, plan: Plan | None = None) -> CollectiveCounts:
    """The collectives a plan skips, from the plan alone: for every step, each region the step reuses skips
    the collectives that serve it (DSP: a temporal region's enter and exit all-to-alls; Ulysses: a joint
    attention's four all-to-alls and its text all-gather; ring: its exchanges), with their bytes as recorded
    on the sharded graph."""
    plan = plan or opt.current_plan
    per_region: dict[str, list] = {}
    for n in collective_nodes(opt.captured.gm.graph):
        info = collective_info(n)
        if info.region:
            per_region.setdefault(info.region, []).append(info)
    out = CollectiveCounts()
    for ph in plan.phases:
        for path in ph.reused:
            for info in per_region.get(path, []):
                out.add(info.kind, info.bytes_sent)
    return out

