"""Tiny random configs of every diffusers class graphpass builds example inputs for, saved as model folders.

Each :class:`FolderCase` names a diffusers class, a tiny config (2 heads, 1-2 layers, small widths), the
output shape of the default example call (read from the model's source: the noise prediction in the input's
layout with ``out_channels``), and whether graphpass captures the call today.

    >>> case = CASES["latte"]
    >>> model = case.build()
    >>> type(model).__name__
    'LatteTransformer3DModel'
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch

torch.set_num_threads(1)

B = 2  # one batched classifier-free-guidance call

_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=16, ffn_dim=48, num_layers=2)
_WAN_I2V = dict(_WAN, in_channels=12, image_dim=16, added_kv_proj_dim=24)
_COG = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2, sample_width=8,
            sample_height=8, sample_frames=9, patch_size=2, text_embed_dim=16, time_embed_dim=8,
            temporal_compression_ratio=4, max_text_seq_length=5)


@dataclass
class FolderCase:
    """name; class_name: the diffusers class; config: its tiny config; out_shape: the default call's output
    shape; captures: graphpass captures the default call today (others fail on tuple arguments or
    data-dependent shapes)."""

    name: str
    class_name: str
    config: dict[str, Any]
    out_shape: tuple[int, ...]
    captures: bool = True

    def build(self) -> torch.nn.Module:
        """The model under seed 0, in eval mode."""
        torch.manual_seed(0)
        return getattr(diffusers, self.class_name)(**self.config).eval()

    def save(self, folder: Path) -> torch.nn.Module:
        """Build the model and write it to ``folder`` with ``save_pretrained``; returns the model."""
        model = self.build()
        model.save_pretrained(str(folder))
        return model


CASES: dict[str, FolderCase] = {c.name: c for c in [
    # CogVideoX 1.0: (B, F, C, H, W) latents; 3 latent frames of 8x8 by default
    FolderCase("cogvideox", "CogVideoXTransformer3DModel", _COG, (B, 3, 4, 8, 8)),
    # rotary embeddings: head dim 16 splits 1/4 : 3/8 : 3/8 over (t, h, w)
    FolderCase("cogvideox-rope", "CogVideoXTransformer3DModel",
               dict(_COG, attention_head_dim=16, use_rotary_positional_embeddings=True), (B, 3, 4, 8, 8),
               captures=False),
    # ConsisID: CogVideoX I2V blocks (image latents concatenated: 8 = 2 x 4 channels in) with rotary
    # embeddings, and face identity injected by perceiver cross-attention every cross_attn_interval blocks
    FolderCase("consisid", "ConsisIDTransformer3DModel",
               # the face tokens' width LFE_output_dim must be 2/3 of the inner dim (3 heads x 16 = 48 -> 32)
               dict(_COG, in_channels=8, num_attention_heads=3, attention_head_dim=16,
                    use_rotary_positional_embeddings=True,
                    is_train_face=True, cross_attn_interval=1, cross_attn_dim_head=8, cross_attn_num_heads=2,
                    LFE_id_dim=16, LFE_vit_dim=8, LFE_depth=2, LFE_dim_head=8, LFE_num_heads=2, LFE_num_id_token=2,
                    LFE_num_querie=4, LFE_output_dim=32, LFE_ff_mult=1, LFE_num_scale=2), (B, 3, 4, 8, 8),
               captures=False),
    # Latte predicts noise and variance (out_channels 8 = 2 x 4); frames fixed at video_length
    FolderCase("latte", "LatteTransformer3DModel",
               dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                    sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=16,
                    num_embeds_ada_norm=1000, norm_type="ada_norm_single", video_length=3), (B, 8, 3, 8, 8)),
    FolderCase("wan", "WanTransformer3DModel", _WAN, (B, 4, 3, 8, 8)),
    FolderCase("wan-i2v", "WanTransformer3DModel", _WAN_I2V, (B, 4, 3, 8, 8)),
    FolderCase("skyreels-v2", "SkyReelsV2Transformer3DModel", _WAN, (B, 4, 3, 8, 8)),
    # ChronoEdit: 2 latent frames by default (the pipeline without temporal reasoning)
    FolderCase("chronoedit", "ChronoEditTransformer3DModel", _WAN_I2V, (B, 4, 2, 8, 8)),
    FolderCase("wan-vace", "WanVACETransformer3DModel", dict(_WAN, vace_layers=[0, 1], vace_in_channels=12),
               (B, 4, 3, 8, 8)),
    FolderCase("hunyuanvideo", "HunyuanVideoTransformer3DModel",
               dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                    num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
                    text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4), guidance_embeds=True),
               (B, 4, 3, 8, 8)),
    # LTX-Video: packed tokens (B, F*H*W, C) in and out (patch size 1)
    FolderCase("ltx", "LTXVideoTransformer3DModel",
               dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
                    attention_head_dim=8, cross_attention_dim=16, num_layers=2, caption_channels=16),
               (B, 3 * 8 * 8, 8), captures=False),
    FolderCase("mochi", "MochiTransformer3DModel",
               dict(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
                    in_channels=4, text_embed_dim=16, time_embed_dim=16), (B, 4, 3, 8, 8), captures=False),
    # Allegro's 3-D rotary splits the head dim in three even parts: head dim 12
    FolderCase("allegro", "AllegroTransformer3DModel",
               dict(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, num_layers=2,
                    cross_attention_dim=24, sample_height=8, sample_width=8, sample_frames=3, caption_channels=16),
               (B, 4, 3, 8, 8), captures=False),
    # EasyAnimate: MMDiT blocks over text + video; the rotary grid is fixed for 60 x 90 base sizes
    FolderCase("easyanimate", "EasyAnimateTransformer3DModel",
               dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, patch_size=2,
                    num_layers=2, mmdit_layers=2, time_embed_dim=16, text_embed_dim=16, sample_width=8,
                    sample_height=8), (B, 4, 3, 8, 8)),
    FolderCase("sana-video", "SanaVideoTransformer3DModel",
               dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2,
                    num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24,
                    caption_channels=16, sample_size=8), (B, 4, 3, 8, 8)),
    # Cosmos: concat_padding_mask off (resizing the padding mask needs torchvision, not installed here)
    FolderCase("cosmos", "CosmosTransformer3DModel",
               dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2,
                    mlp_ratio=2.0, text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 16, 16),
                    concat_padding_mask=False), (B, 4, 3, 8, 8)),
    # HunyuanVideo 1.5: in_channels 2C + 1 (latents, condition latents, mask)
    FolderCase("hunyuanvideo15", "HunyuanVideo15Transformer3DModel",
               dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                    num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
                    text_embed_2_dim=8, image_embed_dim=8, rope_axes_dim=(2, 2, 4)), (B, 4, 3, 8, 8),
               captures=False),
    # Kandinsky 5: channels-last latents (B, F, H, W, C) in and out
    FolderCase("kandinsky5", "Kandinsky5Transformer3DModel",
               dict(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4,
                    patch_size=(1, 2, 2), model_dim=16, ff_dim=32, num_text_blocks=1, num_visual_blocks=2,
                    axes_dims=(4, 2, 2)), (B, 3, 8, 8, 4), captures=False),
    # Motif-Video: in_channels 2C + 1 (latents, condition latents, mask); dual-stream, single-stream and decoder
    # blocks
    FolderCase("motif-video", "MotifVideoTransformer3DModel",
               dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=1,
                    num_single_layers=2, num_decoder_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
                    text_embed_dim=16, rope_axes_dim=(4, 4, 4), enable_text_cross_attention_dual=True,
                    enable_text_cross_attention_single=True), (B, 4, 3, 8, 8)),
]}
