"""What is hoisted, and how often the prologue runs.

* On Latte and Wan every cross-attention's key and value projections are hoisted (named from the model code),
  and VDT's too; the step graph of a phase that reuses the cross-attention reads none of them.
* Over two generations of separate cond/uncond calls, each projection's weight is read by a matrix product
  once per generation and context (counted at dispatch), against once per step and context in eager; the
  outputs are bit-identical to eager's.
"""
from __future__ import annotations

import pytest
import torch

from graphpass import PAB
from graphpass.schedules.base import Action, Phase
from hoisting_helpers import CROSS_KV, STEPS_20, WeightReads, cfg_loop, for_schedule, model_case, optimized

STEPS = STEPS_20[:10]


@pytest.mark.parametrize("name", ["latte", "wan", "vdt"])
def test_every_cross_attention_key_and_value_is_hoisted(name):
    opt = for_schedule(optimized(name), PAB(cross=2, window=(100, 800)))
    sources = [v.source for v in opt.hoisting.values_info().values()]
    for path in CROSS_KV[name]:
        assert sources.count(path) == 1, f"{path} hoisted {sources.count(path)} times: {sources}"
    # A phase that reuses every cross-attention: its step graph needs none of their K/V (DCE removed the
    # regions first), and still computes no cross-attention.
    cross = [r.path for r in opt.regions if r.kind == "cross"]
    assert len(cross) == 2
    reuse = Phase.of({p: Action.REUSE for p in cross})
    pg = opt.phase_graph(reuse)
    sg = opt.hoisting.step_graph(pg)
    kv = {n for n, v in opt.hoisting.values_info().items() if v.source in CROSS_KV[name]}
    assert not kv & set(sg.hoisted_inputs)
    assert sg.attention_ops() == pg.attention_ops()


@pytest.mark.parametrize("name,schedule", [("latte", None), ("wan", None), ("latte", PAB.preset("latte"))])
def test_prologue_runs_once_per_generation_and_context(name, schedule):
    case = model_case(name)
    kw = case.kwargs()
    uncond = torch.zeros_like(kw["encoder_hidden_states"])
    eager_weights = {p: case.model.get_submodule(p).weight for p in CROSS_KV[name]}
    with WeightReads(eager_weights) as eager_reads:
        eager = cfg_loop(case.model, kw, uncond, STEPS, contexts=False)
    assert set(eager_reads.counts.values()) == {2 * len(STEPS)}  # eager: every step, both calls

    never = PAB(**{"joint" if name == "wan" else "spatial": 2}, window=(2000, 3000))  # no step in the window
    opt = for_schedule(optimized(name), schedule or never, timesteps=STEPS)
    weights = {p: opt.model.get_submodule(p).weight for p in CROSS_KV[name]}  # those the graphs read
    generations = 2
    with WeightReads(weights) as reads:
        outs = [cfg_loop(opt, kw, uncond, STEPS, contexts=True) for _ in range(generations)]
    assert dict(reads.counts) == {p: 2 * generations for p in weights}  # two contexts, two generations
    assert opt.state("cond").hoisted.runs == opt.state("uncond").hoisted.runs == generations
    if schedule is None:
        for got in outs:
            for i, (g, e) in enumerate(zip(got, eager)):
                assert torch.equal(g, e), f"call {i}: max diff {float((g - e).abs().max())}"
    else:
        plain = for_schedule(optimized(name), schedule, timesteps=STEPS, hoist=False)
        want = cfg_loop(plain, kw, uncond, STEPS, contexts=True)
        assert all(torch.equal(g, w) for g, w in zip(outs[1], want))
        assert any(ph.reused for _, ph in opt.state("cond").trace)


def test_inspect_reports_hoisted_values_and_flops_saved():
    opt = for_schedule(optimized("latte"), PAB.preset("latte"))
    full = opt.phase_graph(Phase(()))
    # What no step computes any more, counted by hand from the tiny Latte's sizes (batch 2, 5 text tokens
    # of 16 channels, 3 frames, inner dim 16), with flops.py's rules (2*M*N*K per matmul, one per element
    # of any other op, views free): the caption projection (two 16x16 linears and a GELU), each of the
    # 2 blocks' text key and value projections on the text repeated per frame, and the timestep sinusoid's
    # frequency table (exp(-ln(1e4) * arange(128) / 128): a mul, a div and an exp of 128 elements).
    caption = 2 * (2 * 10 * 16 * 16) + 10 * 16
    kv = 2 * 2 * (2 * (2 * 3 * 5) * 16 * 16)
    table = 3 * 128
    assert opt.hoisting.step_graph(full).saved_flops == caption + kv + table
    report = opt.inspect()
    section = report[report.index("\nhoisted ("):]
    for path in CROSS_KV["latte"]:
        assert path in section
    assert "saved per step: P0 72.22k" in section  # the compute-all phase (P0 of this plan)
