"""Rewrites before ONNX export (graphpass/exporters/onnx_rewrites.py) and the check that every exported phase
reproduces its graph under ONNX Runtime (graphpass/exporters/verify.py).

Each rule is tested on a small module written here the way the model code that needs it is written: the
exported graph without the rule fails or computes something else under ONNX Runtime, with the rule it equals
eager PyTorch, and the ONNX op types that must appear or vanish do.

    cd <repo> && python -m pytest tests/exporters/test_onnx_rewrites.py -q
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import graphpass
from graphpass import PAB, ArtefactError
from graphpass.exporters import onnx_rewrites
from graphpass.exporters.onnx_export import to_onnx
from graphpass.exporters.onnx_rewrites import copy_graph_module, rewrite_for_onnx
from conftest import first, make_case, run_loop

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


class LinearAttentionNorm(torch.nn.Module):
    """SANA-Video's linear attention normaliser (transformer_sana_video.py: ``z = 1 / (k.sum @ q + 1e-15)``):
    a query row that ReLU zeroes gives a zero numerator and a 1e15 normaliser, whose product is 0."""

    def forward(self, q, k):
        q, k = torch.relu(q), torch.relu(k)
        z = 1 / (k.sum(dim=-1, keepdim=True).transpose(-2, -1) @ q + 1e-15)
        return (k @ k.transpose(-1, -2)) @ q * z


class BoolMaskFill(torch.nn.Module):
    """HunyuanVideo's text mask: ``attention_mask.masked_fill(mask_indices, False)`` on a boolean mask."""

    def forward(self, mask_len, lengths):
        mask = torch.arange(6).unsqueeze(0) >= mask_len.unsqueeze(1)
        return mask.masked_fill(torch.arange(6).unsqueeze(0) >= lengths.unsqueeze(1), False).float()


class SqueezeNotOne(torch.nn.Module):
    """Allegro/LTX-2: ``hidden_states.squeeze(1)`` where dim 1 holds the tokens (a no-op in PyTorch)."""

    def forward(self, x):
        return x.squeeze(1) * 2 + x.squeeze((0, 1))


def _graph(module, args):
    return copy_graph_module(torch.export.export(module, args).module())


def _ort(gm, args, rules=True):
    """(outputs under ONNX Runtime, op types of the ONNX graph) of ``gm`` exported with or without the rules."""
    if not rules:
        gm = copy_graph_module(gm)
    proto = to_onnx(gm, args, [f"in{i}" for i in range(len(args))], ["out"]) if rules else _no_rules(gm, args)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in sess.get_inputs()}
    feed = {f"in{i}": a.numpy() for i, a in enumerate(args) if f"in{i}" in wanted}
    return sess.run(None, feed), {n.op_type for n in proto.graph.node}


def _no_rules(gm, args):
    saved = onnx_rewrites.RULES
    onnx_rewrites.RULES = ()
    try:
        return to_onnx(gm, args, [f"in{i}" for i in range(len(args))], ["out"])
    finally:
        onnx_rewrites.RULES = saved


def test_tiny_constant_is_kept_and_the_output_is_finite():
    q = torch.randn(2, 4, 8)
    q[..., 3] = -1.0  # token 3: every query feature negative -> ReLU zeroes it
    args = (q, torch.randn(2, 4, 8))
    gm = _graph(LinearAttentionNorm(), args)
    want = LinearAttentionNorm()(*args)
    assert torch.isfinite(want).all() and float(want[..., 3].abs().max()) == 0.0
    (bad,), ops_without = _ort(gm, args, rules=False)
    assert np.isnan(bad[..., 3]).all()  # the exporter dropped "+ 1e-15": 0 * inf
    assert "Add" not in ops_without
    (got,), ops = _ort(gm, args)
    assert "Add" in ops
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)
    assert rewrite_for_onnx(gm)[1]["keep-tiny-constant"] == 1


def test_real_no_ops_and_ordinary_constants_are_left_alone():
    class M(torch.nn.Module):
        def forward(self, x):
            return (x + 1e-3) * 1.0 + 0.0

    gm = _graph(M(), (torch.randn(3),))
    assert rewrite_for_onnx(gm)[1]["keep-tiny-constant"] == 0


def test_boolean_where_runs_on_uint8():
    args = (torch.tensor([2, 5]), torch.tensor([4, 3]))
    gm = _graph(BoolMaskFill(), args)
    with pytest.raises(Exception, match="Where"):
        _ort(gm, args, rules=False)
    (got,), ops = _ort(gm, args)
    np.testing.assert_array_equal(got, BoolMaskFill()(*args).numpy())
    assert "Where" in ops and "Cast" in ops
    assert rewrite_for_onnx(gm)[1]["bool-where-as-uint8"] == 1


def test_squeeze_of_a_dimension_not_of_size_one_is_dropped():
    args = (torch.randn(1, 5, 3),)
    gm = _graph(SqueezeNotOne(), args)
    with pytest.raises(Exception, match="Squeeze"):
        _ort(gm, args, rules=False)
    (got,), ops = _ort(gm, args)
    np.testing.assert_allclose(got, SqueezeNotOne()(*args).numpy(), rtol=1e-6)
    # squeeze((0, 1)) keeps its size-1 dim 0: one Squeeze left, squeeze(1) gone
    gm2, fired = rewrite_for_onnx(gm)
    assert fired["drop-noop-squeeze"] == 2
    squeezes = [n for n in gm2.graph.nodes if "squeeze" in str(n.target)]
    assert [n.args[1] for n in squeezes] == [[0]]
    assert "Squeeze" in ops


def test_an_op_without_onnx_lowering_is_named_with_its_module(tmp_path):
    class Orthogonalize(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.qr(x)[0]

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.motion = Orthogonalize()

        def forward(self, x):
            return self.motion(x) * 2

    args = (torch.randn(4, 4),)
    gm = _graph(Outer(), args)
    with pytest.raises(ArtefactError, match=r"aten\.linalg_qr\.default has no ONNX lowering \(called in module "
                                            r"motion \(Orthogonalize\)\)"):
        to_onnx(gm, args, ["x"], ["out"])


# --- verification of an export ---------------------------------------------------------------------
class VDTWithLinearNorm(torch.nn.Module):
    """VDT-tiny followed by SANA's normaliser on its output, whose numerator is zero: eager adds exactly 0."""

    def __init__(self, vdt):
        super().__init__()
        self.vdt = vdt

    def forward(self, **kw):
        out = first(self.vdt(**kw))
        zero = torch.relu(-out.abs())
        z = 1 / (zero.sum(dim=-1, keepdim=True) + 1e-15)
        return (out + zero * z,)


STEPS = [741.0, 621.0]  # store, then reuse: two phases


@pytest.fixture(scope="module")
def norm_opt():
    case = make_case("vdt")
    model = VDTWithLinearNorm(case.model).eval()
    opt = graphpass.optimize(model, PAB(spatial=2, window=(100, 800)), example_kwargs=case.kwargs(), timesteps=STEPS)
    return opt, case


def test_export_refuses_a_phase_whose_onnx_output_is_nan(norm_opt, tmp_path, monkeypatch):
    opt, case = norm_opt
    monkeypatch.setattr(onnx_rewrites, "RULES", ())  # the exporter's own lowering: "+ 1e-15" dropped
    with pytest.raises(ArtefactError, match=r"phase 0 \(compute-all\) exported to ONNX does not reproduce its graph "
                                            r"under ONNX Runtime: output output\.0 has \d+ NaN/inf values where "
                                            r"eager has none \(first non-finite value made by Reciprocal"):
        # names the node; the first step alone is exported (one phase, computing all): the check stops at phase 0
        graphpass.export(opt, tmp_path / "out", example_kwargs=case.kwargs(), single_file=False, timesteps=STEPS[:1])
    assert not (tmp_path / "out").exists()  # nothing written


def test_verified_export_with_the_rules_matches_eager(norm_opt, tmp_path):
    opt, case = norm_opt
    folder = graphpass.export(opt, tmp_path / "out")  # verify=True on seeded inputs
    want = run_loop(opt, case.kwargs(), STEPS)
    got = run_loop(graphpass.load(folder, threads=1), case.kwargs(), STEPS)
    assert max(float((a - b).abs().max()) for a, b in zip(got, want)) <= 1e-4
    assert len(json.loads((folder / "manifest.json").read_text())["phases"]) == 2


def test_verify_false_writes_the_folder_anyway(norm_opt, tmp_path, monkeypatch):
    opt, case = norm_opt
    monkeypatch.setattr(onnx_rewrites, "RULES", ())
    folder = graphpass.export(opt, tmp_path / "out", verify=False, timesteps=STEPS[:1])  # one phase: the one run
    out = run_loop(graphpass.load(folder, threads=1), case.kwargs(), STEPS[:1])[0]
    assert torch.isnan(out).all()  # what the check guards against
