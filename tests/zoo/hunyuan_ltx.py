"""Zoo family: HunyuanVideo (1.0, 1.5, FramePack), LTX-Video (1 and 2), SANA-WM's LTX-2 refiner, Mochi, Kandinsky 5/6.

Every case is a tiny seeded config of one diffusers 0.42.1 class, called with the keyword arguments its pipeline
passes (read from ``diffusers/pipelines/...``), batch 2. Kinds come from reading each model's source; the reasons
name the construct that decides them.

Some diffusers classes start with zero-initialised parameters (Kandinsky 5's AdaLN ``Kandinsky5Modulation``,
Mochi's ``pos_frequencies``, Kandinsky 6 SR's ``pooled_bias``): with them, every gated region would add exactly
zero and a cache of it could never be told from a recomputation. :func:`_seeded` gives every all-zero parameter
small seeded values so that each region changes the output.

    >>> from zoo.hunyuan_ltx import CASES
    >>> case = next(c for c in CASES if c.name == "ltx-video")
    >>> out = case.build()(**case.kwargs())
    >>> tuple(out[0].shape)
    (2, 48, 8)
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from . import ZooCase

#: std of the seeded values that replace all-zero initial parameters (large enough that gates are not ~0).
_WAKE_STD = 0.1


def _seeded(cls: type, **config) -> torch.nn.Module:
    """``cls(**config)`` built under seed 0, in eval mode, with every all-zero parameter given seeded values.

    Same weights on every call:

        >>> from diffusers import MochiTransformer3DModel
        >>> a = _seeded(MochiTransformer3DModel, **_MOCHI); b = _seeded(MochiTransformer3DModel, **_MOCHI)
        >>> bool(torch.equal(a.pos_frequencies, b.pos_frequencies)) and bool(a.pos_frequencies.any())
        True
    """
    torch.manual_seed(0)
    model = cls(**config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not bool(p.any()):  # zero-initialised (AdaLN-Zero style): the region it gates would be dead
                p.copy_(_WAKE_STD * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _rand(seed: int = 2) -> Callable[..., torch.Tensor]:
    """A seeded ``randn(*shape)``; each ``kwargs()`` call starts from the same seed, so values repeat."""
    g = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=g)


def _blocks(prefix: str, n: int, entries: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """``entries`` (sub-path -> (kind, reason)) repeated for blocks ``prefix.0`` .. ``prefix.{n-1}``.

        >>> _blocks("blocks", 2, {"attn": ("joint", "why")})
        {'blocks.0.attn': ('joint', 'why'), 'blocks.1.attn': ('joint', 'why')}
    """
    return {f"{prefix}.{i}.{sub}": kr for i in range(n) for sub, kr in entries.items()}


#: Batch 2 (one batched classifier-free-guidance call), text length 5, one padded prompt.
B, L = 2, 5
TEXT_MASK = [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
#: FlowMatch schedulers give float32 timesteps on the 0..1000 scale; pipelines expand ``t`` to the batch.
T_FLOW = 700.0


# ------------------------------------------------------------------------------------------------ HunyuanVideo

_HV = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
           num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
           text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4))

_HV_REFINER = {
    "attn": ("text", "HunyuanVideoIndividualTokenRefinerBlock.attn: Attention(encoder_hidden_states=None) over the "
                     "text tokens only, masked by encoder_attention_mask"),
    "ff": ("mlp", "token refiner feed-forward (linear-silu) on text tokens"),
}
_HV_DUAL = {
    "attn": ("joint", "HunyuanVideoAttnProcessor2_0: video q/k/v (to_q/to_k/to_v) and text q/k/v "
                      "(add_q_proj/...) concatenated into one sequence of F*H*W + L tokens, one SDPA"),
    "ff": ("mlp", "video stream feed-forward of the dual-stream block"),
    "ff_context": ("mlp", "text stream feed-forward of the dual-stream block (text carried block to block)"),
}
_HV_SINGLE = {
    "attn": ("joint", "single-stream block: cat([video, text]) split then re-concatenated by the processor "
                      "(add_q_proj is None) into one sequence of F*H*W + L tokens"),
}


def _hv_kinds(prefix_refiner: str, n_dual: int, n_single: int, n_refiner: int) -> dict[str, tuple[str, str]]:
    return {**_blocks(prefix_refiner, n_refiner, _HV_REFINER),
            **_blocks("transformer_blocks", n_dual, _HV_DUAL),
            **_blocks("single_transformer_blocks", n_single, _HV_SINGLE)}


def _hunyuan_video(image_condition_type: str | None = None) -> Callable[[], torch.nn.Module]:
    from diffusers import HunyuanVideoTransformer3DModel

    guidance = image_condition_type is None
    return lambda: _seeded(HunyuanVideoTransformer3DModel, **_HV, guidance_embeds=guidance,
                           image_condition_type=image_condition_type)


def _hunyuan_video_kwargs(guidance: bool) -> Callable[[], dict[str, Any]]:
    def kwargs():
        r = _rand()
        return dict(hidden_states=r(B, 4, 3, 8, 8),  # (B, C, F, H, W)
                    timestep=torch.full((B,), T_FLOW),
                    encoder_hidden_states=r(B, L, 16),
                    encoder_attention_mask=torch.tensor(TEXT_MASK),  # int64 from the tokenizer
                    pooled_projections=r(B, 8),
                    guidance=torch.full((B,), 6000.0) if guidance else None,  # guidance_scale * 1000
                    attention_kwargs=None,
                    return_dict=False)
    return kwargs


_HV_NOTES = (
    "Two-stream blocks carry video and text from block to block (tuple return); single-stream blocks concatenate "
    "text+video (torch.cat, then slices [:, :-L] / [:, -L:]). Rotary: apply_rotary_emb(use_real) on the video "
    "part only, no in-place writes. Masks: HunyuanVideoIndividualTokenRefiner.forward writes in place "
    "`self_attn_mask[:, :, :, 0] = True`; the joint mask is built with masked_fill from "
    "encoder_attention_mask.sum(). Blocks are called with positional args incl. the Python int "
    "first_frame_num_tokens and a None token_replace_emb (absorbed by *args). Timestep also enters the text "
    "refiner (context_embedder takes timestep), so the text tokens change every step. guidance is a tensor "
    "input (guidance_scale*1000)."
)


# ------------------------------------------------------------------------------------------------ HunyuanVideo 1.5

_HV15 = dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
             num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
             text_embed_2_dim=8, image_embed_dim=8, rope_axes_dim=(2, 2, 4))


def _hunyuan_video15() -> torch.nn.Module:
    from diffusers import HunyuanVideo15Transformer3DModel

    return _seeded(HunyuanVideo15Transformer3DModel, **_HV15)


def _hunyuan_video15_kwargs(image: bool) -> Callable[[], dict[str, Any]]:
    def kwargs():
        r = _rand()
        latents = r(B, 4, 3, 4, 4)
        # t2v: zero conditioning latents and mask; i2v: the first frame's latent and a mask of ones on it.
        cond, mask = torch.zeros_like(latents), torch.zeros(B, 1, 3, 4, 4)
        if image:
            cond[:, :, :1] = r(B, 4, 1, 4, 4)
            mask[:, :, :1] = 1.0
        return dict(hidden_states=torch.cat([latents, cond, mask], dim=1),  # (B, 2C+1, F, H, W)
                    image_embeds=r(B, 3, 8) if image else torch.zeros(B, 3, 8),  # SigLIP tokens; zeros for t2v
                    timestep=torch.full((B,), T_FLOW),
                    attention_kwargs=None,
                    return_dict=False,
                    encoder_hidden_states=r(B, L, 16),
                    encoder_attention_mask=torch.tensor(TEXT_MASK, dtype=torch.float32),
                    encoder_hidden_states_2=r(B, 4, 8),  # ByT5 glyph tokens
                    encoder_attention_mask_2=torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    return kwargs


_HV15_KINDS = {
    **_blocks("context_embedder.token_refiner.refiner_blocks", 1, _HV_REFINER),
    **_blocks("transformer_blocks", 2, {
        "attn": ("joint", "HunyuanVideo15AttnProcessor2_0: video q/k/v and the reordered [image, ByT5, MLLM] "
                          "condition q/k/v concatenated into one sequence, one SDPA"),
        "ff": ("mlp", "video stream feed-forward"),
        "ff_context": ("mlp", "condition stream feed-forward (conditions carried block to block)"),
    }),
}
_HV15_NOTES = (
    "Data-dependent Python branch on tensor values: `is_t2v = torch.all(image_embeds == 0)` then `if is_t2v:` "
    "(transformer_hunyuan_video15.py forward) picks the image mask. Per-sample Python loop over the batch with "
    "boolean-mask indexing `image[image_mask]`, `text_2[text_mask_2]`, `text[text_mask]` (data-dependent shapes) "
    "to put valid condition tokens first, then torch.stack. The attention processor builds the (B,1,S,S) mask "
    "from F.pad(attention_mask) every layer. Two-stream blocks (video and conditions carried block to block). "
    "HunyuanVideo15ByT5TextProjection has a fixed 2048-wide hidden layer whatever the config. "
    "hidden_states is cat([latents, cond_latents, mask], dim=1) (in_channels = 2C+1)."
)


# ------------------------------------------------------------------------------------------------ FramePack

_FRAMEPACK = dict(_HV, guidance_embeds=True, has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True)


def _framepack() -> torch.nn.Module:
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    return _seeded(HunyuanVideoFramepackTransformer3DModel, **_FRAMEPACK)


def _framepack_kwargs() -> dict[str, Any]:
    """Inverted anti-drifting sampling, last section (padding 0), latent_window_size 3, history sizes [1, 2, 4]:
    indices = arange(1 + 0 + 3 + 1 + 2 + 4) split [prefix 1, padding 0, latents 3, 1x 1, 2x 2, 4x 4]."""
    r = _rand()
    idx = torch.arange(11)
    prefix, _, latents_idx, h1, h2, h4 = idx.split([1, 0, 3, 1, 2, 4])
    return dict(hidden_states=r(B, 4, 3, 8, 8),
                timestep=torch.full((B,), T_FLOW),
                encoder_hidden_states=r(B, L, 16),
                encoder_attention_mask=torch.tensor(TEXT_MASK),
                pooled_projections=r(B, 8),
                image_embeds=r(B, 4, 16),  # SigLIP last_hidden_state of the start image
                indices_latents=latents_idx,
                guidance=torch.full((B,), 10000.0),
                latents_clean=r(B, 4, 2, 8, 8),  # [image latent, history 1x]
                indices_latents_clean=torch.cat([prefix, h1]),
                latents_history_2x=r(B, 4, 2, 8, 8),
                indices_latents_history_2x=h2,
                latents_history_4x=r(B, 4, 4, 8, 8),
                indices_latents_history_4x=h4,
                attention_kwargs=None,
                return_dict=False)


_FRAMEPACK_NOTES = (
    "Blocks are HunyuanVideoTransformerBlock / HunyuanVideoSingleTransformerBlock. The joint sequence holds "
    "[4x history, 2x history, clean latents, noisy latents] video tokens (HunyuanVideoHistoryPatchEmbed Conv3d "
    "with kernels 1x2x2, 2x4x4, 4x8x8 and replicate padding) + [SigLIP image tokens, text]; the output keeps "
    "only the last F*H*W tokens (`hidden_states[:, -original_context_length:]`). Rotary is built from the "
    "frame-index tensors (indices_* are int64 graph inputs) and avg_pool3d-downsampled for the history; "
    "`_pack_history_states` rebuilds a list of rope tensors. Data-dependent mask: `if batch_size == 1:` else a "
    "Python loop `attention_mask[i, : effective_sequence_length[i]] = True` (in-place write with a slice bound "
    "read from a tensor value, transformer_hunyuan_video_framepack.py:336). The history inputs are required in "
    "practice: image_rotary_emb_clean/_history_2x/_history_4x are only assigned inside `if ... is not None` "
    "branches (line 287 on) but always passed to _pack_history_states (UnboundLocalError otherwise), and "
    "self.clean_x_embedder is called unconditionally (has_clean_x_embedder=True needed)."
)


# ------------------------------------------------------------------------------------------------ LTX-Video

_LTX = dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
            attention_head_dim=8, cross_attention_dim=16, num_layers=2, caption_channels=16)
_LTX_FHW = (3, 4, 4)


def _ltx() -> torch.nn.Module:
    from diffusers import LTXVideoTransformer3DModel

    return _seeded(LTXVideoTransformer3DModel, **_LTX)


def _ltx_kwargs(image: bool) -> Callable[[], dict[str, Any]]:
    f, h, w = _LTX_FHW

    def kwargs():
        r = _rand()
        t = torch.full((B,), T_FLOW)
        if image:  # pipeline_ltx_image2video: timestep.unsqueeze(-1) * (1 - conditioning_mask), first frame clean
            cond = torch.zeros(B, f * h * w)
            cond[:, : h * w] = 1.0
            t = t.unsqueeze(-1) * (1 - cond)
        return dict(hidden_states=r(B, f * h * w, 8),  # packed tokens (B, F*H*W, C)
                    encoder_hidden_states=r(B, L, 16),
                    timestep=t,
                    encoder_attention_mask=torch.tensor(TEXT_MASK).bool(),
                    num_frames=f, height=h, width=w,
                    rope_interpolation_scale=(8 / 25, 32, 32),  # (temporal ratio / frame_rate, spatial, spatial)
                    attention_kwargs=None,
                    return_dict=False)
    return kwargs


_LTX_KINDS = _blocks("transformer_blocks", 2, {
    "attn1": ("joint", "LTXVideoTransformerBlock.attn1: self-attention (encoder_hidden_states=None) over all "
                       "F*H*W packed video tokens with 3-D rotary"),
    "attn2": ("cross", "attn2: keys/values from encoder_hidden_states (T5 text), additive -10000 mask"),
    "ff": ("mlp", "block feed-forward (gelu-approximate)"),
})
_LTX_NOTES = (
    "hidden_states is already packed: rank 3 (B, F*H*W, C), so the video size comes from the int arguments "
    "num_frames/height/width, not from a 5-D tensor. In-place writes in the rotary grid: "
    "LTXVideoRotaryPosEmbed._prepare_video_coords `grid[:, 0:1] = grid[:, 0:1] * rope_interpolation_scale[0] ...` "
    "(three slice assignments). rope_interpolation_scale is a tuple of Python floats. "
    "attn2's residual is ungated (`hidden_states + attn_hidden_states`); attn1 and ff are gated. "
    "LTXAttention.forward calls inspect.signature(self.processor.__call__) on every call. "
    "Output is packed tokens (B, F*H*W, C)."
)


# ------------------------------------------------------------------------------------------------ LTX-2

_LTX2 = dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
             attention_head_dim=8, cross_attention_dim=16, audio_in_channels=8, audio_out_channels=8,
             audio_num_attention_heads=2, audio_attention_head_dim=8, audio_cross_attention_dim=16, num_layers=2,
             caption_channels=16)
_LTX2_AUDIO_FRAMES = 6
_LTX2_FPS = 24.0


@functools.lru_cache(maxsize=None)
def _ltx2_coords(rope_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Video and audio RoPE coordinates as the LTX-2 pipeline precomputes them (``rope.prepare_video_coords``,
    ``audio_rope.prepare_audio_coords``), batch 2. The model is built once here, only for its rope modules."""
    model = _ltx2_build(rope_type)()
    f, h, w = _LTX_FHW
    video = model.rope.prepare_video_coords(B, f, h, w, torch.device("cpu"), fps=_LTX2_FPS)
    audio = model.audio_rope.prepare_audio_coords(B, _LTX2_AUDIO_FRAMES, torch.device("cpu"))
    return video, audio


def _ltx2_build(rope_type: str, v23: bool = False) -> Callable[[], torch.nn.Module]:
    from diffusers import LTX2VideoTransformer3DModel

    extra = dict(gated_attn=True, cross_attn_mod=True, audio_gated_attn=True, audio_cross_attn_mod=True) if v23 else {}
    return lambda: _seeded(LTX2VideoTransformer3DModel, **_LTX2, rope_type=rope_type, **extra)


def _ltx2_kwargs(rope_type: str, use_cross_timestep: bool, image: bool = False) -> Callable[[], dict[str, Any]]:
    f, h, w = _LTX_FHW

    def kwargs():
        r = _rand()
        video, audio = _ltx2_coords(rope_type)
        t = torch.full((B,), T_FLOW)
        mask = torch.tensor(TEXT_MASK).bool()
        kw = dict(hidden_states=r(B, f * h * w, 8),
                  audio_hidden_states=r(B, _LTX2_AUDIO_FRAMES, 8),
                  encoder_hidden_states=r(B, L, 16),  # connector outputs
                  audio_encoder_hidden_states=r(B, L, 16),
                  timestep=t, sigma=t.clone(),
                  encoder_attention_mask=mask, audio_encoder_attention_mask=mask.clone(),
                  num_frames=f, height=h, width=w, fps=_LTX2_FPS, audio_num_frames=_LTX2_AUDIO_FRAMES,
                  video_coords=video.clone(), audio_coords=audio.clone(),
                  isolate_modalities=False, spatio_temporal_guidance_blocks=None, perturbation_mask=None,
                  use_cross_timestep=use_cross_timestep,
                  attention_kwargs=None,
                  return_dict=False)
        if image:  # pipeline_ltx2_image2video: video_timestep = t * (1 - conditioning_mask), audio_timestep = t
            cond = torch.zeros(B, f * h * w)
            cond[:, : h * w] = 1.0
            kw.update(timestep=t.unsqueeze(-1) * (1 - cond), audio_timestep=t.clone())
        return kw
    return kwargs


_LTX2_KINDS = _blocks("transformer_blocks", 2, {
    "attn1": ("joint", "LTX2VideoTransformerBlock.attn1: video self-attention over all F*H*W tokens"),
    "attn2": ("cross", "attn2: queries video, keys/values the video text embeddings"),
    "audio_to_video_attn": ("other", "a2v: queries video, keys/values the audio stream, which is denoised "
                                     "alongside and changes every step (not static conditioning: not cross)"),
    "audio_attn1": ("other", "audio self-attention: audio tokens only"),
    "audio_attn2": ("other", "audio-text cross-attention: queries audio, keys/values the audio text embeddings"),
    "video_to_audio_attn": ("other", "v2a: queries audio (output goes to the audio stream), keys/values video"),
    "ff": ("mlp", "video feed-forward"),
    "audio_ff": ("mlp", "audio stream feed-forward"),
})
_LTX2_NOTES = (
    "Two streams (video and audio) carried block to block; output is a tuple (video, audio), out_index 0 is "
    "video. Blocks are called with ~26 keyword arguments incl. tuples of rotary tensors, None masks, Python bools "
    "use_a2v_cross_attention/use_v2a_cross_attention and a Python-bool-or-tensor all_perturbed. Forward "
    "arguments include Python float fps, Python bool isolate_modalities/use_cross_timestep, None lists. "
    "`all_perturbed = torch.all(perturbation_mask == 0) if perturbation_mask is not None else False`. "
    "hidden_states/audio_hidden_states are packed rank-3 tokens. RoPE coordinates come in as tensors "
    "(video_coords (B,3,N,2), audio_coords (B,1,N,2)); the rope runs in float64 (rope_double_precision). "
    "Timestep enters 4 AdaLN-single modules plus the cross-attention gates."
)
_LTX23_NOTES = (
    "LTX-2.3 style variant: rope_type='split' (apply_split_rotary_emb writes in place: "
    "`first_out.addcmul_(-sin_u, second_x)`, `second_out.addcmul_(sin_u, first_x)` on views of `out`), "
    "gated attention (to_gate_logits: per-head 2*sigmoid gate inside every attention module), "
    "cross_attn_mod (prompt_adaln: the text K/V are modulated by a timestep embedding; attn2 output gated), "
    "use_cross_timestep=True (cross-attention modulation reads sigma). " + _LTX2_NOTES
)


# ------------------------------------------------------------------------------------------------ Mochi

_MOCHI = dict(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
              in_channels=4, text_embed_dim=16, time_embed_dim=16)


def _mochi() -> torch.nn.Module:
    from diffusers import MochiTransformer3DModel

    return _seeded(MochiTransformer3DModel, **_MOCHI)


def _mochi_kwargs() -> dict[str, Any]:
    r = _rand()
    return dict(hidden_states=r(B, 4, 3, 8, 8),
                encoder_hidden_states=r(B, L, 16),
                timestep=torch.full((B,), 1000.0 - T_FLOW),  # Mochi passes reversed timesteps (1000 = clean)
                encoder_attention_mask=torch.tensor(TEXT_MASK).bool(),
                attention_kwargs=None,
                return_dict=False)


_MOCHI_KINDS = {
    "time_embed.pooler": ("text", "MochiAttentionPool: one pooled query attends over the text tokens only "
                                  "(F.scaled_dot_product_attention with the padding mask)"),
    **_blocks("transformer_blocks", 2, {
        "attn1": ("joint", "MochiAttnProcessor2_0: per sample, cat(video q/k/v, valid text q/k/v) into one "
                           "sequence, one SDPA per sample (`for idx in range(batch_size)`, query[idx : idx + 1]): "
                           "each call's batch 1 is one sample, all its video tokens in one sequence"),
        "ff": ("mlp", "video feed-forward (swiglu)"),
    }),
    "transformer_blocks.0.ff_context": ("mlp", "text stream feed-forward (absent in the last block: "
                                               "context_pre_only)"),
}
_MOCHI_NOTES = (
    "Data-dependent shapes in attention: MochiAttnProcessor2_0 loops `for idx in range(batch_size)` and takes "
    "`torch.nonzero(mask.flatten())` of encoder_attention_mask to keep the valid text tokens, runs one SDPA per "
    "sample, then F.pad back to full length (attention_processor.py MochiAttnProcessor2_0.__call__). So there is "
    "one SDPA per sample per block (batch 1 queries), not one per block. Rotary: x[..., 0::2]/x[..., 1::2] "
    "slices, no in-place writes. Two-stream blocks; the last block is context_pre_only (no text FF, norm1_context "
    "is MochiLayerNormContinuous). Residual adds through MochiModulatedRMSNorm with tanh gates, float32 casts. "
    "Reversed timesteps: the pipeline passes t where 1000 is clean, 0 is noise (PAB windows must be read that way). "
    "pos_frequencies is a zero-initialised nn.Parameter (given seeded values here)."
)


# ------------------------------------------------------------------------------------------------ Kandinsky 5

_K5 = dict(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
           model_dim=16, ff_dim=32, num_text_blocks=1, num_visual_blocks=2, axes_dims=(2, 2, 4), visual_cond=True)


def _kandinsky5() -> torch.nn.Module:
    from diffusers import Kandinsky5Transformer3DModel

    return _seeded(Kandinsky5Transformer3DModel, **_K5)


def _kandinsky5_kwargs() -> dict[str, Any]:
    r = _rand()
    latents = r(B, 3, 8, 8, 4)  # (B, F, H, W, C): channels last
    x = torch.cat([latents, torch.zeros_like(latents), torch.zeros(B, 3, 8, 8, 1)], dim=-1)
    return dict(hidden_states=x,
                encoder_hidden_states=r(B, L, 16),
                pooled_projections=r(B, 8),
                timestep=torch.full((B,), T_FLOW),
                visual_rope_pos=[torch.arange(3), torch.arange(4), torch.arange(4)],
                text_rope_pos=torch.arange(L),
                scale_factor=(1, 3.16, 3.16),  # _get_scale_factor for sizes outside 480p
                sparse_params=None,  # attention_type="regular"
                return_dict=False)


_K5_KINDS = {
    **_blocks("text_transformer_blocks", 1, {
        "self_attention": ("text", "Kandinsky5TransformerEncoderBlock: self-attention over text tokens only"),
        "feed_forward": ("mlp", "text encoder block feed-forward"),
    }),
    **_blocks("visual_transformer_blocks", 2, {
        "self_attention": ("joint", "Kandinsky5TransformerDecoderBlock.self_attention over all F*H*W tokens "
                                    "(fractal_flatten without block mask: x.flatten(1, 3))"),
        "cross_attention": ("cross", "cross_attention(encoder_hidden_states=text_embed)"),
        "feed_forward": ("mlp", "visual decoder block feed-forward"),
    }),
}
_K5_NOTES = (
    "Channels-last video (B, F, H, W, C), with C = 2*in_visual_dim + 1 (visual_cond). Output is a bare tensor "
    "with return_dict=False (`return x`, not a tuple). visual_rope_pos is a list of int64 index tensors "
    "(positions gather from a fixed-size 128-entry table: static max F/H/W); text_rope_pos gathers from a "
    "1024-entry table; scale_factor is a tuple of Python numbers. Rotary in Kandinsky5AttnProcessor casts to "
    "bfloat16 (`x_out.reshape(*x.shape).to(torch.bfloat16)`) then back. Every residual is "
    "`(x.float() + gate.float() * out.float()).type_as(x)`. AdaLN Kandinsky5Modulation is zero-initialised "
    "(given seeded values here). Text is encoded once per call by its own text blocks (timestep-modulated). "
    "Kandinsky5TimeEmbeddings keeps `freqs` as a plain tensor attribute (not a buffer). "
    "attention_type='nabla' (sparse_params with sta_mask, flex attention) is not covered here."
)


# ------------------------------------------------------------------------------------------------ Kandinsky 6

_K6 = dict(in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, patch_size=(1, 2, 2),
           model_dim=16, ff_dim=32, num_text_blocks=1, num_visual_blocks=2, axes_dims=(2, 2, 4), visual_cond=True,
           in_audio_dim=6, out_audio_dim=6, text_token_padding=True, ca_rope=True, cross_gates=True,
           fix_modulation=True)


def _kandinsky6(token_types: int = 0) -> Callable[[], torch.nn.Module]:
    from diffusers import Kandinsky6Transformer3DModel

    return lambda: _seeded(Kandinsky6Transformer3DModel, **_K6, visual_token_type_num_embeddings=token_types)


def _kandinsky6_kwargs(audio: bool, image: bool = False) -> Callable[[], dict[str, Any]]:
    """Text-to-video(+audio); with ``image``, the pipeline's tail conditioning: the clean first-frame latent is
    appended as an extra frame (mask 1, token type 1) that reuses rotary position 0."""
    def kwargs():
        r = _rand()
        f = 3 + image
        latents = r(B, f, 8, 8, 4)
        cond_mask = torch.zeros(B, f, 8, 8, 1)
        kw = dict(visual_rope_pos=None, visual_token_type_ids=None)  # text-to-video: no tail reference frame
        if image:
            cond_mask[:, -1] = 1.0
            types = torch.zeros(B, f, dtype=torch.long)
            types[:, -1] = 1
            kw = dict(visual_rope_pos=(torch.cat([torch.arange(3), torch.zeros(1, dtype=torch.long)]),
                                       torch.arange(4), torch.arange(4)),
                      visual_token_type_ids=types)
        x = torch.cat([latents, torch.zeros_like(latents), cond_mask], dim=-1)
        return dict(hidden_states=x,
                    audio_hidden_states=r(B, 7, 6) if audio else None,
                    encoder_hidden_states=r(B, L, 16),
                    pooled_projections=r(B, 8),
                    timestep=torch.full((B,), T_FLOW),
                    encoder_attention_mask=None,  # _get_prompt_embeds drops an all-True mask
                    **kw,
                    return_dict=False)
    return kwargs


_K6_TEXT = {
    "attn": ("text", "Kandinsky6TransformerEncoderBlock: self-attention over text tokens only"),
    "feed_forward": ("mlp", "text encoder block feed-forward"),
}
_K6_VIDEO = {
    "video_dec_block.self_attention": ("joint", "video self-attention over all F*H*W tokens"),
    "video_dec_block.cross_attention": ("cross", "queries video, keys/values the video text branch"),
    "video_dec_block.feed_forward": ("mlp", "video feed-forward"),
}
_K6_AUDIO = {
    "audio_dec_block.self_attention": ("other", "audio self-attention: audio tokens only"),
    "audio_dec_block.cross_attention": ("other", "queries audio, keys/values the audio text branch"),
    "audio_dec_block.feed_forward": ("mlp", "audio stream feed-forward"),
    "va_cross_attention": ("other", "queries video, keys/values the audio stream (aud_pre_ca), which changes "
                                    "every step (not static conditioning: not cross)"),
    "av_cross_attention": ("other", "queries audio (output to the audio stream), keys/values video (vis_pre_ca)"),
}


def _k6_kinds(audio: bool) -> dict[str, tuple[str, str]]:
    return {**_blocks("video_text_transformer_blocks", 1, _K6_TEXT),
            **_blocks("audio_text_transformer_blocks", 1, _K6_TEXT),
            **_blocks("visual_transformer_blocks", 2, {**_K6_VIDEO, **(_K6_AUDIO if audio else {})})}


_K6_NOTES = (
    "Fused video/audio blocks (Kandinsky6FusedTransformerDecoderBlock) with Python branches on None "
    "(`if aud is not None`): without audio_hidden_states the audio path and va/av cross-attentions are skipped. "
    "Two text branches (video_text_*, audio_text_*) each run their own encoder blocks on the same prompt, "
    "timestep-modulated. ca_rope=True: va/av cross-attentions rotate queries and keys with different rope "
    "tensors (video 3-D rope vs audio 1-D rope). Fixed-size rope tables (128 per video axis, 2048 audio/text). "
    "Channels-last video (B, F, H, W, 2C+1). Residuals `(x.float() + gate.float() * out.float()).to(x.dtype)` "
    "then `.type_as(vis)`. Output tuple (video,) or (video, audio). Kandinsky6RoPE3D reads sizes with "
    "`int(axis_pos.shape[0])`."
)


# ------------------------------------------------------------------------------------------------ Kandinsky 6 SR

_K6SR = dict(in_visual_dim=4, out_visual_dim=4, time_dim=16, patch_size=(1, 1, 1), model_dim=16, ff_dim=32,
             num_visual_blocks=2, axes_dims=(2, 2, 4), nabla_window=(3, 3, 3))


def _kandinsky6_sr() -> torch.nn.Module:
    from diffusers import Kandinsky6SRTransformer3DModel

    return _seeded(Kandinsky6SRTransformer3DModel, **_K6SR)


def _kandinsky6_sr_kwargs() -> dict[str, Any]:
    r = _rand()
    latents = r(B, 2, 8, 8, 4)  # token grid H, W must be multiples of 8 (NABLA 8x8 blocks)
    x = torch.cat([latents, torch.zeros_like(latents), torch.zeros(B, 2, 8, 8, 1)], dim=-1)  # anchor, mask
    return dict(hidden_states=x, timestep=torch.full((B,), T_FLOW), return_dict=False)


_K6SR_KINDS = _blocks("visual_transformer_blocks", 2, {
    "self_attention": ("joint", "NABLA sparse self-attention over all F*H*W tokens (8x8 token blocks, "
                                "flex attention with a data-dependent BlockMask)"),
    "feed_forward": ("mlp", "block feed-forward"),
})
_K6SR_NOTES = (
    "Attention is not SDPA: Kandinsky6SRAttnProcessor always dispatches on AttentionBackendName.FLEX "
    "(torch flex_attention) with a BlockMask built per call by nabla_block_mask from the queries/keys "
    "(softmax of block means, sort, in-place `vals.cumsum_(-1)`, argsort: data-dependent sparsity). The token "
    "grid must be divisible by 8 (ValueError otherwise); tokens are regrouped into 8x8 tiles (_local_patch) "
    "before the blocks. Text-free (no cross-attention); pooled_bias is a zero-initialised parameter "
    "(given seeded values here). Channels-last input (B, F, H, W, 2C+1)."
)


# ------------------------------------------------------------------------------------------------ SANA-WM refiner

_SANA_R = dict(_LTX2)
_SANA_SINK, _SANA_HIST = 1, 1  # frames of attention sink and of refined history in the KV cache


def _sana_refiner() -> torch.nn.Module:
    from diffusers import SanaWMLTX2RefinerTransformer3DModel

    return _seeded(SanaWMLTX2RefinerTransformer3DModel, **_SANA_R)


@functools.lru_cache(maxsize=None)
def _sana_ropes() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The active block's and the sink's rotary tuples, from ``build_rotary_emb_for_absolute_positions`` as the
    refiner pipeline builds them (active frames 2..3 of the source video, sink slid to frame 0)."""
    model = _sana_refiner()
    _, h, w = _LTX_FHW
    cpu = torch.device("cpu")
    active = model.build_rotary_emb_for_absolute_positions(B, [2, 3], h, w, cpu, fps=_LTX2_FPS)
    sink = model.build_rotary_emb_for_absolute_positions(B, list(range(_SANA_SINK)), h, w, cpu, fps=_LTX2_FPS)
    return active, sink


def _sana_refiner_kwargs() -> dict[str, Any]:
    from diffusers.models.transformers.transformer_sana_wm_refiner import SanaWMRefinerKVCache

    r = _rand()
    _, h, w = _LTX_FHW
    n, dim = 2 * h * w, 16
    active, sink = _sana_ropes()
    cache = SanaWMRefinerKVCache(_SANA_R["num_layers"])
    cache.sink_pe = tuple(t.clone() for t in sink)
    for layer in cache.layer_caches:  # stand-ins for the captured pre-RoPE sink and post-RoPE history K/V
        layer.store_sink(r(B, _SANA_SINK * h * w, dim), r(B, _SANA_SINK * h * w, dim))
        layer.store_history(r(B, _SANA_HIST * h * w, dim), r(B, _SANA_HIST * h * w, dim))
    return dict(hidden_states=r(B, n, 8),
                encoder_hidden_states=r(B, L, 16),
                timestep=torch.full((B, n), T_FLOW),  # per-token sigma * timestep_scale_multiplier
                video_rotary_emb=tuple(t.clone() for t in active),
                encoder_attention_mask=torch.tensor(TEXT_MASK).bool(),
                kv_cache=cache,
                kv_cache_mode="inject",
                return_dict=False)


_SANA_KINDS = _blocks("transformer_blocks", 2, {
    "attn1": ("joint", "SanaWMLTX2RefinerAttnProcessor: queries the active block's F*H*W tokens, keys/values "
                       "[sink + history + active] (the prefix comes from the Python KV-cache object)"),
    "attn2": ("cross", "queries video, keys/values the text embeddings"),
    "ff": ("mlp", "video feed-forward"),
})
_SANA_NOTES = (
    "kv_cache is a Python object (SanaWMRefinerKVCache) whose per-layer tensors are read inside attention "
    "(get_sink/get_history) and, in the capture modes, written back as a side effect "
    "(store_captured_pre_rope/store_captured_post_rope with .detach().clone()); kv_cache_mode is a Python str "
    "that selects branches. The caller supplies the rotary tuple (video_rotary_emb) and the cache's sink_pe. "
    "Timestep is per token (B, F*H*W). Packed rank-3 hidden_states. The audio submodules (audio_attn1, "
    "audio_attn2, audio_to_video_attn, video_to_audio_attn, audio_ff) exist for checkpoint loading but are "
    "never called, so they are not in kinds. Only the video stream runs; attn2 residual is ungated."
)


# ------------------------------------------------------------------------------------------------ cases

_K5_CHAIN = {"residual_blocks": (
    ["visual_transformer_blocks.0", "visual_transformer_blocks.1"],
    "the text blocks run their own chain on the text tokens first; the visual blocks read their output as "
    "cross-attention context only, so the cached chain is the visual blocks and the text blocks run every step")}
_K6_CHAIN = {"residual_blocks": (
    ["visual_transformer_blocks.0", "visual_transformer_blocks.1"],
    "the audio/text blocks run their own chain first; the visual blocks read their output as context only, so "
    "the cached chain is the visual blocks and the audio/text blocks run every step")}

CASES: list[ZooCase] = [
    ZooCase("hunyuan-video", "HunyuanVideoTransformer3DModel", _hunyuan_video(), _hunyuan_video_kwargs(True),
            _hv_kinds("context_embedder.token_refiner.refiner_blocks", 1, 1, 1),
            notes="T2V, guidance-distilled (guidance_embeds=True). " + _HV_NOTES),
    ZooCase("hunyuan-video-i2v", "HunyuanVideoTransformer3DModel", _hunyuan_video("token_replace"),
            _hunyuan_video_kwargs(False),
            _hv_kinds("context_embedder.token_refiner.refiner_blocks", 1, 1, 1),
            notes="I2V token_replace: first-frame tokens get their own modulation from a timestep-0 embedding "
                  "(HunyuanVideoTokenReplace*Block slice [:, :first_frame_num_tokens] and torch.cat); "
                  "guidance_embeds=False so the pipeline passes guidance=None. " + _HV_NOTES),
    ZooCase("hunyuan-video15", "HunyuanVideo15Transformer3DModel", _hunyuan_video15,
            _hunyuan_video15_kwargs(False), _HV15_KINDS, notes="T2V (image_embeds all zero). " + _HV15_NOTES),
    ZooCase("hunyuan-video15-i2v", "HunyuanVideo15Transformer3DModel", _hunyuan_video15,
            _hunyuan_video15_kwargs(True), _HV15_KINDS, notes="I2V (image tokens valid). " + _HV15_NOTES),
    ZooCase("hunyuan-video-framepack", "HunyuanVideoFramepackTransformer3DModel", _framepack, _framepack_kwargs,
            _hv_kinds("context_embedder.token_refiner.refiner_blocks", 1, 1, 1), notes=_FRAMEPACK_NOTES),
    ZooCase("ltx-video", "LTXVideoTransformer3DModel", _ltx, _ltx_kwargs(False), _LTX_KINDS,
            notes="T2V. " + _LTX_NOTES),
    ZooCase("ltx-video-i2v", "LTXVideoTransformer3DModel", _ltx, _ltx_kwargs(True), _LTX_KINDS,
            notes="I2V: per-token timestep (B, F*H*W), 0 on the first frame's tokens "
                  "(pipeline_ltx_image2video). " + _LTX_NOTES),
    ZooCase("ltx2", "LTX2VideoTransformer3DModel", _ltx2_build("interleaved"), _ltx2_kwargs("interleaved", False),
            _LTX2_KINDS, notes="LTX-2.0: use_cross_timestep=False (the legacy behaviour; the pipeline default True "
                               "is LTX-2.3's, see ltx2.3). " + _LTX2_NOTES),
    ZooCase("ltx2-i2v", "LTX2VideoTransformer3DModel", _ltx2_build("interleaved"),
            _ltx2_kwargs("interleaved", False, image=True), _LTX2_KINDS,
            notes="I2V (pipeline_ltx2_image2video): per-token video timestep (B, F*H*W), 0 on the first frame's "
                  "tokens, and a separate per-sample audio_timestep (B,). " + _LTX2_NOTES),
    ZooCase("ltx2.3", "LTX2VideoTransformer3DModel", _ltx2_build("split", v23=True), _ltx2_kwargs("split", True),
            _LTX2_KINDS, notes=_LTX23_NOTES),
    ZooCase("mochi", "MochiTransformer3DModel", _mochi, _mochi_kwargs, _MOCHI_KINDS, notes=_MOCHI_NOTES),
    ZooCase("kandinsky5", "Kandinsky5Transformer3DModel", _kandinsky5, _kandinsky5_kwargs, _K5_KINDS,
            notes=_K5_NOTES, extra=dict(_K5_CHAIN, adacache_rtol=(
                1e-4, "eager itself turns a 2e-7 relative change of its input into 6e-5 over the 10-step loop "
                      "(measured); graphpass and the per-block reference differ by <= 2.5e-7 per step until a "
                      "compute step amplifies it (5.6e-5 at step 9)"))),
    ZooCase("kandinsky6", "Kandinsky6Transformer3DModel", _kandinsky6(), _kandinsky6_kwargs(True),
            _k6_kinds(True), notes="Text-to-video+audio with the released flags (ca_rope, cross_gates, "
                                   "fix_modulation). " + _K6_NOTES, extra=_K6_CHAIN),
    ZooCase("kandinsky6-video", "Kandinsky6Transformer3DModel", _kandinsky6(), _kandinsky6_kwargs(False),
            _k6_kinds(False), notes="Video only (audio_hidden_states=None; sample_audio=False). " + _K6_NOTES,
            extra=_K6_CHAIN),
    ZooCase("kandinsky6-i2v", "Kandinsky6Transformer3DModel", _kandinsky6(token_types=2),
            _kandinsky6_kwargs(True, image=True), _k6_kinds(True),
            notes="Image-to-video+audio: the clean reference latent is an extra tail frame (F+1 frames) whose "
                  "rotary temporal index repeats 0 (visual_rope_pos is a tuple of int64 tensors) and whose tokens "
                  "get visual_token_type_embeddings (visual_token_type_ids (B, F+1)). " + _K6_NOTES,
            extra=_K6_CHAIN),
    ZooCase("kandinsky6-sr", "Kandinsky6SRTransformer3DModel", _kandinsky6_sr, _kandinsky6_sr_kwargs, _K6SR_KINDS,
            unsupported=r"(?i)flex.?attention|scaled_dot_product_attention",
            notes="Unsupported: its only attention is flex_attention with a per-call data-dependent BlockMask, not "
                  "scaled_dot_product_attention, so there is no SDPA region to tag or reuse. " + _K6SR_NOTES),
    ZooCase("sana-wm-refiner", "SanaWMLTX2RefinerTransformer3DModel", _sana_refiner, _sana_refiner_kwargs,
            _SANA_KINDS, notes="One AR window's denoising call (kv_cache_mode='inject'). " + _SANA_NOTES,
            # the K/V cache is a Python object the attention reads and fills: not a graph input
            unsupported=r"example argument 'kv_cache' is a SanaWMRefinerKVCache"),
]
