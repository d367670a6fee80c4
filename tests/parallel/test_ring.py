"""Ring attention on 2 CPU ranks (gloo): SequenceParallel(mode="ring") on diffusers Wan (3 heads, 45
tokens), CogVideoX (text before the video) and HunyuanVideo (text after it, padded text masked), against
single-process runs, with and without PAB.

One spawn of two processes (tests/parallel/_workers.py: ``parallel_checks``, shared with the other spawned
tests; the ring reuses the Ulysses tests' captures and references), bounded by a timeout. Ring attention
computes softmax blockwise and merges the blocks by log-sum-exp, so it matches SDPA up to rounding:
tolerance 1e-5 relative to the output's largest magnitude.
"""
from __future__ import annotations

import pytest

from _workers import JOINT_MODULES, RING_MODELS, parallel_results

REL = 1e-5


@pytest.fixture(scope="module")
def ranks():
    return parallel_results("ring")


@pytest.mark.parametrize("name", RING_MODELS)
@pytest.mark.parametrize("label", ["plain", "pab"])
def test_ring_outputs_equal_single_process(ranks, name, label):
    for r in ranks:
        assert r[name]["mode"] == "ring"
        assert r[name][label]["rel"] <= REL, (name, label, r[name]["rank"], r[name][label]["rel"])


@pytest.mark.parametrize("name", RING_MODELS)
def test_each_joint_attention_passes_its_keys_and_values_once_round_the_ring(ranks, name):
    """On 2 ranks: one exchange per joint attention (keys and values in one buffer), queries never move,
    all heads stay on every rank; the output is gathered once at the end."""
    for r in ranks:
        d = r[name]
        per_region: dict = {}
        for region, role, kind in d["roles"]:
            per_region.setdefault(region, []).append((kind, role))
        assert set(per_region) - {""} == set(JOINT_MODULES[name])
        for region in JOINT_MODULES[name]:
            assert per_region[region] == [("all_to_all", "ring")]
        assert per_region[""] == [("all_gather", "gather")]
        assert d["attention_heads"] == d["model_heads"]


@pytest.mark.parametrize("name", RING_MODELS)
def test_ring_collectives_counted_equal_the_plan_and_reuse_runs_none(ranks, name):
    for r in ranks:
        d = r[name]
        for counted, predicted in zip(d["pab"]["per_call"], d["predicted"]):
            for kind in ("all_to_all", "all_gather"):
                assert counted["calls"].get(kind, 0) == predicted["calls"].get(kind, 0)
                assert counted["bytes"].get(kind, 0) == predicted["bytes"].get(kind, 0)
        assert d["all_reused_phase"] == [("all_gather", "gather", "")]
        reusing = [i for i, reused in enumerate(d["reused"]) if set(d["attention"]) <= set(reused)]
        assert reusing and all("all_to_all" not in d["pab"]["per_call"][i]["calls"] for i in reusing)
