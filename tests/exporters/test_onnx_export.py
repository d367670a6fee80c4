"""ONNX export per phase (and single-file) run in ONNX Runtime against graphpass's eager executor.

Every case exports a tiny model under a PAB schedule whose 6-step plan, inside the reuse window, has two
distinct phases (compute and store; reuse: an ONNX export costs seconds per phase), loads the folder with
:func:`graphpass.load` and runs the same sampling-like loop as the eager :class:`~graphpass.OptimizedModel`
with the same plan: each step's output must match within 1e-4.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

import graphpass
from graphpass import ArtefactError, InputError
from graphpass.errors import GraphpassError
from graphpass.exporters import onnx_export
from graphpass.exporters.cond import build_switch_graph
from graphpass.exporters.manifest import cache_tensor_name, manifest_digest, render_manifest
from conftest import make_case, run_loop
from _exported import ATOL, SCHEDULE, STEPS, Exported, max_diff, shared_export

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

@pytest.fixture(scope="module")
def vdt() -> Exported:
    return shared_export("vdt")


@pytest.fixture(scope="module")
def vdt_single() -> Exported:
    return shared_export("vdt", single_file=True)


def copy_of(ex: Exported, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(ex.folder, dst)
    return dst


def edit_manifest(folder: Path, edit, reseal: bool = True) -> None:
    """Apply ``edit(manifest)`` to ``folder``'s manifest; ``reseal`` also updates its own sha256, as someone
    editing it on purpose would, so that the checks behind the digest are reached."""
    m = json.loads((folder / "manifest.json").read_text())
    edit(m)
    if reseal:
        m["manifest_sha256"] = manifest_digest(m)
    (folder / "manifest.json").write_text(render_manifest(m))


# --- per-phase export ------------------------------------------------------------------------------
def test_vdt_per_phase_onnxruntime_matches_eager(vdt):
    plan = vdt.opt.current_plan
    assert [ph.label() for ph in plan.distinct()] == ["store 4", "reuse 4"]
    model = graphpass.load(vdt.folder, threads=1)
    outs = run_loop(model, vdt.kw, STEPS)
    assert max_diff(outs, vdt.eager) <= ATOL
    # the exported phases ran as often as the plan says, with the same cache bookkeeping as eager
    assert {s.id: model.phase_calls.get(s.phase, 0) for s in model.specs} == dict(Counter(
        vdt.manifest["plan"]["phase_ids"]))
    assert model.cache_nbytes == vdt.opt.cache_nbytes
    assert model.state().cache.peak_nbytes == vdt.opt.state().cache.peak_nbytes > 0
    # a second generation (timestep back up) starts over with an empty cache and gives the same outputs
    assert max_diff(run_loop(model, vdt.kw, STEPS), vdt.eager) <= ATOL


def test_phase_files_have_named_cache_inputs_and_outputs(vdt):
    files = sorted(p.name for p in vdt.folder.glob("*.onnx"))
    assert files == [f"phase_{i}.onnx" for i in range(2)]
    store = reuse = None
    for entry, ph in zip(vdt.manifest["phases"], vdt.opt.current_plan.distinct()):
        m = onnx.load(str(vdt.folder / entry["file"]), load_external_data=False)
        ins = [i.name for i in m.graph.input]
        outs = [o.name for o in m.graph.output]
        pg = vdt.opt.phase_graph(ph)
        assert [n for n in ins if n.startswith("cache.")] == [cache_tensor_name(k) for k in pg.cache_inputs]
        assert outs == ["output.0"] + [cache_tensor_name(k) for k in pg.cache_outputs]
        assert entry["cache_inputs"] == pg.cache_inputs and entry["cache_outputs"] == pg.cache_outputs
        if pg.cache_outputs:
            store = (m, pg)
        if pg.cache_inputs:
            reuse = (m, pg)
    assert store and reuse
    assert "cache.blocks.0.spatial_attn.0" in [o.name for o in store[0].graph.output]
    assert "cache.blocks.0.spatial_attn.0" in [i.name for i in reuse[0].graph.input]
    # the reuse phase's file has no attention of the reused regions: of 2 blocks x 3, the 2 temporal remain
    ops = Counter(n.op_type for n in reuse[0].graph.node)
    full = Counter(n.op_type for n in store[0].graph.node)
    assert ops["Softmax"] == full["Softmax"] - 4 == 2


def test_weights_are_stored_once_for_all_phases(vdt):
    w = vdt.manifest["weights"]
    assert (vdt.folder / "weights.bin").stat().st_size >= w["stored_bytes"]
    params = sum(p.numel() * p.element_size() for p in vdt.case.model.parameters() if p.numel() * 4 >= 1024)
    assert w["stored_bytes"] <= params * 1.5  # each weight once (plus a few folded constants)
    assert w["referenced_bytes"] >= 1.5 * w["stored_bytes"]  # both phases read most of them, from one copy
    where: dict[str, set] = {}  # initializer name -> (offset, length) in weights.bin, over all phase files
    for entry in vdt.manifest["phases"]:
        m = onnx.load(str(vdt.folder / entry["file"]), load_external_data=False)
        for t in m.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                ext = {e.key: e.value for e in t.external_data}
                assert ext["location"] == "weights.bin"
                where.setdefault(t.name, set()).add((int(ext["offset"]), int(ext["length"])))
    # a parameter read by both phases points at the same bytes (folded constants get per-file names such as
    # "val_12", so only the model's own names are compared)
    params = [n for n in where if n.startswith("model.")]
    assert len(params) >= 4 and all(len(where[n]) == 1 for n in params)
    # and the file holds no two equal tensors: every distinct content is stored once
    data = (vdt.folder / "weights.bin").read_bytes()
    spans = {span for v in where.values() for span in v}
    assert len({data[o:o + n] for o, n in spans}) == len(spans)
    assert sum(n for _, n in spans) == w["stored_bytes"]


def test_manifest_records_versions_schedule_plan_and_hashes(vdt):
    m = vdt.manifest
    assert m["graphpass_version"] == graphpass.__version__
    assert m["torch_version"] == torch.__version__ and m["onnx_version"] == onnx.__version__
    assert graphpass.schedule_from_json(json.dumps(m["schedule"])) == SCHEDULE
    assert m["plan"]["timesteps"] == STEPS and len(m["plan"]["phase_ids"]) == len(STEPS)
    assert set(m["files"]) == {"phase_0.onnx", "phase_1.onnx", "weights.bin"}
    e = m["phases"][0]
    assert {"file", "inputs", "outputs", "cache_inputs", "cache_outputs"} <= set(e)
    assert e["inputs"][0] == {"name": "hidden_states", "shape": list(vdt.kw["hidden_states"].shape),
                              "dtype": "float32"}


def test_other_version_is_refused(vdt, tmp_path):
    folder = copy_of(vdt, tmp_path)
    m = json.loads((folder / "manifest.json").read_text())
    m["graphpass_version"] = "0.0.1"
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtefactError, match=r"exported by graphpass 0\.0\.1.*re-export"):
        graphpass.load(folder)


def test_modified_file_is_refused(vdt, tmp_path):
    folder = copy_of(vdt, tmp_path)
    with open(folder / "weights.bin", "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(ArtefactError, match=r"weights\.bin does not match the sha256"):
        graphpass.load(folder)


def test_missing_phase_file_is_named(vdt, tmp_path):
    folder = copy_of(vdt, tmp_path)
    (folder / "phase_1.onnx").unlink()
    with pytest.raises(ArtefactError, match=r"missing phase_1\.onnx"):
        graphpass.load(folder)


def test_incomplete_manifest_is_refused(vdt, tmp_path):
    folder = copy_of(vdt, tmp_path)
    edit_manifest(folder, lambda m: m.pop("user_outputs"), reseal=False)
    with pytest.raises(ArtefactError, match=r"manifest\.json does not match its own sha256"):
        graphpass.load(folder)
    edit_manifest(folder, lambda m: m.pop("user_outputs", None))  # the same edit, resealed
    with pytest.raises(ArtefactError, match=r"manifest\.json is incomplete or malformed \(KeyError: 'user_outputs'\)"):
        graphpass.load(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(ArtefactError, match="has no manifest.json"):
        graphpass.load(folder)


def test_calls_off_the_exported_plan_are_refused(vdt):
    model = graphpass.load(vdt.folder, threads=1)
    with pytest.raises(ArtefactError, match=r"step 0 got timestep 900.*exported for timestep 741"):
        run_loop(model, vdt.kw, [900.0])
    model.reset()
    with pytest.raises(ArtefactError, match=r"plan of 6 steps"):
        run_loop(model, vdt.kw, STEPS + [0.5])
    with pytest.raises(ArtefactError, match="cannot serve"):
        model.plan(STEPS[:4])
    assert model.plan(STEPS).phases == vdt.opt.current_plan.phases
    report = model.inspect()
    assert "phase 0: store 4" in report and "phase 1: reuse 4" in report


def _has_tensorrt() -> bool:
    return importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


@pytest.mark.skipif(_has_tensorrt(), reason="this machine has TensorRT and a GPU: the error path cannot occur")
def test_tensorrt_without_gpu_or_package_says_what_is_missing(vdt, tmp_path):
    missing = r"needs .*(tensorrt. Python package|NVIDIA GPU)"
    with pytest.raises(ArtefactError, match=missing):
        graphpass.export(vdt.opt, tmp_path / "trt", format="tensorrt")
    assert not (tmp_path / "trt").exists()  # refused before the (slow) ONNX export
    with pytest.raises(ArtefactError, match="holds no TensorRT engines"):
        graphpass.load(vdt.folder, backend="tensorrt")
    folder = copy_of(vdt, tmp_path)  # a folder whose manifest says it holds engines
    edit_manifest(folder, lambda m: m.update(format="tensorrt"))
    with pytest.raises(ArtefactError, match=missing):
        graphpass.load(folder)


def test_export_needs_a_plan(tmp_path):
    case = make_case("vdt")
    opt = graphpass.optimize(case.model, SCHEDULE, example_kwargs=case.kwargs())
    with pytest.raises(InputError, match=r"opt\.plan\(timesteps\)"):
        graphpass.export(opt, tmp_path / "x")
    with pytest.raises(ArtefactError, match="unknown export format"):
        graphpass.export(opt, tmp_path / "x", format="tflite", timesteps=STEPS)


# --- other models -----------------------------------------------------------------------------------
def test_latte_per_phase_onnxruntime_matches_eager(tmp_path):
    ex = Exported("latte", tmp_path / "latte")
    assert [e["label"] for e in ex.manifest["phases"]] == ["store 4", "reuse 4"]
    outs = run_loop(graphpass.load(ex.folder, threads=1), ex.kw, STEPS)
    assert max_diff(outs, ex.eager) <= ATOL


def test_shipped_vdt_s_onnxruntime_matches_eager(tmp_path):
    from graphpass import models

    if not models.weights_path("vdt-s").is_file():
        pytest.skip(f"shipped weights {models.weights_path('vdt-s')} not present yet (trained in the background)")
    from graphpass.workloads import example_call

    model, kw, _ = example_call("vdt-s", batch=2, num_steps=8)
    steps = STEPS[:4]
    opt = graphpass.optimize(model, SCHEDULE, example_kwargs=kw, timesteps=steps)
    eager = run_loop(opt, kw, steps)
    graphpass.export(opt, tmp_path / "vdt-s", verify=False)  # compared with eager below
    outs = run_loop(graphpass.load(tmp_path / "vdt-s", threads=1), kw, steps)
    assert max_diff(outs, eager) <= ATOL


# --- single file ------------------------------------------------------------------------------------
def test_single_file_runs_every_phase_with_if_branches(vdt_single, vdt):
    ex = vdt_single
    assert sorted(p.name for p in ex.folder.glob("*.onnx")) == ["model.onnx"]
    m = onnx.load(str(ex.folder / "model.onnx"), load_external_data=False)
    switch = ex.manifest["single_file"]["switch_regions"]
    assert sorted(switch) == sorted(f"blocks.{i}.{k}" for i in range(2) for k in ("spatial_attn", "cross_attn"))
    assert sum(n.op_type == "If" for n in m.graph.node) == len(switch)
    assert [i.name for i in m.graph.input if i.name.startswith("reuse.")] == [f"reuse.{p}" for p in switch]
    model = graphpass.load(ex.folder, threads=1)
    outs = run_loop(model, ex.kw, STEPS)
    assert max_diff(outs, ex.eager) <= ATOL
    assert len(model.phase_calls) == 2 and model.cache_nbytes == ex.opt.cache_nbytes
    # same weights bytes as the per-phase export, referenced once
    assert ex.manifest["weights"]["stored_bytes"] == vdt.manifest["weights"]["stored_bytes"]


def test_switch_graph_exports_without_dynamo_and_computes_each_phase(vdt, monkeypatch):
    """torch.export traces the If branches as the FX graphs they are, without handing each to Dynamo (seconds
    per region, paid by every single-file export): with torch.compile refused, the switch graph exports, and
    its program computes the captured model when no region is reused and the reuse phase graph when all are."""
    opt = vdt.opt
    sw = build_switch_graph(opt.captured, opt.regions, opt.current_plan)
    exit_specs = {k: s for r in opt.regions for k, s in zip(r.cache_keys, r.exit_specs)}
    torch.manual_seed(0)
    cached = [torch.randn(exit_specs[k].shape, dtype=exit_specs[k].dtype) for k in sw.cache_keys]
    inputs = [vdt.kw[n] for n in opt.captured.input_names]

    def flags(reuse: bool) -> list[torch.Tensor]:
        return [torch.tensor(reuse) for _ in sw.switch_paths]

    def refuse(*a, **k):
        raise AssertionError("torch.compile was called while exporting the switch graph")

    monkeypatch.setattr(torch, "compile", refuse)
    program = torch.export.export(sw.gm, (*inputs, *flags(False), *cached), strict=False).module()
    monkeypatch.undo()
    with torch.no_grad():
        computed = program(*inputs, *flags(False), *cached)
        reused = program(*inputs, *flags(True), *cached)
        want_computed = opt.captured.gm(*inputs)
        reuse_graph = opt.phase_graph(opt.current_plan.distinct()[1])
        by_key = dict(zip(sw.cache_keys, cached))
        want_reused = reuse_graph.gm(*inputs, *(by_key[k] for k in reuse_graph.cache_inputs))
    assert float((computed[0] - want_computed[0]).abs().max()) <= 1e-5
    assert float((reused[0] - want_reused[0]).abs().max()) <= 1e-5
    assert float((reused[0] - computed[0]).abs().max()) > 1e-2  # the reuse branches did run
    for got, want in zip(reused[sw.num_user_outputs:], cached):  # a reused region hands back its cached exits
        assert torch.equal(got, want)


# --- the default layout -----------------------------------------------------------------------------
def test_default_export_is_the_checked_single_file_where_the_plan_reuses(vdt_single, vdt):
    """Both shared folders were written with export's defaults (tests/exporters/_exported.py). Checked: the
    single file, which test_single_file_runs_every_phase_with_if_branches runs against eager. Unchecked: a file
    per phase (an If branch that computes something else would go unseen), which
    test_vdt_per_phase_onnxruntime_matches_eager runs against eager."""
    assert vdt_single.manifest["layout"] == "single-file"
    assert sorted(p.name for p in vdt_single.folder.glob("*.onnx")) == ["model.onnx"]
    assert vdt.manifest["layout"] == "per-phase"
    assert sorted(p.name for p in vdt.folder.glob("*.onnx")) == ["phase_0.onnx", "phase_1.onnx"]


def test_default_falls_back_to_per_phase_when_the_single_file_cannot_be_built(vdt, tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise GraphpassError("region blocks.0.spatial_attn is not convex")

    monkeypatch.setattr(onnx_export, "build_switch_graph", refuse)
    monkeypatch.setattr(graphpass.exporters, "verify_export", lambda *a: None)  # the check is not the point here
    with pytest.warns(UserWarning, match=r"cannot be exported as one graph \(region blocks\.0\.spatial_attn is not "
                                         r"convex\); exported one file per phase instead"):
        folder = graphpass.export(vdt.opt, tmp_path / "fallback")
    assert json.loads((folder / "manifest.json").read_text())["layout"] == "per-phase"
    assert max_diff(run_loop(graphpass.load(folder, threads=1), vdt.kw, STEPS), vdt.eager) <= ATOL
    with pytest.raises(GraphpassError, match="not convex"):  # asked for explicitly: no fallback
        graphpass.export(vdt.opt, tmp_path / "asked", single_file=True, verify=False)
    assert not (tmp_path / "asked").exists()


def test_default_falls_back_to_per_phase_when_the_single_file_fails_the_check(vdt, tmp_path, monkeypatch):
    """A single file whose outputs differ from its graph's (an op lowered wrongly inside an If branch) is
    replaced by the per-phase export, which is checked in turn."""
    real = graphpass.exporters.verify_export
    checked = []

    def check(opt, folder, manifest, plan, inputs):
        checked.append(manifest["layout"])
        if manifest["layout"] == "single-file":
            raise ArtefactError("phase 0 (store 4) exported to ONNX does not reproduce its graph")
        return real(opt, folder, manifest, plan, inputs)

    monkeypatch.setattr(graphpass.exporters, "verify_export", check)
    with pytest.warns(UserWarning, match="single-file export of .* does not reproduce its graph"):
        folder = graphpass.export(vdt.opt, tmp_path / "fallback")
    assert checked == ["single-file", "per-phase"]
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "phase_0.onnx", "phase_1.onnx",
                                                        "weights.bin"]
    assert max_diff(run_loop(graphpass.load(folder, threads=1), vdt.kw, STEPS), vdt.eager) <= ATOL
