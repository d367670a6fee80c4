"""Sequence-parallel (DSP) inference on 2 CPU ranks (gloo), against single-process runs.

All checks but the rank deaths run in ONE spawn of two processes (tests/parallel/_workers.py:
``parallel_checks``, shared with the other spawned tests), bounded by a timeout so that a hang fails
instead of blocking; the tests below read its measurements.

Tolerance: 1e-5 (the ranks run the same kernels on slices of the same tensors; attention over frames sees
all frames after the all-to-all, so results match up to summation order).
"""
from __future__ import annotations

import re
import signal

import pytest

from _launch import launch_allowing_exits
from _workers import parallel_results, rank_death_checks, rank_death_checks_unchecked

ATOL = 1e-5


@pytest.fixture(scope="module")
def ranks():
    return parallel_results("dsp")


@pytest.mark.parametrize("name", ["vdt", "latte"])
@pytest.mark.parametrize("label", ["dsp", "dsp+pab"])
def test_parallel_outputs_equal_single_process(ranks, name, label):
    """Whole outputs on every rank equal eager (no reuse) or single-process PAB (with reuse)."""
    for r in ranks:
        got = r["dsp"][name, label]
        assert got["shapes_match"]
        assert got["diff"] <= ATOL, (r["dsp"]["rank"], got["diff"])


def test_frames_split_unevenly_for_latte(ranks):
    """Latte has 3 frames: rank 0 takes 2, rank 1 takes 1 (all-to-alls with per-rank split sizes)."""
    for r in ranks:
        assert r["dsp"]["latte"]["frames"] == (2, 1)
        assert r["dsp"]["vdt"]["frames"] == (2, 2)


@pytest.mark.parametrize("name", ["vdt", "latte"])
def test_collectives_counted_at_run_time_match_graphs_and_plan(ranks, name):
    for r in ranks:
        d = r["dsp"]
        info, plain, pab = d[name], d[name, "dsp"]["counted"], d[name, "dsp+pab"]["counted"]
        steps = 10
        # The sharded graph: an enter and an exit all-to-all per temporal region, one all-gather of the output.
        assert info["roles"] == sorted(["enter", "exit"] * info["temporal_regions"] + ["gather"])
        # Without reuse: every step runs all of them.
        assert plain["calls"]["all_to_all"] == 2 * info["temporal_regions"] * steps
        assert plain["calls"]["all_gather"] == steps
        # With PAB: what ran is what the phase graphs hold, step by step...
        for kind in ("all_to_all", "all_gather"):
            assert pab["calls"][kind] == info["predicted"]["calls"][kind]
            assert pab["bytes"][kind] == info["predicted"]["bytes"][kind]
        # ...and the all-to-alls fell by what the plan predicts: 2 per reused temporal region and step.
        saved = info["plan_savings"]
        assert info["temporal_reuses"] > 0
        assert saved["calls"]["all_to_all"] == 2 * info["temporal_reuses"]
        assert plain["calls"]["all_to_all"] - pab["calls"]["all_to_all"] == saved["calls"]["all_to_all"]
        assert plain["bytes"]["all_to_all"] - pab["bytes"]["all_to_all"] == saved["bytes"]["all_to_all"]
        assert pab["bytes"]["all_gather"] == plain["bytes"]["all_gather"]  # reuse does not touch the output
        # one agreement all-reduce per call, nothing else communicates
        assert set(pab["calls"]) == {"all_to_all", "all_gather", "all_reduce"}
        assert pab["calls"]["all_reduce"] == steps


@pytest.mark.parametrize("name", ["vdt", "latte"])
def test_each_rank_caches_only_its_frames(ranks, name):
    """Mid-generation, every cached region output holds exactly this rank's share of the frames."""
    for r in ranks:
        d = r["dsp"]
        share = d[name]["frames"][d["rank"]] / sum(d[name]["frames"])
        cache = d[name, "cache"]
        assert any("temporal" in k or "attn1" in k for k, _, _ in cache)
        for key, local, whole in cache:
            assert local == whole * share, key


def test_keep_sharded_returns_this_ranks_frames_without_gathering(ranks):
    for r in ranks:
        k = r["dsp"]["keep_sharded"]
        assert k["local_shape"][2] == (2, 1)[r["dsp"]["rank"]]  # Latte (B, C, F, H, W): this rank's frames
        assert k["diff"] <= ATOL and k["gathered_diff"] <= ATOL
        assert "all_gather" not in k["counted"]["calls"]


def test_inspect_lists_collectives_kept_and_removed_per_phase(ranks):
    text = ranks[0]["dsp"]["inspect"]
    assert "communication per step (rank 0 of 2" in text
    rows = re.findall(r"^  P\d+ +(\d+) +([\d.]+ \w+) +(\d+) +([\d.]+ \w+)  (.*)$", text, re.M)
    assert len(rows) >= 2, text
    for kept, _, removed, _, around in rows:  # every reused temporal region loses both its all-to-alls
        regions = [p for p in around.split(", ") if p.endswith("temporal_attn")]
        assert int(removed) == 2 * len(regions)
        assert int(kept) + int(removed) == 2 * 2 + 1  # 2 temporal regions and the output gather
    assert any(int(removed) == 4 for _, _, removed, _, _ in rows)


def test_a_rank_that_raises_fails_every_rank_with_a_clear_error(ranks):
    for r in ranks:
        e = r["dsp"]["errors"]
        assert e["bad_input"] is not None and "rank(s) [1]" in e["bad_input"] and "InputError" in e["bad_input"]
        assert e["after_error_diff"] <= ATOL  # nothing ran, the ranks are still in step
        assert e["out_of_step"] is not None and "out of step" in e["out_of_step"] and "881..981" in e["out_of_step"]


def test_ranks_given_different_inputs_fail_unless_the_check_is_off(ranks):
    for r in ranks:
        e = r["dsp"]["errors"]
        assert e["per_rank_seed"] is not None
        assert "given different values of hidden_states" in e["per_rank_seed"]
        assert "check_inputs=False" in e["per_rank_seed"]
        assert "timestep" not in e["per_rank_seed"].split("values of")[1].split("(")[0]  # only what differs
        assert e["unchecked"] is None  # turned off: the call ran


@pytest.mark.parametrize("checks", [rank_death_checks, rank_death_checks_unchecked], ids=["checked", "unchecked"])
def test_a_rank_killed_mid_generation_ends_the_others_clearly_and_soon(checks):
    """Killed before the third call: rank 0 learns it in the call's agreement all-reduce (checked) or in the
    phase graph's first all-to-all (unchecked calls)."""
    results, exits = launch_allowing_exits(checks, world_size=2, timeout=150, preload=("_workers",))
    assert exits[1] == -signal.SIGKILL and 1 not in results
    assert exits[0] == 0
    r = results[0]
    assert r["third"] is not None and "another rank stopped during call 3 of the generation" in r["third"]
    assert "restart every rank" in r["third"] and "torch.distributed said:" in r["third"]
    assert r["third_seconds"] < 30  # well inside the group's 60 s timeout: a dead peer is noticed at once
    assert r["fourth"] == r["third"] and r["fourth_seconds"] < 1  # later calls fail at once, without the group


def test_mismatched_world_size_fails_every_rank(ranks):
    for r in ranks:
        msg = r["dsp"]["errors"]["world_size"]
        assert msg is not None and "world_size=3" in msg and "2 ranks" in msg


def test_reduce_metric_gives_every_rank_the_maximum(ranks):
    for r in ranks:
        assert r["dsp"]["reduce_metric"] == (1.5, [1.0, 0.0])


def test_ulysses_joint_attention_matches_and_reuse_elides_all_four_all_to_alls(ranks):
    for r in ranks:
        u = r["ulysses"]
        assert u["kinds"] == ["joint", "mlp"]
        assert u["eager_diff"] <= ATOL and u["pab_diff"] <= ATOL
        assert u["collectives"] == 4 * 2  # q, k, v and output, in each of 2 blocks
        computed = 0
        for ph in u["phases"]:
            assert ph["removed"] == 4 * len(ph["reused"])
            computed += ph["steps"] * (2 - len(ph["reused"]))
        assert any(ph["reused"] for ph in u["phases"])
        assert u["counted"]["calls"] == {"all_to_all": 4 * computed}


def test_input_checksum_sees_one_ulp_and_ignores_memory_layout():
    """The per-call input check's checksum, without a process group: exact on the bytes."""
    import torch

    from graphpass.runtime.parallel import checksum, lost_rank

    x = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y.view(-1)[777] = torch.nextafter(y.view(-1)[777], torch.tensor(float("inf")))  # one ulp
    assert checksum(x) == checksum(x.clone()) and checksum(x) != checksum(y)
    assert checksum(x.transpose(1, 2).contiguous().transpose(1, 2)) == checksum(x)  # same values, other strides
    assert checksum(x.flip(0)) != checksum(x)  # same bytes, other order
    assert lost_rank(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1"))
    assert not lost_rank(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
