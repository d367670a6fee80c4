"""One diffusers pipeline, four ways: plain, diffusers' PAB hook, graphpass PAB (eager), graphpass PAB (inductor).

A random-weight CogVideoXPipeline (CogVideoX-2B's architecture at a size that runs in minutes on 2 CPU
cores), called as a user would with ``prompt_embeds`` (tokenizers need files) and ``output_type="latent"``
(no VAE), batched classifier-free guidance. The same PAB schedule (the published CogVideoX preset: joint
attention range 2, window (100, 850)) runs as diffusers' hook (identifiers set so every attention gets its
true kind) and as graphpass, integrated in one line each:

    pipe.transformer.enable_cache(PyramidAttentionBroadcastConfig(...))          # diffusers
    pipe.transformer = graphpass.optimize(pipe.transformer, schedule)             # graphpass

Each variant first runs one warm-up generation (capture, specialization, compilation: reported apart), then
``--reps`` generations, advanced round-robin so load changes on a shared machine hit all alike. Reported:
median seconds per video (wall and process CPU), speedup against plain, and the largest difference of the
latents against the hook's (equal output) and against plain. Run::

    python benchmarks/pipelines.py                       # default size, 2 threads
    python benchmarks/pipelines.py --layers 4 --size 16 --steps 10 --reps 2   # quick
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import graphpass
from graphpass.eval.diffusers_hooks import pab_hook_config


def build(args):
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(0)
    tr = CogVideoXTransformer3DModel(
        num_attention_heads=args.heads, attention_head_dim=args.head_dim, in_channels=4, out_channels=4,
        num_layers=args.layers, sample_width=args.size, sample_height=args.size, sample_frames=args.frames,
        patch_size=2, text_embed_dim=64, time_embed_dim=64, temporal_compression_ratio=4,
        max_text_seq_length=16).eval()
    return CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tr,
                             scheduler=CogVideoXDDIMScheduler())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--frames", type=int, default=13, help="video frames (latent frames: (F - 1) / 4 + 1)")
    ap.add_argument("--size", type=int, default=24, help="latent height = width")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-inductor", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    schedule = graphpass.PAB.preset("cogvideox")
    # CogVideoXBlock.attn1: one attention over the text and all video tokens (joint).
    kinds = {f"transformer_blocks.{i}.attn1": "joint" for i in range(args.layers)}
    g = torch.Generator().manual_seed(3)
    pe, ne = torch.randn(1, 16, 64, generator=g), torch.randn(1, 16, 64, generator=g)
    call = dict(prompt_embeds=pe, negative_prompt_embeds=ne, height=8 * args.size, width=8 * args.size,
                num_frames=args.frames, guidance_scale=6.0, max_sequence_length=16, num_inference_steps=args.steps,
                output_type="latent")

    variants = {}
    variants["plain"] = build(args)
    hooked = build(args)
    hooked.transformer.enable_cache(pab_hook_config(kinds, schedule, lambda: hooked.current_timestep))
    variants["diffusers PAB hook"] = hooked
    eager = build(args)
    eager.transformer = graphpass.optimize(eager.transformer, schedule)
    variants["graphpass PAB (eager)"] = eager
    if not args.no_inductor:
        ind = build(args)
        ind.transformer = graphpass.optimize(ind.transformer, schedule, backend="inductor")
        variants["graphpass PAB (inductor)"] = ind
    for pipe in variants.values():
        pipe.set_progress_bar_config(disable=True)

    def generate(pipe):
        with torch.no_grad():
            t0, c0 = time.perf_counter(), time.process_time()
            out = pipe(**call, generator=torch.Generator().manual_seed(0)).frames
            return out, time.perf_counter() - t0, time.process_time() - c0

    warm, wall, cpu, latents = {}, {n: [] for n in variants}, {n: [] for n in variants}, {}
    for name, pipe in variants.items():
        latents[name], warm[name], _ = generate(pipe)
    names = list(variants)
    for r in range(args.reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            out, w, c = generate(variants[name])
            assert torch.equal(out, latents[name]), f"{name}: generations differ between repetitions"
            wall[name].append(w)
            cpu[name].append(c)

    tokens = ((args.frames - 1) // 4 + 1) * (args.size // 2) ** 2
    print(f"CogVideoXPipeline, random weights: {args.layers} layers, hidden {args.heads * args.head_dim}, "
          f"{tokens} video tokens + 16 text, {args.steps} steps, batched CFG, {args.threads} threads, "
          f"median of {args.reps}")
    print(f"schedule: {schedule}")
    base = statistics.median(wall["plain"])
    print(f"| variant | s/video | CPU s/video | speedup | first generation s | max diff vs hook | max diff vs plain |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in names:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        dh = float((latents[name] - latents["diffusers PAB hook"]).abs().max())
        dp = float((latents[name] - latents["plain"]).abs().max())
        print(f"| {name} | {w:.2f} | {c:.2f} | {base / w:.2f}x | {warm[name]:.1f} | {dh:.1e} | {dp:.1e} |")


if __name__ == "__main__":
    main()
