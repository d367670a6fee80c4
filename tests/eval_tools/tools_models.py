"""Models of the evaluation-tool tests: one whose attention change per step is known in closed form, and
small workloads over the shared tiny models (tests/conftest.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from graphpass.eval.harness import Workload

#: Per kind, the coefficient c_k of the region output a_k(t) = 2 + c_k * ((t - 500) / 500) ** 3.
COEF = {"spatial": 0.5, "temporal": 0.3, "cross": 0.1}


def known_output(kind: str, t: float) -> float:
    """The value every element of a KnownModel region of ``kind`` outputs at timestep ``t``."""
    return 2.0 + COEF[kind] * ((t - 500.0) / 500.0) ** 3


class KnownAttention(nn.Module):
    """Attention whose every value is ``a`` (one number per video): the softmax weights sum to 1, so the
    output is exactly ``a`` whatever the queries and keys."""

    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)

    def forward(self, x, a, context=None):
        ctx = x if context is None else context
        n, s, d = x.shape
        sk = ctx.shape[1]
        h, dh = self.heads, d // self.heads
        q = self.q(x).reshape(n, s, h, dh).transpose(1, 2).double()
        k = self.k(ctx).reshape(n, sk, h, dh).transpose(1, 2).double()
        v = a.double().repeat_interleave(n // a.shape[0])[:, None, None, None].expand(n, h, sk, dh)
        o = F.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2).reshape(n, s, d)


class KnownModel(nn.Module):
    """A VDT-call-compatible model (hidden_states (B, F, C, H, W), timestep (B,), encoder_hidden_states int64
    ids (B, L), cond_mask (B, F)) with one spatial, one temporal and one cross attention whose outputs are
    ``known_output(kind, t)`` everywhere."""

    F, C, H, P, D, L = 3, 2, 4, 2, 8, 7  # L: the physics labels' length (VDT calling convention)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(self.C * self.P * self.P, self.D)
        self.text = nn.Embedding(11, self.D)
        self.spatial_attn = KnownAttention(self.D)
        self.temporal_attn = KnownAttention(self.D)
        self.cross_attn = KnownAttention(self.D)
        self.proj = nn.Linear(self.D, self.C * self.P * self.P)

    def forward(self, hidden_states, timestep, encoder_hidden_states, cond_mask):
        b, f, c, h, w = hidden_states.shape
        p, g = self.P, h // self.P
        t_ = g * g
        x = hidden_states.reshape(b, f, c, g, p, g, p).permute(0, 1, 3, 5, 2, 4, 6).reshape(b, f, t_, c * p * p)
        x = self.embed(x)
        d = x.shape[-1]
        u = ((timestep.double() - 500.0) / 500.0) ** 3
        s = self.spatial_attn(x.reshape(b * f, t_, d), 2.0 + COEF["spatial"] * u)
        tm = self.temporal_attn(x.transpose(1, 2).reshape(b * t_, f, d), 2.0 + COEF["temporal"] * u)
        cr = self.cross_attn(x.reshape(b, f * t_, d), 2.0 + COEF["cross"] * u, context=self.text(encoder_hidden_states))
        y = (s.reshape(b, f, t_, d) + tm.reshape(b, t_, f, d).transpose(1, 2) + cr.reshape(b, f, t_, d)).float()
        y = self.proj(x + 0.01 * y) * (1 + 0 * cond_mask[:, :, None, None])
        return y.reshape(b, f, g, g, c, p, p).permute(0, 1, 4, 2, 5, 3, 6).reshape(b, f, c, h, w)


def known_workload(num_steps: int = 10) -> Workload:
    m = KnownModel().eval()
    kw = dict(hidden_states=torch.randn(2, m.F, m.C, m.H, m.H), timestep=torch.full((2,), 981.0),
              encoder_hidden_states=torch.randint(1, 11, (2, m.L)), cond_mask=torch.zeros(2, m.F))
    return Workload("known", m, kw, num_steps)


def vdt_workload(num_steps: int = 8) -> Workload:
    """The shared perturbed vdt-tiny (every attention region matters) as a workload."""
    from conftest import make_case

    case = make_case("vdt")
    kw = case.kwargs()
    kw["timestep"] = torch.full((2,), 981.0)
    return Workload("vdt-tiny-perturbed", case.model, kw, num_steps)
