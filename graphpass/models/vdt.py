"""VDT-style video diffusion transformer in pixel space.

Each block runs, in order: spatial self-attention (one frame's tokens, batch
B*F), temporal self-attention (one token position across frames, batch B*T),
cross-attention to an embedded label sequence, and an MLP. The timestep enters
through adaLN-Zero (shift / scale / gate per sublayer). The gate multiply and
the residual add live in the block, so every ``Attention`` / ``Mlp`` module
returns its raw output: this is the boundary a caching compiler replaces.

Frames given as clean conditioning (VDT spatial-temporal mask modelling) are
marked by ``cond_mask`` and receive a learned "given" embedding; the caller
places the clean frames at those positions of ``hidden_states``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import diffusion


@dataclass(frozen=True)
class VDTConfig:
    """Architecture hyper-parameters; the video shape is part of the config."""

    num_frames: int = 16
    image_size: int = 32
    in_channels: int = 3
    patch_size: int = 4
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    vocab_size: int = 11
    cond_len: int = 7
    freq_dim: int = 256
    # "v": the network predicts v = sqrt(ab) eps - sqrt(1 - ab) x0 and forward() converts it to
    # eps = sqrt(ab) v + sqrt(1 - ab) x_t, so high-noise steps need no 1/sqrt(ab) amplification.
    # "eps": the network output is eps directly.
    prediction: str = "v"
    # Pixels each patch embedding also sees of its neighbours on every side (0: plain non-overlapping patches).
    patch_overlap: int = 0
    # > 0: besides the linear patch decoder, tokens emit this many feature channels per pixel that a 3x3
    # convolution turns into a correction of the output (zero at init), so neighbouring tokens jointly decide
    # the pixels at their border (U-ViT's conv after the decoder, Bao et al. 2023).
    head_channels: int = 0

    @property
    def tokens_per_frame(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "VDTConfig":
        return cls(**json.loads(text))


CONFIGS: dict[str, VDTConfig] = {
    # Random-init model for fast tests.
    "vdt-tiny": VDTConfig(num_frames=4, image_size=16, patch_size=4, hidden_size=32, depth=2,
                          num_heads=2, freq_dim=64, patch_overlap=2, head_channels=4),
    # The trained model shipped in graphpass/models/weights/vdt-s.safetensors.
    "vdt-s": VDTConfig(num_frames=16, image_size=32, patch_size=4, hidden_size=96, depth=4,
                       num_heads=4, patch_overlap=2, head_channels=16),
}


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of float timesteps (B,) on the 0..1000 scale."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0))
    out = pos.double().reshape(-1)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).float()


def sincos_pos_embed(num_frames: int, grid_h: int, grid_w: int, dim: int,
                     device: torch.device | None = None) -> torch.Tensor:
    """Fixed space-time embedding (F, T, D), T = grid_h * grid_w: 2D sin-cos over the grid plus 1D over frames.

    Computed from the sizes of each call (a few thousand sin/cos), so one model serves any frame count and
    resolution: positions extrapolate like the published sin-cos embeddings."""
    ys, xs = torch.meshgrid(torch.arange(grid_h, device=device), torch.arange(grid_w, device=device), indexing="ij")
    spatial = torch.cat([_sincos_1d(dim // 2, ys), _sincos_1d(dim // 2, xs)], dim=1)  # (T, D)
    temporal = _sincos_1d(dim, torch.arange(num_frames, device=device))  # (F, D)
    return spatial[None] + temporal[:, None]


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections.

    Self-attention when ``context`` is None; otherwise k and v come only from
    ``context`` (cross-attention), so they are constant across denoising steps.
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None):
        super().__init__()
        assert dim % num_heads == 0
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        ctx = dim if context_dim is None else context_dim
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(ctx, dim)
        self.v = nn.Linear(ctx, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if context is None else context
        n, s, d = x.shape
        sk = ctx.shape[1]
        q = self.q(x).reshape(n, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(ctx).reshape(n, sk, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v(ctx).reshape(n, sk, self.num_heads, self.head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).reshape(n, s, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, ratio: float):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VDTBlock(nn.Module):
    """Spatial attn -> temporal attn -> cross attn -> MLP, each adaLN-Zero gated."""

    def __init__(self, cfg: VDTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.spatial_attn = Attention(d, cfg.num_heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.temporal_attn = Attention(d, cfg.num_heads)
        self.norm3 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.cross_attn = Attention(d, cfg.num_heads)
        self.norm4 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(d, cfg.mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 12 * d))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, f, t, d = x.shape
        mods = self.adaLN_modulation(c)[:, None, None, :].chunk(12, dim=-1)
        (sh1, sc1, g1, sh2, sc2, g2, sh3, sc3, g3, sh4, sc4, g4) = mods

        h = modulate(self.norm1(x), sh1, sc1).reshape(b * f, t, d)
        x = x + g1 * self.spatial_attn(h).reshape(b, f, t, d)

        h = modulate(self.norm2(x), sh2, sc2).permute(0, 2, 1, 3).reshape(b * t, f, d)
        h = self.temporal_attn(h).reshape(b, t, f, d).permute(0, 2, 1, 3)
        x = x + g2 * h

        h = modulate(self.norm3(x), sh3, sc3).reshape(b, f * t, d)
        x = x + g3 * self.cross_attn(h, context).reshape(b, f, t, d)

        x = x + g4 * self.mlp(modulate(self.norm4(x), sh4, sc4))
        return x


def _unpatchify(x: torch.Tensor, p: int, gh: int, gw: int) -> torch.Tensor:
    """(B, F, gh*gw, p*p*C) token outputs -> (B, F, C, gh*p, gw*p) pixels."""
    b, f, _, n = x.shape
    ch = n // (p * p)
    x = x.reshape(b, f, gh, gw, p, p, ch).permute(0, 1, 6, 2, 4, 3, 5)
    return x.reshape(b, f, ch, gh * p, gw * p)


def grow_state_dict(model: "VDT", state: dict[str, torch.Tensor]) -> list[str]:
    """Load ``state``, trained for a config without patch overlap or conv head, into ``model`` so that it
    computes the same function: a smaller patch-embedding kernel goes to the centre of the larger one (zeros
    around), and the head's parameters keep their init (its conv starts at zero). Returns what was adapted."""
    own = model.state_dict()
    notes = []
    state = dict(state)
    w = state.get("patch_embed.weight")
    if w is not None and w.shape != own["patch_embed.weight"].shape:
        big = torch.zeros_like(own["patch_embed.weight"])
        o = (big.shape[-1] - w.shape[-1]) // 2
        big[..., o:o + w.shape[-2], o:o + w.shape[-1]] = w
        state["patch_embed.weight"] = big
        notes.append(f"patch_embed.weight {tuple(w.shape)} -> {tuple(big.shape)} (centred, zeros around)")
    missing = [k for k in own if k not in state]
    if any(not k.startswith("head_") for k in missing):
        raise KeyError(f"weights lack {[k for k in missing if not k.startswith('head_')]}")
    for k in missing:
        state[k] = own[k]
        notes.append(f"{k} kept at init")
    model.load_state_dict(state, strict=True)
    return notes


class VDT(nn.Module):
    """Video diffusion transformer predicting the noise epsilon."""

    def __init__(self, config: VDTConfig):
        super().__init__()
        self.config = cfg = config
        d, p = cfg.hidden_size, cfg.patch_size
        assert cfg.image_size % p == 0
        o = cfg.patch_overlap
        self.patch_embed = nn.Conv2d(cfg.in_channels, d, kernel_size=p + 2 * o, stride=p, padding=o)
        self.given_embed = nn.Parameter(torch.zeros(d))
        self.t_embedder = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.token_embed = nn.Embedding(cfg.vocab_size, d)
        self.token_pos = nn.Parameter(torch.zeros(cfg.cond_len, d))
        self.cond_norm = nn.LayerNorm(d, eps=1e-6)
        self.blocks = nn.ModuleList([VDTBlock(cfg) for _ in range(cfg.depth)])
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.final_linear = nn.Linear(d, p * p * cfg.in_channels)
        if cfg.head_channels:
            self.head_features = nn.Linear(d, p * p * cfg.head_channels)
            self.head_conv = nn.Conv2d(cfg.head_channels, cfg.in_channels, kernel_size=3, padding=1)
        if cfg.prediction not in ("v", "eps"):
            raise ValueError(f"prediction must be 'v' or 'eps', got {cfg.prediction!r}")
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.t_embedder[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder[2].weight, std=0.02)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.token_pos, std=0.02)
        nn.init.normal_(self.given_embed, std=0.02)
        # adaLN-Zero: every residual branch and the output start at zero.
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_modulation[-1].weight)
        nn.init.zeros_(self.final_modulation[-1].bias)
        nn.init.zeros_(self.final_linear.weight)
        nn.init.zeros_(self.final_linear.bias)
        if self.config.head_channels:
            nn.init.zeros_(self.head_conv.weight)
            nn.init.zeros_(self.head_conv.bias)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor, cond_mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states (B, F, C, H, W) in [-1, 1]-ish noise scale; timestep (B,) float on 0..1000;
        encoder_hidden_states (B, L) int64 token ids (0 = null); cond_mask (B, F), 1 = clean given frame.
        Returns predicted epsilon with the shape of hidden_states (for prediction="v" the network's
        v output is converted to epsilon here, outside every block)."""
        cfg = self.config
        b, f, ch, hgt, wid = hidden_states.shape
        p, d = cfg.patch_size, cfg.hidden_size
        if hgt % p or wid % p:
            raise ValueError(f"height and width must be multiples of the patch size {p}, got {hgt}x{wid}")
        gh, gw = hgt // p, wid // p

        x = self.patch_embed(hidden_states.reshape(b * f, ch, hgt, wid))  # (B*F, D, gh, gw)
        x = x.flatten(2).transpose(1, 2).reshape(b, f, gh * gw, d)
        x = x + sincos_pos_embed(f, gh, gw, d, device=x.device).to(x.dtype)
        if cond_mask is not None:
            x = x + cond_mask.to(x.dtype)[:, :, None, None] * self.given_embed

        c = self.t_embedder(timestep_embedding(timestep, cfg.freq_dim).to(x.dtype))
        context = self.cond_norm(self.token_embed(encoder_hidden_states) + self.token_pos)

        for blk in self.blocks:
            x = blk(x, c, context)

        shift, scale = self.final_modulation(c)[:, None, None, :].chunk(2, dim=-1)
        h = modulate(self.final_norm(x), shift, scale)
        out = _unpatchify(self.final_linear(h), p, gh, gw)  # (B, F, C, H, W)
        if cfg.head_channels:
            feats = _unpatchify(self.head_features(h), p, gh, gw).reshape(b * f, cfg.head_channels, hgt, wid)
            out = out + self.head_conv(feats).reshape(b, f, ch, hgt, wid)
        if cfg.prediction == "v":
            a, s = diffusion.alpha_bar_coefficients(timestep)
            out = a.to(out.dtype).reshape(b, 1, 1, 1, 1) * out + s.to(out.dtype).reshape(b, 1, 1, 1, 1) * hidden_states
        return out
