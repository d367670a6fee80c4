"""Tiny diffusers video transformers for the capture tests, and the two checks every fix is held to.

* :func:`check_never_reusing`: a PAB schedule whose window holds no timestep of the loop runs the full graph
  every step; its outputs must equal eager bit for bit.
* :func:`check_pab_reference`: a PAB schedule over a 20-step loop must equal the module-level reference
  (tests/reference_pab.py) within 1e-5 relative, and must really reuse (the result differs from eager).

    >>> case = wan()
    >>> check_pab_reference(case, {"blocks.0.attn1": "joint"}, PAB(joint=2, window=(100, 800)))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

import graphpass
from graphpass import PAB
from conftest import first, run_loop
from reference_pab import ReferencePAB

torch.set_num_threads(1)

#: 20 sampler steps on the 0..1000 scale, high to low.
STEPS_20 = [float(t) for t in torch.linspace(981, 1, 20).round()]
RTOL = 1e-5


@dataclass
class Case:
    """``build()`` returns a fresh model with the same seeded weights; ``kwargs()`` one call's arguments."""

    build: Callable[[], torch.nn.Module]
    kwargs: Callable[[], dict[str, Any]]


def wan(rope_len: int = 32) -> Case:
    """WanTransformer3DModel: rotary embeddings written in place (``out[..., 0::2] = ...``) in every self
    attention. hidden_states (B, C, F, H, W) = (2, 4, 3, 8, 8)."""
    from diffusers import WanTransformer3DModel

    def build():
        torch.manual_seed(0)
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                     in_channels=4, out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32,
                                     num_layers=2, rope_max_seq_len=rope_len).eval()

    def kwargs():
        g = torch.Generator().manual_seed(2)
        return dict(hidden_states=torch.randn(2, 4, 3, 8, 8, generator=g), timestep=torch.full((2,), 500.0),
                    encoder_hidden_states=torch.randn(2, 5, 16, generator=g), return_dict=False)

    return Case(build, kwargs)


#: Wan's regions, from transformer_wan.py: attn1 is self attention over all F*H*W tokens of a sample (joint),
#: attn2 attends to encoder_hidden_states (cross), ffn is the block's FeedForward (mlp).
WAN_MODULES = {f"blocks.{i}.{name}": kind for i in range(2)
               for name, kind in (("attn1", "joint"), ("attn2", "cross"), ("ffn", "mlp"))}


def max_rel(got, want) -> float:
    """max |got - want| / max |want| over a list of step outputs."""
    return max(float((g - w).abs().max()) / float(w.abs().max()) for g, w in zip(got, want))


def check_never_reusing(case: Case, schedule: PAB, steps=STEPS_20[:6], **optimize_kw):
    model = case.build()
    kw = case.kwargs()
    eager = run_loop(model, kw, steps)
    opt = graphpass.optimize(model, schedule, example_kwargs=kw, **optimize_kw)
    got = run_loop(opt, kw, steps)
    for i, (g, e) in enumerate(zip(got, eager)):
        assert torch.equal(g, e), f"step {i}: max diff {float((g - e).abs().max())}"
    assert all(ph.actions == () for _, ph in opt.state().trace)
    return opt


def check_pab_reference(case: Case, modules: dict[str, str], schedule: PAB, kw=None,
                        on: graphpass.OptimizedModel | None = None, **optimize_kw):
    """graphpass's PAB over :data:`STEPS_20` against the reference wrapping ``modules``; returns the
    optimized model. ``on``: an optimized model of the same case and example call whose capture, regions and
    hoisting serve (``on.with_schedule(schedule)``) instead of a new capture."""
    kw = kw or case.kwargs()
    ranges = {k: schedule.range_of(k) for k in ("spatial", "temporal", "cross", "joint", "mlp")}
    ref = ReferencePAB(case.build(), modules, ranges, window=schedule.window)
    want = run_loop(ref, kw, STEPS_20)
    ref.restore()
    assert sum(ref.reused.values()) > 0  # the schedule skips work on this loop
    if on is None:
        opt = graphpass.optimize(case.build(), schedule, example_kwargs=case.kwargs(), **optimize_kw)
    else:
        schedule.check_model({r.kind for r in on.attention_regions})
        opt = on.with_schedule(schedule)
    got = run_loop(opt, kw, STEPS_20)
    rel = max_rel(got, want)
    assert rel <= RTOL, f"max relative |graphpass - reference| = {rel}"
    eager = run_loop(case.build(), kw, STEPS_20)
    assert max_rel(got, eager) > 1e-4  # reuse changed the result: not eager compared with eager
    for i, (_, phase) in enumerate(opt.state().trace):
        assert set(phase.reused) == {p for p, r in ref.steps[i].items() if r}, f"step {i}"
    return opt


def hunyuan15() -> Case:
    """HunyuanVideo15Transformer3DModel (i2v): ``if torch.all(image_embeds == 0):`` picks text-to-video; the
    text tokens are reordered per sample by boolean masks (sizes that depend on values)."""
    from diffusers import HunyuanVideo15Transformer3DModel

    def build():
        torch.manual_seed(0)
        return HunyuanVideo15Transformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
            num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=16,
            image_embed_dim=16, rope_axes_dim=(4, 6, 6), target_size=64, task_type="i2v").eval()

    def kwargs(t2v: bool = True):
        g = torch.Generator().manual_seed(2)
        mask = torch.ones(2, 5, dtype=torch.int64)
        mask[1, 3:] = 0
        image = torch.zeros(2, 3, 16) if t2v else torch.randn(2, 3, 16, generator=g)
        return dict(hidden_states=torch.randn(2, 4, 3, 4, 4, generator=g), timestep=torch.full((2,), 500.0),
                    encoder_hidden_states=torch.randn(2, 5, 16, generator=g), encoder_attention_mask=mask,
                    encoder_hidden_states_2=torch.randn(2, 4, 16, generator=g),
                    encoder_attention_mask_2=torch.ones(2, 4, dtype=torch.int64), image_embeds=image,
                    return_dict=False)

    return Case(build, kwargs)


#: HunyuanVideo-1.5's double-stream blocks attend over video and text tokens together (joint).
HUNYUAN15_MODULES = {f"transformer_blocks.{i}.attn": "joint" for i in range(2)}


def mochi() -> Case:
    """MochiTransformer3DModel: each sample's valid prompt tokens are picked with ``nonzero`` of its mask."""
    from diffusers import MochiTransformer3DModel

    def build():
        torch.manual_seed(0)
        return MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                       pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=8,
                                       max_sequence_length=5).eval()

    def kwargs(valid=(5, 3)):
        g = torch.Generator().manual_seed(2)
        mask = torch.stack([torch.arange(5) < v for v in valid])
        return dict(hidden_states=torch.randn(2, 4, 3, 8, 8, generator=g),
                    encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
                    timestep=torch.full((2,), 500, dtype=torch.int64), encoder_attention_mask=mask, return_dict=False)

    return Case(build, kwargs)


def framepack() -> Case:
    """HunyuanVideoFramepackTransformer3DModel: ``attention_mask[i, :effective_sequence_length[i]] = True``
    slices with a tensor bound computed from the text mask."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    def build():
        torch.manual_seed(0)
        return HunyuanVideoFramepackTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
            num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
            guidance_embeds=False, text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6),
            has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True).eval()

    def kwargs(valid=(5, 3)):
        g = torch.Generator().manual_seed(2)
        mask = torch.stack([(torch.arange(5) < v).long() for v in valid])
        return dict(hidden_states=torch.randn(2, 4, 3, 8, 8, generator=g), timestep=torch.full((2,), 500.0),
                    encoder_hidden_states=torch.randn(2, 5, 16, generator=g), encoder_attention_mask=mask,
                    pooled_projections=torch.randn(2, 8, generator=g), image_embeds=torch.randn(2, 3, 16, generator=g),
                    indices_latents=torch.arange(3), latents_clean=torch.randn(2, 4, 1, 8, 8, generator=g),
                    indices_latents_clean=torch.tensor([3]),
                    latents_history_2x=torch.randn(2, 4, 2, 8, 8, generator=g),
                    indices_latents_history_2x=torch.tensor([4, 5]),
                    latents_history_4x=torch.randn(2, 4, 4, 8, 8, generator=g),
                    indices_latents_history_4x=torch.arange(6, 10), return_dict=False)

    return Case(build, kwargs)


__all__ = ["HUNYUAN15_MODULES", "framepack", "hunyuan15", "mochi", "COGVIDEOX_MODULES", "Case", "STEPS_20", "WAN_MODULES", "cogvideox_rope", "check_never_reusing", "check_pab_reference", "first", "max_rel",
           "wan"]


def cogvideox_rope() -> Case:
    """CogVideoXTransformer3DModel with rotary embeddings, passed by the pipeline as a tuple (cos, sin) of
    (tokens, head_dim) tensors. hidden_states (B, F, C, H, W) = (2, 3, 4, 8, 8): 3 * 4 * 4 video tokens."""
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    def build():
        torch.manual_seed(0)
        return CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=2,
            sample_width=8, sample_height=8, sample_frames=9, patch_size=2, text_embed_dim=16, time_embed_dim=8,
            temporal_compression_ratio=4, max_text_seq_length=5, use_rotary_positional_embeddings=True).eval()

    def kwargs(batch: int = 2):
        g = torch.Generator().manual_seed(2)
        rope = get_3d_rotary_pos_embed(embed_dim=16, crops_coords=((0, 0), (4, 4)), grid_size=(4, 4), temporal_size=3)
        return dict(hidden_states=torch.randn(batch, 3, 4, 8, 8, generator=g),
                    timestep=torch.full((batch,), 500, dtype=torch.int64),
                    encoder_hidden_states=torch.randn(batch, 5, 16, generator=g), image_rotary_emb=tuple(rope),
                    return_dict=False)

    return Case(build, kwargs)


#: CogVideoX's regions: attn1 attends over text and video tokens of a sample together (joint); ff is mlp.
COGVIDEOX_MODULES = {f"transformer_blocks.{i}.{name}": kind for i in range(2)
                     for name, kind in (("attn1", "joint"), ("ff", "mlp"))}
