"""In-place writes inside attention: dead-code elimination reads writes by the memory they touch.

Wan applies rotary embeddings with ``out = torch.empty_like(x); out[..., 0::2] = ...``; export keeps the
writes (``copy_`` into slices of ``out``). When the attention is reused, nothing reads ``out`` any more, so
its writes are dead and the region must vanish from the phase graph. Writes that someone still reads, and
writes into inputs or parameters, stay.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.fx as fx
from torch import nn

import graphpass
from graphpass import PAB
from graphpass.passes.capture import capture
from graphpass.passes.specialize import eliminate_dead_code
from capture_helpers import WAN_MODULES, check_never_reusing, check_pab_reference, wan

aten = torch.ops.aten


class Rope(nn.Module):
    """Writes its result into a fresh tensor, like Wan's rotary embedding; ``keep`` adds a write into a
    buffer (state the caller sees)."""

    def __init__(self, keep: bool = False):
        super().__init__()
        self.keep = keep
        self.register_buffer("count", torch.zeros(1))

    def forward(self, x, y):
        out = torch.empty_like(x)
        out[..., 0::2] = x[..., 0::2] * 2
        out[..., 1::2] = x[..., 1::2] * 3
        if self.keep:
            self.count.add_(1)
        return y + 1, out.sum()


def _graph(keep: bool) -> fx.GraphModule:
    """The exported graph as export leaves it (in-place writes kept; capture would rewrite them)."""
    x, y = torch.randn(2, 4), torch.randn(3)
    gm = torch.export.export(Rope(keep), (x, y), strict=False).module()
    for n in [n for n in gm.graph.nodes if n.op == "call_module"]:  # export's input guards
        gm.graph.erase_node(n)
    gm.graph._codegen = fx.graph.CodeGen()  # flat inputs and outputs
    gm.recompile()
    return gm


def _ops(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_dead_writes_go_with_their_tensor():
    gm = _graph(keep=False)
    assert _ops(gm).count(aten.copy_.default) == 2
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((out.args[0][0],),)  # drop the reader of `out`: its writes are now dead
    eliminate_dead_code(gm.graph)
    gm.recompile()
    assert [op for op in _ops(gm) if op != aten._assert_tensor_metadata.default] == [aten.add.Tensor]
    x, y = torch.randn(2, 4), torch.randn(3)
    assert torch.equal(gm(x, y)[0], y + 1)


def test_read_writes_and_state_writes_stay():
    gm = _graph(keep=False)
    eliminate_dead_code(gm.graph)  # `out` is read by the sum: both writes stay
    gm.recompile()
    assert _ops(gm).count(aten.copy_.default) == 2
    x, y = torch.randn(2, 4), torch.randn(3)
    want = x[..., 0::2].sum() * 2 + x[..., 1::2].sum() * 3
    assert torch.allclose(gm(x, y)[1], want)

    gm = _graph(keep=True)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((out.args[0][0],),)
    eliminate_dead_code(gm.graph)
    assert _ops(gm).count(aten.add_.Tensor) == 1  # the buffer's update is seen by the caller
    assert aten.copy_.default not in _ops(gm)


def test_capture_rewrites_slice_writes_out_of_place():
    model = Rope()
    cap = capture(model, dict(x=torch.randn(2, 4), y=torch.randn(3)))
    assert aten.copy_.default not in _ops(cap.gm) and _ops(cap.gm).count(aten.slice_scatter.default) == 2
    x, y = torch.randn(2, 4), torch.randn(3)
    got = cap.unflatten_outputs(cap.gm(*cap.flatten_call(dict(x=x, y=y))))
    assert all(torch.equal(g, w) for g, w in zip(got, model(x, y)))


@functools.lru_cache(maxsize=None)
def _wan_never_reusing() -> graphpass.OptimizedModel:
    """Wan through :func:`check_never_reusing`, once per module: the PAB comparison builds on its capture."""
    return check_never_reusing(wan(), PAB(joint=2, cross=3, mlp=3, window=(2000, 3000)))


def test_wan_captures_and_never_reusing_equals_eager():
    opt = _wan_never_reusing()
    ops = _ops(opt.captured.gm)
    assert aten.copy_.default not in ops and ops.count(aten.slice_scatter.default) == 8  # 2 blocks x q, k x 2


def test_wan_pab_matches_reference():
    opt = check_pab_reference(wan(), WAN_MODULES, PAB(joint=2, cross=4, mlp=3, window=(100, 800)),
                              on=_wan_never_reusing())
    reused = {p for _, ph in opt.state().trace for p in ph.reused}
    assert {"blocks.0.attn1", "blocks.1.attn1"} <= reused
    # The phase that reuses every joint attention runs none of their rotary writes.
    ph = next(ph for _, ph in opt.state().trace if {"blocks.0.attn1", "blocks.1.attn1"} <= set(ph.reused))
    pg = opt.phase_graph(ph)
    assert pg.attention_ops() == sum(1 for p, k in WAN_MODULES.items() if k == "cross" and p not in ph.reused)
    assert not any(n.target == aten.copy_.default for n in pg.gm.graph.nodes)


class BlockResidualReuse:
    """Module-level residual reuse: on a reuse call every block returns its input plus the residual
    (output - input) it produced on the last compute call."""

    def __init__(self, model: nn.Module, paths):
        self.reuse, self.cache = False, {}
        for path in paths:
            block = model.get_submodule(path)
            block.forward = self._wrap(path, block.forward)

    def _wrap(self, path, forward):
        def wrapped(x, *args, **kwargs):
            if self.reuse:
                return x + self.cache[path]
            out = forward(x, *args, **kwargs)
            self.cache[path] = out - x
            return out

        return wrapped


class RopeAttention(nn.Module):
    """Self attention whose rotary embedding is written in place, as in Wan."""

    def __init__(self, dim: int = 8, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, cos, sin):
        b, n, d = x.shape
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))

        def rope(t):
            out = torch.empty_like(t)
            out[..., 0::2] = t[..., 0::2] * cos - t[..., 1::2] * sin
            out[..., 1::2] = t[..., 0::2] * sin + t[..., 1::2] * cos
            return out

        o = torch.nn.functional.scaled_dot_product_attention(rope(q), rope(k), v)
        return self.out(o.transpose(1, 2).reshape(b, n, d))


class RopeBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1 = RopeAttention()
        self.t = nn.Linear(1, 8)

    def forward(self, x, temb, cos, sin):
        return x + self.attn1(x + self.t(temb)[:, None], cos, sin)


class RopeDiT(nn.Module):
    """hidden_states (B, C, F, H, W) -> same; one token per pixel; rotary tables passed as a tuple."""

    def __init__(self):
        super().__init__()
        self.embed, self.proj_out = nn.Linear(2, 8), nn.Linear(8, 2)
        self.blocks = nn.ModuleList(RopeBlock() for _ in range(2))

    def forward(self, hidden_states, timestep, rope):
        b, c, f, h, w = hidden_states.shape
        x = self.embed(hidden_states.flatten(2).transpose(1, 2))
        temb = timestep[:, None] / 1000
        for block in self.blocks:
            x = block(x, temb, *rope)
        return self.proj_out(x).transpose(1, 2).reshape(b, c, f, h, w)


def test_residual_reuse_drops_rotary_writes():
    # The residual passes rewrite graphs with the same dead-code elimination: reusing the blocks' residual
    # must drop their rotary writes too.
    from graphpass import FrozenAdaCache
    from conftest import first, step
    from capture_helpers import STEPS_20, max_rel

    def build():
        torch.manual_seed(0)
        return RopeDiT().eval()

    g = torch.Generator().manual_seed(1)
    angles = torch.randn(48, 2, generator=g)
    kw = dict(hidden_states=torch.randn(2, 2, 3, 4, 4, generator=g), timestep=torch.full((2,), 500.0),
              rope=(angles.cos(), angles.sin()))
    decisions = "CCRCRRCRRRCCRCRRCRCC"
    opt = graphpass.optimize(build(), FrozenAdaCache(decisions), example_kwargs=kw)
    model = build()
    ref = BlockResidualReuse(model, ["blocks.0", "blocks.1"])
    x_ref = x_opt = kw["hidden_states"]
    got, want = [], []
    with torch.no_grad():
        for t, d in zip(STEPS_20, decisions):
            ref.reuse = d == "R"
            tt = torch.full((2,), t)
            o_ref = model(**dict(kw, hidden_states=x_ref, timestep=tt))
            o_opt = opt(**dict(kw, hidden_states=x_opt, timestep=tt))
            want.append(first(o_ref))
            got.append(first(o_opt))
            x_ref, x_opt = step(x_ref, o_ref), step(x_opt, o_opt)
    assert max_rel(got, want) <= 1e-5
    reuse = [opt.phase_graph(ph) for _, ph in opt.state().trace if ph.reused]
    assert reuse and all(pg.attention_ops() == 0 for pg in reuse)
    assert not any(n.target == aten.copy_.default for pg in reuse for n in pg.gm.graph.nodes)


@pytest.mark.parametrize("name", ["SkyReelsV2Transformer3DModel", "ChronoEditTransformer3DModel",
                                  "WanVACETransformer3DModel"])
def test_models_built_on_wan(name):
    # Wan's attention (rotary written in place) inside other models: capture, equal eager, reusable regions.
    import diffusers
    from capture_helpers import Case
    from graphpass.schedules.base import Action, Phase

    extra = dict(vace_layers=[0], vace_in_channels=6) if "VACE" in name else {}

    def build():
        torch.manual_seed(0)
        return getattr(diffusers, name)(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                        in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                        num_layers=2, rope_max_seq_len=32, **extra).eval()

    def kwargs():
        g = torch.Generator().manual_seed(2)
        kw = dict(hidden_states=torch.randn(2, 4, 3, 8, 8, generator=g), timestep=torch.full((2,), 500.0),
                  encoder_hidden_states=torch.randn(2, 5, 16, generator=g), return_dict=False)
        if extra:
            kw.update(control_hidden_states=torch.randn(2, 6, 3, 8, 8, generator=g),
                      control_hidden_states_scale=torch.ones(1))
        return kw

    opt = check_never_reusing(Case(build, kwargs), PAB(joint=2, window=(2000, 3000)), steps=[981.0, 900.0])
    joint = [r.path for r in opt.regions if r.kind == "joint"]
    assert "blocks.0.attn1" in joint
    pg = opt.phase_graph(Phase.of({p: Action.REUSE for p in joint}))
    assert pg.attention_ops() == sum(1 for r in opt.regions if r.kind == "cross")
