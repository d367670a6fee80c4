"""Residual caching (AdaCache) on each rank's graph, built on one process (no process group is needed to
build it): the chain of blocks carried from the whole graph to the sharded one, the collectives a reuse step
elides, the all-reduce of a measuring step, and the refusals."""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from conftest import captured_case
from graphpass import AdaCache, FrozenAdaCache, MoReg, ParallelError
from graphpass.passes.elide import collective_info, collective_nodes, describe_collectives
from graphpass.passes.parallelize import parallelize
from graphpass.runtime.parallel import sharded_target
from graphpass.schedules.base import Action
from graphpass.techniques import technique_for
from graphpass.techniques.residual import span_phase

C10D = torch.ops._c10d_functional
MODES = {"vdt": "dsp", "cogvideox": "ulysses"}


@functools.lru_cache(maxsize=None)
def sharded(name: str, rank: int = 0):
    _, cap, regions = captured_case(name)
    return cap, regions, parallelize(cap, regions, rank=rank, world_size=2, group_name="7", mode=MODES[name])


def _kinds(pg) -> list[tuple[str, str]]:
    return sorted((collective_info(n).kind, collective_info(n).role) if collective_info(n) else
                  (str(n.target), "") for n in collective_nodes(pg.gm.graph))


@pytest.mark.parametrize("name", list(MODES))
def test_the_chain_of_blocks_has_the_whole_graphs_nodes_and_this_ranks_shapes(name):
    cap, regions, sg = sharded(name)
    schedule = AdaCache.preset("slow")
    whole = technique_for(schedule).target(cap, regions, schedule)
    local = sharded_target(schedule, sg, cap, regions, "7")
    assert local.span.streams == whole.span.streams and local.span.blocks == whole.span.blocks
    share = sg.frames.sizes[0] / sg.frames.total
    for w, s in zip(whole.span.specs, local.span.specs):
        assert torch.Size(s.shape).numel() == torch.Size(w.shape).numel() * share
    assert local.regions == [local.span.region] and local.span.region.exit_specs == local.span.specs
    assert local.metric.path == whole.metric.path and local.metric.group == "7"
    assert whole.metric.group is None


@pytest.mark.parametrize("name", list(MODES))
def test_a_reuse_step_keeps_only_the_output_gather_and_a_measuring_step_adds_one_all_reduce(name):
    cap, regions, sg = sharded(name)
    schedule = AdaCache.preset("slow")
    target = sharded_target(schedule, sg, cap, regions, "7")
    spec = technique_for(schedule).specialize
    full = _kinds(spec(sg.captured, target, span_phase(target, Action.STORE, "store")))
    reuse = spec(sg.captured, target, span_phase(target, Action.REUSE))
    measure = spec(sg.captured, target, span_phase(target, Action.STORE, "measure"))
    assert full == sorted((collective_info(n).kind, collective_info(n).role)
                          for n in collective_nodes(sg.captured.gm.graph))  # a compute step keeps them all
    assert _kinds(reuse) == [("all_gather", "gather")]
    added = [n for n in collective_nodes(measure.gm.graph) if collective_info(n) is None]
    assert [n.target for n in added] == [C10D.all_reduce.default]
    (ar,) = added
    assert ar.args[1:] == ("sum", "7")  # the sums, over the sequence-parallel group
    assert tuple(ar.args[0].meta["val"].shape) == (2, 2)  # (numerator, denominator) x 2 samples
    assert describe_collectives(measure.gm.graph, region=target.metric.path, role="metric") == [ar.name]
    assert collective_info(ar).bytes_sent == 16 and collective_info(ar).kind == "all_reduce"


def test_frozen_adacache_outputs_unit_reuse_elides_the_temporal_pairs():
    """cache_unit="outputs": the attention/MLP outputs are cached (DSP: a temporal region's after its exit
    all-to-all) and a reuse step re-gates them; the all-to-alls around reused temporal attention go."""
    cap, regions, sg = sharded("vdt")
    schedule = FrozenAdaCache("CCRC", cache_unit="outputs")
    target = sharded_target(schedule, sg, cap, regions, "7")
    by_path = {r.path: r for r in sg.regions}
    assert all(r is by_path[r.path] for r in target.span.inner)  # the local regions, exits after the all-to-all
    reuse = technique_for(schedule).specialize(sg.captured, target, span_phase(target, Action.REUSE))
    assert _kinds(reuse) == [("all_gather", "gather")]


def test_held_says_which_values_each_rank_holds_in_part():
    cap, regions, sg = sharded("cogvideox")
    target = sharded_target(AdaCache.preset("slow"), sg, cap, regions, "7")
    assert {sg.held[n] for n in target.metric.block_io} == {"split"}
    assert sg.held["encoder_hidden_states"] == "whole"  # the text tokens: whole on every rank
    assert "segment" in sg.held.values()  # text concatenated with this rank's video tokens in attention


def test_a_metric_residual_with_whole_text_tokens_beside_split_ones_is_refused():
    cap, regions, sg = sharded("cogvideox")
    target = sharded_target(AdaCache.preset("slow"), sg, cap, regions, "7")
    mixed = dataclasses.replace(sg, held={**sg.held, **dict.fromkeys(target.metric.block_io, "segment")})
    with pytest.raises(ParallelError, match=r"holds whole text tokens beside this rank's part of the video.*metric_at="):
        sharded_target(AdaCache.preset("slow"), mixed, cap, regions, "7")


def test_moreg_is_refused():
    cap, regions, sg = sharded("vdt")
    with pytest.raises(ParallelError, match=r"MoReg .* neighboring frames.*moreg=None"):
        sharded_target(AdaCache(moreg=MoReg(window=(1, 10))), sg, cap, regions, "7")
