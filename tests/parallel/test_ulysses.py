"""Ulysses sequence parallelism on 2 CPU ranks (gloo) for joint-attention video DiTs, against single-process
runs: diffusers Wan, CogVideoX (with and without rotary embeddings) and HunyuanVideo (tiny random configs),
and VDT forced into Ulysses mode.

All checks run in one spawn of two processes (tests/parallel/_workers.py: ``parallel_checks``, shared with
the other spawned tests), bounded by a timeout; the tests read its measurements. Without reuse the outputs
are compared with the eager model; with PAB with a module-level PAB on the eager model
(tests/reference_pab.py). Tolerance: 1e-5 relative to the output's largest magnitude (each rank runs the
same kernels on a slice of the tokens or heads).
"""
from __future__ import annotations

import pytest

from _workers import JOINT_MODULES, TEXT_MODELS, ULYSSES_MODELS, parallel_results

REL = 1e-5


@pytest.fixture(scope="module")
def ranks():
    return parallel_results("ulysses")


@pytest.mark.parametrize("name", ULYSSES_MODELS)
@pytest.mark.parametrize("label", ["plain", "pab"])
def test_ulysses_outputs_equal_single_process(ranks, name, label):
    for r in ranks:
        assert r[name]["mode"] == "ulysses"
        assert r[name][label]["rel"] <= REL, (name, label, r[name]["rank"], r[name][label]["rel"])


def test_uneven_tokens_and_heads_split_exactly(ranks):
    """wan-odd: 3 frames of 15 tokens (45 tokens: 30 + 15) and 3 heads (2 + 1) on 2 ranks."""
    for r in ranks:
        d = r["wan-odd"]
        assert d["frames"] == (2, 1)
        assert d["model_heads"] == [3]
        assert d["attention_heads"] == [(2, 1)[d["rank"]]]  # this rank's heads, attending over all tokens


@pytest.mark.parametrize("name", ULYSSES_MODELS)
def test_every_attention_over_the_split_sequence_gets_its_all_to_alls(ranks, name):
    """q, k, v enter (sequence -> heads) and the output leaves (heads -> sequence) by all-to-all; the text
    tokens a joint attention carries (CogVideoX, HunyuanVideo) leave by one all-gather of their heads."""
    text = name in TEXT_MODELS
    for r in ranks:
        d = r[name]
        per_region: dict = {}
        for region, role, kind in d["roles"]:
            per_region.setdefault(region, []).append((kind, role))
        regions = {k for k in per_region if k}
        if name == "vdt":
            assert regions == {p for p in d["attention"] if "temporal" in p}  # spatial attention needs none
        else:
            assert regions == set(JOINT_MODULES[name]) == set(d["attention"])
        for region in regions:
            want = [("all_to_all", "enter")] * 3 + [("all_to_all", "exit")] + [("all_gather", "exit")] * text
            assert sorted(per_region[region]) == sorted(want), region
        assert per_region[""] == [("all_gather", "gather")]  # only the model output is gathered


@pytest.mark.parametrize("name", ULYSSES_MODELS)
def test_collectives_counted_at_run_time_equal_the_plan(ranks, name):
    for r in ranks:
        d = r[name]
        for counted, predicted in zip(d["pab"]["per_call"], d["predicted"]):
            for kind in ("all_to_all", "all_gather"):
                assert counted["calls"].get(kind, 0) == predicted["calls"].get(kind, 0)
                assert counted["bytes"].get(kind, 0) == predicted["bytes"].get(kind, 0)
            assert counted["calls"]["all_reduce"] == 1  # the per-call agreement, nothing else
        full = sum(1 for kind, _ in d["full_phase"] if kind == "all_to_all")
        assert all(c["calls"]["all_to_all"] == full for c in d["plain"]["per_call"])
        # what reuse saved, counted, equals what the plan says the reused regions' collectives carry
        for kind in ("all_to_all", "all_gather"):
            for what in ("calls", "bytes"):
                plain = sum(c[what].get(kind, 0) for c in d["plain"]["per_call"])
                pab = sum(c[what].get(kind, 0) for c in d["pab"]["per_call"])
                assert plain - pab == d["plan_savings"][what].get(kind, 0), (kind, what)
        assert d["plan_savings"]["calls"]["all_to_all"] > 0


@pytest.mark.parametrize("name", [n for n in ULYSSES_MODELS if n != "vdt"])
def test_a_phase_reusing_every_joint_attention_runs_no_all_to_all(ranks, name):
    for r in ranks:
        d = r[name]
        assert d["all_reused_phase"] == [("all_gather", "gather", "")]  # the output gather only
        reusing = [i for i, reused in enumerate(d["reused"]) if set(d["attention"]) <= set(reused)]
        assert reusing
        for i in reusing:
            assert "all_to_all" not in d["pab"]["per_call"][i]["calls"]


@pytest.mark.parametrize("name", ULYSSES_MODELS)
def test_each_rank_caches_only_its_tokens(ranks, name):
    """Cached video-token outputs hold this rank's share; cached text-token outputs are whole."""
    for r in ranks:
        d = r[name]
        share = d["frames"][d["rank"]] / sum(d["frames"])
        assert d["cache"]
        for key, local, whole in d["cache"]:
            assert local == whole * share or (local == whole and name in TEXT_MODELS), key
        assert any(local < whole for _, local, whole in d["cache"])


def test_inspect_lists_the_collectives_a_reuse_removes(ranks):
    """CogVideoX: the phase reusing both joint attentions keeps the output gather and removes, per
    attention, 3 enter and 1 exit all-to-alls and the text all-gather."""
    text = ranks[0]["cogvideox"]["inspect"]
    assert "communication per step (rank 0 of 2" in text
    assert "transformer_blocks.0.attn1, transformer_blocks.1.attn1" in text
    lines = [ln for ln in text.splitlines() if "kept: all_gather/gather 1" in ln and "removed: -" not in ln]
    assert len(lines) == 1, text
    for part in ("all_to_all/enter 6 ", "all_to_all/exit 2 ", "all_gather/exit 2 "):
        assert part in lines[0].split("removed:")[1], lines[0]


def test_wan_matches_diffusers_context_parallel(ranks):
    """diffusers' own Ulysses (ContextParallelConfig(ulysses_degree=2), hooks on the eager model) on the same
    2 ranks gives the same outputs."""
    for r in ranks:
        assert r["wan"]["diffusers_cp"] <= REL
