"""Tagging attention regions by kind from graph structure, region by region, on the three tiny models."""
from __future__ import annotations

import pytest
import torch

from conftest import DDIM_50, make_case
from graphpass import PAB, TaggingError
from graphpass.passes.capture import capture
from graphpass.passes.tag import tag_attention


@pytest.fixture(scope="module")
def captured():
    """name -> (case, CapturedGraph); captured once for the module."""
    out = {}
    for name in ("vdt", "latte", "cogvideox"):
        case = make_case(name)
        out[name] = (case, capture(case.model, case.kwargs()))
    return out


def _kinds(regions):
    return {r.path: r.kind for r in regions}


def test_latte_kinds(captured):
    regions = tag_attention(captured["latte"][1])
    expected = {}
    for i in range(2):
        expected |= {f"transformer_blocks.{i}.attn1": "spatial", f"transformer_blocks.{i}.attn2": "cross",
                     f"transformer_blocks.{i}.ff": "mlp",
                     f"temporal_transformer_blocks.{i}.attn1": "temporal",
                     f"temporal_transformer_blocks.{i}.ff": "mlp"}
    assert _kinds(regions) == expected
    by_path = {r.path: r for r in regions}
    # temporal from structure (sequence = the 3 frames, batch = 2 x 16 tokens), not from the module name
    t = by_path["temporal_transformer_blocks.0.attn1"]
    assert not t.reason.startswith("by name") and t.attention_shape[-2] == 3 and t.attention_shape[0] == 2 * 16
    s = by_path["transformer_blocks.0.attn1"]
    assert s.attention_shape[-2] == 16 and s.attention_shape[0] == 2 * 3
    # every region has one exit: the attention module's output, before the block's gate
    assert all(len(r.exits) == 1 for r in regions)
    assert [r.block for r in regions if r.kind == "cross"] == [0, 1]


def test_latte_temporal_blocks_get_the_temporal_range(captured):
    """'temporal_transformer_blocks.0.attn1' contains 'transformer_blocks': a name match that tries spatial first
    would give it the spatial range. graphpass tags it temporal from its layout, so the Latte preset (spatial 2,
    temporal 3, window (100, 800)) reuses it at the calls of the window whose counter is not a multiple of 3."""
    regions = tag_attention(captured["latte"][1])
    plan = PAB.preset("latte").plan(regions, DDIM_50)

    def reused_at(path):
        return [i for i, ph in enumerate(plan.phases) if path in ph.reused]

    in_window = [i for i, t in enumerate(DDIM_50) if 100 < t < 800]
    assert reused_at("temporal_transformer_blocks.0.attn1") == [i for i in in_window if i % 3]
    assert reused_at("transformer_blocks.0.attn1") == [i for i in in_window if i % 2]


def test_cogvideox_kinds(captured):
    regions = tag_attention(captured["cogvideox"][1])
    assert _kinds(regions) == {p: k for i in range(2) for p, k in
                               ((f"transformer_blocks.{i}.attn1", "joint"), (f"transformer_blocks.{i}.ff", "mlp"))}
    joint = regions[0]
    # one sequence per sample: 5 text + 3 frames x 16 tokens; two exits (text part, video part)
    assert joint.attention_shape[0] == 2 and joint.attention_shape[-2] == 5 + 3 * 16
    assert [s.shape for s in joint.exit_specs] == [(2, 5, 16), (2, 48, 16)]
    assert joint.cache_keys == ["transformer_blocks.0.attn1:0", "transformer_blocks.0.attn1:1"]


def test_vdt_kinds(captured):
    regions = tag_attention(captured["vdt"][1])
    expected = {f"blocks.{i}.{name}": kind for i in range(2) for name, kind in
                (("spatial_attn", "spatial"), ("temporal_attn", "temporal"), ("cross_attn", "cross"), ("mlp", "mlp"))}
    assert _kinds(regions) == expected
    assert [r.path for r in regions] == list(expected)  # graph order: block by block
    for r in regions:
        if r.kind != "mlp":
            assert not r.reason.startswith("by name"), r


def test_regions_are_disjoint_and_account_for_their_flops(captured):
    for name, (_, cap) in captured.items():
        regions = tag_attention(cap)
        seen = set()
        for r in regions:
            assert not seen & set(r.nodes), name
            seen |= set(r.nodes)
            assert r.flops > 0 and set(r.exits) <= set(r.nodes)


def test_kinds_override_by_glob(captured):
    cap = captured["latte"][1]
    regions = tag_attention(cap, kinds={"temporal_transformer_blocks.*.attn1": "spatial",
                                        "transformer_blocks.1.ff": "cross"})
    kinds = _kinds(regions)
    assert kinds["temporal_transformer_blocks.0.attn1"] == kinds["temporal_transformer_blocks.1.attn1"] == "spatial"
    assert kinds["transformer_blocks.1.ff"] == "cross"
    assert kinds["transformer_blocks.0.ff"] == "mlp" and kinds["transformer_blocks.0.attn1"] == "spatial"
    over = [r for r in regions if r.reason == "set by kinds override"]
    assert sorted(r.path for r in over) == ["temporal_transformer_blocks.0.attn1",
                                            "temporal_transformer_blocks.1.attn1", "transformer_blocks.1.ff"]
    with pytest.raises(TaggingError, match="kind must be one of"):
        tag_attention(cap, kinds={"transformer_blocks.*.attn1": "diagonal"})


class _NoAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, hidden_states, timestep):
        return self.proj(hidden_states) * timestep[:, None, None, None, None]


def test_model_without_attention_raises():
    x = torch.randn(2, 3, 4, 4, 8)
    cap = capture(_NoAttention(), dict(hidden_states=x, timestep=torch.ones(2)))
    with pytest.raises(TaggingError, match="no attention op"):
        tag_attention(cap)
