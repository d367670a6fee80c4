"""The sequence-parallel graph passes on one process: each rank's graph is built (no process group is
needed to build it) and checked for its structure, shapes, collectives, elision and errors."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from conftest import captured_case
from graphpass.errors import GraphpassError
from graphpass.passes.elide import WAIT_OP, collective_info, collective_nodes, elide_collectives
from graphpass.passes import parallelize as par
from graphpass.passes.parallelize import ParallelError, choose_mode, parallelize
from graphpass.passes.specialize import eliminate_dead_code, specialize_phase
from graphpass.passes.tag import tag_attention
from graphpass.schedules.base import Action, Phase

C10D = torch.ops._c10d_functional


@pytest.fixture(scope="module")
def captures():
    return {name: captured_case(name)[1:] for name in ("vdt", "latte", "cogvideox")}


@pytest.mark.parametrize("name, frames", [("vdt", (2, 2)), ("latte", (2, 1))])
def test_each_ranks_graph_has_its_frames_and_an_all_to_all_pair_per_temporal_region(captures, name, frames):
    cap, regions = captures[name]
    temporal = [r.path for r in regions if r.kind == "temporal"]
    structures = []
    for rank in range(2):
        sg = parallelize(cap, regions, rank=rank, world_size=2, group_name="0")
        assert sg.frames.sizes == frames
        nodes = list(sg.captured.gm.graph.nodes)
        names = {n.name for n in nodes}
        assert {n.name for n in cap.gm.graph.nodes} <= names  # regions still name their nodes
        colls = collective_nodes(sg.captured.gm.graph)
        infos = [collective_info(c) for c in colls]
        assert sorted((i.region, i.role) for i in infos if i.kind == "all_to_all") == \
            sorted((p, role) for p in temporal for role in ("enter", "exit"))
        assert [(i.kind, i.role) for i in infos if i.kind != "all_to_all"] == [("all_gather", "gather")]
        for c in colls:  # every collective is waited on, and the wait is what the graph reads
            assert [u.target for u in c.users] == [WAIT_OP]
        # local shapes: the video is cut to this rank's frames; the model output is whole again
        video = next(n for n in nodes if n.name.startswith("sp_my_frames"))
        assert video.meta["val"].shape[sg.frame_dim] == frames[rank]
        out = nodes[-1].args[0][0]
        assert tuple(out.meta["val"].shape) == tuple(next(n for n in cap.gm.graph.nodes
                                                          if n.op == "output").args[0][0].meta["val"].shape)
        by_path = {r.path: r for r in sg.regions}
        for p in temporal:  # a temporal region's cached output is this rank's frames after its exit all-to-all
            (spec,) = by_path[p].exit_specs
            assert by_path[p].exits[0] in {c.name for c in nodes}
            glob = next(r for r in regions if r.path == p).exit_specs[0].shape
            assert spec.shape[1] == frames[rank] and spec.shape[0] == glob[0] and spec.shape[2] == glob[2]
        structures.append([(n.op, str(n.target)) for n in nodes])
    # the ranks' graphs differ only in sizes: the same ops in the same order, so elision agrees across ranks
    assert structures[0] == structures[1]


def test_a_reused_temporal_region_loses_both_of_its_all_to_alls(captures):
    cap, regions = captures["vdt"]
    sg = parallelize(cap, regions, rank=1, world_size=2, group_name="0")
    every = {c.name: collective_info(c) for c in collective_nodes(sg.captured.gm.graph)}
    reuse = Phase.of({"blocks.0.temporal_attn": Action.REUSE, "blocks.1.cross_attn": Action.REUSE})
    pg = specialize_phase(sg.captured, sg.regions, reuse, passes=(elide_collectives,))
    kept = {c.name for c in collective_nodes(pg.gm.graph)}
    removed = {n: i for n, i in every.items() if n not in kept}
    assert sorted((i.region, i.role) for i in removed.values()) == [("blocks.0.temporal_attn", "enter"),
                                                                    ("blocks.0.temporal_attn", "exit")]
    # computing everything keeps every collective
    full = specialize_phase(sg.captured, sg.regions, Phase(()), passes=(elide_collectives,))
    assert {c.name for c in collective_nodes(full.gm.graph)} == set(every)
    # dead-code elimination alone keeps collectives (wait_tensor is impure), so the region stays alive
    with pytest.raises(GraphpassError, match="still has live nodes"):
        specialize_phase(sg.captured, sg.regions, reuse)


def test_elide_removes_only_collectives_nobody_reads():
    g = fx.Graph()
    x, y = g.placeholder("x"), g.placeholder("y")
    used = g.call_function(C10D.all_to_all_single.default, (x, [2, 2], [2, 2], "0"))
    used_w = g.call_function(WAIT_OP, (used,))
    out = g.call_function(torch.ops.aten.relu.default, (used_w,))
    scaled = g.call_function(torch.ops.aten.mul.Tensor, (y, 2.0))
    unused = g.call_function(C10D.all_to_all_single.default, (scaled, [2, 2], [2, 2], "0"))
    g.call_function(WAIT_OP, (unused,))
    gathered = g.call_function(C10D.all_gather_into_tensor.default, (x, 2, "0"))
    g.call_function(WAIT_OP, (gathered,))
    g.output((out,))
    assert eliminate_dead_code(g) == 0  # plain DCE treats the collectives as impure
    assert elide_collectives(g) == [unused.name, gathered.name]
    assert [n.name for n in collective_nodes(g)] == [used.name]
    assert scaled not in g.nodes  # what only the removed collective sent is dead too
    assert elide_collectives(g) == []


def test_a_wait_without_its_collective_is_refused():
    g = fx.Graph()
    x = g.placeholder("x")
    w = g.call_function(WAIT_OP, (x,))
    g.output((w,))
    with pytest.raises(GraphpassError, match="not a collective"):
        elide_collectives(g)


def test_joint_attention_model_is_refused_by_dsp(captures):
    cap, regions = captures["cogvideox"]
    with pytest.raises(ParallelError, match="no temporal attention region.*mode='ulysses'"):
        parallelize(cap, regions, rank=0, world_size=2, group_name="0", mode="dsp")


def test_auto_mode_is_dsp_for_spatial_temporal_models_and_ulysses_for_joint_attention(captures):
    assert choose_mode("auto", captures["vdt"][1]) == "dsp"
    assert choose_mode("auto", captures["latte"][1]) == "dsp"
    assert choose_mode("auto", captures["cogvideox"][1]) == "ulysses"
    assert choose_mode("ring", captures["vdt"][1]) == "ring"
    with pytest.raises(ParallelError, match="unknown sequence-parallel mode 'heads'.*auto, dsp, ulysses, ring"):
        choose_mode("heads", captures["vdt"][1])


def _roles(sg) -> dict:
    out: dict = {}
    for c in collective_nodes(sg.captured.gm.graph):
        i = collective_info(c)
        out.setdefault(i.region, []).append((i.kind, i.role))
    return out


def test_ulysses_graph_exchanges_heads_around_each_joint_attention_and_reuse_elides_them(captures):
    """CogVideoX (5 text tokens before 3 frames of 16 video tokens): per joint attention, q, k, v switch
    from sequence to heads (3 all-to-alls), the video tokens switch back (1), the text tokens' heads are
    all-gathered (1); the text stays whole on every rank. A phase that reuses both joint attentions keeps
    only the output gather."""
    cap, regions = captures["cogvideox"]
    joint = [r.path for r in regions if r.kind == "joint"]
    structures = []
    for rank in range(2):
        sg = parallelize(cap, regions, rank=rank, world_size=2, group_name="0", mode="ulysses")
        assert (sg.mode, sg.frames.sizes) == ("ulysses", (2, 1))
        roles = _roles(sg)
        assert roles.pop("") == [("all_gather", "gather")]
        assert set(roles) == set(joint)
        for got in roles.values():
            assert sorted(got) == sorted([("all_to_all", "enter")] * 3 + [("all_to_all", "exit"),
                                                                          ("all_gather", "exit")])
        by_path = {r.path: r for r in sg.regions}
        text, video = by_path[joint[0]].exit_specs  # (encoder, hidden) outputs of the attention
        assert text.shape == (2, 5, 16) and video.shape == (2, 16 * (2, 1)[rank], 16)
        reuse = Phase.of(dict.fromkeys(joint, Action.REUSE))
        pg = specialize_phase(sg.captured, sg.regions, reuse, passes=(elide_collectives,))
        assert [collective_info(c).role for c in collective_nodes(pg.gm.graph)] == ["gather"]
        structures.append([(n.op, str(n.target)) for n in sg.captured.gm.graph.nodes])
    assert structures[0] == structures[1]  # same ops on every rank: elision decides alike


def test_ulysses_falls_back_to_ring_when_heads_are_fewer_than_ranks(captures):
    """CogVideoX-tiny has 2 heads: on 3 ranks each joint attention passes keys and values round the ring
    (2 exchanges) instead of splitting heads."""
    cap, regions = captures["cogvideox"]
    sg = parallelize(cap, regions, rank=1, world_size=3, group_name="0", mode="ulysses")
    roles = _roles(sg)
    roles.pop("")
    assert roles and all(got == [("all_to_all", "ring")] * 2 for got in roles.values())


def test_sharding_rules_are_a_table(captures, monkeypatch):
    """Without its entry an op is refused with an error that names it; the entry back, it shards again."""
    cap, regions = captures["vdt"]
    norm = next(r for r in par.RULES if r.name == "layer_norm")
    monkeypatch.setattr(par, "RULES", tuple(r for r in par.RULES if r is not norm))
    with pytest.raises(ParallelError, match=r"layer_norm.*no sharding rule for this op"):
        parallelize(cap, regions, rank=0, world_size=2, group_name="0")
    monkeypatch.setattr(par, "RULES", par.RULES + (norm,))
    assert parallelize(cap, regions, rank=0, world_size=2, group_name="0").frames.sizes == (2, 2)


def test_more_ranks_than_frames_is_refused(captures):
    cap, regions = captures["vdt"]
    with pytest.raises(ParallelError, match="4 frames cannot be split over 8 ranks"):
        parallelize(cap, regions, rank=0, world_size=8, group_name="0")


def test_attention_over_frames_outside_a_temporal_region_is_refused(captures):
    """Tagged as spatial, VDT's second temporal attention would attend over frames on their shards: an
    error that names the attention op, not a wrong result."""
    cap, _ = captures["vdt"]
    regions = tag_attention(cap, kinds={"blocks.1.temporal_attn": "spatial"})
    with pytest.raises(ParallelError, match=r"scaled_dot_product_attention.*blocks\.1\.temporal_attn.*mixes"):
        parallelize(cap, regions, rank=0, world_size=2, group_name="0")
