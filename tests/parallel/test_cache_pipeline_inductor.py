"""Sequence parallelism on 2 CPU ranks (gloo) with residual caching, in a diffusers pipeline and compiled by
Inductor, against single-process runs and references written independently of graphpass.

AdaCache (residual caching of the whole chain of blocks) against single-process runs and a module-level
reference: VDT split by frames (DSP) and diffusers CogVideoX split by tokens
(Ulysses; its text tokens whole on every rank).

All checks run in one spawn of two processes (tests/parallel/_workers.py: ``parallel_checks``, shared with
the DSP, Ulysses and ring tests). Fixed decisions
(FrozenAdaCache) are compared with the reference that wraps each block's forward (reuse: input + kept
residual; tests/adacache/adacache_helpers.py). Adaptive decisions (AdaCache) must be the same on both ranks
and the same as on one process, with the same distances: each rank measures its part of the residual and
the numerator and denominator sums are all-reduced inside the measuring graph. Tolerance: 1e-5 relative
to the output's largest magnitude.

``optimize_pipeline(pipe, PAB, parallel=SequenceParallel())`` on the tiny CogVideoX pipeline is compared
with the single-process pipeline under diffusers' own PAB hook; ``backend="inductor"`` with Ulysses on tiny
Wan with a module-level PAB on the eager model (tests/reference_pab.py).
"""
from __future__ import annotations

import pytest

from _workers import FROZEN_DECISIONS, INDUCTOR_TIMESTEPS, RESIDUAL_BLOCKS, parallel_results

REL = 1e-5
MODES = {"vdt": "dsp", "cogvideox": "ulysses"}


@pytest.fixture(scope="module")
def ranks():
    return parallel_results("cache_pipeline_inductor")


@pytest.mark.parametrize("name", RESIDUAL_BLOCKS)
def test_fixed_decisions_equal_the_module_level_reference(ranks, name):
    for r in ranks:
        d = r[name]
        assert d["mode"] == MODES[name]
        assert d["frozen"]["decisions"] == FROZEN_DECISIONS
        assert d["frozen"]["rel"] <= REL, (name, d["rank"], d["frozen"]["rel"])
        assert d["frozen"]["eager_rel"] > 1e-3  # reuse changed the outputs: the comparison can fail


@pytest.mark.parametrize("name", RESIDUAL_BLOCKS)
def test_adaptive_decisions_are_the_single_process_decisions_on_every_rank(ranks, name):
    runs = [r[name]["adaptive"] for r in ranks]
    decisions = runs[0]["decisions"]
    assert "R" in decisions and "C" in decisions[1:-2], decisions  # the codebook both reuses and computes
    for a in runs:
        assert a["decisions"] == decisions == a["single_decisions"]
        assert a["metric_reads"] == len(a["distances"]) > 0
        for got, want in zip(a["distances"], a["single_distances"], strict=True):
            assert got == pytest.approx(want, rel=1e-5)
        assert a["rel"] <= REL and a["single_rel"] <= REL, (name, a["rel"], a["single_rel"])
        assert a["metric_held"] == "split"  # each rank measured its part of the residual
        assert a["replay"] == ("ParallelModel", decisions)  # frozen and replayed on the ranks: the same run
        assert a["replay_diff"] == 0.0


@pytest.mark.parametrize("name", RESIDUAL_BLOCKS)
@pytest.mark.parametrize("run", ["frozen", "adaptive"])
def test_collectives_counted_per_call_equal_the_phase_graphs(ranks, name, run):
    """A reuse step skips every block, and with them every collective inside (DSP's pairs around temporal
    attention, Ulysses' all-to-alls and text all-gathers): only the output gather runs. A measuring step
    adds one all-reduce (the distance sums) to the call's agreement all-reduce."""
    for r in ranks:
        d = r[name][run]
        decisions = d["decisions"]
        assert len(d["per_call"]) == len(d["predicted"]) == len(decisions)
        for i, (counted, predicted) in enumerate(zip(d["per_call"], d["predicted"])):
            for kind in ("all_to_all", "all_gather", "all_reduce"):
                extra = 1 if kind == "all_reduce" else 0  # the per-call agreement
                assert counted["calls"].get(kind, 0) == predicted["calls"].get(kind, 0) + extra, (i, kind)
                if kind != "all_reduce":
                    assert counted["bytes"].get(kind, 0) == predicted["bytes"].get(kind, 0), (i, kind)
            if decisions[i] == "R":
                assert counted["calls"] == {"all_gather": 1, "all_reduce": 1}, (i, counted)
            else:
                assert counted["calls"]["all_to_all"] > 0
        measuring = [p for p in d["predicted"] if p["calls"].get("all_reduce")]
        assert bool(measuring) == (run == "adaptive")
        assert all(p["calls"]["all_reduce"] == 1 for p in measuring)


@pytest.mark.parametrize("name", RESIDUAL_BLOCKS)
def test_each_rank_caches_its_part_of_the_residual(ranks, name):
    """The cached residual of the video tokens holds this rank's frames (VDT) or tokens (CogVideoX)."""
    for r in ranks:
        d = r[name]
        share = d["frames"][d["rank"]] / sum(d["frames"])
        ((key, local, whole),) = d["frozen"]["cache"]
        assert local == whole * share < whole, key


def test_inspect_lists_what_a_reuse_step_removes(ranks):
    text = ranks[0]["cogvideox"]["inspect"]
    assert "communication per step (rank 0 of 2" in text
    lines = [ln for ln in text.splitlines() if "kept: all_gather/gather 1 (" in ln and "removed: -" not in ln]
    assert len(lines) == 1, text  # the reuse phase: only the output gather is kept
    for part in ("all_to_all/enter 6 ", "all_to_all/exit 2 ", "all_gather/exit 2 "):
        assert part in lines[0].split("removed:")[1], lines[0]


def test_techniques_sequence_parallel_does_not_drive_are_refused(ranks):
    for r in ranks:
        got = r["refused"]
        assert "FirstBlockCache is run by the FirstBlockCache technique, which SequenceParallel does not drive" \
            in got["fbc"]
        assert "AdaCache" in got["fbc"] and "PAB" in got["fbc"]  # it names what it drives
        assert "TeaCache" in got["teacache"] and "does not drive" in got["teacache"]
        assert "MoReg" in got["moreg"] and "moreg=None" in got["moreg"]


def test_inspect_lists_the_metric_all_reduce_of_measuring_phases(ranks):
    """The phases of an adaptive run's plan (made before any distance is known: every step computes); the
    measuring phase keeps one all-reduce, of the distance sums, besides the blocks' collectives."""
    for name in RESIDUAL_BLOCKS:
        text = ranks[0][name]["adaptive"]["inspect"]
        kept = [ln.split("kept:")[1].split("; removed:")[0] for ln in text.splitlines() if " kept: " in ln]
        assert sum("all_reduce/metric 1 (16 B)" in k for k in kept) == 1, text  # (2 sums x 2 samples) float32


def test_optimize_pipeline_with_parallel_equals_the_single_process_pipeline(ranks):
    """Both generations (the first captures the transformer at its first call, on every rank) equal the
    single-process pipeline with diffusers' PAB hook; reuse changed the latents."""
    for r in ranks:
        d = r["pipeline"]
        assert d["mode"] == "ulysses" and d["frames"] == (2, 1)
        assert max(d["rel"]) <= REL, d["rel"]
        assert d["plain_rel"] > 1e-4
        assert d["calls"] == d["planned"] == 10 and d["reusing"] > 0  # planned from the pipeline's scheduler


def test_optimize_pipeline_collectives_counted_equal_the_plan(ranks):
    for r in ranks:
        d = r["pipeline"]
        for kind in ("all_to_all", "all_gather"):
            assert d["counted"]["calls"][kind] == d["predicted"]["calls"][kind]
            assert d["counted"]["bytes"][kind] == d["predicted"]["bytes"][kind]
        assert d["counted"]["calls"]["all_reduce"] == d["calls"]  # one agreement per call


def test_inductor_with_ulysses_equals_single_process_pab(ranks):
    """Every phase graph, with its all-to-alls, is compiled by Inductor and runs; outputs equal a
    single-process PAB on the eager model."""
    for r in ranks:
        d = r["inductor"]
        assert d["mode"] == "ulysses"
        assert d["decisions"] == "CRCR" and len(d["decisions"]) == len(INDUCTOR_TIMESTEPS)
        assert d["compiled"] == [True] * d["phases"] and d["phases"] == 2
        assert sorted(d["kept"]) == [1, 9]  # reuse: the output gather only; compute: 2 x 4 all-to-alls + gather
        assert d["rel"] <= REL, d["rel"]


def test_a_capture_failing_on_one_rank_fails_on_every_rank_at_once(ranks):
    """Rank 1's capture raises; rank 0, which captured fine, gets the same ParallelError at its next
    agreement instead of waiting in it for the process group's timeout (60 s here)."""
    for r in ranks:
        got = r["refused"]
        assert got["capture"] is not None and "failed on 1 of 2 ranks (rank 1: " in got["capture"], got["capture"]
        assert got["capture_seconds"] < 30
