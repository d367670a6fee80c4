"""Models that read tensor values (``if mask.all():``, ``.item()``, ``x[:, :n]`` with a tensor ``n``).

Export cannot trace a branch on a value it does not know. graphpass runs the example call once, records each
value read with its source line and module, exports the branch the example took, and checks on every call
that the call's values are the same (a small graph computes them from the inputs): another value is an
InputError that names the line, the module and both values, never a silently wrong branch.
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
from conftest import first, run_loop
from capture_helpers import (HUNYUAN15_MODULES, STEPS_20, check_never_reusing, check_pab_reference, framepack,
                             hunyuan15, mochi)


class Gate(nn.Module):
    def forward(self, x, mask):
        if mask.all():  # a branch on a value
            return x * 2
        return x * 3


class Crop(nn.Module):
    def forward(self, x, lengths):
        out = torch.zeros_like(x)
        n = lengths.sum()
        out[:, : n] = x[:, : n]  # a slice bound read from a tensor
        return out + float(lengths.max())


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.crop = Gate(), Crop()

    def forward(self, hidden_states, mask, lengths):
        return self.crop(self.gate(hidden_states, mask), lengths)


def _kw(mask_all=True, lengths=(1, 2)):
    return dict(hidden_states=torch.arange(24.0).reshape(2, 3, 4), mask=torch.tensor([True, mask_all]),
                lengths=torch.tensor(lengths))


def test_values_read_are_fixed_and_checked():
    model = Model()
    cap = capture(model, _kw())
    assert [(c.value, c.module, c.where.split(" ", 1)[1]) for c in cap.value_checks] == [
        (True, "gate", "if mask.all():  # a branch on a value"),
        (3, "crop", "out[:, : n] = x[:, : n]  # a slice bound read from a tensor"),
        (3, "crop", "out[:, : n] = x[:, : n]  # a slice bound read from a tensor"),
        (2, "crop", "return out + float(lengths.max())")]
    kw = dict(_kw(), hidden_states=torch.randn(2, 3, 4))  # same values read, other data
    assert torch.equal(cap.unflatten_outputs(cap.gm(*cap.flatten_call(kw))), model(**kw))
    with pytest.raises(InputError, match=r"test_value_reads.py:\d+ if mask.all\(\):.*in module 'gate'\) to True.*"
                                         r"this call gives False"):
        cap.flatten_call(_kw(mask_all=False))
    with pytest.raises(InputError, match=r"out\[:, : n\].*in module 'crop'\) to 3.*this call gives 2"):
        cap.flatten_call(_kw(lengths=(1, 1)))


def test_branch_on_a_value_dependent_size_is_named():
    class Count(nn.Module):
        def forward(self, x):
            n = torch.nonzero(x > 0).shape[0]
            return x * 2 if n > 3 else x

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.count = Count()

        def forward(self, hidden_states):
            return self.count(hidden_states)

    with pytest.raises(CaptureError, match=r"in module 'count' at test_value_reads.py:\d+ `return x \* 2 if n > 3 "
                                           r"else x` \(a branch on a tensor's value"):
        capture(Outer(), dict(hidden_states=torch.randn(2, 3, 4)))


@functools.lru_cache(maxsize=None)
def _hunyuan15_never_reusing() -> graphpass.OptimizedModel:
    """HunyuanVideo 1.5 through :func:`check_never_reusing`, once per module: the PAB comparison builds on its
    capture (the tests below call it only at the captured branch or sizes it checks)."""
    return check_never_reusing(hunyuan15(), PAB(joint=2, window=(2000, 3000)))


def test_hunyuan15_t2v_branch():
    case = hunyuan15()
    opt = _hunyuan15_never_reusing()
    assert [(c.value, c.where.split(" ", 1)[1]) for c in opt.captured.value_checks] == [(True, "if is_t2v:")]
    with pytest.raises(InputError, match=r"transformer_hunyuan_video15.py:\d+ if is_t2v:.*to True.*gives False"):
        opt(**case.kwargs(t2v=False))
    # Another text mask changes value-dependent sizes only: it runs and equals eager.
    kw = case.kwargs()
    kw["encoder_attention_mask"] = torch.ones(2, 5, dtype=torch.int64)
    kw["timestep"] = torch.full((2,), 999.0)
    assert torch.equal(first(opt(**kw)), first(case.build()(**kw)))


def test_hunyuan15_pab_matches_reference():
    check_pab_reference(hunyuan15(), HUNYUAN15_MODULES, PAB(joint=2, window=(100, 800)), on=_hunyuan15_never_reusing())


def test_mochi_value_dependent_sizes_run_any_mask():
    case = mochi()
    model = case.build()
    # Mochi loops over the samples (the batch is fixed) and attends each sample's own prompt tokens: the query
    # batch is 1, so the structure does not tell the kind; attn1 is MMDiT joint attention over video + text.
    opt = graphpass.optimize(model, PAB(joint=2, window=(2000, 3000)), example_kwargs=case.kwargs(),
                             kinds={"transformer_blocks.*.attn1": "joint"})
    assert opt.captured.value_checks == []
    for valid in [(5, 3), (2, 4)]:
        kw = case.kwargs(valid)
        for g, e in zip(run_loop(opt, kw, STEPS_20[:3]), run_loop(model, kw, STEPS_20[:3])):
            assert torch.equal(g, e)


def test_framepack_tensor_slice_bounds():
    case = framepack()
    model = case.build()
    opt = graphpass.optimize(model, PAB(joint=2, window=(2000, 3000)), example_kwargs=case.kwargs())
    assert [c.value for c in opt.captured.value_checks] == [77, 75]  # video + 5 and + 3 text tokens
    kw = case.kwargs()
    assert torch.equal(first(opt(**kw)), first(model(**kw)))
    with pytest.raises(InputError, match=r"attention_mask\[i, : effective_sequence_length\[i\]\] = True.* to 75.*"
                                         r"gives 77"):
        opt(**case.kwargs(valid=(5, 5)))
