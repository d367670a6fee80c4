"""Write graphpass/models/weights/MODEL_CARD.md from the shipped weights.

    python -m graphpass.eval.card [--name vdt-s] [--num-videos 8] [--num-steps 50]

Reads the safetensors metadata and the loss log, re-checks the recorded
fixed-batch loss, samples videos, and scores their physics against generator
videos and a random-weights model, so the card's numbers are reproducible.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..models import create, load, read_metadata, weights_path
from ..models.physics import VOCAB, PhysicsParams, decode_label, generate
from ..models.sampler import sample
from ..models.train import fixed_batch_loss
from ..models.video_io import write_frame_strip
from .physics import evaluate


def random_weights_model(name: str, seed: int = 0):
    """Random init with every parameter perturbed (N(0, 0.02)); a plain adaLN-Zero init outputs v = 0."""
    m = create(name, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return m


def _score_model(model, num_videos: int, num_steps: int, guidance: float, params: PhysicsParams, base_seed: int,
                 eta: float = 0.0):
    """Physics reports for the two demo tasks: label-only generation and 4-frame future prediction
    (and the videos, under ``"videos"``)."""
    out = {"label": [], "predict": [], "videos": []}
    for i in range(num_videos):
        ref = generate(base_seed + i, params)
        if i % 2 == 0:
            v = sample(model, labels=ref.labels[None], num_steps=num_steps, guidance_scale=guidance,
                       seed=base_seed + i, progress=False, eta=eta)[0]
            out["label"].append(evaluate(v))
            out["videos"].append(v)
        else:
            m = torch.zeros(1, params.num_frames)
            m[:, :4] = 1
            v = sample(model, labels=ref.labels[None], cond_frames=ref.video[None], cond_mask=m,
                       num_steps=num_steps, guidance_scale=guidance, seed=base_seed + i, progress=False,
                       eta=eta)[0]
            out["predict"].append(evaluate(v))
            out["videos"].append(v)
    return out


def _summ(reports) -> str:
    if not reports:
        return "n/a | n/a | n/a"
    p = np.mean([r.plausibility for r in reports])
    d = np.mean([r.detection_rate for r in reports])
    res = [r.residual_px for r in reports if np.isfinite(r.residual_px)]
    return f"{p:.3f} | {d:.2f} | {np.mean(res):.2f}" if res else f"{p:.3f} | {d:.2f} | n/a"


def build_card(name: str = "vdt-s", num_videos: int = 8, num_steps: int = 50, guidance: float = 2.0,
               out: Path | None = None, weights: Path | None = None) -> Path:
    """Write the card (default next to the weights) and return its path."""
    path = Path(weights) if weights is not None else weights_path(name)
    meta = read_metadata(path)
    model = load(name, path=path)
    cfg = model.config
    params = PhysicsParams(size=cfg.image_size, num_frames=cfg.num_frames)
    loss_log = json.loads(path.with_name(f"{name}.loss.json").read_text())
    recomputed = fixed_batch_loss(model)
    nparams = sum(p.numel() for p in model.parameters())

    t0 = time.time()
    trained = _score_model(model, num_videos, num_steps, guidance, params, base_seed=5000)
    sec = (time.time() - t0) / num_videos
    stochastic = _score_model(model, num_videos, num_steps, guidance, params, base_seed=5000, eta=1.0)
    rnd = _score_model(random_weights_model(name), num_videos, num_steps, guidance, params, base_seed=5000)
    real = [evaluate(generate(5000 + i, params).video) for i in range(num_videos)]
    out = Path(out) if out is not None else path.with_name("MODEL_CARD.md")
    strip = write_frame_strip(trained["videos"][:4], out.with_name(f"{name}.samples.png"))

    steps, losses = loss_log.get("step", []), loss_log.get("loss", [])
    k = max(1, len(losses) // 10)
    curve = "\n".join(f"| {steps[i]} | {losses[i]:.4f} |" for i in range(0, len(losses), k))
    if losses and (len(losses) - 1) % k:
        curve += f"\n| {steps[-1]} | {losses[-1]:.4f} |"
    ips = loss_log.get("it_per_s", [])
    wall = loss_log.get("wall_s", [0])[-1] if loss_log.get("wall_s") else 0

    text = f"""# Model card: {name}

Pixel-space video diffusion transformer (VDT-style: spatial attention, temporal attention,
cross-attention to a label, MLP; adaLN-Zero timestep conditioning) trained from scratch on
synthetic physics videos from `graphpass.models.physics` (1-3 coloured balls under gravity,
bouncing off the walls and floor). It exists so the graphpass compiler has a real trained
video DiT to optimize and check against, small enough to run on a CPU.

## Architecture

| field | value |
|---|---|
| video | {cfg.num_frames} frames x {cfg.image_size} x {cfg.image_size} px x {cfg.in_channels}, values in [-1, 1] |
| patch | {cfg.patch_size} ({cfg.tokens_per_frame} tokens / frame, {cfg.tokens_per_frame * cfg.num_frames} / video); the embedding also sees {cfg.patch_overlap} px of each neighbour |
| decoder | linear per token{f" plus {cfg.head_channels} feature channels per pixel refined by a 3x3 conv (U-ViT)" if cfg.head_channels else ""} |
| positions | sin-cos over frames and the patch grid, computed per call (other frame counts and sizes run) |
| hidden / depth / heads | {cfg.hidden_size} / {cfg.depth} / {cfg.num_heads} |
| parameters | {nparams / 1e6:.2f} M |
| conditioning | {cfg.cond_len} label tokens, vocabulary {VOCAB} (0 = null, for guidance) |
| masking | cond_mask (B, F): given clean frames get a learned embedding, no loss |
| config JSON | `{meta.get('config')}` |

## Training

DDPM, linear betas 1e-4..0.02 over 1000 steps (`graphpass.models.diffusion`). The network predicts
v (config `prediction="{cfg.prediction}"`) and `forward` returns epsilon; the loss is v-MSE weighted
min(1, {loss_log.get('snr_gamma')}/SNR). AdamW with warmup and cosine decay (following steps or the
time budget, whichever is further), EMA weights shipped ({loss_log.get('ema')}). Tasks per sample:
unconditional, first-k frames given, first+last given, random frames given; 10% label dropout to the
null token. Fresh generator videos every step (no fixed dataset). Initialised from:
{loss_log.get('init') or 'random (adaLN-Zero)'}.

| field | value |
|---|---|
| steps trained | {meta.get('steps')} in the last run (batch {loss_log.get('batch')}) |
| history | {meta.get('history', 'n/a')} |
| wall time | {wall / 60:.0f} min on {loss_log.get('threads')} CPU thread(s), {np.median(ips) if ips else float('nan'):.2f} it/s median |
| recorded fixed-batch loss | {float(meta['recorded_loss']):.5f} (recomputed now: {recomputed:.5f}) |
| weights dtype | {meta.get('dtype')} |

Training loss (window means):

| step | loss |
|---|---|
{curve}

## Sample quality (physics check, `graphpass.eval.physics`)

{num_videos} videos, DDIM {num_steps} steps (eta=0 unless noted), guidance {guidance}, seeds 5000..{5000 + num_videos - 1};
even seeds generate from the label only, odd seeds predict frames 5-16 given frames 1-4.
Plausibility is in [0, 1], higher is better; residual is the RMS error (px) of piecewise
gravity-parabola / line fits to the detected ball tracks.

| source | task | plausibility | detection rate | residual px |
|---|---|---|---|---|
| generator (ground truth) | - | {_summ(real)} |
| trained {name} | label only | {_summ(trained['label'])} |
| trained {name} | future prediction | {_summ(trained['predict'])} |
| trained {name}, eta=1 (DDPM-like) | label only | {_summ(stochastic['label'])} |
| trained {name}, eta=1 (DDPM-like) | future prediction | {_summ(stochastic['predict'])} |
| random weights | label only | {_summ(rnd['label'])} |
| random weights | future prediction | {_summ(rnd['predict'])} |

![samples]({strip.name})

Frames 1, 4, 7, 10, 13, 16 (columns) of the first four videos above (rows: label only, future prediction,
label only, future prediction; the prediction rows' first column is a given frame).

Sampling time: {sec:.1f} s per video on {torch.get_num_threads()} CPU thread(s) (includes guidance: batch 2).

## Limitations

Tiny resolution and short training: balls can blur, split in two, change colour or fade, and labels are not
always followed. Balls do not collide with each other in the training world. Use it as a compiler
test subject, not as a video model.

Example caption: `{decode_label(generate(5000, params).labels)}`.
"""
    out.write_text(text)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="vdt-s")
    ap.add_argument("--num-videos", type=int, default=8)
    ap.add_argument("--num-steps", type=int, default=50)
    ap.add_argument("--guidance-scale", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch default); see graphpass.demo")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"wrote {build_card(args.name, args.num_videos, args.num_steps, args.guidance_scale)}")


if __name__ == "__main__":
    main()
