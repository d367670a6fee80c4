"""Three tagging rules that Mochi and SANA-WM need, each on a tiny hand-written model where the kind is plain
from the code (the zoo tests check the real models):

* attention run once per sample (``for i in range(B): sdpa(q[i:i+1], ...)``) is tagged from the batch its
  queries are sliced from: one sequence of all a sample's video tokens is ``joint``;
* a parameter-free attention core (a module that only computes ``softmax(q k^T) v`` on what its caller
  projected) gives its region to the module that projects the queries, unless that module is a block;
* a ``(B, 1, L, D)`` caption is text (an attention reading it is ``cross``), a ``(B, 1, N, 2)`` input that no
  projection reads (coordinates) is not.

    cd <repo> && python -m pytest tests/zoo/test_tagging_rules.py -q -n 0
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from graphpass.passes.capture import capture
from graphpass.passes.tag import input_roles, tag_attention

torch.set_num_threads(1)

B, C, FR, H, W, D, L = 2, 4, 3, 4, 4, 16, 5
TOKENS = FR * H * W


def _video() -> torch.Tensor:
    return torch.randn(B, C, FR, H, W, generator=torch.Generator().manual_seed(0))


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)  # (B, F*H*W, C)


class PerSampleAttention(nn.Module):
    """Self-attention over all of one sample's tokens, one SDPA call per sample (as Mochi's processor)."""

    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, h):
        q, k, v = (p(h).unflatten(2, (2, -1)).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v))
        outs = [F.scaled_dot_product_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1]) for i in range(h.shape[0])]
        return torch.cat(outs).transpose(1, 2).flatten(2)


class CoreAttention(nn.Module):
    """A parameter-free attention core, named like an attention module (as SANA-WM's SanaWMSoftmaxAttention):
    ``softmax(q k^T / sqrt(d)) v`` on (B, heads, N, d) operands."""

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


class ProjectingAttention(nn.Module):
    """Projects q/k/v, calls the core, projects back: the attention module (as SANA-WM's ``blocks.N.attn``)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj, self.core = nn.Linear(D, 3 * D), nn.Linear(D, D), CoreAttention()

    def forward(self, h):
        q, k, v = (t.unflatten(2, (2, -1)).transpose(1, 2) for t in self.qkv(h).chunk(3, dim=-1))
        return self.proj(self.core(q, k, v).transpose(1, 2).flatten(2))


class CaptionCross(nn.Module):
    """Cross-attention whose keys/values come from a caption shaped (B, 1, L, D)."""

    def __init__(self):
        super().__init__()
        self.to_q, self.to_kv = nn.Linear(D, D), nn.Linear(D, 2 * D)

    def forward(self, h, caption):
        q = self.to_q(h).unflatten(2, (2, -1)).transpose(1, 2)
        k, v = (t.unflatten(2, (2, -1)).transpose(1, 2) for t in self.to_kv(caption.squeeze(1)).chunk(2, dim=-1))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class CoreInBlock(nn.Module):
    """A block that projects q/k/v itself and calls a parameter-free core: the block is no attention module."""

    def __init__(self):
        super().__init__()
        self.qkv, self.core, self.mlp = nn.Linear(D, 3 * D), CoreAttention(), nn.Sequential(
            nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, h):
        q, k, v = (t.unflatten(2, (2, -1)).transpose(1, 2) for t in self.qkv(h).chunk(3, dim=-1))
        h = h + self.core(q, k, v).transpose(1, 2).flatten(2)
        return h + self.mlp(h)


class Block(nn.Module):
    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, h, caption=None):
        return h + (self.attn(h) if caption is None else self.attn(h, caption))


class Tiny(nn.Module):
    """Embed the video's tokens, run the blocks, project back."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.out = nn.Linear(C, D), nn.Linear(D, C)
        self.blocks = nn.ModuleList(blocks)

    def forward(self, hidden_states, caption=None):
        h = self.embed(_tokens(hidden_states))
        for block in self.blocks:
            h = block(h) if caption is None else block(h, caption)
        return self.out(h)


def _tags(model: nn.Module, **extra) -> dict[str, str]:
    regions = tag_attention(capture(model.eval(), {"hidden_states": _video(), **extra}), video_input="hidden_states")
    return {r.path: r.kind for r in regions if r.kind != "mlp"}


def test_per_sample_attention_is_joint():
    tags = _tags(Tiny([Block(PerSampleAttention())]))
    assert tags == {"blocks.0.attn": "joint"}


def test_a_parameter_free_core_is_tagged_at_the_module_projecting_its_queries():
    tags = _tags(Tiny([Block(ProjectingAttention())]))
    assert tags == {"blocks.0.attn": "joint"}


def test_a_core_called_by_its_block_keeps_its_own_region():
    tags = _tags(Tiny([CoreInBlock()]))
    assert tags == {"blocks.0.core": "joint"}


def test_a_caption_with_a_singleton_axis_is_text():
    caption = torch.randn(B, 1, L, D, generator=torch.Generator().manual_seed(1))
    tags = _tags(Tiny([Block(CaptionCross())]), caption=caption)
    assert tags == {"blocks.0.attn": "cross"}


class CaptionAndCoords(nn.Module):
    """A caption (B, 1, L, D) projected to keys/values, and positions (B, 1, N, 2) that only scale the queries
    through a sine table (as LTX-2's audio coordinates feed its rotary embedding)."""

    def __init__(self):
        super().__init__()
        self.embed, self.cross = nn.Linear(C, D), CaptionCross()

    def forward(self, hidden_states, caption, coords):
        h = self.embed(_tokens(hidden_states))
        h = h * torch.sin(coords.squeeze(1)).sum(-1, keepdim=True)
        return h + self.cross(h, caption)


def test_singleton_axis_inputs_are_text_only_when_projected():
    g = torch.Generator().manual_seed(2)
    kwargs = {"hidden_states": _video(), "caption": torch.randn(B, 1, L, D, generator=g),
              "coords": torch.randn(B, 1, TOKENS, 2, generator=g)}
    roles = input_roles(capture(CaptionAndCoords().eval(), kwargs), "hidden_states")
    assert roles.text == {"caption": (B, L, D)}
    assert roles.features == {"coords": (B, 1, TOKENS, 2)}
