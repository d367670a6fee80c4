"""The step caches are registered techniques: ``graphpass.optimize`` finds them through the registry, the
runtime core runs their probes (First Block Cache equal to diffusers' hook, with a planned loop), and a
policy that answers a probe without saying how to finish the call gets a clear error."""
from __future__ import annotations

import pytest
from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

import graphpass
from graphpass import FirstBlockCache, FrozenFirstBlockCache, FrozenMagCache, MagCache, ScheduleError, TeaCache
from graphpass.schedules.base import Phase
from graphpass.techniques import Decision, Probe, StepPolicy, technique_for
from technique_helpers import TIMESTEPS, captured, denoise, hooked, rel_err


@pytest.mark.parametrize("schedule, name, exports", [
    (FirstBlockCache(0.1), "FirstBlockCache", False), (FrozenFirstBlockCache("CRC"), "FrozenFirstBlockCache", True),
    (TeaCache(), "TeaCache", False), (MagCache(mag_ratios=[1.0]), "MagCache", True),
    (FrozenMagCache("CRC"), "FrozenMagCache", True)])
def test_registry_serves_the_step_caches(schedule, name, exports):
    technique = technique_for(schedule)
    assert technique.name == name
    assert (technique.export.refusal is None) == exports
    if not exports:
        assert "opt.freeze()" in technique.export.refusal


def test_optimize_runs_first_block_cache_through_the_registry_as_diffusers_does():
    model, kw, _, _ = captured("wan", 2)
    hook_model, hook_decisions, after_call = hooked(model, apply_first_block_cache, FirstBlockCacheConfig(0.1),
                                                    "fbc_leader_block_hook")
    expected = denoise(hook_model, kw, after_call=after_call)
    opt = graphpass.optimize(model, FirstBlockCache(0.1), example_kwargs=kw, timesteps=TIMESTEPS)
    got = denoise(opt, kw)
    assert opt.technique.name == "FirstBlockCache" and opt.adaptive
    assert opt.decisions("cond_uncond") == "".join(hook_decisions["cond_uncond"])
    assert "R" in opt.decisions("cond_uncond")
    assert opt.metric_reads == len(opt.records("cond_uncond")) > 0
    assert max(rel_err(a, b) for a, b in zip(got, expected)) <= 1e-5


class _ProbesOnly(StepPolicy):
    """A policy that asks for a probe but never says which phase finishes the call."""

    def decide(self, call) -> Decision | Probe:
        return Probe(Phase(()))


def test_a_probe_without_complete_is_a_clear_error():
    policy = _ProbesOnly(FirstBlockCache(0.1), target=None)
    assert isinstance(policy.decide(None), Probe)
    with pytest.raises(ScheduleError, match=r"_ProbesOnly.decide returned a Probe .* define complete\(call\)"):
        policy.complete(None)
