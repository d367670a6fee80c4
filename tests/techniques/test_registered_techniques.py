"""TaylorSeer, EasyCache and FrozenEasyCache are registered techniques run by the runtime core itself, and
the core's two per-call channels work for any technique: a policy reads the call's inputs
(``StepCall.inputs``) and feeds its phase graph a per-call value (``Decision.feeds``). Checked against the
eager model; export refusals name the fix."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch

import graphpass
from graphpass.passes.specialize import PhaseGraph, cache_input_name
from graphpass.runtime.executor import OptimizedModel
from graphpass.schedules.base import Phase, RegionRef, Schedule
from graphpass.techniques import Decision, StepCall, StepPolicy, Technique, register, tagged_regions, technique_for
from technique_loops import TS, tiny

torch.set_num_threads(1)


@pytest.mark.parametrize("schedule, name", [(graphpass.TaylorSeer(), "TaylorSeer"),
                                            (graphpass.EasyCache(), "EasyCache"),
                                            (graphpass.FrozenEasyCache("CCR"), "FrozenEasyCache")])
def test_registry_serves_the_techniques(schedule, name):
    assert technique_for(schedule).name == name


def test_optimize_runs_them_on_the_core_itself():
    """No runtime subclass: the optimized model is the core's OptimizedModel, whatever the technique."""
    model, kw = tiny("wan")
    for schedule in (graphpass.TaylorSeer.preset("attention"), graphpass.EasyCache(warmup_steps=2),
                     graphpass.FrozenEasyCache("CCRC")):
        opt = graphpass.optimize(model, schedule, example_kwargs=kw, timesteps=TS)
        assert type(opt) is OptimizedModel
        assert opt.technique is technique_for(schedule)


# --- a technique using both channels: output scaled by the mean of the call's own latent ------------------
SCALE_KEY = "scale:latent-mean"


@dataclass
class LatentScaled(Schedule):
    """Test schedule: every call computes, and its first output is multiplied by the mean of its latent."""

    type_name: ClassVar[str] = "LatentScaled"

    def kinds(self) -> set[str]:
        return set()

    def reuses(self, region: RegionRef, t: float, counter: int) -> bool:
        return False

    def may_reuse_next(self, region: RegionRef, t: float, counter: int) -> bool:
        return False

    def to_dict(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LatentScaled":
        return cls()


def scaled_graph(captured, target, phase: Phase) -> PhaseGraph:
    """The captured graph with one more input (the fed scale) multiplying its first output."""
    gm = copy.deepcopy(captured.gm)
    g = gm.graph
    last = [n for n in g.nodes if n.op == "placeholder"][-1]
    with g.inserting_after(last):
        scale = g.placeholder(cache_input_name(SCALE_KEY))
    out = next(n for n in g.nodes if n.op == "output")
    leaves = list(out.args[0])
    with g.inserting_before(out):
        leaves[0] = g.call_function(torch.ops.aten.mul.Tensor, (leaves[0], scale))
    out.args = (tuple(leaves),)
    gm.recompile()
    return PhaseGraph(phase, gm, [SCALE_KEY], [], len(leaves), 0)


class LatentMeanPolicy(StepPolicy):
    def decide(self, call: StepCall) -> Decision:
        x = call.inputs[0]  # hidden_states, the capture's first input
        return Decision(Phase(()), feeds={SCALE_KEY: x.mean()})


register(Technique(name="LatentScaled", schedules=(LatentScaled,), target=tagged_regions,
                   specialize=scaled_graph, policy=lambda s, t, c: LatentMeanPolicy(s, t)))


def test_policy_reads_the_call_and_feeds_its_graph():
    model, kw = tiny("wan")
    opt = graphpass.optimize(model, LatentScaled(), example_kwargs=kw)
    assert opt.captured.input_names[0] == "hidden_states"
    with torch.no_grad():
        for i, t in enumerate(TS[:3]):
            call = dict(kw, hidden_states=kw["hidden_states"] + i, timestep=torch.full((2,), int(t)))
            ours = opt(**call)[0]
            ref = model(**call)[0] * call["hidden_states"].mean()
            assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6), i
    # the fed value is no cached tensor: nothing stays in the cache
    assert SCALE_KEY not in opt.state().cache and opt.cache_nbytes == 0


def test_adaptive_exports_are_refused_with_the_fix(tmp_path):
    """(TaylorSeer exports: tests/techniques/test_taylorseer_export.py.)"""
    model, kw = tiny("wan")
    easy = graphpass.optimize(model, graphpass.EasyCache(warmup_steps=2), example_kwargs=kw, timesteps=TS)
    with pytest.raises(graphpass.GraphpassError, match="FrozenEasyCache"):
        graphpass.export(easy, tmp_path / "easy")
