"""Tiny seeded diffusers video transformers beyond Latte/CogVideoX, and the kinds of their attention
modules as read from diffusers 0.42.1's source (``diffusers/models/transformers/*.py``).

Every builder returns ``(model, kwargs)``: the model in eval mode (2 heads of 8, tiny grids; one forward
well under a second) and a factory of one call's keyword arguments (batch 2, same values every time).

    >>> model, kwargs = hunyuan_video()
    >>> model(**kwargs())[0].shape
    torch.Size([2, 4, 3, 8, 8])
"""
from __future__ import annotations

import torch
import diffusers


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def hunyuan_video():
    """HunyuanVideoTransformer3DModel: 2 token-refiner blocks, 2 dual-stream and 2 single-stream blocks."""
    torch.manual_seed(0)
    model = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_single_layers=2, num_refiner_layers=2, patch_size=2, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 2, 4), guidance_embeds=False).eval()

    def kwargs():
        return dict(hidden_states=_randn(2, 4, 3, 8, 8, seed=2), timestep=torch.full((2,), 500, dtype=torch.int64),
                    encoder_hidden_states=_randn(2, 5, 16, seed=3),
                    encoder_attention_mask=torch.ones(2, 5, dtype=torch.int64),
                    pooled_projections=_randn(2, 8, seed=4), return_dict=False)

    return model, kwargs


HUNYUAN_KINDS = {}
for _i in range(2):
    HUNYUAN_KINDS |= {
        # HunyuanVideoIndividualTokenRefinerBlock.attn: self-attention of the text tokens (self.attn(norm(x)))
        f"context_embedder.token_refiner.refiner_blocks.{_i}.attn": "text",
        # HunyuanVideoTransformerBlock.attn: video and text projected separately, attended as one sequence
        f"transformer_blocks.{_i}.attn": "joint",
        # HunyuanVideoSingleTransformerBlock.attn: cat([video, text]) attended as one sequence
        f"single_transformer_blocks.{_i}.attn": "joint",
    }


def ltx2():
    """LTX2VideoTransformer3DModel (video + audio streams), 2 blocks, video as 3x4x4 packed tokens."""
    torch.manual_seed(0)
    model = diffusers.LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=8, audio_cross_attention_dim=16, num_layers=2, caption_channels=16).eval()

    def kwargs():
        return dict(hidden_states=_randn(2, 3 * 4 * 4, 4, seed=2), audio_hidden_states=_randn(2, 6, 4, seed=5),
                    encoder_hidden_states=_randn(2, 5, 16, seed=3),
                    audio_encoder_hidden_states=_randn(2, 5, 16, seed=6), timestep=torch.full((2,), 500.0),
                    num_frames=3, height=4, width=4, audio_num_frames=6, return_dict=False)

    return model, kwargs


LTX2_KINDS = {}
for _i in range(2):
    LTX2_KINDS |= {
        f"transformer_blocks.{_i}.attn1": "joint",  # video self-attention over all 48 video tokens
        f"transformer_blocks.{_i}.audio_attn1": "other",  # audio self-attention: no video token
        f"transformer_blocks.{_i}.attn2": "cross",  # video queries, text (encoder_hidden_states) keys
        f"transformer_blocks.{_i}.audio_attn2": "other",  # audio queries, audio text keys
        # video queries, audio keys/values: keys from another denoised stream, not static text
        f"transformer_blocks.{_i}.audio_to_video_attn": "other",
        f"transformer_blocks.{_i}.video_to_audio_attn": "other",  # audio queries, video keys
    }


def motif_video():
    """MotifVideoTransformer3DModel with its text cross-attention enabled in dual- and single-stream blocks."""
    torch.manual_seed(0)
    model = diffusers.MotifVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_single_layers=2, patch_size=2, patch_size_t=1, text_embed_dim=16, rope_axes_dim=(2, 2, 4),
        enable_text_cross_attention_dual=True, enable_text_cross_attention_single=True).eval()

    def kwargs():
        return dict(hidden_states=_randn(2, 4, 3, 8, 8, seed=2), timestep=torch.full((2,), 500, dtype=torch.int64),
                    encoder_hidden_states=_randn(2, 5, 16, seed=3), return_dict=False)

    return model, kwargs


MOTIF_KINDS = {}
for _i in range(2):
    MOTIF_KINDS |= {
        f"transformer_blocks.{_i}.attn": "joint",  # video + text stream attended as one sequence
        # MotifVideoCrossAttention: queries = the video attention output, keys/values = the text positions
        # (norm_encoder_hidden_states), which after block 0 carry video information through joint attention
        f"transformer_blocks.{_i}.cross_attn": "cross",
        f"single_transformer_blocks.{_i}.attn": "joint",
        # single-stream: the text positions are a slice of cat([video, text]); keys/values still text
        f"single_transformer_blocks.{_i}.cross_attn": "cross",
    }


def sana_video():
    """SanaVideoTransformer3DModel: linear self-attention (relu kernel, matmuls) + softmax cross-attention."""
    torch.manual_seed(0)
    model = diffusers.SanaVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=8, patch_size=(1, 2, 2), rope_max_seq_len=32).eval()
    # SanaVideo starts with zero gates (scale_shift_table): perturb all weights so every region matters
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))

    def kwargs():
        return dict(hidden_states=_randn(2, 4, 3, 8, 8, seed=2), timestep=torch.full((2,), 500, dtype=torch.int64),
                    encoder_hidden_states=_randn(2, 5, 16, seed=3), return_dict=False)

    return model, kwargs


SANA_KINDS = {}
for _i in range(2):
    SANA_KINDS |= {
        # SanaLinearAttnProcessor3_0: relu(Q), relu(K); (V K^T) Q over all 48 tokens, no SDPA
        f"transformer_blocks.{_i}.attn1": "joint",
        f"transformer_blocks.{_i}.attn2": "cross",  # SanaAttnProcessor2_0 on encoder_hidden_states
    }


def wan():
    """WanTransformer3DModel, 2 blocks."""
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32).eval()

    def kwargs():
        return dict(hidden_states=_randn(2, 4, 3, 8, 8, seed=2), timestep=torch.full((2,), 500, dtype=torch.int64),
                    encoder_hidden_states=_randn(2, 5, 16, seed=3), return_dict=False)

    return model, kwargs


WAN_KINDS = {}
for _i in range(2):
    WAN_KINDS |= {f"blocks.{_i}.attn1": "joint",  # self-attention over all F*H*W/4 = 48 video tokens
                  f"blocks.{_i}.attn2": "cross"}  # keys/values from encoder_hidden_states (text)


def ltx_video():
    """LTXVideoTransformer3DModel (LTX-Video 1), 2 blocks, video as 3x4x4 packed tokens."""
    torch.manual_seed(0)
    model = diffusers.LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=2, caption_channels=16).eval()

    def kwargs():
        return dict(hidden_states=_randn(2, 48, 4, seed=2), encoder_hidden_states=_randn(2, 5, 16, seed=3),
                    timestep=torch.full((2,), 500, dtype=torch.int64),
                    encoder_attention_mask=torch.ones(2, 5, dtype=torch.int64), num_frames=3, height=4, width=4,
                    return_dict=False)

    return model, kwargs


LTX_KINDS = {}
for _i in range(2):
    LTX_KINDS |= {f"transformer_blocks.{_i}.attn1": "joint",  # self-attention over the 48 video tokens
                  f"transformer_blocks.{_i}.attn2": "cross"}  # keys/values from encoder_hidden_states


def allegro():
    """AllegroTransformer3DModel, 2 blocks."""
    torch.manual_seed(0)
    model = diffusers.AllegroTransformer3DModel(
        patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        num_layers=2, cross_attention_dim=16, caption_channels=16, sample_height=8, sample_width=8,
        sample_frames=3).eval()

    def kwargs():
        return dict(hidden_states=_randn(2, 4, 3, 8, 8, seed=2), encoder_hidden_states=_randn(2, 5, 16, seed=3),
                    timestep=torch.full((2,), 500, dtype=torch.int64), return_dict=False)

    return model, kwargs


ALLEGRO_KINDS = {}
for _i in range(2):
    ALLEGRO_KINDS |= {f"transformer_blocks.{_i}.attn1": "joint",  # 3D full attention with 3D RoPE
                      f"transformer_blocks.{_i}.attn2": "cross"}  # keys/values from the caption projection
