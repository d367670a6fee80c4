"""Tiny random diffusers pipelines, called as a user would (``prompt_embeds`` given: tokenizers need files).

Each :class:`PipeCase` builds a fresh pipeline with seeded random components (no VAE: latents come back with
``output_type="latent"``), knows the keyword arguments of one generation, and names every attention module
of its transformer with its true kind (read from the model's source) for diffusers' own PAB hook.

    >>> case = PIPES["cogvideox"]()
    >>> latents = case.run(case.pipe, steps=10)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

#: Attention-kind identifiers for diffusers' PyramidAttentionBroadcastConfig: regexes matched against
#: module names with re.search, checked spatial first, then temporal, then cross. Set per model so every
#: module gets its true kind (diffusers' defaults give Latte's temporal blocks the spatial range).
NONE = r"^$"


@dataclass
class PipeCase:
    """name; pipe: the pipeline; kwargs: one generation's call arguments (without steps and generator);
    modules: attention module path -> kind, from the model source; separate_cfg: the pipeline calls the
    transformer separately for cond and uncond (in cache contexts "cond"/"uncond")."""

    name: str
    pipe: Any
    kwargs: dict[str, Any]
    modules: dict[str, str]
    separate_cfg: bool = False
    latent_attr: str = "frames"
    extra: dict[str, Any] = field(default_factory=dict)

    def run(self, pipe=None, steps: int = 10, seed: int = 0, **overrides) -> torch.Tensor:
        pipe = pipe or self.pipe
        kw = dict(self.kwargs, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                  output_type="latent", **overrides)
        with torch.no_grad():
            out = pipe(**kw)
        return getattr(out, self.latent_attr)


def _embeds(*shape, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


def cogvideox(rope: bool = False) -> PipeCase:
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(0)
    # rotary embeddings split the head dim 1/4 : 3/8 : 3/8 over (t, h, w), each even: head dim 16
    tr = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16 if rope else 8, in_channels=4,
                                     out_channels=4,
                                     num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
                                     text_embed_dim=16, time_embed_dim=8, temporal_compression_ratio=4,
                                     max_text_seq_length=5, use_rotary_positional_embeddings=rope).eval()
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tr,
                             scheduler=CogVideoXDDIMScheduler())
    pe, ne = _embeds(1, 5, 16)
    kwargs = dict(prompt_embeds=pe, negative_prompt_embeds=ne, height=64, width=64, num_frames=9,
                  guidance_scale=6.0, max_sequence_length=5)
    # CogVideoXBlock.attn1: one attention over text + all video tokens (CogVideoXAttnProcessor2_0 concatenates).
    modules = {f"transformer_blocks.{i}.attn1": "joint" for i in range(2)}
    return PipeCase("cogvideox-rope" if rope else "cogvideox", pipe, kwargs, modules)


def latte() -> PipeCase:
    from diffusers import DDIMScheduler, LattePipeline, LatteTransformer3DModel

    torch.manual_seed(0)
    tr = LatteTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=16,
                                 caption_channels=16, num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                                 video_length=3).eval()
    pipe = LattePipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tr,
                         scheduler=DDIMScheduler(clip_sample=False))
    pe, ne = _embeds(1, 5, 16)
    kwargs = dict(prompt_embeds=pe, negative_prompt_embeds=ne, height=64, width=64, video_length=3,
                  negative_prompt=None, guidance_scale=4.5, clean_caption=False, mask_feature=False, enable_temporal_attentions=True)
    # transformer_blocks: attention within each frame (spatial) + cross to the caption;
    # temporal_transformer_blocks: attention over the frames at each position.
    modules = {**{f"transformer_blocks.{i}.attn1": "spatial" for i in range(2)},
               **{f"transformer_blocks.{i}.attn2": "cross" for i in range(2)},
               **{f"temporal_transformer_blocks.{i}.attn1": "temporal" for i in range(2)}}
    return PipeCase("latte", pipe, kwargs, modules)


def wan(experts: int = 1, expand_timesteps: bool = False) -> PipeCase:
    """Wan 2.1; ``experts=2``: Wan 2.2's high-noise ``transformer`` and low-noise ``transformer_2`` (boundary
    ratio 0.875); ``expand_timesteps``: Wan 2.2 TI2V's per-token timesteps."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    def make():
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                     out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2,
                                     rope_max_seq_len=32).eval()

    torch.manual_seed(0)
    tr = make()
    tr2 = make() if experts == 2 else None
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tr, transformer_2=tr2,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
                       boundary_ratio=0.875 if experts == 2 else None, expand_timesteps=expand_timesteps)
    pe, ne = _embeds(1, 5, 16)
    kwargs = dict(prompt_embeds=pe, negative_prompt_embeds=ne, height=64, width=64, num_frames=9,
                  guidance_scale=5.0)
    # WanTransformerBlock.attn1: self-attention over all video tokens (3D rotary); attn2: text cross-attention.
    modules = {**{f"blocks.{i}.attn1": "joint" for i in range(2)}, **{f"blocks.{i}.attn2": "cross" for i in range(2)}}
    name = "wan" + ("-2experts" if experts == 2 else "") + ("-ti2v" if expand_timesteps else "")
    return PipeCase(name, pipe, kwargs, modules, separate_cfg=True)


def hunyuanvideo() -> PipeCase:
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    tr = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                        num_layers=1, num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0,
                                        patch_size=2, patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True,
                                        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4)).eval()
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=tr, vae=None,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                                tokenizer_2=None)
    g = torch.Generator().manual_seed(3)
    kwargs = dict(prompt_embeds=torch.randn(1, 5, 16, generator=g), pooled_prompt_embeds=torch.randn(1, 8, generator=g),
                  prompt_attention_mask=torch.ones(1, 5, dtype=torch.long), height=64, width=64, num_frames=9,
                  guidance_scale=6.0)
    # double-stream blocks: one joint attention over video + text; single-stream blocks: attention over the
    # concatenated text + video tokens (joint); the token refiner attends over text tokens only.
    modules = {"transformer_blocks.0.attn": "joint", "single_transformer_blocks.0.attn": "joint",
               "context_embedder.token_refiner.refiner_blocks.0.attn": "text"}
    return PipeCase("hunyuanvideo", pipe, kwargs, modules)


def ltx() -> PipeCase:
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    torch.manual_seed(0)
    tr = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                    num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                    num_layers=2, caption_channels=16).eval()
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                       transformer=tr)
    g = torch.Generator().manual_seed(3)
    kwargs = dict(prompt_embeds=torch.randn(1, 5, 16, generator=g),
                  prompt_attention_mask=torch.ones(1, 5, dtype=torch.long),
                  negative_prompt_embeds=torch.randn(1, 5, 16, generator=g),
                  negative_prompt_attention_mask=torch.ones(1, 5, dtype=torch.long),
                  height=64, width=64, num_frames=9, guidance_scale=3.0)
    # LTXVideoTransformerBlock.attn1: self-attention over all video tokens; attn2: cross-attention to text.
    modules = {**{f"transformer_blocks.{i}.attn1": "joint" for i in range(2)},
               **{f"transformer_blocks.{i}.attn2": "cross" for i in range(2)}}
    return PipeCase("ltx", pipe, kwargs, modules)


PIPES: dict[str, Callable[[], PipeCase]] = {
    "cogvideox": cogvideox, "cogvideox-rope": lambda: cogvideox(rope=True), "latte": latte, "wan": wan,
    "wan-2experts": lambda: wan(experts=2), "wan-ti2v": lambda: wan(expand_timesteps=True),
    "hunyuanvideo": hunyuanvideo, "ltx": ltx,
}
