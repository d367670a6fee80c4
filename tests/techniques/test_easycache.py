"""EasyCache compiled: equal to a module-level reference of the published rule (H-EmbodVis/EasyCache's
``easycache_forward``) over full loops on tiny Wan and CogVideoX, reused calls included, with batched CFG and
separate cond/uncond contexts; host reads counted; the frozen form replays without reads and runs in
onnxruntime; config validation and JSON."""
from __future__ import annotations

import contextlib

import pytest
import torch

import graphpass
from graphpass import ScheduleError, schedule_from_json
from graphpass.eval.harness import ComputeAll
from graphpass.techniques.easycache import EasyCache, FrozenEasyCache
from technique_loops import TS, graphpass_caller, loop, on_tiny, reads_per_call, rel_err, tiny

torch.set_num_threads(1)


class EasyCacheReference:
    """The published rule around an eager model, one state per cache context (the reference code's "even"
    stream; here every context is its own stream). |t| is the mean of |t| over all elements.

    A call first decides: the first ``ret_steps`` calls and the last ``last`` compute and zero the error;
    otherwise, with the previous call's input and a computed output at hand and a rate k known, it adds
    ``k * (|x - x_prev| / |v_last|)`` to the error and reuses while the error is below ``thresh`` (else
    computes and zeroes it). The previous input is then replaced by this call's. A reuse returns
    ``x + D``; a computed call caches ``D = v - x``, updates ``k = |v - v_last| / |x - x_last_computed|`` and
    keeps this call's input and output."""

    def __init__(self, model, thresh: float, ret_steps: int, num_steps: int, last: int = 1):
        self.model, self.thresh, self.ret, self.n, self.last = model, thresh, ret_steps, num_steps, last
        self.states: dict[str, dict] = {}
        self.decisions: dict[str, str] = {}

    def __call__(self, context: str, **kw):
        s = self.states.setdefault(context, dict(cnt=0, err=0, k=None, prev_in=None, prev_prev_in=None,
                                                 prev_out=None, cache=None))
        raw = kw["hidden_states"].clone()
        if s["cnt"] < self.ret or s["cnt"] >= self.n - self.last:
            calc = True
            s["err"] = 0
        elif s["prev_in"] is not None and s["prev_out"] is not None and s["k"] is not None:
            change = (raw - s["prev_in"]).abs().mean()
            s["err"] = s["err"] + s["k"] * (change / s["prev_out"].abs().mean())
            calc = not bool(s["err"] < self.thresh)
            if calc:
                s["err"] = 0
        else:
            calc = True
        s["prev_in"] = raw
        s["cnt"] += 1
        self.decisions[context] = self.decisions.get(context, "") + ("C" if calc else "R")
        if not calc:
            return ((raw + s["cache"]).float(),)
        out = self.model(**kw)[0]
        s["cache"] = out - raw
        if s["prev_out"] is not None and s["prev_prev_in"] is not None:
            s["k"] = (out - s["prev_out"]).abs().mean() / (s["prev_in"] - s["prev_prev_in"]).abs().mean()
        s["prev_prev_in"] = s["prev_in"]
        s["prev_out"] = out.clone()
        return (out.float(),)

    def caller(self):
        @contextlib.contextmanager
        def call(name):
            yield lambda **kw: self(name, **kw)
        return call


@pytest.mark.parametrize("name, thresh, expected", [("wan", 0.5, "CCCRRRCRRRRCRC"), ("wan", 0.2, "CCCRCRCRCRCRCC"),
                                                     ("cogvideox", 0.5, "CCCRRRRRRRRRCC")])
def test_equals_reference_batched_cfg(name, thresh, expected):
    _, kw, opt = on_tiny(name, EasyCache(threshold=thresh, warmup_steps=3), timesteps=TS)
    assert opt.technique.name == "EasyCache"
    ours = loop(graphpass_caller(opt), kw)
    ref_model, _ = tiny(name)
    ref = EasyCacheReference(ref_model, thresh, ret_steps=3, num_steps=len(TS))
    theirs = loop(ref.caller(), kw)
    assert opt.decisions("cond_uncond") == ref.decisions["cond_uncond"] == expected
    assert rel_err(ours, theirs) < 1e-5
    plain, _ = tiny(name)  # the comparison can fail: reusing changed the outputs
    assert rel_err(loop(lambda _: contextlib.nullcontext(plain), kw), theirs) > 1e-3


@pytest.mark.parametrize("name", ["wan", "cogvideox"])
def test_separate_cond_uncond_contexts_equal_reference(name):
    _, _, opt = on_tiny(name, EasyCache(threshold=0.5, warmup_steps=3), batch=1, timesteps=TS)
    _, kw = tiny(name)
    contexts = {"cond": slice(0, 1), "uncond": slice(1, 2)}
    ours = loop(graphpass_caller(opt), kw, contexts)
    ref_model, _ = tiny(name)
    ref = EasyCacheReference(ref_model, 0.5, ret_steps=3, num_steps=len(TS))
    theirs = loop(ref.caller(), kw, contexts)
    assert rel_err(ours, theirs) < 1e-5
    for c in contexts:
        assert opt.decisions(c) == ref.decisions[c] and "R" in ref.decisions[c]


def test_host_reads_and_frozen_replay(monkeypatch):
    """Reads beyond those of every graphpass call (the timestep's): one on each call that tests the error
    (the rule needs that call's input change), none on forced calls; the frozen replay reads none and gives
    the same outputs."""
    model, kw, opt = on_tiny("wan", EasyCache(threshold=0.5, warmup_steps=3), timesteps=TS)
    base = reads_per_call(on_tiny("wan", ComputeAll(), timesteps=TS)[2], kw, monkeypatch)
    extra = [a - b for a, b in zip(reads_per_call(opt, kw, monkeypatch), base)]
    d = opt.decisions()
    assert d == "CCCRRRCRRRRCRC"
    tested = [i for i in range(len(TS)) if 3 <= i < len(TS) - 1]  # after warm-up, before the forced last call
    assert extra == [1 if i in tested else 0 for i in range(len(TS))] and opt.metric_reads == len(tested)
    assert max(e for i, e in enumerate(extra) if d[i] == "C") <= 1

    frozen = opt.freeze()
    assert frozen == FrozenEasyCache(d) and schedule_from_json(frozen.to_json()) == frozen
    rep = graphpass.optimize(model, frozen, example_kwargs=kw, timesteps=TS)
    assert reads_per_call(rep, kw, monkeypatch) == base and rep.metric_reads == 0
    ours = loop(graphpass_caller(rep), kw)
    adaptive = on_tiny("wan", EasyCache(threshold=0.5, warmup_steps=3), timesteps=TS)[2]
    assert rel_err(ours, loop(graphpass_caller(adaptive), kw)) < 1e-6
    # a reuse call runs x + D only: one add per latent element, no weight
    reuse = rep.phase_graph(rep.current_plan.phases[d.index("R")])
    assert reuse.flops == kw["hidden_states"].numel()
    assert not [n for n in reuse.gm.graph.nodes if n.op == "get_attr"]


@pytest.mark.slow
def test_frozen_form_exports_to_onnx_and_runs_in_onnxruntime(tmp_path):
    """graphpass.export writes the frozen schedule's phases as ONNX files; graphpass.load runs them in
    onnxruntime: the loop matches the eager phase graphs within 1e-4."""
    model, kw = tiny("cogvideox")
    frozen = FrozenEasyCache("CCCRRCRRCRRRCC")
    opt = graphpass.optimize(model, frozen, example_kwargs=kw, timesteps=TS)
    ref = loop(graphpass_caller(opt), kw)
    assert opt.decisions("cond_uncond") == frozen.decisions
    assert sorted(ph.label() for ph in opt.current_plan.distinct()) == ["compute-all", "reuse 1", "store 1"]
    graphpass.export(opt, tmp_path / "easycache", verify=False)  # the loop below compares the artefact
    loaded = graphpass.load(tmp_path / "easycache")
    ours = loop(graphpass_caller(loaded), kw)
    assert max(float((a - b).abs().max()) for a, b in zip(ours, ref)) < 1e-4


def test_threshold_zero_always_computes_and_equals_eager():
    model, kw = tiny("cogvideox")
    opt = graphpass.optimize(model, EasyCache(threshold=0.0, warmup_steps=1), example_kwargs=kw, timesteps=TS)
    ours = loop(graphpass_caller(opt), kw)
    eager, _ = tiny("cogvideox")
    assert opt.decisions("cond_uncond") == "C" * len(TS)
    assert rel_err(ours, loop(lambda _: contextlib.nullcontext(eager), kw)) < 1e-6


# --- config ---------------------------------------------------------------------------------------------
def test_presets_are_the_published_settings_and_round_trip():
    # H-EmbodVis/EasyCache: Wan2.1 (tau 0.05, 10 forced steps and the last; 0.1 for about 2x),
    # HunyuanVideo (tau 0.025, 5 forced calls and the last)
    assert [(p.threshold, p.warmup_steps, p.always_compute_last) for p in map(
        EasyCache.preset, ("wan2.1", "wan2.1-fast", "hunyuanvideo"))] == [(0.05, 10, 1), (0.1, 10, 1), (0.025, 5, 1)]
    for name in ("wan2.1", "hunyuanvideo"):
        assert schedule_from_json(EasyCache.preset(name).to_json()) == EasyCache.preset(name)
    assert EasyCache() == EasyCache.preset("wan2.1")


@pytest.mark.parametrize("make, words", [
    (lambda: EasyCache(threshold=-0.1), "threshold=-0.1 must be a number >= 0"),
    (lambda: EasyCache(warmup_steps=0), "nothing to reuse"),
    (lambda: EasyCache(always_compute_last=-1), "always_compute_last=-1"),
    (lambda: EasyCache.preset("turbo"), "unknown EasyCache preset"),
    (lambda: FrozenEasyCache("RC"), "start with a reuse"),
    (lambda: FrozenEasyCache("CXR"), "one 'C'"),
    (lambda: schedule_from_json('{"type": "EasyCache", "tau": 0.1}'), "unknown fields"),
])
def test_bad_config_is_refused_with_the_fix(make, words):
    with pytest.raises(ScheduleError, match=words):
        make()


def test_model_that_does_not_fit_and_unknown_length_are_refused():
    from conftest import make_case

    latte = make_case("latte")  # predicts 8 channels (noise and variance) for a 4-channel latent
    with pytest.raises(ScheduleError, match="shaped like its latent input"):
        graphpass.optimize(latte.model, EasyCache(), example_kwargs=latte.kwargs())
    model, kw, opt = on_tiny("wan", EasyCache(warmup_steps=2))  # no timesteps
    with pytest.raises(ScheduleError, match="number of calls is unknown"):
        opt(**kw)
    ok = on_tiny("wan", EasyCache(warmup_steps=2, always_compute_last=0))[2]
    assert torch.equal(ok(**kw)[0], model(**kw)[0])
