"""DDIM sampler (deterministic at eta = 0, the default) with batched classifier-free guidance.

The model is any callable invoked as
``model(hidden_states=x, timestep=t, encoder_hidden_states=ids, cond_mask=m)``
with keyword arguments only, exactly once per step, on a batch of 2B (the B
conditional rows followed by the B null-token rows). That fixed calling
pattern is what lets a compiled drop-in replacement reuse work across steps.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from . import diffusion


def ddim_timesteps(num_steps: int = 50) -> list[int]:
    """Descending integer timesteps, 'leading' spacing with offset 1: 50 steps -> 981, 961, ..., 1."""
    if not 1 <= num_steps <= diffusion.NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"num_steps must be in [1, {diffusion.NUM_TRAIN_TIMESTEPS}], got {num_steps}")
    stride = diffusion.NUM_TRAIN_TIMESTEPS // num_steps
    return [i * stride + 1 for i in range(num_steps)][::-1]


def _shape_of(model, batch: int) -> tuple[int, ...]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError("cannot infer the video shape: pass shape=(F, C, H, W) or a model with .config")
    return (batch, cfg.num_frames, cfg.in_channels, cfg.image_size, cfg.image_size)


@torch.no_grad()
def sample(model, *, labels: torch.Tensor, cond_frames: torch.Tensor | None = None,
           cond_mask: torch.Tensor | None = None, num_steps: int = 50, guidance_scale: float = 2.0,
           seed: int = 0, progress: bool = True, shape: tuple[int, ...] | None = None,
           device: str | torch.device = "cpu", eta: float = 0.0) -> torch.Tensor:
    """Generate videos (B, F, C, H, W) clamped to [-1, 1].

    labels (B, L) int64 token ids. cond_frames (B, F, C, H, W) supplies the clean
    frames where cond_mask (B, F) is 1 (future prediction, interpolation); those
    frames are re-imposed at every step and copied into the output.
    guidance_scale 1.0 disables guidance (still one batched call of size 2B).
    eta: DDIM's stochasticity (Song et al. 2021): 0 follows the deterministic ODE, 1 adds the DDPM
    posterior's noise at every step (drawn from the same seeded generator, so still reproducible).
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like), got {eta}")
    labels = labels.to(device).long()
    b = labels.shape[0]
    full_shape = (b, *shape) if shape is not None else _shape_of(model, b)
    if cond_mask is None:
        cond_mask = torch.zeros(full_shape[:2])
    cond_mask = cond_mask.to(device).float()
    if cond_frames is None:
        if cond_mask.any():
            raise ValueError("cond_mask marks given frames but cond_frames is None")
        cond_frames = torch.zeros(full_shape)
    cond_frames = cond_frames.to(device).float()
    m = cond_mask[:, :, None, None, None]

    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    x = torch.randn(full_shape, generator=gen).to(device)
    ab = diffusion.alphas_cumprod()
    ts = ddim_timesteps(num_steps)
    ids2 = torch.cat([labels, torch.zeros_like(labels)], dim=0)
    mask2 = torch.cat([cond_mask, cond_mask], dim=0)

    for i, t in enumerate(tqdm(ts, disable=not progress, desc="ddim", leave=False)):
        x = m * cond_frames + (1 - m) * x
        x2 = torch.cat([x, x], dim=0)
        t2 = torch.full((2 * b,), float(t), dtype=torch.float32, device=device)
        eps2 = model(hidden_states=x2, timestep=t2, encoder_hidden_states=ids2, cond_mask=mask2)
        eps_c, eps_u = eps2.float().chunk(2, dim=0)
        eps = eps_u + guidance_scale * (eps_c - eps_u)
        a_t = float(ab[t])
        a_prev = float(ab[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        x0 = x0.clamp(-1, 1)
        eps = (x - a_t ** 0.5 * x0) / (1 - a_t) ** 0.5
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x = a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * torch.randn(full_shape, generator=gen).to(device)
    x = m * cond_frames + (1 - m) * x
    return x.clamp(-1, 1)
