"""A tiny video DiT whose attention is written by hand with matrix products: no
``scaled_dot_product_attention`` anywhere, so graphpass must find every attention from ops and data flow.

Layout: video ``(B, C=4, F=3, H=8, W=8)`` patched 2x2 into 16 tokens per frame (48 in all), width 16,
2 heads of 8; text ``(B, 5, 16)``. Modules and the kinds their code gives them:

* ``refiner``                 softmax self-attention over the 5 text tokens only          -> text
* ``blocks.i.spatial_attn``   softmax(Q K^T) V with 4-D matmuls, batch B*F, 16 tokens      -> spatial
* ``blocks.i.temporal_attn``  softmax attention with bmm on (B*16*heads, F, d)             -> temporal
* ``blocks.i.cross_attn``     softmax attention, keys/values from the refined text         -> cross
* ``blocks.i.linear_attn``    linear attention over all 48 tokens: relu feature map,
                              K^T V summed over tokens, then Q (K^T V) / (Q . sum K)       -> joint
* ``blocks.i.mlp``            expand 16 -> 64 -> 16                                        -> mlp

    >>> model = HandAttentionDiT().eval()
    >>> model(**hand_kwargs()).shape
    torch.Size([2, 4, 3, 8, 8])
"""
from __future__ import annotations

import torch
from torch import nn

WIDTH, HEADS, PATCH = 16, 2, 2


def _heads(x: torch.Tensor) -> torch.Tensor:
    """(N, L, WIDTH) -> (N, HEADS, L, d)"""
    return x.unflatten(-1, (HEADS, -1)).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(N, HEADS, L, d) -> (N, L, WIDTH)"""
    return x.transpose(1, 2).flatten(2)


class MatmulAttention(nn.Module):
    """softmax(Q K^T / sqrt(d)) V with 4-D matmuls; keys/values from ``context`` when given."""

    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(WIDTH, WIDTH) for _ in range(4))

    def forward(self, x, context=None):
        ctx = x if context is None else context
        q, k, v = _heads(self.to_q(x)), _heads(self.to_k(ctx)), _heads(self.to_v(ctx))
        scores = torch.matmul(q, k.transpose(-1, -2)) / (q.shape[-1] ** 0.5)
        return self.to_out(_merge(torch.matmul(scores.softmax(dim=-1), v)))


class BmmAttention(nn.Module):
    """The same softmax attention on (N * heads, L, d) tensors with bmm, as older code writes it."""

    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(WIDTH, WIDTH) for _ in range(4))

    def forward(self, x):
        n, length, _ = x.shape
        q, k, v = (_heads(f(x)).reshape(n * HEADS, length, -1) for f in (self.to_q, self.to_k, self.to_v))
        attn = torch.softmax(torch.bmm(q, k.transpose(1, 2)) * (q.shape[-1] ** -0.5), dim=-1)
        return self.to_out(_merge(torch.bmm(attn, v).reshape(n, HEADS, length, -1)))


class LinearAttention(nn.Module):
    """Linear attention (Katharopoulos et al.): phi = relu, out_i = phi(q_i) sum_j phi(k_j)^T v_j /
    (phi(q_i) . sum_j phi(k_j)); the token sum K^T V is formed first, so cost is linear in tokens."""

    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(WIDTH, WIDTH) for _ in range(4))

    def forward(self, x):
        q, k, v = torch.relu(_heads(self.to_q(x))), torch.relu(_heads(self.to_k(x))), _heads(self.to_v(x))
        kv = torch.matmul(k.transpose(-1, -2), v)  # (N, heads, d, d): sum over tokens
        norm = torch.matmul(q, k.sum(dim=-2, keepdim=True).transpose(-1, -2)) + 1e-6  # (N, heads, L, 1)
        return self.to_out(_merge(torch.matmul(q, kv) / norm))


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class HandBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.spatial_attn, self.temporal_attn = MatmulAttention(), BmmAttention()
        self.cross_attn, self.linear_attn, self.mlp = MatmulAttention(), LinearAttention(), Mlp()

    def forward(self, x, text, frames, scale):
        b, n, c = x.shape  # n = frames * tokens per frame
        per_frame = n // frames
        s = x.reshape(b * frames, per_frame, c)
        x = x + scale * self.spatial_attn(s).reshape(b, n, c)
        t = x.reshape(b, frames, per_frame, c).transpose(1, 2).reshape(b * per_frame, frames, c)
        x = x + scale * self.temporal_attn(t).reshape(b, per_frame, frames, c).transpose(1, 2).reshape(b, n, c)
        x = x + self.cross_attn(x, text)
        x = x + scale * self.linear_attn(x)
        return x + self.mlp(x)


class HandAttentionDiT(nn.Module):
    def __init__(self, channels: int = 4, depth: int = 2):
        super().__init__()
        self.patch = nn.Linear(channels * PATCH * PATCH, WIDTH)
        self.text_proj = nn.Linear(16, WIDTH)
        self.refiner = MatmulAttention()
        self.blocks = nn.ModuleList(HandBlock() for _ in range(depth))
        self.out = nn.Linear(WIDTH, channels * PATCH * PATCH)

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        b, c, f, h, w = hidden_states.shape
        x = hidden_states.reshape(b, c, f, h // PATCH, PATCH, w // PATCH, PATCH)
        x = x.permute(0, 2, 3, 5, 1, 4, 6).reshape(b, f * (h // PATCH) * (w // PATCH), c * PATCH * PATCH)
        x = self.patch(x)
        scale = (1 + timestep / 1000).reshape(b, 1, 1)  # the timestep modulates every self-attention
        text = self.text_proj(encoder_hidden_states)
        text = text + self.refiner(text)
        for block in self.blocks:
            x = block(x, text, f, scale)
        x = self.out(x).reshape(b, f, h // PATCH, w // PATCH, c, PATCH, PATCH)
        return x.permute(0, 4, 1, 2, 5, 3, 6).reshape(b, c, f, h, w)


#: module path -> (kind, reason), read from the code above.
HAND_KINDS = {"refiner": ("text", "self-attention over the 5 projected text tokens; no video token")}
for _i in range(2):
    HAND_KINDS |= {
        f"blocks.{_i}.spatial_attn": ("spatial", "batch B*F, sequence = the 16 tokens of one frame"),
        f"blocks.{_i}.temporal_attn": ("temporal", "batch B*16 (x heads in the bmm), sequence = the 3 frames"),
        f"blocks.{_i}.cross_attn": ("cross", "queries video tokens, keys/values the 5 text tokens"),
        f"blocks.{_i}.linear_attn": ("joint", "one sequence of all 48 video tokens per sample"),
        f"blocks.{_i}.mlp": ("mlp", "fc1 16 -> 64, fc2 64 -> 16"),
    }


def build_hand(seed: int = 0) -> HandAttentionDiT:
    torch.manual_seed(seed)
    return HandAttentionDiT().eval()


def hand_kwargs() -> dict:
    g = torch.Generator().manual_seed(2)
    return dict(hidden_states=torch.randn(2, 4, 3, 8, 8, generator=g), timestep=torch.full((2,), 500.0),
                encoder_hidden_states=torch.randn(2, 5, 16, generator=g))
