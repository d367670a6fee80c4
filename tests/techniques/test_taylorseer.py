"""TaylorSeer compiled: equal to diffusers' own TaylorSeer hook (same config, same computed and predicted calls)
over full loops on tiny Wan and CogVideoX, with batched CFG and with separate cond/uncond contexts; no value
read back from the device; the phase graphs run in onnxruntime; config validation and JSON."""
from __future__ import annotations

import contextlib

import pytest
import torch

import graphpass
from graphpass import ScheduleError, schedule_from_json
from graphpass.techniques.taylorseer import TaylorSeer
from technique_loops import TS, graphpass_caller, loop, on_tiny, reads_per_call, rel_err, tiny

torch.set_num_threads(1)


class HookRecorder:
    """Runs a model with diffusers' TaylorSeer hook and records, per cache context, which calls the hook
    computed (read from the hook's own state: a call that refreshed its factors has last_update_step ==
    current_step)."""

    def __init__(self, model, config, probe: str):
        model.enable_cache(config)
        self.model = model
        self.hook = model.get_submodule(probe)._diffusers_hook.get_hook("taylorseer_cache")
        self.decisions: dict[str, str] = {}

    @contextlib.contextmanager
    def __call__(self, name):
        with self.model.cache_context(name):
            yield self.model
            st = self.hook.state_manager.get_state()
            # "C": the hook ran the module (refresh); "R": it predicted from the cached factors
            self.decisions[name] = self.decisions.get(name, "") + (
                "C" if st.last_update_step == st.current_step else "R")


CONFIGS = {
    # diffusers defaults on the attention modules (factors in bf16, as diffusers stores them by default)
    "attention": dict(cache_identifiers=[r"(transformer_)?blocks\.\d+\.attn\d"]),
    # lite mode: proj_out extrapolated, every block zeroed on predict calls
    "lite": dict(use_lite_mode=True),
    # second order, fp32 factors, feed-forwards zeroed, a compute-only tail
    "order2": dict(cache_interval=3, disable_cache_before_step=2, max_order=2, disable_cache_after_step=11,
                   taylor_factors_dtype=torch.float32, cache_identifiers=[r"(transformer_)?blocks\.\d+\.attn1"],
                   skip_predict_identifiers=[r"(transformer_)?blocks\.\d+\.ff(n)?"]),
}
PROBE = {("wan", "lite"): "proj_out", ("cogvideox", "lite"): "proj_out", ("wan", "attention"): "blocks.0.attn1",
         ("cogvideox", "attention"): "transformer_blocks.0.attn1", ("wan", "order2"): "blocks.0.attn1",
         ("cogvideox", "order2"): "transformer_blocks.0.attn1"}


@pytest.mark.parametrize("name", ["wan", "cogvideox"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_equals_diffusers_hook_batched_cfg(name, config):
    from diffusers import TaylorSeerCacheConfig

    cfg = TaylorSeerCacheConfig(**CONFIGS[config])
    _, kw, opt = on_tiny(name, TaylorSeer.from_diffusers(cfg))
    assert opt.technique.name == "TaylorSeer"
    ours = loop(graphpass_caller(opt), kw)
    ref_model, _ = tiny(name)
    hook = HookRecorder(ref_model, cfg, PROBE[name, config])
    ref = loop(hook, kw)
    assert opt.decisions("cond_uncond") == hook.decisions["cond_uncond"]
    assert "R" in opt.decisions("cond_uncond")
    assert rel_err(ours, ref) < 1e-5
    # the comparison can fail: predicting changed the outputs
    plain, _ = tiny(name)
    assert rel_err(loop(lambda _: contextlib.nullcontext(plain), kw), ref) > 1e-3


@pytest.mark.parametrize("name, config, expected", [("wan", "lite", "CCCRCRRRRCRRRR"),
                                                    ("cogvideox", "order2", "CCRCRRCRRCRCCC")])
def test_separate_cond_uncond_contexts_equal_diffusers_hook(name, config, expected):
    """Batch-1 calls in two contexts on a capture of the batch-2 example (the batch is a free size: lite mode's
    zeros follow it)."""
    from diffusers import TaylorSeerCacheConfig

    cfg = TaylorSeerCacheConfig(**CONFIGS[config])
    _, kw, opt = on_tiny(name, TaylorSeer.from_diffusers(cfg))
    contexts = {"cond": slice(0, 1), "uncond": slice(1, 2)}
    ours = loop(graphpass_caller(opt), kw, contexts)
    ref_model, _ = tiny(name)
    hook = HookRecorder(ref_model, cfg, PROBE[name, config])
    ref = loop(hook, kw, contexts)
    assert rel_err(ours, ref) < 1e-5
    for c in contexts:
        assert opt.decisions(c) == hook.decisions[c] == expected


def test_no_value_read_back_from_the_device(monkeypatch):
    """TaylorSeer decides from the call counter: it adds no read to the ones every graphpass call makes (the
    timestep's value, which picks the generation), on computed and predicted calls alike."""
    from graphpass.eval.harness import ComputeAll

    _, kw, opt = on_tiny("wan", TaylorSeer.preset("attention", taylor_factors_dtype="float32"), timesteps=TS)
    ours = reads_per_call(opt, kw, monkeypatch)
    plain = reads_per_call(on_tiny("wan", ComputeAll(), timesteps=TS)[2], kw, monkeypatch)
    assert ours == plain and len(set(plain)) == 1
    assert opt.decisions() == "CCCRCRRRRCRRRR" and opt.metric_reads == 0
    # one graph per phase kind, whatever the gap (2 updates seeding the factors, the steady update, predict)
    assert sorted(ph.label() for ph in opt._phase_graphs) == ["predict (2 factors)", "update (1 factors held)",
                                                              "update (2 factors held)", "update (first)"]


def test_always_compute_equals_eager():
    model, kw = tiny("cogvideox")
    opt = graphpass.optimize(model, TaylorSeer.preset("attention", disable_cache_after_step=0), example_kwargs=kw)
    ours = loop(graphpass_caller(opt), kw)
    eager, _ = tiny("cogvideox")
    ref = loop(lambda _: contextlib.nullcontext(eager), kw)
    assert opt.decisions("cond_uncond") == "C" * len(TS)
    assert rel_err(ours, ref) < 1e-6


# --- config ---------------------------------------------------------------------------------------------
def test_json_round_trip_presets_and_diffusers_config():
    from diffusers import TaylorSeerCacheConfig

    for name in ("diffusers", "attention", "lite", "flux"):
        s = TaylorSeer.preset(name)
        assert schedule_from_json(s.to_json()) == s
    d = TaylorSeer.preset("diffusers")  # diffusers' own defaults, field by field
    ref = TaylorSeerCacheConfig()
    assert (d.cache_interval, d.disable_cache_before_step, d.disable_cache_after_step, d.max_order,
            d.factors_dtype, d.use_lite_mode) == (ref.cache_interval, ref.disable_cache_before_step,
                                                   ref.disable_cache_after_step, ref.max_order,
                                                   ref.taylor_factors_dtype, ref.use_lite_mode)
    s = TaylorSeer(max_order=2, taylor_factors_dtype=torch.float32, skip_predict_identifiers=["proj_out"])
    back = s.to_diffusers()
    assert isinstance(back, TaylorSeerCacheConfig) and TaylorSeer.from_diffusers(back) == s
    assert s.taylor_factors_dtype == "float32"


@pytest.mark.parametrize("kwargs, words", [
    (dict(cache_interval=0), "cache_interval=0 must be an integer >= 1"),
    (dict(disable_cache_before_step=0), "needs an earlier refresh"),
    (dict(max_order=-1), "max_order=-1"),
    (dict(disable_cache_after_step=-2), "call index >= 0"),
    (dict(taylor_factors_dtype="int8"), "one of bfloat16, float16, float32"),
    (dict(cache_identifiers="blocks"), "list of regular expressions"),
    (dict(cache_identifiers=["blocks.(0"]), "not a regular expression"),
])
def test_bad_config_is_refused_with_the_fix(kwargs, words):
    with pytest.raises(ScheduleError, match=words.replace("(", r"\(").replace(")", r"\)")):
        TaylorSeer(**kwargs)


def test_identifiers_that_pick_nothing_or_nest_are_refused():
    model, kw = tiny("wan")
    # diffusers' default patterns end in 'attn': Wan's attention modules are attn1/attn2
    with pytest.raises(ScheduleError, match="pick no module"):
        graphpass.optimize(model, TaylorSeer(), example_kwargs=kw)
    with pytest.raises(ScheduleError, match="inside"):
        graphpass.optimize(model, TaylorSeer(cache_identifiers=[r"blocks\.0", r"blocks\.0\.attn1"]), example_kwargs=kw)
    with pytest.raises(ScheduleError, match="unknown TaylorSeer preset"):
        TaylorSeer.preset("fastest")
    with pytest.raises(ScheduleError, match="unknown fields"):
        schedule_from_json('{"type": "TaylorSeer", "interval": 4}')
