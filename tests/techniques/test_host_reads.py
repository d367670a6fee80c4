"""Device->host reads per model call, counted for every technique over a full loop (``Tensor.item``,
``tolist``, ``bool``, ``float``, ``int`` patched): the runtime core reads the call's timestep once; static
plans (MagCache's table, TaylorSeer, the frozen forms) add nothing on any call; the techniques that decide
from the call being run (First Block Cache, TeaCache, EasyCache) add exactly one read to each call whose
decision is open, computed or reused (its statistic is measured at that call, so the read cannot move to an
earlier one), and none to the calls their rules force."""
from __future__ import annotations

import math

import pytest
import torch

from graphpass import InputError

from graphpass.eval.harness import ComputeAll
from graphpass.techniques.easycache import EasyCache, FrozenEasyCache
from graphpass.techniques.first_block_cache import FirstBlockCache, FrozenFirstBlockCache
from graphpass.techniques.magcache import MagCache
from graphpass.techniques.taylorseer import TaylorSeer
from graphpass.techniques.teacache import TeaCache
from technique_helpers import TIMESTEPS, compiled, denoise, captured
from technique_loops import HostReads

N = len(TIMESTEPS)


def reads_per_call(monkeypatch, schedule) -> tuple[list[int], object]:
    """(host reads of each model call of one generation, the optimized model)."""
    _, kw, _, _ = captured("wan", 2)
    opt = compiled("wan", schedule)
    opt.plan(TIMESTEPS)
    reads = HostReads(monkeypatch)
    per_call = []
    forward = opt.forward

    def counted(**kwargs):
        before = reads.count
        out = forward(**kwargs)
        per_call.append(reads.count - before)
        return out

    opt.forward = counted
    denoise(opt, kw)
    monkeypatch.undo()
    return per_call, opt


def test_the_core_reads_the_timestep_once_per_call(monkeypatch):
    per_call, _ = reads_per_call(monkeypatch, ComputeAll())
    assert per_call == [1] * N


@pytest.mark.parametrize("schedule", [
    MagCache(mag_ratios=[1.0] * 6 + [0.98] * 6, num_inference_steps=N),
    TaylorSeer.preset("attention", taylor_factors_dtype="float32"),
    FrozenFirstBlockCache("CCRCRRCRRCRC"),
    FrozenEasyCache("CCCRRCRRCRRC"),
], ids=["magcache", "taylorseer", "frozen-fbc", "frozen-easycache"])
def test_static_plans_add_no_read(monkeypatch, schedule):
    per_call, opt = reads_per_call(monkeypatch, schedule)
    assert "R" in opt.decisions("cond_uncond")
    assert per_call == [1] * N and opt.metric_reads == 0


@pytest.mark.parametrize("schedule", [FirstBlockCache(0.1), TeaCache(threshold=0.15, num_inference_steps=N),
                                      EasyCache(threshold=0.5, warmup_steps=3)],
                         ids=["fbc", "teacache", "easycache"])
def test_deciding_techniques_read_once_per_open_decision(monkeypatch, schedule):
    per_call, opt = reads_per_call(monkeypatch, schedule)
    extra = [n - 1 for n in per_call]  # beyond the core's timestep read
    decisions = opt.decisions("cond_uncond")
    assert set(extra) <= {0, 1} and sum(extra) == opt.metric_reads
    reused = [i for i, d in enumerate(decisions) if d == "R"]
    assert reused and all(extra[i] == 1 for i in reused)  # a reuse is always a decision read at its call
    assert extra[0] == 0  # the first call is forced: it computes and reads nothing
    if isinstance(schedule, (TeaCache, EasyCache)):  # so is the last (both rules compute it)
        assert extra[-1] == 0
    records = opt.records("cond_uncond")
    if records:  # First Block Cache and TeaCache record the statistic of each read call
        assert [r.step for r in records] == [i for i, n in enumerate(extra) if n]


def test_per_token_timesteps_are_read_once_too(monkeypatch):
    """A timestep of many values (one per token) is reduced on its device and read once: its noisiest token
    steps the call; rows that differ, or a non-finite value, are refused as with a few values."""
    opt = compiled("wan", ComputeAll())
    per_token = torch.full((2, 300), 0.0)
    per_token[:, 7] = 640.0  # a noisy token beside clean ones
    reads = HostReads(monkeypatch)
    assert opt._timestep({"timestep": per_token}) == 640.0 and reads.count == 1
    monkeypatch.undo()
    for bad, words in ((torch.cat([per_token[:1], per_token[:1] + 1]), "different values in one call"),
                       (per_token.clone().fill_(math.nan), "non-finite"),
                       (torch.tensor([500.0, 400.0]), "different values in one call"),
                       (torch.tensor([math.inf, math.inf]), "non-finite")):
        with pytest.raises(InputError, match=words):
            opt._timestep({"timestep": bad})
