"""Example inputs of one denoiser call of a diffusers video transformer, built from the model's config.

Each builder returns the keyword arguments the model's diffusers pipeline passes to the transformer at one
denoising step: latents of the config's channel count in the model's layout, text embeddings of the config's
width (and the padding mask where the pipeline passes one), the timestep in the dtype the pipeline's scheduler
gives, and every extra argument the pipeline computes (rotary tables, guidance, micro-conditions), with
``return_dict=False``. Sizes are latent sizes (after the VAE): ``frames`` latent frames of ``height`` x
``width``; ``None`` picks the model's default (:data:`DEFAULT_FRAMES` x :data:`DEFAULT_SIZE`, or the size a
model fixes, e.g. Latte's ``video_length``). ``batch`` 2 is one batched classifier-free-guidance call.

Builders are looked up by class name in :data:`INPUT_BUILDERS`; :data:`TIMESTEP_RULES` says how the family's
default scheduler spaces its timesteps (:func:`timesteps_for`), computed here without diffusers' schedulers;
:func:`example_inputs` gives both, the call at the first timestep.

    >>> from diffusers import LatteTransformer3DModel
    >>> model = LatteTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
    ...     out_channels=8, num_layers=1, sample_size=8, patch_size=2, cross_attention_dim=16,
    ...     caption_channels=16, norm_type="ada_norm_single", num_embeds_ada_norm=1000, video_length=3)
    >>> kw = build_inputs(model, batch=2, timestep=981)
    >>> tuple(kw["hidden_states"].shape), kw["timestep"].dtype, tuple(kw["encoder_hidden_states"].shape)
    ((2, 4, 3, 8, 8), torch.int64, (2, 120, 16))
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .errors import InputError

#: Latent frames and latent height/width of a default example call: small, so capture and tests stay fast.
DEFAULT_FRAMES = 3
DEFAULT_SIZE = 8
#: Text tokens for pipelines whose prompt length varies (with a padding mask: HunyuanVideo, LTX-Video, Mochi,
#: Kandinsky 5); where the pipeline pads every prompt to a fixed length, that length is used (CogVideoX's
#: ``max_text_seq_length``, Wan 512, Latte 120, Allegro 512, EasyAnimate 256, SANA-Video 300, Cosmos 512).
TEXT_TOKENS = 16
#: Tokens of the unconditional (negative, empty) prompt in the padding mask of a batched CFG call.
NEGATIVE_TOKENS = 3
#: First timestep used when the caller gives none (a DDPM model's first DDIM step, a flow model's sigma 1).
DEFAULT_TIMESTEP = 999.0

Builder = Callable[..., dict[str, Any]]


#: How a family's default scheduler spaces its timesteps: ``rule(model, num_steps, example_kwargs) -> timesteps``
#: as the model is called with them (the model and the example call give what a rule needs, e.g. the token
#: count of a resolution-dependent shift).
TimestepRule = Callable[[torch.nn.Module, int, dict[str, Any]], list[float]]


def ddim_timesteps(num_steps: int) -> list[float]:
    """DDPM-trained models: DDIM 'leading' timesteps with offset 1 on 0..1000 (graphpass's sampler).

    >>> ddim_timesteps(4)
    [751.0, 501.0, 251.0, 1.0]
    """
    from .models.sampler import ddim_timesteps as spaced

    return [float(t) for t in spaced(num_steps)]


def _shifted(sigmas: list[float], shift: float) -> list[float]:
    """Flow matching's static shift ``shift * s / (1 + (shift - 1) * s)`` (1 stays 1, 0 stays 0)."""
    return [shift * s / (1.0 + (shift - 1.0) * s) for s in sigmas]


def _check_steps(num_steps: int) -> None:
    if num_steps < 1:
        raise InputError(f"num_steps={num_steps}: sample at least one step")


def flow_timesteps(num_steps: int, *, shift: float = 1.0) -> list[float]:
    """FlowMatchEulerDiscreteScheduler(shift) given the sigmas ``linspace(1, 0, N + 1)[:-1]`` (HunyuanVideo's
    pipeline): ``1000 * shifted sigma``, float.

    >>> flow_timesteps(4)
    [1000.0, 750.0, 500.0, 250.0]
    >>> flow_timesteps(2, shift=3.0)
    [1000.0, 750.0]
    """
    _check_steps(num_steps)
    return [1000.0 * s for s in _shifted([1.0 - i / num_steps for i in range(num_steps)], shift)]


def flow_default_timesteps(num_steps: int, *, shift: float = 1.0
                           ) -> list[float]:
    """FlowMatchEulerDiscreteScheduler(shift) with its own spacing (no sigmas given): sigmas from 1 to the shifted
    ``1/1000``, evenly spaced, then shifted (the scheduler shifts them once at construction and again per
    call). With shift 1: timesteps ``linspace(1000, 1, N)``.

    >>> [round(t, 6) for t in flow_default_timesteps(4)]
    [1000.0, 667.0, 334.0, 1.0]
    """
    _check_steps(num_steps)
    top, bottom = 1.0, _shifted([1.0 / 1000], shift)[0]
    sigmas = [top + (bottom - top) * i / max(num_steps - 1, 1) for i in range(num_steps)]
    return [1000.0 * s for s in _shifted(sigmas, shift)]


def unipc_flow_timesteps(num_steps: int, *, shift: float = 3.0
                         ) -> list[float]:
    """UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift) (the Wan checkpoints' scheduler): sigmas
    ``linspace(1, 1/1000, N + 1)[:-1]`` shifted, the first nudged below 1, timesteps ``int64(1000 * sigma)``.

    >>> unipc_flow_timesteps(4, shift=1.0)
    [999.0, 750.0, 500.0, 250.0]
    """
    _check_steps(num_steps)
    top, bottom = 1.0, 1.0 / 1000
    sigmas = _shifted([top + (bottom - top) * i / num_steps for i in range(num_steps)], shift)
    sigmas[0] -= 1e-6  # as the scheduler, to keep log(alpha) finite at sigma 1
    return [float(math.trunc(1000.0 * s)) for s in sigmas]


def dpm_flow_timesteps(num_steps: int, *, shift: float = 3.0
                       ) -> list[float]:
    """DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift) (the Sana family's scheduler; shift 3.0
    as in its released configs): sigmas ``1 - linspace(1, 1/1000, N + 1)`` reversed, shifted, the last (0)
    dropped; timesteps ``int64(1000 * sigma)``.

    >>> dpm_flow_timesteps(4, shift=1.0)
    [999.0, 749.0, 499.0, 249.0]
    """
    _check_steps(num_steps)
    top, bottom = 1.0, 1.0 / 1000
    sigmas = [1.0 - (top + (bottom - top) * i / num_steps) for i in range(num_steps, 0, -1)]
    return [float(math.trunc(1000.0 * s)) for s in _shifted(sigmas, shift)]


def edm_timesteps(num_steps: int, *, sigma_min: float = 0.002,
                  sigma_max: float = 80.0, rho: float = 7.0) -> list[float]:
    """EDMEulerScheduler (Cosmos 1.0): Karras sigmas from ``sigma_max`` to ``sigma_min`` and the model's timestep
    ``0.25 * log(sigma)`` -- not on the 0..1000 scale (a PAB window in 0..1000 units does not apply).

    >>> [round(t, 4) for t in edm_timesteps(2)]
    [1.0955, -1.5537]
    """
    _check_steps(num_steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    ramp = [i / max(num_steps - 1, 1) for i in range(num_steps)]
    return [0.25 * math.log((hi + r * (lo - hi)) ** rho) for r in ramp]


def dynamic_flow_timesteps(num_steps: int, tokens: int, *, base_shift: float, max_shift: float, base_tokens: int,
                           max_tokens: int, terminal: float | None = None) -> list[float]:
    """Flow matching with a resolution-dependent shift, as the LTX-Video and Motif-Video pipelines drive
    FlowMatchEulerDiscreteScheduler: sigmas ``linspace(1, 1/N, N)``, exponential time shift by ``mu`` (linear in
    the video's ``tokens`` between ``(base_tokens, base_shift)`` and ``(max_tokens, max_shift)``), stretched so
    the last sigma is ``terminal`` when given.

    >>> [round(t, 1) for t in dynamic_flow_timesteps(2, 256, base_shift=0.5, max_shift=1.15, base_tokens=256,
    ...                                              max_tokens=4096)]
    [1000.0, 622.5]
    """
    _check_steps(num_steps)
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    mu = tokens * slope + base_shift - slope * base_tokens
    sigmas = [1.0 - (1.0 - 1.0 / num_steps) * i / max(num_steps - 1, 1) for i in range(num_steps)]
    sigmas = [math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0)) for s in sigmas]
    if terminal is not None:
        scale = (1.0 - sigmas[-1]) / (1.0 - terminal)
        sigmas = [1.0 - (1.0 - s) / scale for s in sigmas]
    return [1000.0 * s for s in sigmas]


def ltx_timesteps(num_steps: int, tokens: int) -> list[float]:
    """LTX-Video's pipeline with its checkpoint's scheduler config: :func:`dynamic_flow_timesteps` over the
    video's latent tokens between (1024, 0.95) and (4096, 2.05), terminal sigma 0.1.

    >>> [round(t, 1) for t in ltx_timesteps(2, tokens=1024)]
    [1000.0, 100.0]
    """
    return dynamic_flow_timesteps(num_steps, tokens, base_shift=0.95, max_shift=2.05, base_tokens=1024,
                                  max_tokens=4096, terminal=0.1)


def motif_timesteps(num_steps: int, tokens: int) -> list[float]:
    """Motif-Video's pipeline: :func:`dynamic_flow_timesteps` over its packed video tokens between the
    pipeline's defaults (256, 0.5) and (4096, 1.15).

    >>> [round(t, 1) for t in motif_timesteps(2, tokens=256)]
    [1000.0, 622.5]
    """
    return dynamic_flow_timesteps(num_steps, tokens, base_shift=0.5, max_shift=1.15, base_tokens=256,
                                  max_tokens=4096)


def mochi_timesteps(num_steps: int, *, threshold_noise: float = 0.025
                    ) -> list[float]:
    """Mochi's pipeline: the linear-quadratic sigma schedule (linear for the first half of the steps up to
    ``threshold_noise``, quadratic after) through a scheduler with ``invert_sigmas``: the model is called with
    ``1000 * (1 - sigma)``, rising from 0 (Mochi's 1000 is the clean end).

    >>> [round(t, 6) for t in mochi_timesteps(4)]
    [0.0, 12.5, 25.0, 275.0]
    """
    _check_steps(num_steps)
    linear = num_steps // 2
    quad = num_steps - linear
    diff = linear - threshold_noise * num_steps
    q_coef = diff / (linear * quad ** 2) if linear else 0.0
    l_coef = threshold_noise / linear - 2 * diff / quad ** 2 if linear else 0.0
    const = q_coef * linear ** 2
    noise = [i * threshold_noise / linear for i in range(linear)]
    noise += [q_coef * i ** 2 + l_coef * i + const for i in range(linear, num_steps)]
    return [1000.0 * x for x in noise]


# --- shared pieces ---------------------------------------------------------------------------------------------

def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _sizes(frames: int | None, height: int | None, width: int | None) -> tuple[int, int, int]:
    return (frames or DEFAULT_FRAMES, height or DEFAULT_SIZE, width or DEFAULT_SIZE)


def _check_divisible(cls: str, what: str, value: int, by: int) -> None:
    if value % by:
        raise InputError(f"{cls}: {what} {value} is not a multiple of the patch size {by}; pick a multiple of {by}")


def _text_mask(batch: int, tokens: int) -> torch.Tensor:
    """(B, L) int64 padding mask as a tokenizer gives it: the first half of a CFG batch is the negative
    (short, padded) prompt, the second the full prompt.

    >>> _text_mask(2, 5).tolist()
    [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    """
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[: batch // 2, min(NEGATIVE_TOKENS, tokens):] = 0
    return mask


def _timestep(batch: int, t: float, dtype: torch.dtype) -> torch.Tensor:
    """``t.expand(batch)`` of a scheduler timestep: int64 for DDPM/UniPC schedulers, float32 for flow ones."""
    return torch.full((batch,), t).to(dtype)


# --- CogVideoX ---------------------------------------------------------------------------------------------------

def cogvideox_rotary_emb(model: torch.nn.Module, frames: int, height: int, width: int) -> tuple[torch.Tensor, ...]:
    """``(freqs_cos, freqs_sin)`` as ``CogVideoXPipeline._prepare_rotary_positional_embeddings`` builds them for
    latents of ``frames`` x ``height`` x ``width`` (the pipeline's pixel size // VAE factor = latent size):
    crop-region grid for CogVideoX 1.0, 'slice' grid for 1.5 (``patch_size_t`` set)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    cfg = model.config
    p, p_t = cfg.patch_size, cfg.get("patch_size_t")
    grid_h, grid_w = height // p, width // p
    base_w, base_h = cfg.sample_width // p, cfg.sample_height // p
    if p_t is None:
        crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
        return get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=crops,
                                       grid_size=(grid_h, grid_w), temporal_size=frames)
    return get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=None, grid_size=(grid_h, grid_w),
                                   temporal_size=(frames + p_t - 1) // p_t, grid_type="slice",
                                   max_size=(base_h, base_w))


def _cogvideo_core(model, batch, frames, height, width, timestep, seed) -> tuple[dict[str, Any], torch.Generator]:
    """What CogVideoX and ConsisID share: latents ``(B, F, C_in, H, W)``, T5 text padded to
    ``max_text_seq_length``, int64 timestep, the rotary tables when ``use_rotary_positional_embeddings``."""
    cfg = model.config
    name = type(model).__name__
    f, h, w = _sizes(frames, height, width)
    if cfg.use_learned_positional_embeddings:
        h, w = height or cfg.sample_height, width or cfg.sample_width
    p_t = cfg.get("patch_size_t")
    if p_t is not None and f % p_t:
        f += p_t - f % p_t  # the pipeline pads the latent frames to a multiple of patch_size_t
    _check_divisible(name, "latent height", h, cfg.patch_size)
    _check_divisible(name, "latent width", w, cfg.patch_size)
    g = torch.Generator().manual_seed(seed)
    kw: dict[str, Any] = dict(hidden_states=_randn(g, batch, f, cfg.in_channels, h, w),
                              encoder_hidden_states=_randn(g, batch, cfg.max_text_seq_length, cfg.text_embed_dim),
                              timestep=_timestep(batch, timestep, torch.long))
    if cfg.use_rotary_positional_embeddings:
        kw["image_rotary_emb"] = cogvideox_rotary_emb(model, f, h, w)
    return kw, g


def cogvideox_inputs(model, batch: int = 2, frames: int | None = None, height: int | None = None,
                     width: int | None = None, *, timestep: float = DEFAULT_TIMESTEP, seed: int = 0) -> dict[str, Any]:
    """CogVideoX (1.0 and 1.5, T2V and I2V): latents ``(B, F, C_in, H, W)`` (I2V's image latents are part of
    ``in_channels``), T5 text padded to ``max_text_seq_length``, int64 DDIM timestep, rotary tables when
    ``use_rotary_positional_embeddings``, ``ofs`` 2.0 when ``ofs_embed_dim`` is set (1.5 I2V). Learned
    positional embeddings fix the size to the config's sample size (the model refuses others)."""
    kw, _ = _cogvideo_core(model, batch, frames, height, width, timestep, seed)
    if model.config.ofs_embed_dim is not None:
        kw["ofs"] = torch.full((1,), 2.0)
    kw.update(attention_kwargs=None, return_dict=False)
    return kw


#: ConsisID's face features: EVA-CLIP ViT-L/14 at 336 px gives 24 x 24 patches + the class token per scale.
CONSISID_VIT_TOKENS = 577


def consisid_inputs(model, batch: int = 2, frames: int | None = None, height: int | None = None,
                    width: int | None = None, *, timestep: float = DEFAULT_TIMESTEP, seed: int = 0) -> dict[str, Any]:
    """ConsisID: the CogVideoX call (image latents in ``in_channels``) plus, when ``is_train_face``, the face
    identity of one reference image as ``process_face_embeddings_infer`` gives it: ``id_cond`` ``(1,
    LFE_id_dim)`` (ArcFace + CLIP embedding) and ``id_vit_hidden``, a list of ``LFE_num_scale`` CLIP hidden
    states ``(1, 577, LFE_vit_dim)`` (batch 1 even under guidance: the pipeline does not repeat them)."""
    kw, g = _cogvideo_core(model, batch, frames, height, width, timestep, seed)
    cfg = model.config
    if cfg.is_train_face:
        kw["id_cond"] = _randn(g, 1, cfg.LFE_id_dim)
        kw["id_vit_hidden"] = [_randn(g, 1, CONSISID_VIT_TOKENS, cfg.LFE_vit_dim) for _ in range(cfg.LFE_num_scale)]
    kw.update(attention_kwargs=None, return_dict=False)
    return kw


# --- Latte -------------------------------------------------------------------------------------------------------

#: LattePipeline's ``max_sequence_length`` (T5 prompt padded to it).
LATTE_TEXT_TOKENS = 120


def latte_inputs(model, batch: int = 2, frames: int | None = None, height: int | None = None,
                 width: int | None = None, *, timestep: float = DEFAULT_TIMESTEP, seed: int = 0) -> dict[str, Any]:
    """Latte: latents ``(B, C_in, F, H, W)`` with ``F = video_length`` (the temporal position table has
    exactly that many rows), T5 text of 120 tokens, int64 DDIM timestep, temporal attention on."""
    cfg = model.config
    f, h, w = _sizes(frames or cfg.video_length, height, width)
    if f != cfg.video_length:
        raise InputError(f"LatteTransformer3DModel: frames={f} but the model's temporal position embedding has "
                         f"video_length={cfg.video_length} rows; use frames={cfg.video_length}")
    _check_divisible("LatteTransformer3DModel", "latent height", h, cfg.patch_size)
    _check_divisible("LatteTransformer3DModel", "latent width", w, cfg.patch_size)
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_randn(g, batch, cfg.in_channels, f, h, w),
                encoder_hidden_states=_randn(g, batch, LATTE_TEXT_TOKENS, cfg.caption_channels),
                timestep=_timestep(batch, timestep, torch.long), enable_temporal_attentions=True, return_dict=False)


# --- Wan family ----------------------------------------------------------------------------------------------------

#: umT5 length the Wan pipelines pad every prompt to; Wan's image cross-attention splits the text at it.
WAN_TEXT_TOKENS = 512
#: CLIP ViT-H/14 image tokens (256 patches + class token) of the I2V pipelines' image encoder.
CLIP_IMAGE_TOKENS = 257


def _wan_core(model, batch, frames, height, width, timestep, seed) -> tuple[dict[str, Any], torch.Generator, tuple]:
    """Latents, text, int64 timestep (UniPCMultistepScheduler, which the released checkpoints ship) and the
    CLIP image tokens when the config has ``image_dim`` (I2V)."""
    cfg = model.config
    f, h, w = _patched_sizes(model, frames, height, width, tuple(cfg.patch_size))
    g = torch.Generator().manual_seed(seed)
    kw: dict[str, Any] = dict(hidden_states=_randn(g, batch, cfg.in_channels, f, h, w),
                              timestep=_timestep(batch, timestep, torch.long),
                              encoder_hidden_states=_randn(g, batch, WAN_TEXT_TOKENS, cfg.text_dim))
    if cfg.image_dim is not None:
        kw["encoder_hidden_states_image"] = _randn(g, batch, CLIP_IMAGE_TOKENS, cfg.image_dim)
    return kw, g, (f, h, w)


def wan_inputs(model, batch: int = 2, frames: int | None = None, height: int | None = None,
               width: int | None = None, *, timestep: float = DEFAULT_TIMESTEP, seed: int = 0) -> dict[str, Any]:
    """Wan 2.1/2.2, SkyReels-V2 (text-to-video call), ChronoEdit: latents ``(B, C_in, F, H, W)`` (I2V's mask
    and image latents are part of ``in_channels``), 512 text tokens, int64 timestep, CLIP image tokens for
    I2V configs (``image_dim`` set)."""
    kw, _, _ = _wan_core(model, batch, frames, height, width, timestep, seed)
    kw.update(attention_kwargs=None, return_dict=False)
    return kw


def chronoedit_inputs(model, batch: int = 2, frames: int | None = None, height: int | None = None,
                      width: int | None = None, *, timestep: float = DEFAULT_TIMESTEP, seed: int = 0
                      ) -> dict[str, Any]:
    """ChronoEdit: a Wan I2V call on 2 latent frames by default (the pipeline's 5 pixel frames without
    temporal reasoning)."""
    return wan_inputs(model, batch, frames or 2, height, width, timestep=timestep, seed=seed)


def wan_vace_inputs(model, batch: int = 2, frames: int | None = None, height: int | None = None,
                    width: int | None = None, *, timestep: float = DEFAULT_TIMESTEP, seed: int = 0) -> dict[str, Any]:
    """Wan VACE: the Wan call plus control latents ``(B, vace_in_channels, F, H, W)`` and one conditioning
    scale per VACE layer (``pipeline_wan_vace``: a tensor of ones by default)."""
    kw, g, (f, h, w) = _wan_core(model, batch, frames, height, width, timestep, seed)
    cfg = model.config
    kw.update(control_hidden_states=_randn(g, batch, cfg.vace_in_channels, f, h, w),
              control_hidden_states_scale=torch.ones(len(cfg.vace_layers)), attention_kwargs=None, return_dict=False)
    return kw


# --- HunyuanVideo ----------------------------------------------------------------------------------------------------

#: HunyuanVideoPipeline's default embedded guidance scale (``guidance = scale * 1000``).
HUNYUAN_GUIDANCE = 6.0


def hunyuan_video_inputs(model, batch: int = 2, frames: int | None = None, height: int | None = None,
                         width: int | None = None, *, timestep: float = DEFAULT_TIMESTEP, seed: int = 0
                         ) -> dict[str, Any]:
    """HunyuanVideo: latents ``(B, C_in, F, H, W)``, Llama text with its padding mask (in the model's dtype), CLIP pooled
    projection, float32 flow timestep, embedded guidance ``6.0 * 1000`` when ``guidance_embeds``."""
    cfg = model.config
    f, h, w = _patched_sizes(model, frames, height, width, (cfg.patch_size_t, cfg.patch_size, cfg.patch_size))
    g = torch.Generator().manual_seed(seed)
    guidance = torch.full((batch,), HUNYUAN_GUIDANCE * 1000.0) if cfg.guidance_embeds else None
    return dict(hidden_states=_randn(g, batch, cfg.in_channels, f, h, w), timestep=_timestep(batch, timestep,
                                                                                              torch.float32),
                encoder_hidden_states=_randn(g, batch, TEXT_TOKENS, cfg.text_embed_dim),
                encoder_attention_mask=_text_mask(batch, TEXT_TOKENS).to(model.dtype),  # the pipeline casts it
                pooled_projections=_randn(g, batch, cfg.pooled_projection_dim), guidance=guidance,
                attention_kwargs=None, return_dict=False)


#: HunyuanVideo15Pipeline's SigLIP image tokens (all zeros for text-to-video).
def _patched_sizes(model, frames: int | None, height: int | None, width: int | None,
                   patch: tuple[int, int, int]) -> tuple[int, int, int]:
    """Latent (frames, height, width), each checked to divide by the model's patch (t, h, w)."""
    f, h, w = _sizes(frames, height, width)
    for what, v, p in (("latent frames", f, patch[0]), ("latent height", h, patch[1]), ("latent width", w, patch[2])):
        _check_divisible(type(model).__name__, what, v, p)
    return f, h, w


def _latents_with_condition(model, g: torch.Generator, batch: int, frames, height, width) -> torch.Tensor:
    """Text-to-video input of models conditioned by channel concatenation (``in_channels = 2C + 1``):
    ``cat([latents, zero condition latents, zero mask], dim=1)``, as their pipelines build it."""
    cfg = model.config
    f, h, w = _patched_sizes(model, frames, height, width, (cfg.patch_size_t, cfg.patch_size, cfg.patch_size))
    c = (cfg.in_channels - 1) // 2
    latents = _randn(g, batch, c, f, h, w)
    return torch.cat([latents, torch.zeros_like(latents), torch.zeros(batch, cfg.in_channels - 2 * c, f, h, w)], dim=1)


HUNYUAN15_IMAGE_TOKENS = 729


def hunyuan_video15_inputs(model, batch: int = 2, frames: int | None = None, height: int | None = None,
                           width: int | None = None, *, timestep: float = DEFAULT_TIMESTEP, seed: int = 0
                           ) -> dict[str, Any]:
    """HunyuanVideo 1.5 text-to-video: ``cat([latents, zero condition latents, zero mask], dim=1)`` (``in_channels =
    2C + 1``), zero SigLIP image tokens ``(B, 729, image_embed_dim)``, the Qwen text and ByT5 glyph text with
    their padding masks in the model's dtype, float32 flow timestep."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    hidden = _latents_with_condition(model, g, batch, frames, height, width)
    return dict(hidden_states=hidden, image_embeds=torch.zeros(batch, HUNYUAN15_IMAGE_TOKENS, cfg.image_embed_dim),
                timestep=_timestep(batch, timestep, torch.float32),
                encoder_hidden_states=_randn(g, batch, TEXT_TOKENS, cfg.text_embed_dim),
                encoder_attention_mask=_text_mask(batch, TEXT_TOKENS).to(model.dtype),
                encoder_hidden_states_2=_randn(g, batch, TEXT_TOKENS, cfg.text_embed_2_dim),
                encoder_attention_mask_2=_text_mask(batch, TEXT_TOKENS).to(model.dtype),
                attention_kwargs=None, return_dict=False)


# --- LTX-Video ---------------------------------------------------------------------------------------------------------

#: LTX-Video's VAE compression (temporal, spatial) and the pipeline's default frame rate.
LTX_VAE_TEMPORAL, LTX_VAE_SPATIAL, LTX_FRAME_RATE = 8, 32, 25


def ltx_video_inputs(model, batch: int = 2, frames: int | None = None, height: int | None = None,
                     width: int | None = None, *, timestep: float = DEFAULT_TIMESTEP, seed: int = 0) -> dict[str, Any]:
    """LTX-Video: packed latent tokens ``(B, F*H*W / (p_t p p), C_in)`` (``LTXPipeline._pack_latents``) with the
    unpacked latent size as ints, T5 text with a bool mask, float32 flow timestep, and the rope interpolation
    scale ``(8 / 25, 32, 32)`` (VAE temporal ratio / frame rate, spatial ratio twice)."""
    cfg = model.config
    p, pt = cfg.patch_size, cfg.patch_size_t
    f, h, w = _patched_sizes(model, frames, height, width, (pt, p, p))
    g = torch.Generator().manual_seed(seed)
    tokens = (f // pt) * (h // p) * (w // p)
    return dict(hidden_states=_randn(g, batch, tokens, cfg.in_channels),
                encoder_hidden_states=_randn(g, batch, TEXT_TOKENS, cfg.caption_channels),
                timestep=_timestep(batch, timestep, torch.float32),
                encoder_attention_mask=_text_mask(batch, TEXT_TOKENS).bool(), num_frames=f, height=h, width=w,
                rope_interpolation_scale=(LTX_VAE_TEMPORAL / LTX_FRAME_RATE, LTX_VAE_SPATIAL, LTX_VAE_SPATIAL),
                attention_kwargs=None, return_dict=False)


# --- Mochi -----------------------------------------------------------------------------------------------------------------

def mochi_inputs(model, batch: int = 2, frames: int | None = None, height: int | None = None,
                 width: int | None = None, *, timestep: float = DEFAULT_TIMESTEP, seed: int = 0) -> dict[str, Any]:
    """Mochi: latents ``(B, C_in, F, H, W)``, T5 text with a bool mask, float32 timestep as the pipeline passes
    it (reversed, rising from 0: :func:`mochi_timesteps`)."""
    cfg = model.config
    f, h, w = _sizes(frames, height, width)
    _check_divisible("MochiTransformer3DModel", "latent height", h, cfg.patch_size)
    _check_divisible("MochiTransformer3DModel", "latent width", w, cfg.patch_size)
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_randn(g, batch, cfg.in_channels, f, h, w),
                encoder_hidden_states=_randn(g, batch, TEXT_TOKENS, cfg.text_embed_dim),
                timestep=_timestep(batch, timestep, torch.float32),
                encoder_attention_mask=_text_mask(batch, TEXT_TOKENS).bool(), attention_kwargs=None, return_dict=False)


# --- Allegro -------------------------------------------------------------------------------------------------------------

#: AllegroPipeline's ``max_sequence_length`` (T5 prompt padded to it).
ALLEGRO_TEXT_TOKENS = 512


def allegro_rotary_emb(model: torch.nn.Module, frames: int, height: int, width: int) -> tuple[tuple[torch.Tensor, ...],
                                                                                               tuple[torch.Tensor, ...]]:
    """``((freqs_t, freqs_h, freqs_w), (grid_t, grid_h, grid_w))`` as ``AllegroPipeline.
    _prepare_rotary_positional_embeddings`` builds them for latents of ``frames`` x ``height`` x ``width``."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

    cfg = model.config
    grid_h, grid_w = height // cfg.patch_size, width // cfg.patch_size
    freqs_t, freqs_h, freqs_w, grid_t, grid_h_, grid_w_ = get_3d_rotary_pos_embed_allegro(
        embed_dim=cfg.attention_head_dim, crops_coords=((0, 0), (grid_h, grid_w)), grid_size=(grid_h, grid_w),
        temporal_size=frames,
        interpolation_scale=(cfg.interpolation_scale_t, cfg.interpolation_scale_h, cfg.interpolation_scale_w))
    pos = torch.cartesian_prod(grid_t.long(), grid_h_.long(), grid_w_.long())
    pos = pos.reshape(-1, 3).transpose(0, 1).reshape(3, 1, -1).contiguous()
    return (freqs_t, freqs_h, freqs_w), tuple(pos)


def allegro_inputs(model, batch: int = 2, frames: int | None = None, height: int | None = None,
                   width: int | None = None, *, timestep: float = DEFAULT_TIMESTEP, seed: int = 0) -> dict[str, Any]:
    """Allegro: latents ``(B, C_in, F, H, W)``, T5 text ``(B, 1, 512, D)`` with its int64 padding mask, a float32
    timestep (the Euler-family schedulers Allegro runs with), the pipeline's 3-D rotary tables and positions."""
    cfg = model.config
    f, h, w = _patched_sizes(model, frames, height, width, (cfg.patch_size_t, cfg.patch_size, cfg.patch_size))
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_randn(g, batch, cfg.in_channels, f, h, w),
                # the pipeline passes the text as (B, 1, L, D) (`prompt_embeds.unsqueeze(1)`)
                encoder_hidden_states=_randn(g, batch, 1, ALLEGRO_TEXT_TOKENS, cfg.caption_channels),
                encoder_attention_mask=_text_mask(batch, ALLEGRO_TEXT_TOKENS),
                timestep=_timestep(batch, timestep, torch.float32),
                image_rotary_emb=allegro_rotary_emb(model, f, h, w), return_dict=False)


# --- EasyAnimate ---------------------------------------------------------------------------------------------------------

#: EasyAnimatePipeline's ``max_sequence_length`` (Qwen2-VL prompt padded to it).
EASYANIMATE_TEXT_TOKENS = 256


def easyanimate_inputs(model, batch: int = 2, frames: int | None = None, height: int | None = None,
                       width: int | None = None, *, timestep: float = DEFAULT_TIMESTEP, seed: int = 0
                       ) -> dict[str, Any]:
    """EasyAnimate (V5.1 text-to-video): latents ``(B, C_in, F, H, W)``, Qwen2-VL text of 256 tokens (no mask:
    the pipeline does not pass it), the timestep in the latents' dtype (``torch.tensor([t] * B).to(dtype)``),
    passed positionally by the pipeline, by name here."""
    cfg = model.config
    name = type(model).__name__
    f, h, w = _sizes(frames, height, width)
    _check_divisible(name, "latent height", h, cfg.patch_size)
    _check_divisible(name, "latent width", w, cfg.patch_size)
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_randn(g, batch, cfg.in_channels, f, h, w), timestep=_timestep(batch, timestep,
                                                                                              torch.float32),
                encoder_hidden_states=_randn(g, batch, EASYANIMATE_TEXT_TOKENS, cfg.text_embed_dim),
                return_dict=False)


# --- SANA-Video ------------------------------------------------------------------------------------------------------------

#: SanaVideoPipeline's ``max_sequence_length`` (Gemma prompt: first token + the last 299 of the padded prompt).
SANA_TEXT_TOKENS = 300


def sana_video_inputs(model, batch: int = 2, frames: int | None = None, height: int | None = None,
                      width: int | None = None, *, timestep: float = DEFAULT_TIMESTEP, seed: int = 0
                      ) -> dict[str, Any]:
    """SANA-Video: latents ``(B, C_in, F, H, W)``, Gemma text of 300 tokens with its int64 padding mask, int64
    timestep (DPM-Solver on flow sigmas)."""
    cfg = model.config
    f, h, w = _patched_sizes(model, frames, height, width, tuple(cfg.patch_size))
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_randn(g, batch, cfg.in_channels, f, h, w),
                encoder_hidden_states=_randn(g, batch, SANA_TEXT_TOKENS, cfg.caption_channels),
                encoder_attention_mask=_text_mask(batch, SANA_TEXT_TOKENS),
                timestep=_timestep(batch, timestep, torch.long), attention_kwargs=None, return_dict=False)


# --- Cosmos -----------------------------------------------------------------------------------------------------------------

#: CosmosTextToWorldPipeline's defaults: T5 prompt of 512 tokens, 30 fps, a VAE with 8x spatial compression.
COSMOS_TEXT_TOKENS, COSMOS_FPS, COSMOS_VAE_SPATIAL = 512, 30, 8


def cosmos_inputs(model, batch: int = 2, frames: int | None = None, height: int | None = None,
                  width: int | None = None, *, timestep: float = DEFAULT_TIMESTEP, seed: int = 0) -> dict[str, Any]:
    """Cosmos 1.0 text-to-world: latents ``(B, C_in, F, H, W)``, T5 text of 512 tokens, a float32 EDM timestep
    (``0.25 * log(sigma)``: :func:`edm_timesteps`), ``fps`` 30 and the all-zero pixel-size padding mask
    ``(1, 1, 8H, 8W)`` the pipeline passes. (The pipeline runs the conditional and unconditional halves as two
    calls; batch 2 here is one call of both.)"""
    cfg = model.config
    f, h, w = _patched_sizes(model, frames, height, width, tuple(cfg.patch_size))
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_randn(g, batch, cfg.in_channels, f, h, w),
                timestep=_timestep(batch, timestep, torch.float32),
                encoder_hidden_states=_randn(g, batch, COSMOS_TEXT_TOKENS, cfg.text_embed_dim), fps=COSMOS_FPS,
                padding_mask=torch.zeros(1, 1, h * COSMOS_VAE_SPATIAL, w * COSMOS_VAE_SPATIAL), return_dict=False)


# --- Kandinsky 5 ----------------------------------------------------------------------------------------------------------

#: Kandinsky 5's VAE spatial compression (the pipeline's ``vae_scale_factor_spatial``).
KANDINSKY5_VAE_SPATIAL = 8


def kandinsky5_inputs(model, batch: int = 2, frames: int | None = None, height: int | None = None,
                      width: int | None = None, *, timestep: float = DEFAULT_TIMESTEP, seed: int = 0
                      ) -> dict[str, Any]:
    """Kandinsky 5 text-to-video: channels-last latents ``(B, F, H, W, C)`` (with zero visual conditioning and
    mask appended when ``visual_cond``), Qwen text and CLIP pooled embedding, float32 flow timestep, the rope
    positions as the pipeline builds them (a list of frame/row/column ``arange`` tables over the patch grid and one
    over the text), the resolution's ``scale_factor`` ((1, 2, 2) for 480p-sized videos, else (1, 3.16, 3.16))
    and no sparse attention (``attention_type`` "regular"; "nabla" is not built)."""
    cfg = model.config
    name = type(model).__name__
    if cfg.attention_type != "regular":
        raise InputError(f"{name} with attention_type={cfg.attention_type!r}: graphpass builds inputs for regular "
                         f"attention only; pass your pipeline's inputs (with its sparse_params) to graphpass.optimize")
    _, ph, pw = cfg.patch_size
    f, h, w = _patched_sizes(model, frames, height, width, tuple(cfg.patch_size))
    g = torch.Generator().manual_seed(seed)
    x = _randn(g, batch, f, h, w, cfg.in_visual_dim)
    if cfg.visual_cond:
        x = torch.cat([x, torch.zeros_like(x), torch.zeros(batch, f, h, w, 1)], dim=-1)
    px_h, px_w = h * KANDINSKY5_VAE_SPATIAL, w * KANDINSKY5_VAE_SPATIAL
    scale = (1, 2, 2) if 480 <= px_h <= 854 and 480 <= px_w <= 854 else (1, 3.16, 3.16)
    return dict(hidden_states=x, encoder_hidden_states=_randn(g, batch, TEXT_TOKENS, cfg.in_text_dim),
                pooled_projections=_randn(g, batch, cfg.in_text_dim2),
                timestep=_timestep(batch, timestep, torch.float32),
                visual_rope_pos=[torch.arange(f), torch.arange(h // ph), torch.arange(w // pw)],
                text_rope_pos=torch.arange(TEXT_TOKENS), scale_factor=scale, sparse_params=None,
                # as the pipeline: with return_dict=False the model returns the bare tensor, not a 1-tuple
                return_dict=True)


# --- Motif-Video ----------------------------------------------------------------------------------------------------------

#: MotifVideoPipeline's ``max_sequence_length`` (T5 prompt padded to it).
MOTIF_TEXT_TOKENS = 512


def motif_video_inputs(model, batch: int = 2, frames: int | None = None, height: int | None = None,
                       width: int | None = None, *, timestep: float = DEFAULT_TIMESTEP, seed: int = 0
                       ) -> dict[str, Any]:
    """Motif-Video text-to-video: ``cat([latents, zero condition latents, zero mask], dim=1)`` (``in_channels =
    2C + 1``), T5 text of 512 tokens with its bool padding mask, float32 flow timestep, no image embeddings."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    hidden = _latents_with_condition(model, g, batch, frames, height, width)
    return dict(hidden_states=hidden, timestep=_timestep(batch, timestep, torch.float32),
                encoder_hidden_states=_randn(g, batch, MOTIF_TEXT_TOKENS, cfg.text_embed_dim),
                encoder_attention_mask=_text_mask(batch, MOTIF_TEXT_TOKENS).bool(), attention_kwargs=None,
                return_dict=False)


# --- registry ----------------------------------------------------------------------------------------------------------------

#: Input builder per diffusers class name: ``builder(model, batch, frames, height, width, *, timestep, seed)``.
INPUT_BUILDERS: dict[str, Builder] = {
    "CogVideoXTransformer3DModel": cogvideox_inputs,
    "ConsisIDTransformer3DModel": consisid_inputs,
    "LatteTransformer3DModel": latte_inputs,
    "WanTransformer3DModel": wan_inputs,
    "SkyReelsV2Transformer3DModel": wan_inputs,
    "ChronoEditTransformer3DModel": chronoedit_inputs,
    "WanVACETransformer3DModel": wan_vace_inputs,
    "HunyuanVideoTransformer3DModel": hunyuan_video_inputs,
    "LTXVideoTransformer3DModel": ltx_video_inputs,
    "MochiTransformer3DModel": mochi_inputs,
    "AllegroTransformer3DModel": allegro_inputs,
    "EasyAnimateTransformer3DModel": easyanimate_inputs,
    "SanaVideoTransformer3DModel": sana_video_inputs,
    "CosmosTransformer3DModel": cosmos_inputs,
    "HunyuanVideo15Transformer3DModel": hunyuan_video15_inputs,
    "Kandinsky5Transformer3DModel": kandinsky5_inputs,
    "MotifVideoTransformer3DModel": motif_video_inputs,
}

#: Timestep rule of each family's default scheduler (classes not listed: :func:`ddim_timesteps`, the DDPM
#: families). Wan-family checkpoints ship UniPC with flow shift 3.0 (the 480p configs), HunyuanVideo shift 7.0.
TIMESTEP_RULES: dict[str, TimestepRule] = {
    "WanTransformer3DModel": lambda model, n, kw: unipc_flow_timesteps(n, shift=3.0),
    "SkyReelsV2Transformer3DModel": lambda model, n, kw: unipc_flow_timesteps(n, shift=3.0),
    "ChronoEditTransformer3DModel": lambda model, n, kw: unipc_flow_timesteps(n, shift=3.0),
    "WanVACETransformer3DModel": lambda model, n, kw: unipc_flow_timesteps(n, shift=3.0),
    "HunyuanVideoTransformer3DModel": lambda model, n, kw: flow_timesteps(n, shift=7.0),
    # the pipeline's sigmas linspace(1, 0, N + 1)[:-1]; shift 7.0 as HunyuanVideo's scheduler config
    "HunyuanVideo15Transformer3DModel": lambda model, n, kw: flow_timesteps(n, shift=7.0),
    "LTXVideoTransformer3DModel": lambda model, n, kw: ltx_timesteps(n, kw["num_frames"] * kw["height"]
                                                                     * kw["width"]),
    "MotifVideoTransformer3DModel": lambda model, n, kw: motif_timesteps(n, _packed_tokens(model, kw)),
    "MochiTransformer3DModel": lambda model, n, kw: mochi_timesteps(n),
    "EasyAnimateTransformer3DModel": lambda model, n, kw: flow_default_timesteps(n),
    # the pipeline's set_timesteps(N); shift 5.0 assumed (Kandinsky 5's sampling scale)
    "Kandinsky5Transformer3DModel": lambda model, n, kw: flow_default_timesteps(n, shift=5.0),
    "SanaVideoTransformer3DModel": lambda model, n, kw: dpm_flow_timesteps(n, shift=3.0),
    "CosmosTransformer3DModel": lambda model, n, kw: edm_timesteps(n),
}


def _packed_tokens(model: torch.nn.Module, kwargs: dict[str, Any]) -> int:
    """Video tokens after a ``(patch_size_t, patch_size, patch_size)`` patch embedding of ``(B, C, F, H, W)``."""
    _, _, f, h, w = kwargs["hidden_states"].shape
    cfg = model.config
    return (f // cfg.patch_size_t) * (h // cfg.patch_size) * (w // cfg.patch_size)


def timesteps_for(model: torch.nn.Module, num_steps: int, kwargs: dict[str, Any]) -> list[float]:
    """The timesteps ``model`` is called with over ``num_steps`` by its pipeline's default scheduler, for the
    call ``kwargs`` (:data:`TIMESTEP_RULES`)."""
    rule = TIMESTEP_RULES.get(type(model).__name__)
    return ddim_timesteps(num_steps) if rule is None else rule(model, num_steps, kwargs)


def example_inputs(model: torch.nn.Module, batch: int = 2, num_steps: int = 50, frames: int | None = None,
                   height: int | None = None, width: int | None = None, seed: int = 0
                   ) -> tuple[dict[str, Any], list[float]]:
    """(keyword arguments of the first denoiser call of a ``num_steps`` generation, the timesteps of all steps).

    The timestep argument holds the first timestep, in the dtype the pipeline's scheduler gives.
    """
    kwargs = build_inputs(model, batch, frames, height, width, seed=seed)
    # in the call's dtype (float32 for flow schedulers): the values the model is called with
    dtype = kwargs["timestep"].dtype
    timesteps = [float(t) for t in torch.tensor(timesteps_for(model, num_steps, kwargs)).to(dtype)]
    kwargs["timestep"] = torch.full_like(kwargs["timestep"], timesteps[0])
    return kwargs, timesteps


def supported_classes() -> list[str]:
    """Class names :func:`build_inputs` can serve, sorted."""
    return sorted(INPUT_BUILDERS)


def builder_for(class_name: str) -> Builder:
    """The input builder of ``class_name``, or an :class:`InputError` naming the supported classes."""
    if class_name not in INPUT_BUILDERS:
        raise InputError(f"no example-input builder for {class_name}: graphpass builds the inputs of one "
                         f"denoiser call for {', '.join(supported_classes())}; call graphpass.optimize(model, "
                         f"schedule, example_kwargs=...) with your pipeline's inputs instead")
    return INPUT_BUILDERS[class_name]


def build_inputs(model: torch.nn.Module, batch: int = 2, frames: int | None = None, height: int | None = None,
                 width: int | None = None, *, timestep: float = DEFAULT_TIMESTEP, seed: int = 0) -> dict[str, Any]:
    """The keyword arguments of one denoiser call of ``model`` (its class's :data:`INPUT_BUILDERS` entry)."""
    if batch < 1:
        raise InputError(f"batch={batch}: use 1 (one video) or 2 (one video with batched guidance)")
    return builder_for(type(model).__name__)(model, batch, frames, height, width, timestep=timestep, seed=seed)


__all__ = ["INPUT_BUILDERS", "TIMESTEP_RULES", "build_inputs", "builder_for", "example_inputs", "supported_classes",
           "timesteps_for", "ddim_timesteps", "flow_timesteps", "flow_default_timesteps", "dpm_flow_timesteps", "edm_timesteps",
           "dynamic_flow_timesteps", "motif_timesteps", "unipc_flow_timesteps", "ltx_timesteps",
           "mochi_timesteps", "cogvideox_rotary_emb"]
