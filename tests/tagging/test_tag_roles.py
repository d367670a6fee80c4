"""Input roles (video, streams, text, features) and the kinds they give, on a tiny model with a reference
image next to the video: attention over the reference's tokens holds no video token."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graphpass.passes.capture import capture
from graphpass.passes.tag import input_roles, tag_attention


class RefAttention(nn.Module):
    """SDPA with 2 heads of 8; keys/values from ``context`` when given."""

    def __init__(self):
        super().__init__()
        self.to_q, self.to_kv = nn.Linear(16, 16), nn.Linear(16, 32)

    def forward(self, x, context=None):
        k, v = self.to_kv(x if context is None else context).chunk(2, dim=-1)
        heads = [t.unflatten(-1, (2, 8)).transpose(1, 2) for t in (self.to_q(x), k, v)]
        return F.scaled_dot_product_attention(*heads).transpose(1, 2).flatten(2)


class ReferenceDiT(nn.Module):
    """video (B, 4, 3, 8, 8) -> 48 tokens; reference image (B, 4, 8, 8) -> 16 tokens.

    * ``ref_attn``    self-attention of the reference tokens            -> other (features only)
    * ``video_attn``  self-attention of all 48 video tokens             -> joint
    * ``ref_cross``   video queries, reference keys/values              -> other (keys of features)
    * ``text_cross``  video queries, text keys/values                   -> cross
    """

    def __init__(self):
        super().__init__()
        self.patch, self.ref_patch, self.text_proj = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.ref_attn, self.video_attn, self.ref_cross, self.text_cross = (RefAttention() for _ in range(4))
        self.out = nn.Linear(16, 16)

    def forward(self, hidden_states, timestep, reference, encoder_hidden_states):
        b = hidden_states.shape[0]
        x = self.patch(hidden_states.reshape(b, 4, 3, 4, 2, 4, 2).permute(0, 2, 3, 5, 1, 4, 6).reshape(b, 48, 16))
        r = self.ref_patch(reference.reshape(b, 4, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, 16, 16))
        r = r + self.ref_attn(r)
        x = x * (1 + timestep / 1000).reshape(b, 1, 1)
        x = x + self.video_attn(x)
        x = x + self.ref_cross(x, r)
        x = x + self.text_cross(x, self.text_proj(encoder_hidden_states))
        x = self.out(x).reshape(b, 3, 4, 4, 4, 2, 2)
        return x.permute(0, 4, 1, 2, 5, 3, 6).reshape(b, 4, 3, 8, 8)


@pytest.fixture(scope="module")
def cap():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    kw = dict(hidden_states=torch.randn(2, 4, 3, 8, 8, generator=g), timestep=torch.full((2,), 500.0),
              reference=torch.randn(2, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(2, 5, 16, generator=g))
    return capture(ReferenceDiT().eval(), kw)


def test_roles_from_shapes(cap):
    roles = input_roles(cap, "hidden_states")
    assert roles.streams == {} and list(roles.text) == ["encoder_hidden_states"]
    assert list(roles.features) == ["reference"]  # rank 4, not shaped like the output
    assert roles.role("timestep") is None


def test_reference_attention_is_other(cap):
    kinds = {r.path: r.kind for r in tag_attention(cap)}
    assert kinds == {"ref_attn": "other", "video_attn": "joint", "ref_cross": "other", "text_cross": "cross"}


class FoldedAttention(nn.Module):
    """bmm attention on queries reshaped straight from (B*G, L, heads*d) to (B*G*heads, L, d): no 4-D tensor
    shows the heads, so the query's batch cannot be split into groups and heads."""

    def __init__(self):
        super().__init__()
        self.to_qkv = nn.Linear(16, 48)

    def forward(self, x):
        n, length, _ = x.shape
        q, k, v = (t.reshape(n * 2, length, 8) for t in self.to_qkv(x).chunk(3, dim=-1))
        return torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1), v).reshape(n, length, 16)


class FoldedDiT(nn.Module):
    """Spatial attention (batch B*F, 16 tokens) over a (B, 4, 3, 8, 8) video, with folded heads."""

    def __init__(self):
        super().__init__()
        self.patch, self.spatial_attn = nn.Linear(16, 16), FoldedAttention()

    def forward(self, hidden_states, timestep):
        b = hidden_states.shape[0]
        x = self.patch(hidden_states.reshape(b, 4, 3, 4, 2, 4, 2).permute(0, 2, 3, 5, 1, 4, 6).reshape(b * 3, 16, 16))
        x = x + self.spatial_attn(x) * (1 + timestep[0] / 1000)
        return x.reshape(b, 3, 4, 4, 4, 2, 2).permute(0, 4, 1, 2, 5, 3, 6).reshape(b, 4, 3, 8, 8)


def test_folded_heads_defer_to_the_module_name():
    torch.manual_seed(0)
    cap = capture(FoldedDiT().eval(), dict(hidden_states=torch.randn(2, 4, 3, 8, 8), timestep=torch.full((2,), 500.0)))
    (region,) = tag_attention(cap)
    # the bmm query is (2*3*2, 16, 8): 6 sequences per sample are frames x heads, not frames; the name decides
    assert region.kind == "spatial" and region.reason.startswith("by name") and "folds the heads" in region.reason
