"""Wan-family video transformers: Wan 2.1/2.2 (T2V, TI2V, I2V), VACE, Animate, Animate-2, SkyReels-V2,
ChronoEdit, Helios, AnyFlow (bidirectional and FAR causal) and Motif-Video.

Every model here shares one tiny geometry: 2 heads of 12 channels (inner dim 24; 12 splits evenly into the
4+4+4 channels of Wan's 3D RoPE), latents of 4 channels, 3 latent frames of 8x8 (4x4 tokens per frame after
the 2x2 patch, 48 video tokens), 5 text tokens of 16 channels, batch 2. Keyword arguments follow each
model's pipeline call (``return_dict=False`` and the timestep dtype its scheduler gives included).

Wan's image-to-video attention (``WanAttnProcessor`` with ``add_k_proj``) splits ``encoder_hidden_states``
at a hard-coded 512 text tokens, so the I2V-style cases (wan-i2v, wan-animate, chronoedit) pass 512 text
tokens: the umT5 length their pipelines always pad to.

    >>> from zoo import ZOO
    >>> case = ZOO["wan"]
    >>> out = case.build()(**case.kwargs())[case.out_index]
    >>> tuple(out.shape)
    (2, 4, 3, 8, 8)
"""
from __future__ import annotations

import torch

from . import ZooCase

HEADS, HEAD_DIM = 2, 12
DIM = HEADS * HEAD_DIM
FFN = 2 * DIM
TEXT_DIM, TEXT_LEN = 16, 5
#: The text length Wan's I2V cross-attention assumes (transformer_wan.py:89, ``shape[1] - 512``).
UMT5_LEN = 512
FREQ_DIM = 16
LATENT = 4
FRAMES, SIZE = 3, 8
TOKENS_PER_FRAME = (SIZE // 2) ** 2
BATCH = 2
#: Image-conditioning features (CLIP in the real models): a few tokens of a small width.
IMAGE_DIM, IMAGE_LEN = 16, 4
#: Wan's released checkpoints ship UniPCMultistepScheduler (int64 timesteps); 999 is its first step.
T_INT = 999

WAN_CORE = dict(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                in_channels=LATENT, out_channels=LATENT, text_dim=TEXT_DIM, freq_dim=FREQ_DIM, ffn_dim=FFN,
                num_layers=2)


def _seeded(cls, **config) -> torch.nn.Module:
    """``cls(**config)`` built under seed 0, in eval mode: the same weights on every call."""
    torch.manual_seed(0)
    return cls(**config).eval()


def _randn(g: torch.Generator, *shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype)


def _latents(g: torch.Generator, channels: int = LATENT, frames: int = FRAMES, batch: int = BATCH) -> torch.Tensor:
    """(B, C, F, H, W) latents."""
    return _randn(g, batch, channels, frames, SIZE, SIZE)


def _int_timestep() -> torch.Tensor:
    """``t.expand(B)`` of an int64 UniPC timestep."""
    return torch.full((BATCH,), T_INT, dtype=torch.int64)


# --- kinds ----------------------------------------------------------------------------------------------

def _wan_block_kinds(prefix: str, n: int, block: str, i2v: bool = False, attn1: str | None = None,
                     ffn: str = "ffn") -> dict[str, tuple[str, str]]:
    """Kinds of ``n`` Wan-style blocks (self-attention attn1, text cross-attention attn2, FeedForward ffn).

    >>> sorted(_wan_block_kinds("blocks", 1, "WanTransformerBlock"))
    ['blocks.0.attn1', 'blocks.0.attn2', 'blocks.0.ffn']
    """
    self_reason = attn1 or (f"{block}.attn1: softmax self-attention over all F*H*W video tokens of the clip "
                            f"in one sequence (3D RoPE on q/k)")
    cross_reason = f"{block}.attn2: queries the video tokens, keys/values the text embedding (encoder_hidden_states)"
    if i2v:
        cross_reason += ("; I2V: a second softmax attention of the same queries over the image tokens "
                         "(add_k_proj/add_v_proj, the first L-512 tokens) is added to it")
    kinds: dict[str, tuple[str, str]] = {}
    for i in range(n):
        kinds[f"{prefix}.{i}.attn1"] = ("joint", self_reason)
        kinds[f"{prefix}.{i}.attn2"] = ("cross", cross_reason)
        kinds[f"{prefix}.{i}.{ffn}"] = ("mlp", f"{block}.{ffn}: the block's feed-forward (GELU-tanh MLP)")
    return kinds


def _rename(kinds: dict[str, tuple[str, str]], old: str, new: str) -> dict[str, tuple[str, str]]:
    """Kinds with the attribute ``old`` renamed ``new`` in every path (Animate-2 names attn1 ``self_attn``)."""
    return {".".join(new if p == old else p for p in k.split(".")): v for k, v in kinds.items()}


# --- Wan 2.1 / 2.2 --------------------------------------------------------------------------------------

WAN_NOTES = (
    "WanTransformerBlock: self-attention (attn1), text cross-attention (attn2), FeedForward (ffn); adaLN "
    "modulation from scale_shift_table + temb. Residual adds wrapped in float casts: "
    "`(hidden_states.float() + attn_output * gate_msa).type_as(hidden_states)` (transformer_wan.py:490). "
    "RoPE writes in place into a fresh tensor: `out = torch.empty_like(...); out[..., 0::2] = x1 * cos - "
    "x2 * sin` (transformer_wan.py:113, nested function inside WanAttnProcessor.__call__). Rotary table is a "
    "fixed buffer (rope_max_seq_len=1024 positions per axis) sliced by the latent's F/H/W. rotary_emb is a "
    "(cos, sin) tuple passed positionally to every attn1. attention_kwargs=None (apply_lora_scale "
    "decorator). Shape branches: `if timestep.ndim == 2` (transformer_wan.py:677, Wan 2.2 TI2V) and "
    "`if temb.ndim == 4` (transformer_wan.py:469). Timestep int64: the released checkpoints ship "
    "UniPCMultistepScheduler (the pipeline's type hint says FlowMatchEulerDiscreteScheduler, float32). "
    "The pipeline runs cond and uncond as two batch-1 calls; batch 2 here. condition_embedder holds a "
    "PixArtAlphaTextProjection (text MLP) outside the blocks."
)


def _wan() -> ZooCase:
    from diffusers import WanTransformer3DModel

    def kwargs():
        g = torch.Generator().manual_seed(2)
        return dict(hidden_states=_latents(g), timestep=_int_timestep(),
                    encoder_hidden_states=_randn(g, BATCH, TEXT_LEN, TEXT_DIM),
                    attention_kwargs=None, return_dict=False)

    return ZooCase("wan", "WanTransformer3DModel", lambda: _seeded(WanTransformer3DModel, **WAN_CORE), kwargs,
                   _wan_block_kinds("blocks", 2, "WanTransformerBlock"), notes=WAN_NOTES)


def _wan_ti2v() -> ZooCase:
    """Wan 2.2 TI2V-5B: ``expand_timesteps`` gives one timestep per video token, (B, F*H*W/4), float32."""
    from diffusers import WanTransformer3DModel

    def kwargs():
        g = torch.Generator().manual_seed(2)
        # pipeline_wan.py:607: (mask[0][0][:, ::2, ::2] * t).flatten() expanded over the batch; the mask is
        # all ones for text-to-video (float32 mask times the int64 timestep gives float32).
        timestep = torch.full((BATCH, FRAMES * TOKENS_PER_FRAME), float(T_INT))
        return dict(hidden_states=_latents(g), timestep=timestep,
                    encoder_hidden_states=_randn(g, BATCH, TEXT_LEN, TEXT_DIM),
                    attention_kwargs=None, return_dict=False)

    return ZooCase("wan-ti2v", "WanTransformer3DModel", lambda: _seeded(WanTransformer3DModel, **WAN_CORE), kwargs,
                   _wan_block_kinds("blocks", 2, "WanTransformerBlock"),
                   notes=WAN_NOTES + " TI2V: timestep is (B, L) float32, one per video token; temb is "
                                     "(B, L, D) and every adaLN shift/scale/gate is per token (the "
                                     "`temb.ndim == 4` branch), so the time embedding runs on B*L rows.")


def _wan_i2v() -> ZooCase:
    """Wan 2.1 I2V-14B: CLIP image tokens through image_embedder, an extra image attention in every attn2."""
    from diffusers import WanTransformer3DModel

    config = dict(WAN_CORE, in_channels=2 * LATENT + 4, image_dim=IMAGE_DIM, added_kv_proj_dim=DIM)

    def kwargs():
        g = torch.Generator().manual_seed(2)
        # pipeline_wan_i2v.py: latent_model_input = cat([latents, condition], dim=1), condition = mask (4) +
        # encoded first frame (16 in the real model).
        return dict(hidden_states=_latents(g, 2 * LATENT + 4), timestep=_int_timestep(),
                    encoder_hidden_states=_randn(g, BATCH, UMT5_LEN, TEXT_DIM),
                    encoder_hidden_states_image=_randn(g, BATCH, IMAGE_LEN, IMAGE_DIM),
                    attention_kwargs=None, return_dict=False)

    return ZooCase("wan-i2v", "WanTransformer3DModel", lambda: _seeded(WanTransformer3DModel, **config), kwargs,
                   _wan_block_kinds("blocks", 2, "WanTransformerBlock", i2v=True),
                   notes=WAN_NOTES + " I2V: image tokens are concatenated before the text tokens and split "
                                     "again inside every attn2 at the hard-coded `encoder_hidden_states.shape[1] "
                                     "- 512` (transformer_wan.py:89), so the text must be exactly 512 tokens. "
                                     "attn2 holds two softmax attentions (text, image) summed before to_out.")


# --- VACE -----------------------------------------------------------------------------------------------

def _wan_vace() -> ZooCase:
    from diffusers import WanVACETransformer3DModel

    vace_in = 2 * LATENT + 4
    config = dict(WAN_CORE, vace_layers=[0, 1], vace_in_channels=vace_in)

    def kwargs():
        g = torch.Generator().manual_seed(2)
        # pipeline_wan_vace.py:887: conditioning_scale is a (len(vace_layers),) tensor in the model's dtype.
        return dict(hidden_states=_latents(g), timestep=_int_timestep(),
                    encoder_hidden_states=_randn(g, BATCH, TEXT_LEN, TEXT_DIM),
                    control_hidden_states=_latents(g, vace_in),
                    control_hidden_states_scale=torch.ones(2),
                    attention_kwargs=None, return_dict=False)

    kinds = _wan_block_kinds("blocks", 2, "WanTransformerBlock")
    kinds.update(_wan_block_kinds(
        "vace_blocks", 2, "WanVACETransformerBlock",
        attn1="WanVACETransformerBlock.attn1: softmax self-attention over all F*H*W tokens of the control "
              "stream (control latents + video tokens at block 0), 3D RoPE"))
    for i in range(2):
        kinds[f"vace_blocks.{i}.attn2"] = (
            "cross", "WanVACETransformerBlock.attn2: queries the control-stream tokens (one per video token), "
                     "keys/values the text embedding")
    notes = WAN_NOTES + (
        " VACE: a second stream of WanVACETransformerBlocks (vace_blocks) runs first over the control latents "
        "(proj_in adds the video tokens at block 0); each returns (hint, control_hidden_states) as a tuple; hints "
        "are kept in a Python list, reversed and popped, and added to the main stream after the blocks listed "
        "in vace_layers (`if i in self.config.vace_layers`, transformer_wan_vace.py:375), scaled by "
        "torch.unbind(control_hidden_states_scale). control tokens are padded with new_zeros to the video length.")
    return ZooCase("wan-vace", "WanVACETransformer3DModel", lambda: _seeded(WanVACETransformer3DModel, **config),
                   kwargs, kinds, notes=notes)


# --- Animate --------------------------------------------------------------------------------------------

#: Face video: 5 pixel frames (4k+1, like the 77-frame segments) of 8x8 give 3 face tokens per video frame
#: after the face encoder's two stride-2 causal convolutions and the prepended zero frame.
FACE_FRAMES, FACE_SIZE = 5, 8


def _wan_animate() -> ZooCase:
    from diffusers import WanAnimateTransformer3DModel

    config = dict(WAN_CORE, in_channels=None, latent_channels=LATENT, out_channels=LATENT,
                  image_dim=IMAGE_DIM, added_kv_proj_dim=DIM,
                  motion_encoder_channel_sizes={"8": 8, "4": 8}, motion_encoder_size=FACE_SIZE,
                  motion_style_dim=8, motion_dim=4, motion_encoder_dim=8, face_encoder_hidden_dim=8,
                  face_encoder_num_heads=2, inject_face_latents_blocks=2, motion_encoder_batch_size=8)

    def kwargs():
        g = torch.Generator().manual_seed(2)
        return dict(hidden_states=_latents(g, 2 * LATENT + 4), timestep=_int_timestep(),
                    encoder_hidden_states=_randn(g, BATCH, UMT5_LEN, TEXT_DIM),
                    encoder_hidden_states_image=_randn(g, BATCH, IMAGE_LEN, IMAGE_DIM),
                    pose_hidden_states=_latents(g, LATENT, FRAMES - 1),
                    face_pixel_values=_randn(g, BATCH, 3, FACE_FRAMES, FACE_SIZE, FACE_SIZE),
                    motion_encode_batch_size=None, attention_kwargs=None, return_dict=False)

    kinds = _wan_block_kinds("blocks", 2, "WanTransformerBlock", i2v=True)
    kinds["face_adapter.0"] = (
        "other", "keys from face-motion features, not text: WanAnimateFaceBlockCrossAttention (after block 0): queries the video tokens of frame t, "
                 "keys/values the face-motion tokens of frame t (query.unflatten(1, (T, -1)).flatten(0, 1): "
                 "frames folded into the batch), softmax, no mask")
    notes = WAN_NOTES + (
        " Animate: I2V attn2 (512-token text split, transformer_wan_animate.py:572). In-place write on the "
        "patch embedding output: `hidden_states[:, :, 1:] = hidden_states[:, :, 1:] + pose_hidden_states` "
        "(transformer_wan_animate.py:1223). Face branch: motion encoder (StyleGAN-like convs, "
        "`torch.linalg.qr` at transformer_wan_animate.py:345) run over `torch.split(face_pixel_values, "
        "motion_encode_batch_size)` in a Python loop (line 1248; 10 face images in batches of 8 here), then a "
        "causal Conv1d face encoder; face_adapter attention runs after every inject_face_latents_blocks-th "
        "block (`block_idx % ... == 0`) and is added to the residual stream. motion_encode_batch_size=None "
        "(an int-or-None argument). Face resolution is checked against the config (ValueError otherwise).")
    return ZooCase("wan-animate", "WanAnimateTransformer3DModel",
                   lambda: _seeded(WanAnimateTransformer3DModel, **config), kwargs, kinds, notes=notes)


# --- Animate-2 --------------------------------------------------------------------------------------------

#: Animate-2 geometry: the generation clip has origin_latent_frames + 1 = 3 latent frames, the cached
#: reference stream origin_latent_frames = 2 (origin_len=5 pixel frames, //4 + 1), 64x64 pixels -> 4x4 tokens.
A2_ORIGIN_LEN, A2_AREA, A2_REF_FRAMES = 5, (64, 64), 2


def _build_animate_2() -> torch.nn.Module:
    """The seeded Animate-2 model with its in-context block mask already built.

    The model builds the flex ``BlockMask`` lazily on its first call with ``create_block_mask(_compile=True)``
    (5-30 s of inductor compilation on CPU); here the model's own ``create_mask`` runs once with dynamo
    disabled (the same mask, built eagerly) and is stored where ``forward`` looks for it.
    """
    from diffusers import WanAnimate2Transformer3DModel

    model = _seeded(WanAnimate2Transformer3DModel, patch_size=(1, 2, 2), text_len=TEXT_LEN, in_dim=3 * LATENT,
                    dim=DIM, ffn_dim=FFN, freq_dim=FREQ_DIM, text_dim=TEXT_DIM, out_dim=LATENT, num_heads=HEADS,
                    num_layers=2)
    frames, hw = A2_ORIGIN_LEN // 4 + 1, A2_AREA[0] * A2_AREA[1] // 256
    with torch._dynamo.config.patch(disable=True):
        model.block_masks[(frames, hw)] = model.create_mask(frames, hw, torch.device("cpu"))
    return model


def _wan_animate_2() -> ZooCase:
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    ref_tokens = A2_REF_FRAMES * TOKENS_PER_FRAME

    def kwargs():
        g = torch.Generator().manual_seed(2)
        # The reference pass (kv_cache_mode="extract") fills one pre-RoPE K/V pair per layer, (B, L_ref, H, D);
        # seeded values stand in for it so each call is independent of earlier ones.
        cache = WanAnimate2KVCache(2)
        for layer in cache.layer_caches:
            layer.store(_randn(g, BATCH, ref_tokens, HEADS, HEAD_DIM), _randn(g, BATCH, ref_tokens, HEADS, HEAD_DIM))
        # modular_pipelines/wan_animate_2/denoise.py:560: lists of per-sample tensors, timestep = stack([t]).
        return dict(hidden_states=[_randn(g, LATENT, FRAMES, SIZE, SIZE) for _ in range(BATCH)],
                    timestep=torch.tensor([float(T_INT)]),
                    encoder_hidden_states=[_randn(g, TEXT_LEN, TEXT_DIM) for _ in range(BATCH)],
                    condition_latents=[_randn(g, 2 * LATENT, FRAMES, SIZE, SIZE) for _ in range(BATCH)],
                    kv_cache=cache, kv_cache_mode="cached", seq_len=FRAMES * TOKENS_PER_FRAME,
                    encoder_hidden_states_image=_randn(g, BATCH, IMAGE_LEN, 1280),
                    reference_grid_sizes=torch.tensor([[A2_REF_FRAMES, SIZE // 2, SIZE // 2]] * BATCH),
                    origin_len=A2_ORIGIN_LEN, origin_area=list(A2_AREA), is_uncondtion=False,
                    return_dict=False)

    kinds = _rename(_wan_block_kinds(
        "blocks", 2, "WanAnimate2TransformerBlock",
        attn1="WanAnimate2TransformerBlock.self_attn (kv_cache_mode='cached'): softmax attention of the "
              "generation tokens over [generation tokens | cached reference tokens] packed into 128-aligned "
              "buffers under a flex BlockMask: every generation token sees all generation tokens, plus the "
              "reference tokens of its own frame index"), "attn1", "self_attn")
    kinds = _rename(kinds, "attn2", "cross_attn")
    for i in range(2):
        kinds[f"blocks.{i}.cross_attn"] = (
            "cross", "WanAnimate2CrossAttnProcessor: queries video, keys/values text; plus a second softmax "
                     "attention over the CLIP image tokens (add_k_proj/add_v_proj), summed")
        kinds[f"blocks.{i}.ffn"] = ("mlp", "WanAnimate2TransformerBlock.ffn: nn.Sequential Linear-GELU-Linear")
    notes = (
        "Animate-2 (modular pipeline wan_animate_2): every argument a graph capture dislikes. hidden_states, "
        "encoder_hidden_states and condition_latents are Python lists of per-sample tensors (patch-embedded "
        "one by one, `u.unsqueeze(0)`); the output is `(list_of_tensors,)`. kv_cache is a WanAnimate2KVCache "
        "object (Python state, written by the extract pass at transformer_wan_animate_2.py:199 and read by "
        "`kv_cache.get()` at :217); kv_cache_mode is a str that selects the code path. `grid_sizes.tolist()` "
        "drives a per-sample Python loop in rope_apply (:49) and unpatchify (:931); `reference_grid[0][axis]"
        ".item()` (:849) only for refer_offset_w=-1 (default). RoPE in float64 complex (view_as_complex, :53). "
        "The generation self-attention always runs on the FLEX backend with a BlockMask (create_block_mask, "
        ":755, cached in self.block_masks by (frames, hw)); q/k/v are scattered into zero buffers with in-place "
        "view writes (`query_packed[:, generation].view(...)[:, :, :hw] = ...`). The RoPE table is cached in "
        "self.rope_freqs_cache (state). `is_uncondtion and idx == 9` skips block 9 on the unconditional branch "
        "(no effect with 2 layers). Text is zero-padded to text_len in the forward. Timestep is a (1,) float "
        "tensor (`torch.stack([t])`); the K/V cache holds seeded values standing in for the reference pass.")
    return ZooCase("wan-animate-2", "WanAnimate2Transformer3DModel", _build_animate_2, kwargs, kinds,
                   unsupported=r"example argument 'kv_cache' is a WanAnimate2KVCache",
                   notes=notes + " Unsupported: the inputs are lists of per-sample tensors and the self-attention "
                                 "reads a K/V cache held in a Python object filled by another call.")


# --- SkyReels-V2 ----------------------------------------------------------------------------------------

SKYREELS_NOTES = (
    "SkyReels-V2: a Wan 2.1 copy (SkyReelsV2TransformerBlock: attn1/attn2/ffn, same in-place RoPE at "
    "transformer_skyreels_v2.py:119, same type_as residuals); timesteps embedded with "
    "get_1d_sincos_pos_embed_from_grid (numpy-style sincos, float64 inside). Timestep int64 (UniPC). "
    "The block takes an attention_mask argument (None unless num_frame_per_block > 1).")


def _skyreels() -> ZooCase:
    from diffusers import SkyReelsV2Transformer3DModel

    def kwargs():
        g = torch.Generator().manual_seed(2)
        return dict(hidden_states=_latents(g), timestep=_int_timestep(),
                    encoder_hidden_states=_randn(g, BATCH, TEXT_LEN, TEXT_DIM),
                    attention_kwargs=None, return_dict=False)

    return ZooCase("skyreels-v2", "SkyReelsV2Transformer3DModel",
                   lambda: _seeded(SkyReelsV2Transformer3DModel, **WAN_CORE), kwargs,
                   _wan_block_kinds("blocks", 2, "SkyReelsV2TransformerBlock"), notes=SKYREELS_NOTES)


#: Diffusion forcing: 4 latent frames in causal blocks of 2 (frames of a block see their own and earlier blocks).
DF_FRAMES, DF_BLOCK = 4, 2


def _skyreels_df() -> ZooCase:
    """SkyReels-V2 diffusion forcing: one timestep per latent frame, fps conditioning, block-causal attn1."""
    from diffusers import SkyReelsV2Transformer3DModel

    config = dict(WAN_CORE, inject_sample_info=True, num_frame_per_block=DF_BLOCK)

    def kwargs():
        g = torch.Generator().manual_seed(2)
        # pipeline_skyreels_v2_diffusion_forcing.py:874/889: per-frame timesteps (B, F), fps a list of ints.
        # Batch 1: the fps term `.repeat(timestep.shape[1], 1, 1)` (transformer_skyreels_v2.py:715) only
        # broadcasts against the (B, F, 6, D) table when B == 1 (the pipeline runs cond/uncond separately).
        return dict(hidden_states=_latents(g, LATENT, DF_FRAMES, batch=1),
                    timestep=torch.full((1, DF_FRAMES), T_INT, dtype=torch.int64),
                    encoder_hidden_states=_randn(g, 1, TEXT_LEN, TEXT_DIM),
                    enable_diffusion_forcing=True, fps=[1], attention_kwargs=None, return_dict=False)

    attn1 = ("SkyReelsV2TransformerBlock.attn1: softmax self-attention over all F*H*W video tokens, "
             "block-causal boolean mask over frames (num_frame_per_block=2)")
    notes = SKYREELS_NOTES + (
        " Diffusion forcing: timestep (B, F) int64, one per latent frame; temb and the adaLN table are "
        "repeated over each frame's H*W tokens (4D temb branch, `temb.dim() == 4`); `fps` is a Python list "
        "turned into a tensor inside forward (`torch.tensor(fps)`, transformer_skyreels_v2.py:711) and "
        "embedded (fps_embedding + fps_projection FeedForward outside the blocks); enable_diffusion_forcing is "
        "a bool argument. The block-causal mask is built in forward from arange/repeat_interleave (static "
        "shapes) and passed to every attn1 as a (1, 1, L, L) bool tensor. Batch 1 only: with inject_sample_info "
        "the fps term is repeated F times over the batch axis (`.repeat(timestep.shape[1], 1, 1)`, "
        "transformer_skyreels_v2.py:715) and fails to broadcast for B > 1.")
    return ZooCase("skyreels-v2-df", "SkyReelsV2Transformer3DModel",
                   lambda: _seeded(SkyReelsV2Transformer3DModel, **config), kwargs,
                   _wan_block_kinds("blocks", 2, "SkyReelsV2TransformerBlock", attn1=attn1), notes=notes)


# --- ChronoEdit -----------------------------------------------------------------------------------------

def _chronoedit() -> ZooCase:
    """ChronoEdit (image editing as a 2-latent-frame I2V clip, temporal reasoning off)."""
    from diffusers import ChronoEditTransformer3DModel

    config = dict(WAN_CORE, in_channels=2 * LATENT + 4, image_dim=IMAGE_DIM, added_kv_proj_dim=DIM)

    def kwargs():
        g = torch.Generator().manual_seed(2)
        # pipeline_chronoedit.py:593: num_frames = 5 without temporal reasoning -> 2 latent frames;
        # latent_model_input = cat([latents, condition], dim=1) (condition = 4 mask + latent channels).
        return dict(hidden_states=_latents(g, 2 * LATENT + 4, 2), timestep=_int_timestep(),
                    encoder_hidden_states=_randn(g, BATCH, UMT5_LEN, TEXT_DIM),
                    encoder_hidden_states_image=_randn(g, BATCH, IMAGE_LEN, IMAGE_DIM),
                    attention_kwargs=None, return_dict=False)

    notes = WAN_NOTES + (
        " ChronoEdit: Wan 2.1 I2V blocks (copied), 512-token text split at transformer_chronoedit.py:92. "
        "ChronoEditRotaryPosEmbed branches on the frame count: `if num_frames == 2` (transformer_chronoedit.py"
        ":413/420) takes temporal RoPE positions [0, temporal_skip_len-1] (fancy indexing `[[0, -1]]`) instead "
        "of [0, 1]; the pipeline's default (no temporal reasoning) is exactly 2 latent frames, so a capture at "
        "2 frames is specialized to that branch.")
    return ZooCase("chronoedit", "ChronoEditTransformer3DModel",
                   lambda: _seeded(ChronoEditTransformer3DModel, **config), kwargs,
                   _wan_block_kinds("blocks", 2, "WanTransformerBlock", i2v=True), notes=notes)


# --- Helios ---------------------------------------------------------------------------------------------

#: Helios history: long 4 frames, mid 2, short 1 (+ the prefix frame), chunk of 3 latent frames.
HELIOS_HISTORY = (4, 2, 1)


def _helios() -> ZooCase:
    from diffusers import HeliosTransformer3DModel

    config = dict(WAN_CORE, rope_dim=(4, 4, 4))
    long_, mid, short = HELIOS_HISTORY

    def kwargs():
        g = torch.Generator().manual_seed(2)
        # pipeline_helios.py:761 (keep_first_frame): indices = arange over [prefix, long, mid, 1x, chunk];
        # short history = prefix + 1x. Every index tensor has batch 1 (unsqueeze(0)); timestep float64 (the
        # pipeline's numpy sigmas through HeliosScheduler).
        idx = torch.arange(0, 1 + sum(HELIOS_HISTORY) + FRAMES)
        prefix, i_long, i_mid, i_1x, i_hidden = idx.split([1, long_, mid, short, FRAMES])
        return dict(hidden_states=_latents(g), timestep=torch.full((BATCH,), 999.0, dtype=torch.float64),
                    encoder_hidden_states=_randn(g, BATCH, TEXT_LEN, TEXT_DIM),
                    indices_hidden_states=i_hidden.unsqueeze(0),
                    indices_latents_history_short=torch.cat([prefix, i_1x]).unsqueeze(0),
                    indices_latents_history_mid=i_mid.unsqueeze(0),
                    indices_latents_history_long=i_long.unsqueeze(0),
                    latents_history_short=_latents(g, LATENT, 1 + short),
                    latents_history_mid=_latents(g, LATENT, mid),
                    latents_history_long=_latents(g, LATENT, long_),
                    attention_kwargs=None, return_dict=False)

    kinds = _wan_block_kinds(
        "blocks", 2, "HeliosTransformerBlock",
        attn1="HeliosTransformerBlock.attn1: softmax self-attention over [long | mid | short history tokens | "
              "current chunk tokens] in one sequence (3D RoPE from frame indices)")
    for i in range(2):
        kinds[f"blocks.{i}.attn2"] = (
            "cross", "HeliosTransformerBlock.attn2 (guidance_cross_attn=True): only the current chunk's tokens "
                     "(the last original_context_length) query the text; history tokens bypass it")
    notes = (
        "Helios: Wan-like blocks over a sequence of multi-scale history tokens (patch_long/patch_mid/patch_short "
        "Conv3d, replicate padding via pad_for_3d_conv) concatenated before the current chunk; "
        "original_context_length (an int from a shape) is threaded through every block and attention. attn2 "
        "splits the sequence with torch.split and re-concatenates (transformer_helios.py:464). RoPE computed in "
        "forward from index tensors (einsum under torch.autocast(enabled=False), avg_pool3d for the mid/long "
        "grids); applied with in-place writes `out[..., 0::2] = ...` (transformer_helios.py:59). History "
        "tokens get the timestep-0 modulation (zero_history_timestep: a second condition_embedder call on "
        "torch.zeros(1)), so temb is per token (B, L, D) and the adaLN branch is `temb.ndim == 4`. "
        "HeliosOutputNorm keeps only the last original_context_length tokens. Index tensors have batch 1 and "
        "broadcast against batch 2. Timestep float64. is_amplify_history (off by default) would add a "
        "`if history_seq_len > 0` shape branch (transformer_helios.py:134).")
    return ZooCase("helios", "HeliosTransformer3DModel", lambda: _seeded(HeliosTransformer3DModel, **config),
                   kwargs, kinds, notes=notes)


# --- AnyFlow --------------------------------------------------------------------------------------------

ANYFLOW_CORE = dict(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                    in_channels=LATENT, out_channels=LATENT, text_dim=TEXT_DIM, freq_dim=FREQ_DIM, ffn_dim=FFN,
                    num_layers=2)

ANYFLOW_NOTES = (
    "AnyFlow: Wan 2.1 backbone with a dual-timestep embedding (timestep t and target r_timestep, both "
    "(B, F) per latent frame, float64 from FlowMapEulerDiscreteScheduler), repeated over each frame's tokens "
    "(repeat_interleave), so temb is per token and every adaLN term is (B, L, D). hidden_states is "
    "(B, F, C, H, W) (permuted inside), output likewise. RoPE as float64 complex multiplication "
    "(view_as_complex, transformer_anyflow.py:46); rotary_emb is a dict {'query': ..., 'key': ...}; the "
    "frequency table is cached on the module (`self._freqs_cache`, :361) unless compiling. layout_cfg is a "
    "Python dict of ints built in forward. The pipeline batches CFG (uncond, cond) in one call.")


def _anyflow() -> ZooCase:
    from diffusers import AnyFlowTransformer3DModel

    def kwargs():
        g = torch.Generator().manual_seed(2)
        # pipeline_anyflow.py:586: timestep = t.expand(B).unsqueeze(-1).repeat(1, F); r likewise.
        return dict(hidden_states=_randn(g, BATCH, FRAMES, LATENT, SIZE, SIZE),
                    timestep=torch.full((BATCH, FRAMES), 1000.0, dtype=torch.float64),
                    r_timestep=torch.full((BATCH, FRAMES), 750.0, dtype=torch.float64),
                    encoder_hidden_states=_randn(g, BATCH, TEXT_LEN, TEXT_DIM),
                    attention_kwargs=None, return_dict=False)

    return ZooCase("anyflow", "AnyFlowTransformer3DModel", lambda: _seeded(AnyFlowTransformer3DModel, **ANYFLOW_CORE),
                   kwargs, _wan_block_kinds("blocks", 2, "AnyFlowTransformerBlock"), notes=ANYFLOW_NOTES)


#: FAR: chunks of (1, 2, 2) latent frames, at most 2 full-resolution chunks; the case is the denoising call of
#: the third chunk, whose first chunk is attended as compressed (4x4-patch) context through the KV cache.
FAR_CHUNKS, FAR_FULL_LIMIT = (1, 2, 2), 2


def _far_cache_lengths() -> tuple[int, int]:
    """(full, compressed) KV-cache lengths as pipeline_anyflow_far.py:656 allocates them."""
    full_tpf, compressed_tpf = TOKENS_PER_FRAME, (SIZE // 4) ** 2
    full = FAR_FULL_LIMIT * max(FAR_CHUNKS) * full_tpf
    compressed = (len(FAR_CHUNKS) - FAR_FULL_LIMIT + 1) * max(FAR_CHUNKS) * compressed_tpf
    return full, compressed


def _anyflow_far() -> ZooCase:
    from diffusers import AnyFlowFARTransformer3DModel

    config = dict(ANYFLOW_CORE, compressed_patch_size=(1, 4, 4), full_chunk_limit=FAR_FULL_LIMIT,
                  chunk_partition=FAR_CHUNKS)
    frames = FAR_CHUNKS[-1]

    def kwargs():
        g = torch.Generator().manual_seed(2)
        full, compressed = _far_cache_lengths()
        # The cache-prefill calls (is_cache_step=True) of chunks 0 and 1 fill these buffers; seeded values
        # stand in for them. kv_cache_flag is deep-copied by the pipeline before each call (the model writes it).
        kv_cache = {i: {"full_cache": _randn(g, 2, BATCH, HEADS, full, HEAD_DIM),
                        "compressed_cache": _randn(g, 2, BATCH, HEADS, compressed, HEAD_DIM)} for i in range(2)}
        return dict(hidden_states=_randn(g, BATCH, frames, LATENT, SIZE, SIZE),
                    timestep=torch.full((BATCH, frames), 1000.0, dtype=torch.float64),
                    r_timestep=torch.full((BATCH, frames), 750.0, dtype=torch.float64),
                    encoder_hidden_states=_randn(g, BATCH, TEXT_LEN, TEXT_DIM),
                    attention_kwargs=None, return_dict=False, chunk_partition=list(FAR_CHUNKS),
                    kv_cache=kv_cache, kv_cache_flag={"num_cached_chunks": len(FAR_CHUNKS) - 1,
                                                      "is_cache_step": False})

    kinds = _wan_block_kinds(
        "blocks", 2, "AnyFlowTransformerBlock",
        attn1="AnyFlowTransformerBlock.attn1 (AnyFlowCausalAttnProcessor, inference step): softmax attention "
              "of the current chunk's tokens over [cached compressed context K/V | cached full-chunk K/V | own "
              "K/V] (torch.cat with the KV cache), flex backend, no mask; q/k padded to 128 tokens and head "
              "dim to 16")
    notes = ANYFLOW_NOTES + (
        " FAR: the call returns (output, kv_cache) with return_dict=False (out_index 0). Three paths chosen by "
        "Python state: kv_cache None (training rollout with a flex BlockMask), kv_cache_flag['is_cache_step'] "
        "True (prefill: in-place writes into the cache, transformer_anyflow_far.py:137), else inference "
        "(this case: reads cache slices sized by ints computed from kv_cache_flag and chunk_partition, "
        ":152). kv_cache is a dict {layer: {'full_cache', 'compressed_cache'}} of tensors; kv_cache_flag a "
        "dict the forward mutates (`kv_cache_flag['num_cached_full_tokens'] = ...`); chunk_partition a list "
        "of ints. The causal processor forces the 'flex' attention backend (ValueError otherwise), zero-pads "
        "the sequence to a multiple of 128 and head_dim to 16 with an explicit scale. The cache holds seeded "
        "values standing in for the prefill.")
    return ZooCase("anyflow-far", "AnyFlowFARTransformer3DModel",
                   lambda: _seeded(AnyFlowFARTransformer3DModel, **config), kwargs, kinds,
                   unsupported=r"FlexAttention does not support backward on CPU",
                   notes=notes + " Unsupported: chunk_partition is a list of ints and the self-attention reads "
                                 "a K/V cache (dict of tensors) filled by the prefill calls, with flex attention.")


# --- Motif-Video ----------------------------------------------------------------------------------------

MOTIF_CONFIG = dict(in_channels=2 * LATENT + 1, out_channels=LATENT, num_attention_heads=HEADS,
                    attention_head_dim=HEAD_DIM, num_layers=1, num_single_layers=2, num_decoder_layers=1,
                    mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=TEXT_DIM, rope_axes_dim=(4, 4, 4),
                    enable_text_cross_attention_dual=True, enable_text_cross_attention_single=True)


def _motif_kinds(image: bool) -> dict[str, tuple[str, str]]:
    """Kinds of the 1 dual-stream, 1 single-stream encoder and 1 single-stream decoder block."""
    text = "image + text" if image else "text"
    cross = ("cross", "MotifVideoCrossAttention: queries the joint attention's video output (RoPE on q only), "
                      "keys/values the text positions (encoder_hidden_states[:, image_embed_seq_len:]; after the "
                      "first joint attention those tokens also carry video information)")
    return {
        "transformer_blocks.0.attn": (
            "joint", f"MotifVideoTransformerBlock.attn: dual-stream (MMDiT) softmax attention over "
                     f"[video tokens | {text} tokens], video and text have their own projections "
                     f"(add_q_proj...); RoPE on the video part"),
        "transformer_blocks.0.cross_attn": cross,
        "transformer_blocks.0.ff": ("mlp", "MotifVideoTransformerBlock.ff: the video stream's feed-forward"),
        "transformer_blocks.0.ff_context": (
            "mlp", "MotifVideoTransformerBlock.ff_context: the text stream's feed-forward (text tokens only)"),
        "single_transformer_blocks.0.attn": (
            "joint", f"MotifVideoSingleTransformerBlock.attn: single-stream softmax attention over "
                     f"cat([video, {text}]) (pre_only: no to_out; fused into proj_out)"),
        "single_transformer_blocks.0.cross_attn": cross,
        "single_transformer_blocks.0.proj_mlp": (
            "mlp", "MotifVideoSingleTransformerBlock.proj_mlp: parallel MLP branch (GELU-tanh), concatenated "
                   "with the attention output and projected by proj_out"),
        "single_transformer_blocks.1.attn": (
            "joint", "decoder MotifVideoSingleTransformerBlock.attn: softmax attention over [decoder tokens "
                     "(the patch embeddings) | encoder output video tokens]: two copies of the video grid, "
                     "no text"),
        "single_transformer_blocks.1.proj_mlp": (
            "mlp", "decoder MotifVideoSingleTransformerBlock.proj_mlp: parallel MLP branch"),
    }


MOTIF_NOTES = (
    "Motif-Video: MMDiT-style dual-stream blocks (text carried from block to block, returned as a tuple), "
    "single-stream blocks over cat([video, text]) with a parallel MLP (attention output and MLP concatenated "
    "then proj_out), and num_decoder_layers single-stream decoder blocks whose 'text' stream is the encoder "
    "output and whose video stream restarts from `hidden_states.clone()` of the patch embedding. Text "
    "cross-attention (optional per config) queries the joint attention output. MotifVideoAttention.forward "
    "calls inspect.signature on every call (transformer_motif_video.py:379). encoder_attention_mask (B, L) "
    "is padded with True for the video tokens into a (B, 1, 1, L_video + L_text) bool mask; the cross-"
    "attention slices it with a negative start. RoPE computed in forward (meshgrid, float64 freqs, "
    "get_1d_rotary_pos_embed(use_real=True)); apply_rotary_emb slices query/key around the text. Residual adds "
    "are plain (no type_as). Timestep float32 (flow-matching scheduler). The pipeline runs cond/uncond "
    "through a guider, one batch-1 call each.")


def _motif(image: bool = False) -> ZooCase:
    from diffusers import MotifVideoTransformer3DModel

    config = dict(MOTIF_CONFIG, image_embed_dim=IMAGE_DIM if image else None)

    def kwargs():
        g = torch.Generator().manual_seed(2)
        mask = torch.ones(BATCH, TEXT_LEN, dtype=torch.int64)
        mask[1, 3:] = 0  # the second prompt is shorter (padding tokens)
        # pipeline_motif_video.py:704: hidden_states = cat([latents, latent_condition, latent_mask], dim=1).
        kw = dict(hidden_states=_latents(g, 2 * LATENT + 1), timestep=torch.full((BATCH,), 1000.0),
                  encoder_hidden_states=_randn(g, BATCH, TEXT_LEN, TEXT_DIM), encoder_attention_mask=mask)
        if image:
            kw["image_embeds"] = _randn(g, BATCH, IMAGE_LEN, IMAGE_DIM)
        return dict(kw, attention_kwargs=None, return_dict=False)

    name = "motif-video-i2v" if image else "motif-video"
    notes = MOTIF_NOTES + (" I2V: image embeddings projected and prepended to the text tokens; the text mask "
                           "is extended with ones for them (image_embed_seq_len int threaded to every block)."
                           if image else "")
    chain = {"residual_blocks": (
        ["single_transformer_blocks.1"],
        "the decoder block restarts its video stream from hidden_states.clone() of the patch embeddings and reads "
        "the encoder blocks' output as its second stream: the cached chain is the decoder block, the encoder "
        "blocks run every step")}
    return ZooCase(name, "MotifVideoTransformer3DModel", lambda: _seeded(MotifVideoTransformer3DModel, **config),
                   kwargs, _motif_kinds(image), notes=notes, extra=chain)


CASES: list[ZooCase] = [
    _wan(), _wan_ti2v(), _wan_i2v(), _wan_vace(), _wan_animate(), _wan_animate_2(), _skyreels(), _skyreels_df(),
    _chronoedit(), _helios(), _anyflow(), _anyflow_far(), _motif(), _motif(image=True),
]
