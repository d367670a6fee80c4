"""The TensorRT build plan, checked without a GPU: which ONNX files become engines and what weights they put
on the device.

The tiny VDT is exported under a PAB schedule with two phases (store, reuse) in both layouts. The
single-file layout (what TensorRT builds by default) must become one engine holding each weight once; the
per-phase layout one engine per phase, each holding the weights its phase reads. Weight bytes are
recomputed here from the ONNX files with their data loaded by ``onnx`` itself, and from the model's
parameters; the ONNX file TensorRT builds from runs in ONNX Runtime with the eager executor's outputs.
"""
from __future__ import annotations

from pathlib import Path

import pytest

import graphpass
from graphpass import ArtefactError
from graphpass.exporters import TensorRTConfig
from graphpass.exporters.manifest import read_manifest
from graphpass.exporters.tensorrt import engine_plan
from conftest import run_loop
from _exported import STEPS, shared_export

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


class Exports:
    """The tiny VDT's two layouts (exported once per test process, shared with the other export tests)."""

    def __init__(self):
        single, per_phase = shared_export("vdt", single_file=True), shared_export("vdt")
        self.case, self.kw, self.opt, self.eager = single.case, single.kw, single.opt, single.eager
        self.single, self.per_phase = single.folder, per_phase.folder
        self.param_bytes = sum(p.numel() * p.element_size() for p in self.case.model.parameters())


@pytest.fixture(scope="module")
def ex() -> Exports:
    return Exports()


def loaded_initializer_bytes(path: Path) -> int:
    """Bytes of every initializer of ``path`` (If branches included), with the weights loaded by onnx."""
    def walk(graph) -> int:
        n = sum(onnx.numpy_helper.to_array(t).nbytes for t in graph.initializer)
        for node in graph.node:
            for a in node.attribute:
                if a.HasField("g"):
                    n += walk(a.g)
        return n

    return walk(onnx.load(str(path)).graph)


def test_single_file_engine_holds_each_weight_once(ex):
    plan = engine_plan(ex.single, read_manifest(ex.single), TensorRTConfig())
    assert plan.layout == "single-file" and plan.phases == 2
    assert plan.engines == [("model.onnx", "model.engine")]
    weights = plan.device_weight_bytes("fp32")
    assert weights == loaded_initializer_bytes(ex.single / "model.onnx")
    assert ex.param_bytes <= weights <= 1.1 * ex.param_bytes  # every parameter once (plus small constants)
    assert plan.device_weight_bytes("fp16") == plan.device_weight_bytes("bf16") == weights // 2
    text = plan.describe("fp32")
    assert f"{weights / 2**20:.2f} MiB" in text and "1 engine(s) for 2 phase(s)" in text


def test_per_phase_engines_hold_the_weights_once_per_phase(ex):
    plan = engine_plan(ex.per_phase, read_manifest(ex.per_phase), TensorRTConfig(layout="per-phase"))
    assert plan.engines == [("phase_0.onnx", "phase_0.engine"), ("phase_1.onnx", "phase_1.engine")]
    per_engine = [loaded_initializer_bytes(ex.per_phase / f) for f, _ in plan.engines]
    assert plan.device_weight_bytes("fp32") == sum(per_engine)
    single = engine_plan(ex.single, read_manifest(ex.single), TensorRTConfig()).device_weight_bytes("fp32")
    # both phases read most weights: two engines hold them nearly twice, the single engine once
    assert plan.device_weight_bytes("fp32") >= 1.5 * single


def test_the_file_tensorrt_builds_from_has_an_if_per_reused_region_and_matches_eager(ex):
    m = read_manifest(ex.single)
    proto = onnx.load(str(ex.single / "model.onnx"))
    onnx.checker.check_model(proto)
    assert sum(n.op_type == "If" for n in proto.graph.node) == len(m["single_file"]["switch_regions"]) == 4
    model = graphpass.load(ex.single, threads=1)
    outs = run_loop(model, ex.kw, STEPS)
    assert max(float((a - b).abs().max()) for a, b in zip(outs, ex.eager)) <= 1e-4


def test_layout_mismatch_and_bad_layout_are_refused(ex, tmp_path):
    with pytest.raises(ArtefactError, match="per-phase.*single-file one"):
        engine_plan(ex.single, read_manifest(ex.single), TensorRTConfig(layout="per-phase"))
    with pytest.raises(ArtefactError, match="layout 'per-block'.*single-file, per-phase"):
        TensorRTConfig(layout="per-block")
    with pytest.raises(ArtefactError, match="single_file=True asks for one engine"):
        graphpass.export(ex.opt, tmp_path / "x", format="tensorrt", single_file=True,
                         tensorrt=TensorRTConfig(layout="per-phase"))
