"""inspect() of techniques that decide at run time (First Block Cache, TeaCache, EasyCache) shows what they
do: every phase a call may run (the probe included) and how a call picks one, instead of the all-compute plan
they assume before running; after a generation, the decisions taken and the phases each call ran, which must
agree with the runners the core actually called."""
from __future__ import annotations

import re

import pytest

from graphpass.techniques.easycache import EasyCache
from graphpass.techniques.first_block_cache import FirstBlockCache
from graphpass.techniques.magcache import MagCache
from graphpass.techniques.teacache import TeaCache
from technique_helpers import TIMESTEPS, captured, compiled, denoise

N = len(TIMESTEPS)
SCHEDULES = {"fbc": FirstBlockCache(0.1), "teacache": TeaCache(threshold=0.15, num_inference_steps=N),
             "easycache": EasyCache(threshold=0.5, warmup_steps=3)}
#: labels of the phases each may run (a probe, and the two ends of a decided call; EasyCache decides before)
LABELS = {"fbc": ["probe", "store 1, head kept, rest", "reuse 1, head kept, rest"],
          "teacache": ["probe", "store 1, rest", "reuse 1, rest"],
          "easycache": ["compute", "compute, rate", "reuse x + D"]}


def _phase_rows(report: str) -> dict[str, tuple[str, str]]:
    """Phase id -> (steps column, label) from the report's phase table."""
    rows = re.findall(r"^  (P\d+)\s+\d+\s+\d+\s+\S+\s+\S+\s+(\S+)\s+reuse\[[^]]*\] store\[[^]]*\]  (.+)$", report, re.M)
    return {pid: (steps, label) for pid, steps, label in rows}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_before_a_run_the_report_shows_the_possible_phases_not_a_plan(name):
    opt = compiled("wan", SCHEDULES[name])
    opt.plan(TIMESTEPS)
    report = opt.inspect()
    rows = _phase_rows(report)
    labels = [label for _, label in rows.values()]
    assert all(want in labels for want in LABELS[name]), labels
    assert "decided at run time" in report and "none yet: run a generation" in report
    assert "plan FLOP share" not in report and "plan (step: timestep -> phase" not in report
    assert {steps for steps, _ in rows.values()} == {"-"}  # no step counts are claimed before running


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_after_a_run_the_report_shows_the_decisions_and_the_runs(name):
    _, kw, _, _ = captured("wan", 2)
    opt = compiled("wan", SCHEDULES[name])
    opt.plan(TIMESTEPS)
    denoise(opt, kw)
    report = opt.inspect()
    decisions = opt.decisions("cond_uncond")
    assert "R" in decisions and "C" in decisions
    line = re.search(r"context 'cond_uncond': ([CR]+) \((\d+) of (\d+) calls reused, (\d+) probed\)", report)
    assert line and line.group(1) == decisions and int(line.group(2)) == decisions.count("R")
    # the phases each call ran, as listed, are the runners the core called (counted by the core per run)
    rows = _phase_rows(report)
    by_label = {label: pid for pid, (_, label) in rows.items()}
    cells = re.findall(r"(\d+): t=\s*[\d.]+ ((?:P\d+\+)?P\d+)", report.split("decisions (")[1])
    assert [int(i) for i, _ in cells] == list(range(N))
    listed: dict[str, int] = {}
    for _, ran in cells:
        for pid in ran.split("+"):
            listed[pid] = listed.get(pid, 0) + 1
    counted = {by_label[ph.label()]: n for ph, n in opt.phase_calls.items()}
    assert listed == counted
    assert {pid: int(steps) for pid, (steps, _) in rows.items() if steps != "0"} == counted
    reuse_id = by_label[LABELS[name][2]]
    assert [ran.endswith(reuse_id) for _, ran in cells] == [d == "R" for d in decisions]
    assert int(line.group(4)) == sum("+" in ran for _, ran in cells) == len(opt.records("cond_uncond"))
    speedup = float(re.search(r"last generation FLOP share \S+ -> ideal speedup ([\d.]+)x", report).group(1))
    assert speedup > 1.0


def test_a_static_table_still_reports_its_plan():
    opt = compiled("wan", MagCache(mag_ratios=[1.0] * 6 + [0.98] * 6, num_inference_steps=N))
    opt.plan(TIMESTEPS)
    report = opt.inspect()
    assert "plan (step: timestep -> phase" in report and "decided at run time" not in report
    assert len(re.findall(r"\d+: t=\s*[\d.]+ P\d+\s+[\d.]+ (?:B|KiB|MiB)", report)) == N
