"""Residual caching beyond single-stream blocks, on tiny random diffusers models built here:

* CogVideoX (``CogVideoXBlock``: video and text carried from block to block, joint attention over both);
  with rotary embeddings (held by a wrapper, whose capture writes them into q and k in place);
* HunyuanVideo (double-stream blocks, then single-stream blocks that concatenate text and video tokens
  inside the block and slice them apart again; a text token refiner, itself a list of blocks, in the
  context embedder);
* Wan (residual adds wrapped in casts: ``(h.float() + f.float() * gate).type_as(h)``; rotary embeddings
  written in place into an ``empty_like`` buffer);
* a two-stream chain of CogVideoX blocks whose text tokens are read after the blocks (concatenated with the
  video, normalised, sliced off), so that two residuals are cached.

Each is checked against eager (always-compute codebook, bit-exact), against a module-level residual-reuse
reference (:class:`adacache_helpers.BlockResidualReuse`: every block's forward wrapped; a reuse step returns
each input plus its kept residual) over a 10-step loop, and by counting the attention ops left in the reuse
graph. Mochi is not here: its capture stops at a data-dependent size (``GuardOnDataDependentSymNode``).
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from adacache_helpers import run_reference
from conftest import DDIM_50, run_loop
import graphpass
from graphpass import AdaCache, FrozenAdaCache, TaggingError
from graphpass.passes.capture import capture
from graphpass.passes.residuals import Concat, find_block_span
from graphpass.passes.tag import tag_attention
from graphpass.runtime.adaptive import ResidualModel
from graphpass.schedules.base import Action, Phase

import diffusers
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_3d_rotary_pos_embed
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock

TS = DDIM_50[::5]  # 10 steps: 981, 881, ..., 81
ALWAYS = {1.0: 1}  # every distance maps to "compute the next step too"
SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _noise(*shapes, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g) for s in shapes]


def _t():
    return torch.full((2,), 500, dtype=torch.int64)


# --- the models -------------------------------------------------------------------------------------------
def _cogvideox(rotary: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16 if rotary else 8, in_channels=4, out_channels=4, num_layers=2,
        sample_width=8, sample_height=8, sample_frames=9, patch_size=2, text_embed_dim=16, time_embed_dim=8,
        temporal_compression_ratio=4, max_text_seq_length=5, use_rotary_positional_embeddings=rotary).eval()


def _cogvideox_kwargs():
    video, text = _noise((2, 3, 4, 8, 8), (2, 5, 16))
    return dict(hidden_states=video, timestep=_t(), encoder_hidden_states=text, return_dict=False)


class CogVideoXWithRotary(nn.Module):
    """CogVideoX-5B style: rotary embeddings for its 3x4x4 latent tokens (head dim 16: the 3-D rotary
    embedding splits it 4 + 6 + 6), held as buffers and passed to every call."""

    def __init__(self):
        super().__init__()
        self.transformer = _cogvideox(rotary=True)
        cos, sin = get_3d_rotary_pos_embed(16, ((0, 0), (4, 4)), (4, 4), 3)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)

    def forward(self, hidden_states, encoder_hidden_states, timestep, return_dict=False):
        return self.transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                timestep=timestep, image_rotary_emb=(self.cos, self.sin), return_dict=False)


def _hunyuan() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2, num_single_layers=2,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(2, 2, 4), guidance_embeds=False).eval()


def _hunyuan_kwargs():
    video, text, pooled = _noise((2, 4, 3, 8, 8), (2, 5, 16), (2, 8))
    return dict(hidden_states=video, timestep=_t(), encoder_hidden_states=text,
                encoder_attention_mask=torch.ones(2, 5, dtype=torch.int64), pooled_projections=pooled,
                return_dict=False)


def _wan() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16,
        freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32).eval()


def _wan_kwargs():
    video, text = _noise((2, 4, 3, 8, 8), (2, 5, 16))
    return dict(hidden_states=video, timestep=_t(), encoder_hidden_states=text, return_dict=False)


class TwoStreamDiT(nn.Module):
    """Two CogVideoX blocks on (video tokens, text tokens) whose text tokens are read after the chain: the
    output layer normalises the concatenation of both and keeps the video tokens (LayerNorm is per token, so
    the text matters only through the blocks, but the graph reads it after them)."""

    def __init__(self, dim: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.proj_in = nn.Linear(4, dim)
        self.text_in = nn.Linear(16, dim)
        self.time_proj = Timesteps(8, True, 0)
        self.time_embedding = TimestepEmbedding(8, 8)
        self.transformer_blocks = nn.ModuleList(
            CogVideoXBlock(dim=dim, num_attention_heads=2, attention_head_dim=8, time_embed_dim=8) for _ in range(2))
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, 4)
        self.eval()

    def forward(self, hidden_states, encoder_hidden_states, timestep):
        h, e = self.proj_in(hidden_states), self.text_in(encoder_hidden_states)
        temb = self.time_embedding(self.time_proj(timestep))
        for block in self.transformer_blocks:
            h, e = block(h, e, temb)
        x = self.norm_out(torch.cat([e, h], dim=1))
        return (self.proj_out(x[:, e.shape[1]:]),)


def _two_stream_kwargs():
    video, text = _noise((2, 12, 4), (2, 5, 16))
    return dict(hidden_states=video, encoder_hidden_states=text, timestep=_t())


#: name -> (build, kwargs, the blocks a reuse step skips, in call order, and how many hidden states leave them)
CASES = {
    "cogvideox": (_cogvideox, _cogvideox_kwargs, ["transformer_blocks.0", "transformer_blocks.1"], 1),
    "cogvideox-rotary": (CogVideoXWithRotary, _cogvideox_kwargs,
                         ["transformer.transformer_blocks.0", "transformer.transformer_blocks.1"], 1),
    "hunyuanvideo": (_hunyuan, _hunyuan_kwargs, ["transformer_blocks.0", "transformer_blocks.1",
                                                 "single_transformer_blocks.0", "single_transformer_blocks.1"], 1),
    "wan": (_wan, _wan_kwargs, ["blocks.0", "blocks.1"], 1),
    "two-stream": (TwoStreamDiT, _two_stream_kwargs, ["transformer_blocks.0", "transformer_blocks.1"], 2),
    "cat-between": (lambda: CatBetweenBlocks(), _two_stream_kwargs,
                    ["transformer_blocks.0", "transformer_blocks.1", "single_blocks.0", "single_blocks.1"], 1),
}
NAMES = list(CASES)


@functools.lru_cache(maxsize=None)
def _captured(name: str):
    build, kwargs, _, _ = CASES[name]
    model = build()
    cap = capture(model, kwargs())
    return model, cap, tag_attention(cap)


def _optimized(name: str, schedule) -> ResidualModel:
    model, cap, regions = _captured(name)
    opt = ResidualModel(model, cap, regions, schedule)
    opt.plan(TS)
    return opt


def _max_rel(xs, ys) -> float:
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(xs, ys))


def _attention_modules(model: nn.Module, blocks) -> tuple[int, int]:
    """(attention modules inside ``blocks``, outside them), read from the module tree."""
    paths = [p for p, m in model.named_modules() if isinstance(m, (Attention, AttentionModuleMixin))]
    inside = sum(any(p.startswith(b + ".") for b in blocks) for p in paths)
    return inside, len(paths) - inside


def _count(gm, target) -> int:
    return sum(n.op == "call_function" and n.target == target for n in gm.graph.nodes)


# --- the tests --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_span_carries_every_stream_that_leaves_the_blocks(name):
    _, cap, regions = _captured(name)
    _, _, blocks, streams = CASES[name]
    span = find_block_span(cap, regions)
    assert span.blocks == blocks  # HunyuanVideo: its token refiner (blocks inside the context embedder) is not
    assert len(span.streams) == len(span.residual_keys) == streams
    nodes = {n.name: n for n in cap.gm.graph.nodes}
    for (x, o), spec in zip(span.streams, span.specs):
        assert nodes[o].meta["val"].shape == spec.shape
        if not isinstance(x, Concat):
            assert nodes[x].meta["val"].shape == spec.shape
    if streams == 2:  # video (2 x 12 tokens) first, then text (2 x 5 tokens)
        assert [s.shape for s in span.specs] == [(2, 12, 16), (2, 5, 16)]


@pytest.mark.parametrize("name", NAMES)
def test_always_compute_codebook_equals_eager(name):
    build, kwargs, _, _ = CASES[name]
    eager = run_loop(build(), kwargs(), TS)
    opt = _optimized(name, AdaCache(codebook=ALWAYS))
    outs = run_loop(opt, kwargs(), TS)
    assert opt.decisions() == "C" * len(TS)
    assert max((a - b).abs().max().item() for a, b in zip(outs, eager)) == 0.0
    assert [r.step for r in opt.records()] == [1, 2, 3, 4, 5, 6]  # it measured (on the middle block's residual)


@pytest.mark.parametrize("name, decisions", [("cogvideox", "CCRRCRCRRC"), ("cogvideox-rotary", "CCRRRCRCRC"),
                                             ("hunyuanvideo", "CCRRCRCRRC"), ("wan", "CCRCRRRCRC"),
                                             ("two-stream", "CCRRRCRCRC"), ("cat-between", "CCRRCRRCRC")])
def test_frozen_decisions_equal_block_reference(name, decisions):
    build, kwargs, blocks, _ = CASES[name]
    opt = _optimized(name, FrozenAdaCache(decisions))
    outs = run_loop(opt, kwargs(), TS)
    assert opt.decisions() == decisions
    ref = run_reference(build(), kwargs(), TS, decisions, blocks=blocks)
    assert _max_rel(outs, ref) < 1e-5
    assert _max_rel(outs, run_loop(build(), kwargs(), TS)) > 1e-3  # reuse changed the result
    assert len(opt.state().cache) == 0


@pytest.mark.parametrize("name", NAMES)
def test_reuse_graph_runs_no_attention_of_the_blocks(name):
    model, cap, regions = _captured(name)
    _, _, blocks, streams = CASES[name]
    opt = _optimized(name, FrozenAdaCache("CCR"))
    inside, outside = _attention_modules(model, blocks)
    full = opt.phase_graph(Phase())
    reuse = opt.phase_graph(Phase.of({opt.span.path: Action.REUSE}))
    assert inside > 0
    assert _count(full.gm, SDPA) == inside + outside
    # HunyuanVideo's token refiner (the one attention outside the blocks) only prepares the text tokens the
    # blocks read, so it goes as well; every other model has no attention outside its blocks.
    assert outside == (1 if name == "hunyuanvideo" else 0)
    assert _count(reuse.gm, SDPA) == 0
    assert reuse.cache_inputs == opt.span.residual_keys and len(reuse.cache_inputs) == streams
    store = opt.phase_graph(Phase.of({opt.span.path: Action.STORE}))
    assert store.cache_outputs == opt.span.residual_keys


@pytest.mark.parametrize("name", ["wan", "cogvideox-rotary"])
def test_in_place_rotary_writes_of_the_blocks_are_dropped_on_reuse(name):
    """Capture turns the rotary ``out[..., 0::2] = ...`` writes into ``slice_scatter``; reusing the blocks
    removes them with the blocks."""
    opt = _optimized(name, FrozenAdaCache("CCR"))
    writes = (torch.ops.aten.copy_.default, torch.ops.aten.slice_scatter.default)
    assert sum(_count(opt.phase_graph(Phase()).gm, w) for w in writes) > 0
    assert sum(_count(opt.phase_graph(Phase.of({opt.span.path: Action.REUSE})).gm, w) for w in writes) == 0


def test_block_metric_on_two_stream_blocks_matches_eager_residuals():
    """HunyuanVideo's default metric site: the middle block (a double-stream block), measured on its video
    tokens: ``out[0] - hidden_states`` of its forward."""
    build, kwargs, _, _ = CASES["hunyuanvideo"]
    model = build()
    got = []
    model.transformer_blocks[1].register_forward_hook(
        lambda m, args, out: got.append((out[0] - args[0]).detach().clone()))
    run_loop(model, kwargs(), TS)
    opt = _optimized("hunyuanvideo", AdaCache(codebook=ALWAYS))
    run_loop(opt, kwargs(), TS)
    assert (opt.metric.path, opt.metric.kind) == ("transformer_blocks.1", "block")
    for rec in opt.records():
        now, prev = got[rec.step], got[rec.step - 1]
        dist = [((now[b] - prev[b]).abs().sum() / prev[b].abs().sum()).item() for b in range(2)]
        assert rec.distance == pytest.approx(dist, rel=1e-5)


def test_adaptive_run_reuses_and_replays():
    _, kwargs, _, _ = CASES["two-stream"]
    opt = _optimized("two-stream", AdaCache(codebook={0.5: 3, 1.0: 1}))
    first = run_loop(opt, kwargs(), TS)
    assert "R" in opt.decisions()
    replay = run_loop(_optimized("two-stream", opt.freeze()), kwargs(), TS)
    assert max((a - b).abs().max().item() for a, b in zip(first, replay)) == 0.0


class CatBetweenBlocks(TwoStreamDiT):
    """Two-stream blocks, then text and video concatenated OUTSIDE the blocks (``join``) into single-stream
    blocks, then the video tokens sliced off (Flux's layout)."""

    def __init__(self):
        super().__init__()
        self.single_blocks = nn.ModuleList([SingleBlock(16) for _ in range(2)])

    def join(self, e, h):
        return torch.cat([e, h], dim=1)

    def forward(self, hidden_states, encoder_hidden_states, timestep):
        h, e = self.proj_in(hidden_states), self.text_in(encoder_hidden_states)
        temb = self.time_embedding(self.time_proj(timestep))
        for block in self.transformer_blocks:
            h, e = block(h, e, temb)
        x = self.join(e, h)
        for block in self.single_blocks:
            x = block(x)
        return (self.proj_out(self.norm_out(x[:, e.shape[1]:])),)


class SlicedJoin(CatBetweenBlocks):
    """Joins text with only part of the video tokens: not a concatenation of whole hidden states."""

    def join(self, e, h):
        return torch.cat([e, h[:, :6]], dim=1)


class SingleBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(query_dim=dim, heads=2, dim_head=8)

    def forward(self, x):
        return x + self.attn(self.norm(x))


def test_concatenation_between_blocks_enters_as_one_stream():
    _, cap, regions = _captured("cat-between")
    span = find_block_span(cap, regions)
    nodes = {n.name: n for n in cap.gm.graph.nodes}
    (x, o), = span.streams
    # the single blocks' stream enters the chain as text and video tokens entering the first two-stream block
    assert isinstance(x, Concat) and x.dim == 1
    assert [tuple(nodes[p].meta["val"].shape) for p in x.parts] == [(2, 5, 16), (2, 12, 16)]
    assert span.specs[0].shape == (2, 17, 16) == tuple(nodes[o].meta["val"].shape)


def test_other_joins_between_blocks_are_refused_clearly():
    cap = capture(SlicedJoin(), _two_stream_kwargs())
    with pytest.raises(TaggingError, match=r"block single_blocks\.0's hidden state .* is built from 2 outputs of "
                                           r"block transformer_blocks\.1 .*sliced \(1, 0, 6\).* otherwise than by "
                                           r"one concatenation \(aten\.cat\) of whole outputs"):
        find_block_span(cap, tag_attention(cap))


def _hunyuan_attn_residual(model):
    """What ``transformer_blocks.1.attn`` adds to the video tokens: ``attn_output * gate_msa.unsqueeze(1)``."""
    block, got, gates = model.transformer_blocks[1], [], []
    block.norm1.register_forward_hook(lambda m, a, out: gates.append(out[1]))
    block.attn.register_forward_hook(lambda m, a, out: got.append(out[0] * gates[-1].unsqueeze(1)))
    return got


def _cogvideox_ff_residual(model):
    """What ``transformer_blocks.1.ff`` (over text and video tokens) adds to the video tokens:
    ``gate_ff * ff_output[:, text_length:]``."""
    block, got, gates = model.transformer_blocks[1], [], []
    block.norm2.register_forward_hook(lambda m, a, out: gates.append(out[2]))
    block.ff.register_forward_hook(lambda m, a, out: got.append(gates[-1] * out[:, 5:]))
    return got


@pytest.mark.parametrize("name, metric_at, record", [
    ("hunyuanvideo", "transformer_blocks.1.attn", _hunyuan_attn_residual),
    ("cogvideox", "transformer_blocks.1.ff", _cogvideox_ff_residual),
])
def test_joint_region_metric_measures_the_video_tokens(name, metric_at, record):
    build, kwargs, _, _ = CASES[name]
    model = build()
    got = record(model)
    run_loop(model, kwargs(), TS)
    opt = _optimized(name, AdaCache(codebook=ALWAYS, metric_at=metric_at))
    run_loop(opt, kwargs(), TS)
    assert (opt.metric.kind, opt.metric.spec.shape) == ("region", (2, 48, 16))
    assert len(opt.records()) == 6
    for rec in opt.records():
        now, prev = got[rec.step], got[rec.step - 1]
        dist = [((now[b] - prev[b]).abs().sum() / prev[b].abs().sum()).item() for b in range(2)]
        assert rec.distance == pytest.approx(dist, rel=1e-5)


@pytest.mark.parametrize("name, resize", [
    ("hunyuanvideo", dict(hidden_states=(2, 4, 2, 6, 10))),  # other frames, height and width
    ("wan", dict(hidden_states=(2, 4, 2, 6, 10))),
    ("cat-between", dict(hidden_states=(2, 7, 4), encoder_hidden_states=(2, 3, 16))),  # other token counts
])
def test_dynamic_capture_at_another_size_equals_reference(name, resize):
    """One capture with free sizes (``dynamic=True``) serves another size: the streams, slices and the
    concatenation found at the example's size hold at the new one."""
    build, kwargs, blocks, _ = CASES[name]
    decisions = "CCRRCRCRRC"
    opt = graphpass.optimize(build(), FrozenAdaCache(decisions), example_kwargs=kwargs(), timesteps=TS, dynamic=True)
    kw = {**kwargs(), **{k: t for k, t in zip(resize, _noise(*resize.values(), seed=5))}}
    outs = run_loop(opt, kw, TS)
    assert opt.decisions() == decisions
    assert _max_rel(outs, run_reference(build(), kw, TS, decisions, blocks=blocks)) < 1e-5
    assert _max_rel(outs, run_loop(build(), kw, TS)) > 1e-3


class PostNormBlocks(nn.Module):
    """Blocks normalising after their skip add, ``x -> norm(x + attn(x))``: no residual to carry on."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj_in = nn.Linear(4, 16)
        self.blocks = nn.ModuleList(PostNormBlock(16) for _ in range(2))

    def forward(self, hidden_states):
        x = self.proj_in(hidden_states)
        for block in self.blocks:
            x = block(x)
        return (x,)


class PostNormBlock(SingleBlock):
    def forward(self, x):
        return self.norm(x + self.attn(x))


def test_blocks_without_a_residual_form_are_refused_clearly():
    cap = capture(PostNormBlocks(), dict(hidden_states=torch.randn(2, 12, 4)))
    with pytest.raises(TaggingError, match=r"hidden state entering block blocks\.1: its output .*\(computed by "
                                           r"aten\.layer_norm.*x -> norm\(x \+ f\(x\)\), is not"):
        find_block_span(cap, tag_attention(cap))
