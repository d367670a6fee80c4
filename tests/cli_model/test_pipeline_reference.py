"""The built inputs against what diffusers' own pipelines pass to the transformer, and the timestep rules against
diffusers' schedulers configured as the checkpoints ship them.

Each pipeline runs a few steps on a tiny random transformer (no VAE, no text encoder: ``prompt_embeds`` given,
``output_type="latent"``); a forward pre-hook records every transformer call. The inputs graphpass builds for
the same latent size must have the same arguments, dtypes and shapes (text length aside: graphpass picks its
own prompt length), the same values for everything the pipeline derives from the config (timestep, rotary
tables, guidance, rope scale, sizes), and the same timesteps at every step.
"""
from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
from torch.utils._pytree import tree_flatten

from cli_model_cases import CASES
from graphpass.model_inputs import (build_inputs, ddim_timesteps, dpm_flow_timesteps, example_inputs,
                                    edm_timesteps, flow_default_timesteps, flow_timesteps, ltx_timesteps,
                                    mochi_timesteps, unipc_flow_timesteps)

STEPS = 3
#: Arguments with a prompt-length dimension (the pipeline's is the given prompt_embeds'), and which one.
TEXT_ARGS = {"encoder_hidden_states": -2, "encoder_attention_mask": -1, "text_rope_pos": -1}
#: Arguments drawn at random (compared by dtype and shape only).
RANDOM_ARGS = {"hidden_states", "encoder_hidden_states", "encoder_hidden_states_image", "pooled_projections",
               "encoder_attention_mask"}


def _embeds(*shape: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


def record_calls(pipe, kwargs: dict[str, Any], steps: int = STEPS) -> list[dict[str, Any]]:
    """Run ``pipe`` and return every transformer call's arguments, bound by name with defaults applied."""
    tr = pipe.transformer
    sig = inspect.signature(tr.forward)
    calls = []

    def hook(module, args, kw):
        bound = sig.bind(*args, **kw)
        bound.apply_defaults()
        calls.append(dict(bound.arguments))

    handle = tr.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(**kwargs, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                 output_type="latent")
    finally:
        handle.remove()
    return calls


def bind(model, kwargs: dict[str, Any]) -> dict[str, Any]:
    bound = inspect.signature(model.forward).bind(**kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def assert_same_call(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    """Same arguments; tensors of the same dtype and shape (prompt length aside); derived values equal."""
    assert sorted(ours) == sorted(theirs)
    for name, want in theirs.items():
        got = ours[name]
        if isinstance(want, torch.Tensor):
            assert isinstance(got, torch.Tensor), name
            assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
            shape_got, shape_want = list(got.shape), list(want.shape)
            if name in TEXT_ARGS:
                del shape_got[TEXT_ARGS[name]], shape_want[TEXT_ARGS[name]]
            assert shape_got == shape_want, (name, got.shape, want.shape)
            if name in TEXT_ARGS and name not in RANDOM_ARGS:  # text positions: ours run on past the prompt's
                torch.testing.assert_close(got[..., :want.shape[-1]], want, msg=name)
            elif name not in RANDOM_ARGS:
                torch.testing.assert_close(got, want, msg=name)
        elif isinstance(want, (tuple, list)):  # rotary tables, rope scales: nested tuples of tensors or floats
            leaves_got, spec_got = tree_flatten(got)
            leaves_want, spec_want = tree_flatten(want)
            assert spec_got == spec_want, name
            for g, w in zip(leaves_got, leaves_want):
                if isinstance(w, torch.Tensor):
                    torch.testing.assert_close(g, w, msg=name)
                else:
                    assert g == pytest.approx(w), name
        else:
            assert got == want, (name, got, want)


def _first_timesteps(calls: list[dict[str, Any]]) -> list[float]:
    return [float(c["timestep"].flatten()[0]) for c in calls]


# --- pipelines ----------------------------------------------------------------------------------------------------

def _cogvideox(case: str):
    model = CASES[case].build()
    # DDIM 'leading' spacing with offset 1 (what graphpass's sampler and its DDIM rule use)
    pipe = diffusers.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                                       scheduler=diffusers.CogVideoXDDIMScheduler(timestep_spacing="leading",
                                                                                   steps_offset=1))
    pe, ne = _embeds(1, 5, 16)
    return pipe, dict(prompt_embeds=pe, negative_prompt_embeds=ne, height=64, width=64, num_frames=9,
                      guidance_scale=6.0, max_sequence_length=5), 2, (3, 8, 8)


def _latte():
    model = CASES["latte"].build()
    pipe = diffusers.LattePipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                                   scheduler=diffusers.DDIMScheduler(clip_sample=False, timestep_spacing="leading",
                                                                     steps_offset=1))
    pe, ne = _embeds(1, 5, 16)
    return pipe, dict(prompt_embeds=pe, negative_prompt_embeds=ne, height=64, width=64, video_length=3,
                      negative_prompt=None, guidance_scale=4.5, clean_caption=False, mask_feature=False), 2, (3, 8, 8)


def _wan():
    model = CASES["wan"].build()
    # the scheduler Wan's checkpoints ship: UniPC on flow sigmas, shift 3
    sched = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                              flow_shift=3.0)
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=sched)
    pe, ne = _embeds(1, 5, 16)
    # Wan runs the conditional and unconditional halves as two batch-1 calls
    return pipe, dict(prompt_embeds=pe, negative_prompt_embeds=ne, height=64, width=64, num_frames=9,
                      guidance_scale=5.0), 1, (3, 8, 8)


def _hunyuanvideo():
    model = CASES["hunyuanvideo"].build()
    pipe = diffusers.HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=model, vae=None,
                                          scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0),
                                          text_encoder_2=None, tokenizer_2=None)
    g = torch.Generator().manual_seed(3)
    # guidance-distilled: one batch-1 call per step with the guidance scale embedded
    return pipe, dict(prompt_embeds=torch.randn(1, 5, 16, generator=g),
                      pooled_prompt_embeds=torch.randn(1, 8, generator=g),
                      prompt_attention_mask=torch.ones(1, 5, dtype=torch.long), height=64, width=64, num_frames=9,
                      guidance_scale=6.0), 1, (3, 8, 8)


def _ltx():
    model = CASES["ltx"].build()
    # LTX-Video's scheduler config: resolution-dependent shift, terminal sigma 0.1
    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                                      base_image_seq_len=1024, max_image_seq_len=4096,
                                                      shift_terminal=0.1)
    pipe = diffusers.LTXPipeline(scheduler=sched, vae=None, text_encoder=None, tokenizer=None, transformer=model)
    pe, ne = _embeds(1, 5, 16)
    # masks as the pipeline's T5 encoding returns them (`prompt_attention_mask.bool()`, pipeline_ltx.py)
    return pipe, dict(prompt_embeds=pe, prompt_attention_mask=torch.ones(1, 5, dtype=torch.bool),
                      negative_prompt_embeds=ne, negative_prompt_attention_mask=torch.ones(1, 5, dtype=torch.bool),
                      height=256, width=256, num_frames=17, guidance_scale=3.0), 2, (3, 8, 8)


def _mochi():
    model = CASES["mochi"].build()
    # Mochi's scheduler config: inverted sigmas (the model's 1000 is the clean end)
    pipe = diffusers.MochiPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(invert_sigmas=True),
                                   vae=None, text_encoder=None, tokenizer=None, transformer=model)
    pe, ne = _embeds(1, 5, 16)
    # masks as the pipeline's T5 encoding returns them (`prompt_attention_mask.bool()`, pipeline_mochi.py)
    return pipe, dict(prompt_embeds=pe, prompt_attention_mask=torch.ones(1, 5, dtype=torch.bool),
                      negative_prompt_embeds=ne, negative_prompt_attention_mask=torch.ones(1, 5, dtype=torch.bool),
                      height=64, width=64, num_frames=13, guidance_scale=4.5), 2, (3, 8, 8)


def _allegro():
    model = CASES["allegro"].build()
    sched = diffusers.EulerAncestralDiscreteScheduler(timestep_spacing="leading", steps_offset=1)
    pipe = diffusers.AllegroPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=sched)
    pe, ne = _embeds(1, 5, 16)
    mask = torch.ones(1, 5, dtype=torch.long)  # the tokenizer's attention mask
    return pipe, dict(prompt_embeds=pe, prompt_attention_mask=mask, negative_prompt_embeds=ne,
                      negative_prompt_attention_mask=mask, negative_prompt=None, height=64, width=64, num_frames=9,
                      guidance_scale=7.5,
                      clean_caption=False), 2, (3, 8, 8)


def _easyanimate():
    model = CASES["easyanimate"].build()
    pipe = diffusers.EasyAnimatePipeline(vae=None, text_encoder=None, tokenizer=None, transformer=model,
                                         scheduler=diffusers.FlowMatchEulerDiscreteScheduler())
    # the loop reads vae.config.latent_channels after each call: a stand-in VAE config (set past the pipeline's
    # module registration, which expects a model)
    object.__setattr__(pipe, "vae", SimpleNamespace(config=SimpleNamespace(latent_channels=4)))
    pe, ne = _embeds(1, 5, 16)
    mask = torch.ones(1, 5, dtype=torch.long)
    return pipe, dict(prompt_embeds=pe, prompt_attention_mask=mask, negative_prompt_embeds=ne,
                      negative_prompt_attention_mask=mask, height=64, width=64, num_frames=9,
                      guidance_scale=5.0), 2, (3, 8, 8)


def _sana_video():
    model = CASES["sana-video"].build()
    sched = diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=3.0)
    pipe = diffusers.SanaVideoPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                                       scheduler=sched)
    pe, ne = _embeds(1, 5, 16)
    mask = torch.ones(1, 5, dtype=torch.long)
    return pipe, dict(prompt_embeds=pe, prompt_attention_mask=mask, negative_prompt_embeds=ne,
                      negative_prompt_attention_mask=mask, negative_prompt=None, height=64, width=64, frames=9,
                      guidance_scale=6.0,
                      use_resolution_binning=False), 2, (3, 8, 8)


def _kandinsky5():
    model = CASES["kandinsky5"].build()
    pipe = diffusers.Kandinsky5T2VPipeline(transformer=model, vae=None, text_encoder=None, tokenizer=None,
                                           text_encoder_2=None, tokenizer_2=None,
                                           scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0))
    g = torch.Generator().manual_seed(3)
    # Qwen text of 5 tokens (cu_seqlens: one prompt of 5) and the CLIP pooled embedding, prompt and negative
    return pipe, dict(prompt_embeds_qwen=torch.randn(1, 5, 16, generator=g),
                      prompt_embeds_clip=torch.randn(1, 8, generator=g),
                      negative_prompt_embeds_qwen=torch.randn(1, 5, 16, generator=g),
                      negative_prompt_embeds_clip=torch.randn(1, 8, generator=g),
                      prompt_cu_seqlens=torch.tensor([0, 5], dtype=torch.int32),
                      negative_prompt_cu_seqlens=torch.tensor([0, 5], dtype=torch.int32),
                      height=64, width=64, num_frames=9, guidance_scale=5.0), 1, (3, 8, 8)


def _motif_video():
    model = CASES["motif-video"].build()
    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    pipe = diffusers.MotifVideoPipeline(scheduler=sched, vae=None, text_encoder=None, tokenizer=None,
                                        transformer=model, guider=diffusers.ClassifierFreeGuidance())
    # the pipeline reads the latent channel count from vae.config.z_dim: a stand-in VAE config
    object.__setattr__(pipe, "vae", SimpleNamespace(config=SimpleNamespace(z_dim=4)))
    pe, ne = _embeds(1, 5, 16)
    # masks as the pipeline's T5 encoding returns them (`prompt_attention_mask.bool()`)
    mask = torch.ones(1, 5, dtype=torch.bool)
    return pipe, dict(prompt_embeds=pe, prompt_attention_mask=mask, negative_prompt_embeds=ne,
                      negative_prompt_attention_mask=mask, height=64, width=64, num_frames=9), 1, (3, 8, 8)


def _skyreels_v2():
    model = CASES["skyreels-v2"].build()
    sched = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                              flow_shift=3.0)
    pipe = diffusers.SkyReelsV2Pipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                                        scheduler=sched)
    pe, ne = _embeds(1, 5, 16)
    return pipe, dict(prompt_embeds=pe, negative_prompt_embeds=ne, height=64, width=64, num_frames=9,
                      guidance_scale=6.0), 1, (3, 8, 8)


PIPELINES = {"cogvideox": lambda: _cogvideox("cogvideox"), "cogvideox-rope": lambda: _cogvideox("cogvideox-rope"),
             "latte": _latte, "wan": _wan, "hunyuanvideo": _hunyuanvideo, "ltx": _ltx, "mochi": _mochi,
             "allegro": _allegro, "easyanimate": _easyanimate,
             "sana-video": _sana_video, "kandinsky5": _kandinsky5,
             "motif-video": _motif_video, "skyreels-v2": _skyreels_v2}


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_inputs_match_the_pipeline_call(name):
    pipe, kwargs, batch, (f, h, w) = PIPELINES[name]()
    calls = record_calls(pipe, kwargs)
    model = pipe.transformer
    ours, timesteps = example_inputs(model, batch, STEPS, frames=f, height=h, width=w)
    assert_same_call(bind(model, ours), calls[0])
    per_step = len(calls) // STEPS  # 2 for pipelines that call cond and uncond separately
    assert _first_timesteps(calls)[::per_step] == pytest.approx(timesteps, rel=1e-6)


def test_built_inputs_run_every_later_step():
    """A later step's call differs from the first only in the timestep: build_inputs at that timestep."""
    pipe, kwargs, batch, (f, h, w) = PIPELINES["cogvideox-rope"]()
    calls = record_calls(pipe, kwargs)
    t = float(calls[-1]["timestep"][0])
    assert_same_call(bind(pipe.transformer, build_inputs(pipe.transformer, batch, f, h, w, timestep=t)), calls[-1])


# --- timestep rules against diffusers' schedulers --------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 4, 50])
def test_ddim_rule_is_diffusers_leading_ddim(steps):
    sched = diffusers.DDIMScheduler(timestep_spacing="leading", steps_offset=1)
    sched.set_timesteps(steps)
    assert ddim_timesteps(steps) == [float(t) for t in sched.timesteps]


@pytest.mark.parametrize("steps", [1, 4, 50])
def test_unipc_flow_rule_is_diffusers_unipc(steps):
    sched = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    sched.set_timesteps(steps)
    assert unipc_flow_timesteps(steps) == [float(t) for t in sched.timesteps]


@pytest.mark.parametrize("steps", [1, 4, 50])
def test_flow_rule_is_diffusers_flow_match(steps):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0)
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
    assert flow_timesteps(steps, shift=7.0) == pytest.approx(sched.timesteps.tolist(), rel=1e-6)


@pytest.mark.parametrize("steps,tokens", [(4, (3, 8, 8)), (30, (21, 16, 24))])
def test_ltx_rule_is_diffusers_dynamic_shift(steps, tokens):
    from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

    f, h, w = tokens
    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                                      base_image_seq_len=1024, max_image_seq_len=4096,
                                                      shift_terminal=0.1)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(f * h * w, 1024, 4096, 0.95, 2.05))
    got = ltx_timesteps(steps, f * h * w)
    assert got == pytest.approx(sched.timesteps.tolist(), rel=1e-5, abs=1e-3)


@pytest.mark.parametrize("steps", [4, 64])
def test_mochi_rule_is_diffusers_inverted_linear_quadratic(steps):
    from diffusers.pipelines.mochi.pipeline_mochi import linear_quadratic_schedule

    sched = diffusers.FlowMatchEulerDiscreteScheduler(invert_sigmas=True)
    sched.set_timesteps(sigmas=linear_quadratic_schedule(steps, 0.025))
    assert mochi_timesteps(steps) == pytest.approx(sched.timesteps.tolist(), rel=1e-5, abs=1e-3)


def test_consisid_rotary_is_the_pipelines():
    """ConsisID's pipeline needs a VAE to encode its reference image; its rotary tables need only the config."""
    from diffusers.pipelines.consisid.pipeline_consisid import ConsisIDPipeline

    model = CASES["consisid"].build()
    # the pipeline's own method on a stand-in holding what it reads (constructing the pipeline needs OpenCV)
    pipe = SimpleNamespace(transformer=model, vae_scale_factor_spatial=8)
    want = ConsisIDPipeline._prepare_rotary_positional_embeddings(pipe, 64, 64, 3, torch.device("cpu"))
    kw = build_inputs(model, 2, 3, 8, 8)
    assert len(kw["image_rotary_emb"]) == 2
    for got, ref in zip(kw["image_rotary_emb"], want):
        torch.testing.assert_close(got, ref)
    assert kw["timestep"].dtype == torch.int64  # CogVideoXDPMScheduler's timesteps


@pytest.mark.parametrize("steps", [1, 4, 50])
def test_dpm_flow_rule_is_diffusers_dpm_solver(steps):
    sched = diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=3.0)
    sched.set_timesteps(steps)
    assert dpm_flow_timesteps(steps) == [float(t) for t in sched.timesteps]


@pytest.mark.parametrize("steps", [1, 4, 50])
@pytest.mark.parametrize("shift", [1.0, 5.0])
def test_flow_default_rule_is_diffusers_flow_match(steps, shift):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    assert flow_default_timesteps(steps, shift=shift) == pytest.approx(sched.timesteps.tolist(), rel=1e-5)


@pytest.mark.parametrize("steps", [1, 4, 35])
def test_edm_rule_is_diffusers_edm_euler(steps):
    """Cosmos 1.0's scheduler (its pipeline cannot be built here: it requires the cosmos_guardrail package)."""
    sched = diffusers.EDMEulerScheduler()
    sched.set_timesteps(steps)
    assert edm_timesteps(steps) == pytest.approx(sched.timesteps.tolist(), rel=1e-5)
