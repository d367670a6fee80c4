"""Tuples, lists and dicts of tensors as arguments: flattened as pytrees, one graph input per tensor leaf.

CogVideoX with rotary embeddings takes ``image_rotary_emb=(cos, sin)``; the capture's inputs are
``image_rotary_emb.0`` and ``image_rotary_emb.1``. Constant leaves (None, ints) are bound like top-level
constants. A call with another structure or other constant leaves gets an InputError naming the argument.
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import graphpass
from graphpass import PAB
from graphpass.errors import CaptureError, InputError
from graphpass.passes.capture import capture
from capture_helpers import COGVIDEOX_MODULES, check_never_reusing, check_pab_reference, cogvideox_rope


class Mixer(nn.Module):
    """Reads a list of features, a dict with a tensor, a None and an int, and a plain tensor."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x, feats, opts):
        y = self.proj(x) * opts["scale"][:, None] + sum(f.mean() for f in feats)
        if opts["shift"] is not None:
            y = y + opts["shift"]
        return y * opts["repeat"]


def _mixer_kwargs(n_feats=2, **opts):
    g = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(3, 4, generator=g), feats=[torch.randn(5, generator=g) for _ in range(n_feats)],
                opts={"scale": torch.rand(3, generator=g), "shift": None, "repeat": 2, **opts})


def test_leaves_are_named_inputs_and_outputs_equal_eager():
    torch.manual_seed(0)
    model = Mixer().eval()
    cap = capture(model, _mixer_kwargs())
    assert cap.input_names == ["x", "feats.0", "feats.1", "opts.scale"]
    assert [n.name for n in cap.gm.graph.nodes if n.op == "placeholder"] == ["x", "feats_0", "feats_1", "opts_scale"]
    kw = _mixer_kwargs()
    kw["x"] = kw["x"] + 1  # new values, same structure
    got = cap.unflatten_outputs(cap.gm(*cap.flatten_call(kw)))
    assert torch.equal(got, model(**kw))


def test_changed_structure_or_constant_leaf_is_named():
    torch.manual_seed(0)
    cap = capture(Mixer().eval(), _mixer_kwargs())
    with pytest.raises(InputError, match=r"argument 'feats' is list\(tensor\[5\], tensor\[5\], tensor\[5\]\) but "
                                         r"was captured as list\(tensor\[5\], tensor\[5\]\): the structure differs"):
        cap.flatten_call(_mixer_kwargs(n_feats=3))
    with pytest.raises(InputError, match=r"argument 'opts' is dict\(scale=tensor\[3\], shift=None, repeat=3\).*"
                                         r"leaf 2 differs"):
        cap.flatten_call(_mixer_kwargs(repeat=3))
    with pytest.raises(InputError, match=r"argument 'feats' is tuple.*captured as list"):
        cap.flatten_call(dict(_mixer_kwargs(), feats=tuple(_mixer_kwargs()["feats"])))
    with pytest.raises(InputError, match=r"missing argument 'opts'"):
        cap.flatten_call({k: v for k, v in _mixer_kwargs().items() if k != "opts"})


def test_unsupported_leaf_is_named():
    with pytest.raises(CaptureError, match=r"'opts' holds a object at 'opts.repeat'"):
        capture(Mixer().eval(), _mixer_kwargs(repeat=object()))


@functools.lru_cache(maxsize=None)
def _rope_never_reusing() -> graphpass.OptimizedModel:
    """CogVideoX with rotary embeddings through :func:`check_never_reusing`, once per module: the PAB
    comparison builds on its capture."""
    return check_never_reusing(cogvideox_rope(), PAB(joint=2, mlp=3, window=(2000, 3000)))


def test_cogvideox_rope_tuple_never_reusing_equals_eager():
    opt = _rope_never_reusing()
    assert opt.captured.input_names[-2:] == ["image_rotary_emb.0", "image_rotary_emb.1"]


def test_cogvideox_rope_pab_matches_reference():
    check_pab_reference(cogvideox_rope(), COGVIDEOX_MODULES, PAB(joint=2, mlp=3, window=(100, 800)),
                        on=_rope_never_reusing())
