"""TensorRT engines against eager (with a GPU and the tensorrt package; the error path without them is in
test_onnx_export.py, which has an exported folder at hand) and the ``graphpass export`` command: it writes a
folder that loads and matches eager, and replaces it only with ``--overwrite``."""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import graphpass
from graphpass import PAB, ArtefactError
from graphpass.cli import main
from graphpass.exporters import TensorRTConfig
from graphpass.workloads import example_call
from conftest import make_case, run_loop

STEPS = [741.0 - 120 * i for i in range(6)]  # inside the window: phases "store 2", "reuse 2"
SCHEDULE = PAB(spatial=2, window=(100, 800))


def has_tensorrt() -> bool:
    """The tensorrt package and a CUDA GPU are both present."""
    return importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


def test_tensorrt_options_are_checked():
    with pytest.raises(ArtefactError, match="precision 'int4'"):
        TensorRTConfig(precision="int4")


@pytest.mark.skipif(not has_tensorrt(), reason="needs an NVIDIA GPU and the tensorrt package")
@pytest.mark.parametrize("strip", [True, False])
def test_tensorrt_engines_match_eager(tmp_path, strip):
    case = make_case("vdt")
    model = case.model.cuda()
    kw = {k: v.cuda() for k, v in case.kwargs().items()}
    opt = graphpass.optimize(model, SCHEDULE, example_kwargs=kw, timesteps=STEPS)
    eager = run_loop(opt, kw, STEPS)
    graphpass.export(opt, tmp_path / "trt", format="tensorrt", tensorrt=TensorRTConfig(strip_weights=strip))
    loaded = graphpass.load(tmp_path / "trt")
    assert loaded.backend == "tensorrt"
    outs = run_loop(loaded, kw, STEPS)
    assert max(float((a - b).abs().max()) for a, b in zip(outs, eager)) <= 1e-3


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_export_command_writes_a_loadable_folder_and_replaces_it_only_with_overwrite(tmp_path, capsys):
    out = tmp_path / "cli"
    window = [0, 1]  # 2 DDIM steps (501, 1), none inside: one phase keeps the export short
    argv = ["export", "--model", "vdt-tiny", "--schedule", json.dumps({"type": "PAB", "spatial": 2, "window": window}),
            "--steps", "2", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert [e["label"] for e in m["phases"]] == ["compute-all"] and m["plan"]["phase_ids"] == [0, 0]
    assert "1 phase)" in text and "weights stored once" in text
    assert m["inputs"][0]["shape"][0] == 2  # batch 2: one video with batched CFG
    model, kw, ts = example_call("vdt-tiny", batch=2, num_steps=2)
    assert m["plan"]["timesteps"] == ts
    outs = run_loop(graphpass.load(out, threads=1), kw, ts)
    eager = run_loop(model, kw, ts)
    assert max(float((a - b).abs().max()) for a, b in zip(outs, eager)) <= 1e-4
    # the same command again is refused, leaving the export as it was; with --overwrite it is replaced
    before = digest(out)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "already holds a graphpass export; pass overwrite=True (--overwrite)" in err and "Traceback" not in err
    assert digest(out) == before
    assert main([*argv[:-4], "--steps", "3", "--out", str(out), "--overwrite"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert len(m["plan"]["timesteps"]) == 3  # the new export, complete, in place of the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli"]  # no staging folder left behind


def test_export_command_reports_errors(tmp_path, capsys):
    assert main(["export", "--model", "vdt-huge", "--out", str(tmp_path / "x")]) == 1
    assert "unknown model 'vdt-huge'" in capsys.readouterr().err
