"""Zoo family: the remaining diffusers video transformers (CogVideoX, Latte, Allegro, ConsisID, Cosmos,
EasyAnimate, MiniMax-H3, SANA-Video, SANA-WM, JoyImage-Edit, JoyImage-Edit-Plus).

Every case is a tiny seeded config (2 layers, 2-3 heads of dim 8-16, a 3-frame 8x8 latent or its packed
equivalent, 5 text tokens, batch 2) called with the keyword arguments its diffusers pipeline passes.
The ``kinds`` tables were written by reading each model's source in diffusers 0.42.1; the reason names the
construct that decides the kind.

    >>> from zoo import ZOO
    >>> case = ZOO["allegro"]
    >>> out = case.build()(**case.kwargs())[0]
    >>> tuple(out.shape)
    (2, 4, 3, 8, 8)

``extra["prediction_shape"]`` is set where the prediction's shape differs from the video input's.

Zero-initialised parameters (JoyImage's modulation tables, SANA-WM's Plucker embedder, ...) are refilled with
small seeded noise after construction (:func:`_seeded`), so that every attention and MLP region changes the
output: a region whose contribution is identically zero would hide caching errors.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from . import ZooCase

# Batch 2: one batched classifier-free-guidance call (unconditional and conditional rows).
B = 2
# Latent video of the plain cases: 3 frames of 8x8 with 4 channels; text: 5 tokens of width 16.
F, H, W, C, L, D_TEXT = 3, 8, 8, 4, 5, 16


def _seeded(factory: Callable[[], torch.nn.Module]) -> Callable[[], torch.nn.Module]:
    """Wrap a model constructor: seed 0, eval mode, and all-zero parameters refilled with 0.02 * N(0, 1).

    >>> build = _seeded(lambda: torch.nn.Linear(2, 2))
    >>> torch.equal(build().weight, build().weight)
    True
    """

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        model = factory().eval()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.numel() and not p.any():
                    p.copy_(0.02 * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))
        return model

    return build


def _gen() -> torch.Generator:
    """The generator every ``kwargs()`` draws from (same values on every call)."""
    return torch.Generator().manual_seed(2)


def _text_mask() -> torch.Tensor:
    """A tokenizer-style padding mask (int64, 1 = keep): the unconditional row is shorter, as an empty
    negative prompt is."""
    return torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.int64)


def _per_layer(n: int, prefix: str, table: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """Expand ``{"attn1": (kind, reason)}`` to ``{"<prefix>.0.attn1": ..., "<prefix>.1.attn1": ...}``.

    >>> _per_layer(2, "blocks", {"ff": ("mlp", "feed-forward")})
    {'blocks.0.ff': ('mlp', 'feed-forward'), 'blocks.1.ff': ('mlp', 'feed-forward')}
    """
    return {f"{prefix}.{i}.{name}": kr for i in range(n) for name, kr in table.items()}


# ----------------------------------------------------------------------------------------------------------------
# CogVideoX (plain 2B-style: sin-cos position table; 5B-style: 3D RoPE passed by the pipeline)
# ----------------------------------------------------------------------------------------------------------------

_COG_KINDS = _per_layer(2, "transformer_blocks", {
    "attn1": ("joint", "CogVideoXAttnProcessor2_0 concatenates text before video (torch.cat([encoder_hidden_states, "
                       "hidden_states], dim=1)) and runs one SDPA over all F*H*W video tokens plus the text"),
    "ff": ("mlp", "CogVideoXBlock.ff runs on torch.cat([norm_encoder_hidden_states, norm_hidden_states]) "
                  "(text and video rows through one feed-forward), split back by text_seq_length"),
})


def _cogvideox(rope: bool) -> Callable[[], torch.nn.Module]:
    from diffusers import CogVideoXTransformer3DModel

    # The 2B checkpoint uses head dim 64 and a sin-cos table; 5B uses RoPE (head dim must split 1/4 : 3/8 : 3/8).
    return _seeded(lambda: CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16 if rope else 8, in_channels=C, out_channels=C, num_layers=2,
        sample_width=W, sample_height=H, sample_frames=4 * (F - 1) + 1, patch_size=2, text_embed_dim=D_TEXT,
        time_embed_dim=8, temporal_compression_ratio=4, max_text_seq_length=L,
        use_rotary_positional_embeddings=rope))


def _cogvideox_rotary() -> tuple[torch.Tensor, torch.Tensor]:
    """CogVideoXPipeline._prepare_rotary_positional_embeddings for the tiny latent (CogVideoX 1.0 branch:
    crop region of the patch grid inside the base grid, then 3D RoPE of the head dim)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    grid = (H // 2, W // 2)
    crops = get_resize_crop_region_for_grid(grid, W // 2, H // 2)
    return get_3d_rotary_pos_embed(embed_dim=16, crops_coords=crops, grid_size=grid, temporal_size=F)


def _cogvideox_kwargs(rope: bool) -> Callable[[], dict[str, Any]]:
    def kwargs() -> dict[str, Any]:
        g = _gen()
        return dict(hidden_states=torch.randn(B, F, C, H, W, generator=g),  # (B, F, C, H, W)
                    encoder_hidden_states=torch.randn(B, L, D_TEXT, generator=g),
                    timestep=torch.full((B,), 500, dtype=torch.int64),  # CogVideoXDDIMScheduler: int64
                    image_rotary_emb=_cogvideox_rotary() if rope else None,
                    attention_kwargs=None,
                    return_dict=False)

    return kwargs


_COG_NOTES = (
    "Two-stream blocks: text and video are both carried from block to block (each block returns (hidden_states, "
    "encoder_hidden_states)); attention and feed-forward see them concatenated [text | video]. Timestep int64. "
    "Output is (B, F, C, H, W) (frames before channels).")

COGVIDEOX = ZooCase(
    name="cogvideox-2b", cls="CogVideoXTransformer3DModel", build=_cogvideox(rope=False),
    kwargs=_cogvideox_kwargs(rope=False), kinds=_COG_KINDS,
    notes=_COG_NOTES + " Static F/H/W: CogVideoXPatchEmbed adds a fixed sin-cos position table built for "
                       "sample_frames/sample_height/sample_width (recomputed only if the size differs). "
                       "attention_kwargs=None is passed explicitly (the forward is wrapped by apply_lora_scale).")

COGVIDEOX_ROPE = ZooCase(
    name="cogvideox-rope", cls="CogVideoXTransformer3DModel", build=_cogvideox(rope=True),
    kwargs=_cogvideox_kwargs(rope=True), kinds=_COG_KINDS,
    notes=_COG_NOTES + " use_rotary_positional_embeddings=True (5B style): image_rotary_emb is a (cos, sin) tuple "
                       "of (F*H*W/4, head_dim) tensors built by the pipeline. In-place rotary writes in "
                       "CogVideoXAttnProcessor2_0 (attention_processor.py:2325-2327): query[:, :, text_seq_length:] = "
                       "apply_rotary_emb(...), same for key.")

F15 = 4  # CogVideoX 1.5 patches 2 latent frames together; the pipeline pads the latent frames to a multiple of 2


def _cogvideox15_i2v() -> torch.nn.Module:
    from diffusers import CogVideoXTransformer3DModel

    # CogVideoX1.5-5B-I2V: temporal patch 2, "ofs" embedding, RoPE on a sliced grid, no patch bias; the image
    # latents are concatenated to the noisy latents on the channel axis.
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=2 * C, out_channels=C, num_layers=2,
        sample_width=W, sample_height=H, sample_frames=4 * (F15 - 1) + 1, patch_size=2, patch_size_t=2,
        ofs_embed_dim=8, text_embed_dim=D_TEXT, time_embed_dim=8, max_text_seq_length=L,
        use_rotary_positional_embeddings=True, patch_bias=False)


def _cogvideox15_kwargs() -> dict[str, Any]:
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    g = _gen()
    # CogVideoXImageToVideoPipeline._prepare_rotary_positional_embeddings, CogVideoX 1.5 branch.
    rotary = get_3d_rotary_pos_embed(embed_dim=16, crops_coords=None, grid_size=(H // 2, W // 2),
                                     temporal_size=F15 // 2, grid_type="slice", max_size=(H // 2, W // 2))
    return dict(hidden_states=torch.randn(B, F15, 2 * C, H, W, generator=g),
                encoder_hidden_states=torch.randn(B, L, D_TEXT, generator=g),
                timestep=torch.full((B,), 500, dtype=torch.int64),
                ofs=torch.full((1,), 2.0),  # latents.new_full((1,), fill_value=2.0)
                image_rotary_emb=rotary,
                attention_kwargs=None,
                return_dict=False)


COGVIDEOX15_I2V = ZooCase(
    name="cogvideox-1.5-i2v", cls="CogVideoXTransformer3DModel", build=_seeded(_cogvideox15_i2v),
    kwargs=_cogvideox15_kwargs, kinds=_COG_KINDS, extra={"prediction_shape": (B, F15, C, H, W)},
    notes=_COG_NOTES + " CogVideoX 1.5 I2V: patch_size_t=2 (tokens span 2 latent frames; the unpatchify "
                       "branch `if p_t is None ... else` differs), an ofs tensor of batch 1 embedded and added to "
                       "the time embedding, image latents as extra input channels, RoPE tuple argument and the "
                       "in-place rotary writes of CogVideoXAttnProcessor2_0 (attention_processor.py:2325-2327).")

# ----------------------------------------------------------------------------------------------------------------
# Latte
# ----------------------------------------------------------------------------------------------------------------


def _latte() -> torch.nn.Module:
    from diffusers import LatteTransformer3DModel

    return LatteTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=C, out_channels=2 * C,
                                   num_layers=2, sample_size=H, patch_size=2, cross_attention_dim=16,
                                   caption_channels=D_TEXT, num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                                   video_length=F)


def _latte_kwargs() -> dict[str, Any]:
    g = _gen()
    return dict(hidden_states=torch.randn(B, C, F, H, W, generator=g),
                encoder_hidden_states=torch.randn(B, L, D_TEXT, generator=g),
                timestep=torch.full((B,), 500, dtype=torch.int64),  # DDPM/DDIM: int64
                enable_temporal_attentions=True,
                return_dict=False)


LATTE = ZooCase(
    name="latte", cls="LatteTransformer3DModel", build=_seeded(_latte), kwargs=_latte_kwargs,
    extra={"prediction_shape": (B, 2 * C, F, H, W)},  # learned sigma: noise channels, then variance channels
    kinds={
        **_per_layer(2, "transformer_blocks", {
            "attn1": ("spatial", "spatial BasicTransformerBlock: hidden_states are (B*F, H*W, D), self-attention "
                                 "within one frame"),
            "attn2": ("cross", "attn2 takes encoder_hidden_states_spatial (caption repeated per frame) as "
                               "keys/values"),
            "ff": ("mlp", "BasicTransformerBlock.ff of the spatial block"),
        }),
        **_per_layer(2, "temporal_transformer_blocks", {
            "attn1": ("temporal", "temporal BasicTransformerBlock: hidden_states reshaped to (B*H*W, F, D), "
                                  "self-attention over frames at one position"),
            "ff": ("mlp", "BasicTransformerBlock.ff of the temporal block"),
        }),
    },
    notes="Alternating spatial/temporal blocks with (B,F,N,D) <-> (B,N,F,D) permutes between them. Python bool "
          "argument enable_temporal_attentions. Learned-sigma output: 2*C channels (noise first). Static F: "
          "temp_pos_embed buffer is built for video_length frames and added before temporal block 0 "
          "(`if i == 0 and num_frame > 1`). PatchEmbed sin-cos table built for sample_size. Timestep int64.")

# ----------------------------------------------------------------------------------------------------------------
# Allegro
# ----------------------------------------------------------------------------------------------------------------


def _allegro() -> torch.nn.Module:
    from diffusers import AllegroTransformer3DModel

    # Head dim 12: apply_rotary_emb_allegro splits it in three (t, h, w) parts of 4.
    return AllegroTransformer3DModel(patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=12,
                                     in_channels=C, out_channels=C, num_layers=2, cross_attention_dim=24,
                                     sample_height=H, sample_width=W, sample_frames=F, caption_channels=D_TEXT)


def _allegro_rotary() -> tuple[tuple, tuple]:
    """AllegroPipeline._prepare_rotary_positional_embeddings on the tiny latent: ((t, h, w) (cos, sin) tables,
    (t, h, w) int64 position ids of every token)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

    gh, gw = H // 2, W // 2
    freqs_t, freqs_h, freqs_w, grid_t, grid_h, grid_w = get_3d_rotary_pos_embed_allegro(
        embed_dim=12, crops_coords=((0, 0), (gh, gw)), grid_size=(gh, gw), temporal_size=F,
        interpolation_scale=(2.2, 2.0, 2.0))
    pos = torch.cartesian_prod(grid_t.long(), grid_h.long(), grid_w.long())
    pos = pos.reshape(-1, 3).transpose(0, 1).reshape(3, 1, -1).contiguous()
    return (freqs_t, freqs_h, freqs_w), tuple(pos)


def _allegro_kwargs() -> dict[str, Any]:
    g = _gen()
    return dict(hidden_states=torch.randn(B, C, F, H, W, generator=g),
                encoder_hidden_states=torch.randn(B, L, D_TEXT, generator=g),
                encoder_attention_mask=_text_mask(),
                timestep=torch.full((B,), 500.0),  # EulerAncestralDiscreteScheduler: float
                image_rotary_emb=_allegro_rotary(),
                return_dict=False)


ALLEGRO = ZooCase(
    name="allegro", cls="AllegroTransformer3DModel", build=_seeded(_allegro), kwargs=_allegro_kwargs,
    kinds=_per_layer(2, "transformer_blocks", {
        "attn1": ("joint", "AllegroTransformerBlock.attn1: self-attention over all F*H*W tokens "
                           "(hidden_states flattened to (B, F*H*W, D)) with 3-axis RoPE"),
        "attn2": ("cross", "attn2 takes the projected caption as keys/values, masked by encoder_attention_mask"),
        "ff": ("mlp", "AllegroTransformerBlock.ff"),
    }),
    notes="Nested tuple argument image_rotary_emb = ((t, h, w) (cos, sin) pairs, (t, h, w) int64 position ids); "
          "apply_rotary_emb_allegro gathers cos/sin with F.embedding(pos, cos). 2D int64 text mask turned into "
          "a -10000 bias inside forward via self.dtype. Residual of attn2 has no gate. Timestep float.")

# ----------------------------------------------------------------------------------------------------------------
# ConsisID (identity-preserving CogVideoX: face perceiver + perceiver cross-attention every 2 blocks)
# ----------------------------------------------------------------------------------------------------------------


def _consisid() -> torch.nn.Module:
    from diffusers import ConsisIDTransformer3DModel

    # 3 heads x 16: inner 48, so the face features (LFE_output_dim) are inner * 2/3 = 32 wide, as 2048 = 3072 * 2/3.
    return ConsisIDTransformer3DModel(
        num_attention_heads=3, attention_head_dim=16, in_channels=2 * C, out_channels=C, time_embed_dim=8,
        text_embed_dim=D_TEXT, num_layers=2, sample_width=W, sample_height=H, sample_frames=4 * (F - 1) + 1,
        patch_size=2, max_text_seq_length=L, use_rotary_positional_embeddings=True, is_train_face=True,
        is_kps=False, cross_attn_interval=2, cross_attn_dim_head=8, cross_attn_num_heads=2, LFE_id_dim=12,
        LFE_vit_dim=16, LFE_depth=2, LFE_dim_head=8, LFE_num_heads=2, LFE_num_id_token=2, LFE_num_querie=4,
        LFE_output_dim=32, LFE_ff_mult=2, LFE_num_scale=2)


def _consisid_kwargs() -> dict[str, Any]:
    g = _gen()
    # The pipeline concatenates the image latents to the noisy latents on the channel axis (dim=2).
    return dict(hidden_states=torch.randn(B, F, 2 * C, H, W, generator=g),
                encoder_hidden_states=torch.randn(B, L, D_TEXT, generator=g),
                timestep=torch.full((B,), 500, dtype=torch.int64),
                image_rotary_emb=_cogvideox_rotary(),
                attention_kwargs=None,
                return_dict=False,
                # One face for the whole CFG batch: the pipeline does not repeat id_cond / id_vit_hidden.
                id_vit_hidden=[torch.randn(1, 6, 16, generator=g) for _ in range(2)],
                id_cond=torch.randn(1, 12, generator=g))


CONSISID = ZooCase(
    name="consisid", cls="ConsisIDTransformer3DModel", build=_seeded(_consisid), kwargs=_consisid_kwargs,
    # The input carries the image latents as extra channels; the prediction covers the noisy latents only.
    extra={"prediction_shape": (B, F, C, H, W)},
    kinds={
        **_per_layer(2, "transformer_blocks", {
            "attn1": ("joint", "CogVideoXAttnProcessor2_0: [text | video] concatenated, one SDPA"),
            "ff": ("mlp", "ConsisIDBlock.ff over the concatenated text and video rows"),
        }),
        "perceiver_cross_attention.0": (
            "cross", "PerceiverCrossAttention after block 0 (i % cross_attn_interval == 0): queries video tokens, "
                     "keys/values the face features; hand-written (q*s) @ (k*s)^T -> softmax -> @ v, no SDPA"),
        **_per_layer(2, "local_facial_extractor.layers", {
            "0": ("other", "PerceiverAttention: queries learned latents + id tokens, keys/values id + ViT face "
                           "features; no video tokens (hand-written matmul-softmax)"),
            "1": ("mlp", "feed-forward (nn.Sequential) over the face latents; no video tokens"),
        }),
    },
    notes="Keyword arguments include a list of tensors (id_vit_hidden, one per LFE scale). The whole "
          "local_facial_extractor depends only on id_cond/id_vit_hidden: its output is the same at every step. "
          "Face tensors have batch 1 against a video batch of 2 (broadcast in the perceiver matmuls). In-place "
          "rotary writes in CogVideoXAttnProcessor2_0 (attention_processor.py:2325-2327). Two-stream blocks as "
          "CogVideoX; the perceiver cross-attention residual is added outside the blocks, in the model forward "
          "(consisid_transformer_3d.py: `hidden_states + self.local_face_scale * self.perceiver_cross_attention"
          "[ca_idx](valid_face_emb, hidden_states)`). Timestep int64.")

# ----------------------------------------------------------------------------------------------------------------
# Cosmos (1.0 text2world)
# ----------------------------------------------------------------------------------------------------------------


def _cosmos() -> torch.nn.Module:
    from diffusers import CosmosTransformer3DModel

    # concat_padding_mask=False: the released True resizes padding_mask with torchvision, which is not installed
    # here (diffusers then fails with NameError: name 'transforms' is not defined).
    return CosmosTransformer3DModel(in_channels=C, out_channels=C, num_attention_heads=2, attention_head_dim=16,
                                    num_layers=2, mlp_ratio=2.0, text_embed_dim=D_TEXT, adaln_lora_dim=8,
                                    max_size=(8, 16, 16), patch_size=(1, 2, 2), concat_padding_mask=False)


def _cosmos_kwargs() -> dict[str, Any]:
    g = _gen()
    return dict(hidden_states=torch.randn(B, C, F, H, W, generator=g),
                timestep=torch.full((B,), 0.5),  # EDM scheduler, cast to the transformer dtype: float
                encoder_hidden_states=torch.randn(B, L, D_TEXT, generator=g),
                fps=30,
                padding_mask=torch.zeros(1, 1, H, W),
                return_dict=False)


COSMOS = ZooCase(
    name="cosmos", cls="CosmosTransformer3DModel", build=_seeded(_cosmos), kwargs=_cosmos_kwargs,
    kinds=_per_layer(2, "transformer_blocks", {
        "attn1": ("joint", "CosmosTransformerBlock.attn1: self-attention over all F*H*W tokens with 3-axis RoPE"),
        "attn2": ("cross", "attn2 (CosmosAttnProcessor2_0) takes the text encoder_hidden_states as keys/values"),
        "ff": ("mlp", "CosmosTransformerBlock.ff"),
    }),
    notes="The text2world pipeline calls the transformer twice per step with batch 1 (conditional, then "
          "unconditional); the case batches both. Python int argument fps (rotary time scale). The released "
          "config has concat_padding_mask=True: padding_mask is resized with torchvision "
          "transforms.functional.resize (NEAREST) inside forward and concatenated as an extra input channel; "
          "torchvision is not installed here, so the case uses concat_padding_mask=False (padding_mask is still "
          "passed, as the pipeline does, and ignored). `if timestep.ndim == 1 / elif timestep.ndim == 5` shape branch; "
          "`isinstance(encoder_hidden_states, tuple)` branch. torch.onnx.is_in_onnx_export() branch in "
          "CosmosAttnProcessor2_0 (GQA repeat_interleave). Learnable positional embedding normalised with "
          "np.sqrt(norm.numel() / emb.numel()).")



def _cosmos2() -> torch.nn.Module:
    from diffusers import CosmosTransformer3DModel

    # Cosmos-Predict2 video2world: the condition mask is one more input channel, no learnable position table,
    # RoPE scaled (1, 3, 3). concat_padding_mask=False for the torchvision reason above.
    return CosmosTransformer3DModel(in_channels=C + 1, out_channels=C, num_attention_heads=2, attention_head_dim=16,
                                    num_layers=2, mlp_ratio=2.0, text_embed_dim=D_TEXT, adaln_lora_dim=8,
                                    max_size=(8, 16, 16), patch_size=(1, 2, 2), rope_scale=(1.0, 3.0, 3.0),
                                    concat_padding_mask=False, extra_pos_embed_type=None)


def _cosmos2_kwargs() -> dict[str, Any]:
    g = _gen()
    # Cosmos2VideoToWorldPipeline: t = sigma / (sigma + 1) per frame, the first (conditioning) latent frame held
    # at t_conditioning = 1e-4 / (1 + 1e-4); cond_mask is 1 on that frame.
    cond = torch.zeros(1, 1, F, 1, 1)
    cond[:, :, :1] = 1.0
    t_cond = 1e-4 / (1 + 1e-4)
    timestep = cond * t_cond + (1 - cond) * torch.full((B, 1, F, 1, 1), 0.5)
    return dict(hidden_states=torch.randn(B, C, F, H, W, generator=g),
                timestep=timestep,
                encoder_hidden_states=torch.randn(B, L, D_TEXT, generator=g),
                fps=16,
                condition_mask=cond * torch.ones(B, 1, F, H, W),
                padding_mask=torch.zeros(1, 1, H, W),
                return_dict=False)


COSMOS2_V2W = ZooCase(
    name="cosmos2-video2world", cls="CosmosTransformer3DModel", build=_seeded(_cosmos2), kwargs=_cosmos2_kwargs,
    kinds=COSMOS.kinds,
    notes="Per-frame timesteps: timestep is (B, 1, T, 1, 1) with the conditioning frame at t_conditioning and "
          "the others at the step's t (`elif timestep.ndim == 5` branch with an assert on its shape; embeddings "
          "expanded per token). condition_mask (B, 1, T, H, W) concatenated as an input channel. Otherwise as "
          "cosmos (two batch-1 calls per step in the pipeline; batched here).")

# ----------------------------------------------------------------------------------------------------------------
# EasyAnimate (V5.1: MMDiT blocks; the tiny model has one MMDiT block and one shared-weight block)
# ----------------------------------------------------------------------------------------------------------------


def _easyanimate() -> torch.nn.Module:
    from diffusers import EasyAnimateTransformer3DModel

    return EasyAnimateTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=C,
                                         out_channels=C, patch_size=2, sample_width=W, sample_height=H,
                                         num_layers=2, mmdit_layers=1, time_embed_dim=8, text_embed_dim=D_TEXT)


def _easyanimate_kwargs() -> dict[str, Any]:
    g = _gen()
    return dict(hidden_states=torch.randn(B, C, F, H, W, generator=g),
                timestep=torch.full((B,), 500.0),  # t_expand cast to the latent dtype: float
                encoder_hidden_states=torch.randn(B, L, D_TEXT, generator=g),
                return_dict=False)


EASYANIMATE = ZooCase(
    name="easyanimate", cls="EasyAnimateTransformer3DModel", build=_seeded(_easyanimate),
    kwargs=_easyanimate_kwargs,
    kinds={
        "transformer_blocks.0.attn1": ("joint", "MMDiT block: separate text projections (add_q/k/v_proj), "
                                                "[text | video] concatenated on the sequence axis, one SDPA"),
        "transformer_blocks.0.ff": ("mlp", "video-stream feed-forward"),
        "transformer_blocks.0.txt_ff": ("mlp", "text-stream feed-forward of the MMDiT block"),
        "transformer_blocks.1.attn1": ("joint", "non-MMDiT block (index >= mmdit_layers): text concatenated to "
                                                "video before the shared to_q/k/v, one SDPA"),
        "transformer_blocks.1.ff": ("mlp", "shared feed-forward: called twice, on the video rows and then on "
                                           "the text rows (txt_ff is None)"),
    },
    notes="Two-stream blocks (hidden_states, encoder_hidden_states carried from block to block). In-place "
          "rotary writes in EasyAnimateAttnProcessor2_0 (transformer_easyanimate.py:172-177): "
          "query[:, :, encoder_hidden_states.shape[1]:] = apply_rotary_emb(...). RoPE is computed inside forward "
          "from the latent shape against a hard-coded 90x60 base grid. Block 1 calls self.ff twice (one module, "
          "two call sites). Output reshaped with the input channel count. Timestep float.")

# ----------------------------------------------------------------------------------------------------------------
# MiniMax-H3 (joint video + audio, one packed sequence; modular pipeline)
# ----------------------------------------------------------------------------------------------------------------


def _minimax() -> torch.nn.Module:
    from diffusers import MiniMaxH3Transformer3DModel

    # As in the release, heads * head_dim (32) exceeds the residual width (24); 2*3*2 = 12 of 16 channels rotate.
    return MiniMaxH3Transformer3DModel(num_attention_heads=2, attention_head_dim=16, hidden_size=24, num_layers=2,
                                       num_refiner_layers=1, ffn_dim=32, in_channels=C, audio_in_channels=C,
                                       patch_size=(1, 2, 2), text_dim=D_TEXT, freq_dim=32,
                                       time_embed_hidden_dim=24, time_embed_dim=16, rope_freq_dim=2)


def _minimax_layout(keyframes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """MiniMaxH3PrepareLayoutStep.build_packed_sequence: [text | keyframe rows | audio | video] rows, and the
    row timestep plan of one step (MiniMaxH3SetTimestepsStep: video and audio at the same t; keyframe rows held
    at max(t, keyframe_noise_aug = 0.999))."""
    from diffusers.modular_pipelines.minimax_h3.before_denoise import (
        MiniMaxH3PrepareLayoutStep, MiniMaxH3SetTimestepsStep)

    position_ids, token_tags, video_idx, audio_idx, text_idx, n_cond, _ = (
        MiniMaxH3PrepareLayoutStep.build_packed_sequence(
            text_token_tags=torch.ones(L, dtype=torch.long), num_latent_frames=F, latent_height=H, latent_width=W,
            num_audio_latents=2, patch_size=(1, 2, 2), audio_channels=2, audio_tag=2, video_tag=0,
            keyframe_anchors=keyframes))
    timestep, timestep_indices = MiniMaxH3SetTimestepsStep.build_row_timesteps(
        video_idx, audio_idx, n_cond, 0, L, 0.5, 0.5, 0.999, 1.0)
    return dict(timestep=timestep, timestep_indices=timestep_indices, token_tags=token_tags,
                position_ids=position_ids, video_indices=video_idx, audio_indices=audio_idx, text_indices=text_idx)


def _minimax_kwargs(keyframes: tuple[str, ...] = ()) -> dict[str, Any]:
    g = _gen()
    layout = _minimax_layout(keyframes)
    return dict(hidden_states=torch.randn(B, layout["video_indices"].numel(), C * 4, generator=g),
                audio_hidden_states=torch.randn(B, layout["audio_indices"].numel(), C, generator=g),
                encoder_hidden_states=torch.randn(B, L, D_TEXT, generator=g),
                attention_kwargs=None, return_dict=False, **layout)


MINIMAX_H3 = ZooCase(
    name="minimax-h3", cls="MiniMaxH3Transformer3DModel", build=_seeded(_minimax), kwargs=lambda: _minimax_kwargs(),
    kinds={
        "token_refiner.refiner_blocks.0.attn": ("text", "MiniMaxH3TokenRefinerBlock: self-attention over the "
                                                        "projected text only, before packing"),
        "token_refiner.refiner_blocks.0.ff": ("mlp", "refiner feed-forward over text tokens only"),
        **_per_layer(2, "transformer_blocks", {
            "attn": ("joint", "MiniMaxH3TransformerBlock.attn: full self-attention over one packed sequence of "
                              "text, audio and video rows (index_copy'd together), 3-axis partial RoPE"),
            "ff": ("mlp", "MiniMaxH3TransformerBlock.ff (SwiGLU) over the packed sequence"),
        }),
    },
    notes="Video input is already patchified and packed: hidden_states (B, F*H/2*W/2, 4*C), rows placed into "
          "the sequence with index_copy(1, video_indices, ...); outputs (video, audio) selected back with "
          "index_select. Two outputs (out_index 0 = video velocity). timestep has shape (num_distinct_timesteps,), "
          "not (B,): rows pick their modulation with index_select(0, timestep_indices * 3 + token_tags). "
          "position_ids are float64 (cast to float32 in the rope). Python shape checks raise ValueError in "
          "forward. The token refiner sees only text: its output is the same at every step. The pipeline "
          "(modular, guidance-distilled) calls with batch 1; the batch axis is pure replication.")

MINIMAX_H3_KEYFRAME = ZooCase(
    name="minimax-h3-keyframe", cls="MiniMaxH3Transformer3DModel", build=_seeded(_minimax),
    kwargs=lambda: _minimax_kwargs(("first",)), kinds=MINIMAX_H3.kinds,
    # a timestep tensor of distinct values indexed per row (not one per sample or per token): graphpass cannot
    # tell which is the step's, and says so at the first call
    unsupported=r"timestep holds different values in one call",
    notes="fl2va-style layout with one first-frame keyframe block: its video rows sit before the audio rows and "
          "are held at t = 0.999 while the generated rows are at the step's t, so timestep holds 2 distinct "
          "values and timestep_indices points each row at one of them. hidden_states carries the keyframe rows "
          "first (video_indices is not contiguous). Otherwise as minimax-h3.")

# ----------------------------------------------------------------------------------------------------------------
# SANA-Video
# ----------------------------------------------------------------------------------------------------------------


def _sana_video() -> torch.nn.Module:
    from diffusers import SanaVideoTransformer3DModel

    return SanaVideoTransformer3DModel(in_channels=C, out_channels=C, num_attention_heads=2, attention_head_dim=16,
                                       num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16,
                                       cross_attention_dim=32, caption_channels=D_TEXT, mlp_ratio=2.5,
                                       sample_size=H, patch_size=(1, 2, 2), rope_max_seq_len=64)


def _sana_video_kwargs() -> dict[str, Any]:
    g = _gen()
    return dict(hidden_states=torch.randn(B, C, F, H, W, generator=g),
                encoder_hidden_states=torch.randn(B, L, D_TEXT, generator=g),
                encoder_attention_mask=_text_mask(),
                timestep=torch.full((B,), 500.0),  # flow matching: float
                return_dict=False,
                attention_kwargs=None)


SANA_VIDEO = ZooCase(
    name="sana-video", cls="SanaVideoTransformer3DModel", build=_seeded(_sana_video), kwargs=_sana_video_kwargs,
    kinds=_per_layer(2, "transformer_blocks", {
        "attn1": ("joint", "SanaLinearAttnProcessor3_0: LINEAR (ReLU-kernel, non-softmax) self-attention over all "
                           "F*H*W tokens, RoPE on the numerator stream"),
        "attn2": ("cross", "attn2 (SanaAttnProcessor2_0, SDPA) takes the caption as keys/values"),
        "ff": ("mlp", "GLUMBTempConv: 1x1 conv, depthwise 3x3 spatial conv, gated, then a (3,1) temporal conv "
                      "over frames: not pointwise, mixes neighbouring tokens in space and time"),
    }),
    notes="Linear attention with in-place rotary writes into a fresh tensor (transformer_sana_video.py:142-144: "
          "out = torch.empty_like(...); out[..., 0::2] = ...; out[..., 1::2] = ...). Python ints frames/height/"
          "width passed to every block (ff unflattens the sequence to (B, F, H, W, D)). Cross-attention residual "
          "has no gate. int64 text mask turned into a -10000 bias inside forward. Timestep float.")



def _sana_video_i2v_kwargs() -> dict[str, Any]:
    kwargs = _sana_video_kwargs()
    # SanaImageToVideoPipeline: per-token timesteps t * (1 - conditioning_mask), the mask (B, 1, F, H/2, W/2) being
    # 1 on the first (image) latent frame.
    mask = torch.zeros(B, 1, F, H // 2, W // 2)
    mask[:, :, 0] = 1.0
    kwargs["timestep"] = torch.full((B, 1, F, H // 2, W // 2), 500.0) * (1 - mask)
    return kwargs


SANA_VIDEO_I2V = ZooCase(
    name="sana-video-i2v", cls="SanaVideoTransformer3DModel", build=_seeded(_sana_video),
    kwargs=_sana_video_i2v_kwargs, kinds=SANA_VIDEO.kinds,
    notes="Per-token timesteps: timestep is (B, 1, F, H/2, W/2), 0 on the first latent frame; forward flattens "
          "it (time_embed(timestep.flatten())) and views the modulation as (B, F*H*W/4, 6*D), so every token has "
          "its own AdaLN shift/scale/gate. Otherwise as sana-video.")

# ----------------------------------------------------------------------------------------------------------------
# SANA-WM (camera-controlled world model: gated-delta-net linear attention + every 2nd block softmax)
# ----------------------------------------------------------------------------------------------------------------

_WM_LATENT = (C, F, 4, 4)  # (C, T, H, W): the camera tensors are built for a 128x128 frame at VAE stride 32


def _sana_wm() -> torch.nn.Module:
    from diffusers import SanaWMTransformer3DModel

    return SanaWMTransformer3DModel(in_channels=C, num_layers=2, hidden_size=32, num_attention_heads=2,
                                    patch_size=(1, 1, 1), softmax_every_n=2, linear_head_dim=16,
                                    caption_channels=D_TEXT, mlp_ratio=2.0, chunk_plucker_post_attn_blocks=2,
                                    cam_attn_compress=1, mixed_precision="fp32")


def _sana_wm_camera() -> dict[str, torch.Tensor]:
    """SanaWMPipeline._build_camera_kwargs for a 17-frame 'wj' (forward while turning) trajectory at 128x128 pixels: raymap
    (1, T, 20) and chunk_plucker (1, 48, T, 4, 4), both repeated for the CFG batch."""
    from diffusers.pipelines.sana_wm.cam_utils import action_string_to_c2w, prepare_camera

    c2w = action_string_to_c2w(f"wj-{8 * (F - 1)}")  # 8 * (T - 1) + 1 poses: T latent frames at VAE stride 8
    n = c2w.shape[0]
    intr = np.tile(np.array([[100.0, 100.0, 64.0, 64.0]], dtype=np.float32), (n, 1))
    cam = prepare_camera(c2w, intr, target_size=(128, 128), vae_stride=(8, 32, 32))
    return dict(camera_conditions=cam["raymap"].unsqueeze(0).repeat(B, 1, 1),
                chunk_plucker=cam["chunk_plucker"].unsqueeze(0).repeat(B, 1, 1, 1, 1))


def _sana_wm_kwargs() -> dict[str, Any]:
    g = _gen()
    # LTX-style per-frame timesteps (B, 1, T): the first latent frame is the clean conditioning anchor (t = 0).
    timestep = torch.full((B, 1, F), 500.0)
    timestep[:, :, 0] = 0.0
    return dict(hidden_states=torch.randn(B, *_WM_LATENT, generator=g),
                timestep=timestep,
                encoder_hidden_states=torch.randn(B, 1, L, D_TEXT, generator=g),
                return_dict=False,
                data_info={"img_hw": torch.tensor([[128.0, 128.0]])},
                mask=_text_mask(),
                **_sana_wm_camera())


SANA_WM = ZooCase(
    name="sana-wm", cls="SanaWMTransformer3DModel", build=_seeded(_sana_wm), kwargs=_sana_wm_kwargs,
    kinds={
        "blocks.0.attn": ("joint", "BidirectionalGDNUCPESinglePathLiteLA: LINEAR (ReLU kernel, gated delta rule, "
                                   "non-softmax) attention; the D x D state sums k v^T over all spatial tokens of a "
                                   "frame and is scanned over frames both ways, so every token sees every frame; "
                                   "a second camera (UCPE) branch runs the same recurrence. The attention "
                                   "module is blocks.0.attn: it projects q/k/v and calls the parameter-free cores "
                                   "attn (SanaWMBidirectionalGDNAttention) and cam_attn, then gates and projects "
                                   "their sum; its output is what the block adds to the hidden state"),
        "blocks.1.attn": ("joint", "_SoftmaxUCPESinglePathLiteLA (every softmax_every_n-th block): softmax "
                                   "self-attention over all T*H*W tokens plus the UCPE camera branch, computed by "
                                   "the parameter-free cores attn / cam_attn it calls (as blocks.0.attn)"),
        **_per_layer(2, "blocks", {
            "cross_attn": ("cross", "MultiHeadCrossAttention: queries video tokens, keys/values the caption "
                                    "(encoder_hidden_states (B, 1, L, D): tokens with a singleton axis)"),
            "mlp": ("mlp", "GLUMBConvTemp: conv feed-forward with a temporal conv (mixes neighbouring frames)"),
        }),
    },
    video_input="hidden_states",
    notes="Timestep is (B, 1, T) per frame and is cast with timestep.long() before embedding (transformer_sana_wm.py:2957). "
          "Dict argument data_info; text mask passed as `mask`; camera_conditions (B, T, 20) drive a numpy/"
          "float64 ray computation inside forward (_process_camera_conditions_ucpe / _prepare_ucpe_ray_transforms); "
          "chunk_plucker (B, 48, T, H, W) is embedded and added after every block's attention (plucker_proj). "
          "The GDN scan is a Python loop over frames with torch.stack of per-frame states. Complex RoPE table "
          "(SanaWMRotaryPosEmbed.freqs, complex64, a plain attribute, not a buffer). The parameter-free "
          "attention sub-modules blocks.i.attn.attn / .cam_attn are called from blocks.i.attn.")

# ----------------------------------------------------------------------------------------------------------------
# JoyImage-Edit (double-stream DiT over reference + target items) and JoyImage-Edit-Plus (padded patch lists)
# ----------------------------------------------------------------------------------------------------------------

_JOY_CONFIG = dict(patch_size=[1, 2, 2], in_channels=C, hidden_size=32, num_attention_heads=2, text_dim=D_TEXT,
                   mlp_width_ratio=2.0, num_layers=2, rope_dim_list=[4, 6, 6])


def _joy_kinds(prefix: str = "double_blocks") -> dict[str, tuple[str, str]]:
    return _per_layer(2, prefix, {
        "attn": ("joint", "double-stream joint attention: image tokens (all items, all frames) and text tokens "
                          "concatenated [image | text], one SDPA"),
        "img_mlp": ("mlp", "image-stream feed-forward"),
        "txt_mlp": ("mlp", "text-stream feed-forward"),
    })


def _joyimage() -> torch.nn.Module:
    from diffusers import JoyImageEditTransformer3DModel

    return JoyImageEditTransformer3DModel(**_JOY_CONFIG)


def _joyimage_kwargs() -> dict[str, Any]:
    g = _gen()
    # (B, items, C, T, H, W): one reference image and the noisy target (pipeline: cat([image_latents, noise])).
    return dict(hidden_states=torch.randn(B, 2, C, 1, H, W, generator=g),
                timestep=torch.full((B,), 500.0),
                encoder_hidden_states=torch.randn(B, L, D_TEXT, generator=g),
                return_dict=False)


JOYIMAGE_EDIT = ZooCase(
    name="joyimage-edit", cls="JoyImageEditTransformer3DModel", build=_seeded(_joyimage), kwargs=_joyimage_kwargs,
    kinds=_joy_kinds(),
    notes="6D multi-item input (B, items, C, T, H, W): items are rotated (target first: torch.cat([hs[:, -1:], "
          "hs[:, :-1]], dim=1)) and laid out on the time axis; output rotated back. Two-stream blocks carried "
          "from block to block. RoPE computed inside forward from the patch grid (get_rotary_pos_embed; a "
          "`.item()` on a constant grid only for rope_type='mrope'). The pipeline calls twice per step (batch 1 "
          "each, conditional and negative); the case batches both. Timestep float.")


def _joyimage_plus() -> torch.nn.Module:
    from diffusers import JoyImageEditPlusTransformer3DModel

    return JoyImageEditPlusTransformer3DModel(**_JOY_CONFIG)


_PLUS_SHAPES = [(1, 4, 4), (1, 3, 3)]  # target 8x8 latent and one 6x6 reference, in 2x2 patches


def _joyimage_plus_kwargs() -> dict[str, Any]:
    g = _gen()
    n = sum(t * h * w for t, h, w in _PLUS_SHAPES)
    return dict(hidden_states=torch.randn(B, n, C, 1, 2, 2, generator=g),  # (B, patches, C, pt, ph, pw)
                timestep=torch.full((B,), 500.0),
                encoder_hidden_states=torch.randn(B, L, D_TEXT, generator=g),
                encoder_hidden_states_mask=_text_mask(),
                shape_list=[list(_PLUS_SHAPES) for _ in range(B)],
                return_dict=False)


JOYIMAGE_EDIT_PLUS = ZooCase(
    name="joyimage-edit-plus", cls="JoyImageEditPlusTransformer3DModel", build=_seeded(_joyimage_plus),
    kwargs=_joyimage_plus_kwargs, kinds=_joy_kinds(),
    notes="Input is a padded list of patches (B, max_patches, C, pt, ph, pw), output the same layout. "
          "shape_list is a per-sample list of (t, h, w) tuples: RoPE tables and the joint attention mask are "
          "built by Python loops over the batch and over shape_list, with an in-place write "
          "img_mask[i, :actual_len] = 1.0 (transformer_joyimage_edit_plus.py:514). Boolean joint [image | text] "
          "attention mask passed to SDPA. Batched (B, S, D) RoPE. Timestep float.")


CASES = [COGVIDEOX, COGVIDEOX_ROPE, COGVIDEOX15_I2V, LATTE, ALLEGRO, CONSISID, COSMOS, COSMOS2_V2W, EASYANIMATE,
         MINIMAX_H3, MINIMAX_H3_KEYFRAME, SANA_VIDEO, SANA_VIDEO_I2V, SANA_WM, JOYIMAGE_EDIT, JOYIMAGE_EDIT_PLUS]
