"""Golden graph: the code of one small phase graph, compared with tests/golden/<name>.txt.

The model is built here: one block with a spatial self-attention whose output is multiplied by a
timestep-dependent gate outside the attention module, then a cross attention to a text input. The phase
that reuses both attentions must keep the gate multiply (the current step's gate applied to the cached
output), contain no attention op and take the two cached tensors as inputs.

Regenerate after an intended change of the rewrite with ``GRAPHPASS_UPDATE_GOLDEN=1 pytest tests/test_golden_graph.py``
and read the diff before committing it.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphpass
from graphpass import PAB, Action, Phase

GOLDEN = Path(__file__).parent / "golden"


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, context=None):
        ctx = x if context is None else context
        n, s, d = x.shape
        split = lambda t: t.reshape(n, t.shape[1], self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        o = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(ctx)), split(self.v(ctx)))
        return self.out(o.transpose(1, 2).reshape(n, s, d))


class OneBlock(nn.Module):
    """hidden_states (B, F, C, H, W) -> same shape; a token per pixel."""

    def __init__(self, channels: int = 2, dim: int = 8, heads: int = 2):
        super().__init__()
        self.embed = nn.Linear(channels, dim)
        self.t_embed = nn.Linear(1, dim)
        self.gate = nn.Linear(dim, dim)
        self.spatial_attn = Attention(dim, heads)
        self.cross_attn = Attention(dim, heads)
        self.proj_out = nn.Linear(dim, channels)

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        b, f, c, h, w = hidden_states.shape
        x = self.embed(hidden_states.permute(0, 1, 3, 4, 2).reshape(b * f, h * w, c))
        gate = self.gate(F.silu(self.t_embed(timestep[:, None] / 1000)))  # (B, D)
        gate = gate.repeat_interleave(f, dim=0)[:, None, :]
        x = x + gate * self.spatial_attn(x)
        ctx = encoder_hidden_states.repeat_interleave(f, dim=0)
        x = x + self.cross_attn(x, ctx)
        return self.proj_out(x).reshape(b, f, h, w, c).permute(0, 1, 4, 2, 3)


def _model_and_kwargs():
    torch.manual_seed(0)
    model = OneBlock().eval()
    kw = dict(hidden_states=torch.randn(1, 3, 2, 4, 4), timestep=torch.full((1,), 500.0),
              encoder_hidden_states=torch.randn(1, 5, 8))
    return model, kw


def normalise(code: str) -> str:
    return "\n".join(line.strip() for line in code.splitlines() if line.strip()) + "\n"


@pytest.fixture(scope="module")
def optimized():
    model, kw = _model_and_kwargs()
    opt = graphpass.optimize(model, PAB(spatial=2, cross=3, window=(100, 800)), example_kwargs=kw)
    assert {r.path: r.kind for r in opt.regions} == {"spatial_attn": "spatial", "cross_attn": "cross"}
    return model, kw, opt


def test_reuse_all_phase_matches_golden(optimized):
    _, _, opt = optimized
    phase = Phase.of({"spatial_attn": Action.REUSE, "cross_attn": Action.REUSE})
    pg = opt.phase_graph(phase)
    code = normalise(pg.gm.code)

    # What the golden text must show, checked before comparing with it:
    assert "scaled_dot_product_attention" not in code  # no attention op left
    assert "def forward(self, hidden_states, timestep, encoder_hidden_states, cache_spatial_attn_0, " \
           "cache_cross_attn_0)" in code  # the cached outputs are inputs
    gate_muls = [line for line in code.splitlines() if "aten.mul.Tensor" in line and "cache_spatial_attn_0" in line]
    assert len(gate_muls) == 1  # the current step's gate times the cached attention output
    assert "cache_cross_attn_0" in code.split("return", 1)[0].split("cache_cross_attn_0)", 1)[1]
    assert pg.cache_inputs == ["spatial_attn:0", "cross_attn:0"] and pg.cache_outputs == []

    path = GOLDEN / "one_block_reuse_all.txt"
    if os.environ.get("GRAPHPASS_UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(code)
    assert path.exists(), f"{path} is missing: run with GRAPHPASS_UPDATE_GOLDEN=1 once and review the file"
    assert code == path.read_text(), f"phase graph code changed; see {path} (GRAPHPASS_UPDATE_GOLDEN=1 to accept)"


def test_reuse_all_phase_is_numerically_the_model(optimized):
    """Fed the attention outputs eager computes at the same step, the reuse-all graph is the eager model."""
    model, kw, opt = optimized
    pg = opt.phase_graph(Phase.of({"spatial_attn": Action.REUSE, "cross_attn": Action.REUSE}))
    seen = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o))
             for n in ("spatial_attn", "cross_attn")]
    try:
        with torch.no_grad():
            expected = model(**kw)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        (out,) = pg.gm(kw["hidden_states"], kw["timestep"], kw["encoder_hidden_states"],
                       seen["spatial_attn"], seen["cross_attn"])
    assert torch.allclose(out, expected, rtol=0, atol=1e-6)
    # and with stale caches (from another step) the output moves, through the current gate only
    with torch.no_grad():
        (stale,) = pg.gm(kw["hidden_states"], kw["timestep"], kw["encoder_hidden_states"],
                         torch.zeros_like(seen["spatial_attn"]), seen["cross_attn"])
    assert not torch.allclose(stale, expected, atol=1e-4)


def test_planned_loop_matches_hand_written_pab(optimized):
    """Over a DDIM-like loop, the planned optimized model equals the model with PAB done by hand."""
    model, kw, opt = optimized
    ts = [float(t) for t in range(981, 0, -20)]
    opt.reset()
    opt.plan(ts)
    cache = {}

    def pab(name, rng):
        def hook(m, args, out):
            if 100 < state["t"] < 800 and state["i"] % rng != 0:
                return cache[name]
            cache[name] = out
        return hook

    state = {}
    hooks = [model.spatial_attn.register_forward_hook(pab("s", 2)), model.cross_attn.register_forward_hook(pab("c", 3))]
    x_ref, x = kw["hidden_states"], kw["hidden_states"]
    try:
        with torch.no_grad():
            for i, t in enumerate(ts):
                state.update(i=i, t=t)
                call = dict(kw, timestep=torch.full((1,), t))
                ref = model(**dict(call, hidden_states=x_ref))
                got = opt(**dict(call, hidden_states=x))
                assert torch.allclose(got, ref, rtol=0, atol=1e-6), f"step {i}"
                x_ref, x = x_ref - 0.1 * ref, x - 0.1 * got
    finally:
        for h in hooks:
            h.remove()
    assert sum(len(ph.reused) for _, ph in opt.state().trace) > 0


class InPlaceGateBlock(OneBlock):
    """OneBlock, with the gate applied in place to the attention output (``a.mul_(gate)``); export keeps
    the in-place op in the graph."""

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        b, f, c, h, w = hidden_states.shape
        x = self.embed(hidden_states.permute(0, 1, 3, 4, 2).reshape(b * f, h * w, c))
        gate = self.gate(F.silu(self.t_embed(timestep[:, None] / 1000))).repeat_interleave(f, dim=0)[:, None, :]
        a = self.spatial_attn(x)
        a.mul_(gate)
        x = x + a
        x = x + self.cross_attn(x, encoder_hidden_states.repeat_interleave(f, dim=0))
        return self.proj_out(x).reshape(b, f, h, w, c).permute(0, 1, 4, 2, 3)


def test_in_place_ops_on_a_cached_output_do_not_corrupt_the_cache():
    """The STORE phase caches the attention output as the region produced it (before the in-place gate);
    the REUSE phase gates a copy, so the cached tensor is the same at every reuse."""
    torch.manual_seed(0)
    model = InPlaceGateBlock().eval()
    _, kw = _model_and_kwargs()
    ts = [float(t) for t in range(981, 0, -20)]
    opt = graphpass.optimize(model, PAB(spatial=3, window=(100, 800)), example_kwargs=kw, timesteps=ts)
    store = opt.phase_graph(Phase.of({"spatial_attn": Action.STORE}))
    reuse = opt.phase_graph(Phase.of({"spatial_attn": Action.REUSE}))
    clones = lambda pg: [n for n in pg.gm.graph.nodes if n.target == torch.ops.aten.clone.default]  # noqa: E731
    assert len(clones(store)) == 1 and len(clones(reuse)) == 1
    assert clones(reuse)[0].args[0].name == "cache_spatial_attn_0"

    cache, state = {}, {}

    def hook(mod, args, out):  # hand-written PAB that copies what it stores and what it hands out
        if 100 < state["t"] < 800 and state["i"] % 3 != 0:
            return cache["s"].clone()
        cache["s"] = out.clone()

    h = model.spatial_attn.register_forward_hook(hook)
    x_ref, x, stored = kw["hidden_states"], kw["hidden_states"], None
    try:
        with torch.no_grad():
            for i, t in enumerate(ts):
                state.update(i=i, t=t)
                call = dict(kw, timestep=torch.full((1,), t))
                ref = model(**dict(call, hidden_states=x_ref))
                got = opt(**dict(call, hidden_states=x))
                assert torch.allclose(got, ref, rtol=0, atol=1e-6), f"step {i}"
                held = opt.state().cache
                if "spatial_attn:0" in held:
                    now = held.get("spatial_attn:0").clone()
                    if opt.state().trace[-1][1].reused:  # a reuse step left the cached tensor unchanged
                        assert torch.equal(now, stored)
                    stored = now
                x_ref, x = x_ref - 0.1 * ref, x - 0.1 * got
    finally:
        h.remove()
    assert sum(len(ph.reused) for _, ph in opt.state().trace) > 0
