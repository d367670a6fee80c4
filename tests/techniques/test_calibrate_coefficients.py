"""Calibration of the per-model constants: MagCache ratios measured on graphpass's block span equal diffusers'
own MagCache calibration; TeaCache's fit reads the first block's modulated input found from the graph, which
equals the input diffusers' Wan block hands its self-attention (read by a forward hook), and its coefficients
are numpy's least-squares fit of those points; the command writes them."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from graphpass.cli import main
from graphpass.eval.coefficients import diffusers_mag_ratios, fit_teacache, magcache_ratios
from graphpass.eval.harness import Workload
from technique_loops import tiny

torch.set_num_threads(1)
STEPS = 8


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    model, _ = tiny("wan")
    path = tmp_path_factory.mktemp("wan") / "transformer"
    model.save_pretrained(path)
    return str(path)


def test_magcache_ratios_equal_diffusers_calibration(wan_folder):
    wl = Workload.from_name(wan_folder, num_steps=STEPS)
    ours = magcache_ratios(wl, seed=0)
    theirs = diffusers_mag_ratios(wl, seed=0)
    assert len(ours) == len(theirs) == STEPS and ours[0] == theirs[0] == 1.0
    assert np.allclose(ours, theirs, rtol=1e-5, atol=0)
    assert max(abs(r - 1) for r in ours) > 1e-3  # the ratios move: the comparison can fail


def test_teacache_fit_reads_the_modulated_input(wan_folder):
    wl = Workload.from_name(wan_folder, num_steps=STEPS)
    fit = fit_teacache(wl, seeds=[0, 1])
    # independent reference: the eager model, the input of block 0's self-attention (Wan's
    # norm1(h) * (1 + scale) + shift) and the model's output, at every call of the same runs
    seen, outs = [], []
    model = wl.model
    pre = model.blocks[0].attn1.register_forward_pre_hook(lambda m, args, kw: seen.append(
        (args[0] if args else kw["hidden_states"]).detach().clone()), with_kwargs=True)
    post = model.register_forward_hook(lambda m, args, out: outs.append(out[0].detach().clone()))
    try:
        xs, ys = [], []
        for seed in (0, 1):
            seen.clear(), outs.clear()
            wl.generate(model, seed)
            xs += [float((seen[s] - seen[s - 1]).abs().mean() / seen[s - 1].abs().mean()) for s in range(1, STEPS)]
            ys += [float((outs[s] - outs[s - 1]).abs().mean() / outs[s - 1].abs().mean()) for s in range(1, STEPS)]
    finally:
        pre.remove(), post.remove()
    assert np.allclose(fit.input_changes, xs, rtol=1e-4) and np.allclose(fit.output_changes, ys, rtol=1e-4)
    ref = np.polyfit(xs, ys, 4)
    assert np.allclose(np.poly1d(fit.coefficients)(xs), np.poly1d(ref)(xs), rtol=1e-3, atol=1e-6)
    assert len(fit.coefficients) == 5


def test_calibrate_command_writes_coefficients(wan_folder, tmp_path, capsys):
    out = tmp_path / "mag.json"
    assert main(["calibrate", "--method", "magcache", "--model", wan_folder, "--steps", str(STEPS), "--seeds", "0",
                 "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["method"] == "magcache" and len(d["mag_ratios"]) == STEPS and d["num_inference_steps"] == STEPS
    assert "wrote" in capsys.readouterr().out
    assert main(["calibrate", "--model", "vdt-tiny"]) == 1  # AdaCache without a target: the fix is named
    assert "--target-speedup" in capsys.readouterr().err


def test_a_fit_that_predicts_negative_changes_is_flagged():
    """TeaCache adds the prediction each call: a polynomial below zero inside its own fitted range would lower the
    accumulated distance and reuse without end."""
    from graphpass.eval.coefficients import TeaCacheFit

    xs = [0.01, 0.02, 0.05, 0.1]
    dips = TeaCacheFit([100.0, -10.0, 0.2], "p", 2, xs, [0.0] * 4)  # 100x^2 - 10x + 0.2 < 0 for 0.0276 < x < 0.0724
    assert 0.0276 < dips.negative_at() < 0.03
    assert TeaCacheFit([2.0, 0.001], "p", 1, xs, [0.0] * 4).negative_at() is None
    assert TeaCacheFit([2.0, -0.03], "p", 1, xs, [0.0] * 4).negative_at() == pytest.approx(0.01)  # below at once
