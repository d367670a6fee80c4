"""ONNX Runtime sessions of an export: one copy of each weight for every phase, outputs unchanged.

The tiny VDT is exported under a PAB schedule whose 6-step plan has two phases (store, reuse), so in the
per-phase layout two sessions read the same weights (the single-file layout serves both from one). Checks:

* every initializer that a phase file keeps in ``weights.bin`` (read with ``onnx``, independently of the
  loader) is handed to its session as one shared OrtValue, and the distinct OrtValues hold exactly the
  bytes ``weights.bin`` stores, while the phases reference more;
* the sessions hold no private copy (no copy read from the file, no pre-packed or constant-folded one):
  after the shared buffer is changed in memory, the loaded model gives the outputs of a reference folder
  whose ``weights.bin`` holds the same change on disk, loaded with ONNX Runtime's own per-session weights;
* outputs match the eager executor within 1e-4, with and without IO binding, warmed up at load or not;
* what memory a load holds, by structure rather than by RSS (which other processes on a shared machine
  move; ``benchmarks/backends.py`` reports the peak RSS): one session per file, each built without
  pre-packed weight copies, on the one shared arena, with no per-session memory pattern; in the
  single-file layout every graph output of every phase is bound to torch memory (ONNX Runtime allocates
  none in its arena), a reused region's output written over its own cached tensor, which stays intact.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import graphpass
from graphpass import ArtefactError
from graphpass.exporters.manifest import cache_tensor_name
from graphpass.exporters.ort_runner import OrtOptions
from conftest import first, run_loop
from _exported import ATOL, SCHEDULE, STEPS, Exported, max_diff, shared_export

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

@pytest.fixture(scope="module")
def vdt() -> Exported:
    return shared_export("vdt")


@pytest.fixture(scope="module")
def vdt_single() -> Exported:
    return shared_export("vdt", single_file=True)


def external_spans(folder: Path, file: str, float32_only: bool = False) -> dict[str, tuple[int, int]]:
    """Initializer name -> (offset, length) in weights.bin, read from the ONNX file itself."""
    m = onnx.load(str(folder / file), load_external_data=False)
    out = {}
    for t in m.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL and (t.data_type == 1 or not float32_only):
            ext = {e.key: e.value for e in t.external_data}
            out[t.name] = (int(ext["offset"]), int(ext["length"]))
    return out


def perturb(words: np.ndarray, spans: set[tuple[int, int]]) -> None:
    """Scale the float32 tensors at ``spans`` of a weights.bin buffer in place, by 1.25, 0.75, 1.1 in turn."""
    for i, (offset, length) in enumerate(sorted(spans)):
        words[offset // 4:(offset + length) // 4] *= np.float32((1.25, 0.75, 1.1)[i % 3])


def test_per_phase_sessions_share_one_ortvalue_per_weight(vdt, monkeypatch):
    handed: dict[str, dict[str, object]] = {}  # phase file -> initializer name -> OrtValue handed to its session
    real_add = graphpass.exporters.ort_runner.SharedWeights.add_to

    def spy(self, so, model_path):
        n = real_add(self, so, model_path)
        handed[model_path.name] = {name: self.value(o, ln, t, s) for name, o, ln, t, s in
                                   graphpass.exporters.ort_runner.external_initializers(model_path)}
        return n

    monkeypatch.setattr(graphpass.exporters.ort_runner.SharedWeights, "add_to", spy)
    model = graphpass.load(vdt.folder, threads=1)  # warm-up builds both sessions
    sessions = model._make_runner.sessions
    files = [e["file"] for e in vdt.manifest["phases"]]
    assert sorted(handed) == sorted(files) and len(files) == 2
    referenced = 0
    distinct: dict[int, int] = {}  # id(OrtValue) -> bytes
    for f in files:
        spans = external_spans(vdt.folder, f)
        assert set(handed[f]) == set(spans) and len(spans) >= 10  # every stored weight of the file is handed over
        for name, (offset, length) in spans.items():
            v = handed[f][name]
            referenced += length
            distinct[id(v)] = length
            assert v.numpy().nbytes == length
    w = vdt.manifest["weights"]
    assert referenced == w["referenced_bytes"] >= 1.5 * w["stored_bytes"]  # both phases read most weights
    assert sum(distinct.values()) == w["stored_bytes"] == sessions.shared_bytes  # ...from one copy
    # the OrtValues are views of the one mapped weights.bin, not copies of it
    base = sessions.weights.buffer
    lo, hi = base.ctypes.data, base.ctypes.data + base.size
    for f in files:
        for v in handed[f].values():
            assert lo <= v.data_ptr() < hi


def test_sessions_read_the_shared_buffer_and_hold_no_private_copy(vdt, tmp_path):
    spans = {s for e in vdt.manifest["phases"] for s in external_spans(vdt.folder, e["file"], True).values()}
    assert all(o % 4 == 0 for o, _ in spans) and len(spans) >= 10
    model = graphpass.load(vdt.folder, threads=1)
    buf = model._make_runner.sessions.weights.buffer  # copy-on-write map: changes stay in this process
    perturb(buf[: buf.size // 4 * 4].view(np.float32), spans)
    # reference: the same change written to disk, read by sessions that each load their own weights
    ref_folder = tmp_path / "perturbed"
    shutil.copytree(vdt.folder, ref_folder)
    words = np.fromfile(ref_folder / "weights.bin", dtype=np.float32)
    perturb(words, spans)
    words.tofile(ref_folder / "weights.bin")
    ref = graphpass.load(ref_folder, threads=1, verify=False, ort_options=OrtOptions.unshared())
    got, want = run_loop(model, vdt.kw, STEPS), run_loop(ref, vdt.kw, STEPS)
    assert max_diff(got, want) <= 1e-5
    assert max_diff(want, vdt.eager) > 1e-2  # the change matters: a session with its own copy would differ


@pytest.mark.parametrize("options", [OrtOptions(threads=1), OrtOptions(threads=1, io_binding=False),
                                     OrtOptions(threads=1, arena="none"), OrtOptions.unshared(threads=1)],
                         ids=["default", "numpy-feed", "no-arena", "unshared"])
def test_outputs_match_eager(vdt, options):
    model = graphpass.load(vdt.folder, ort_options=options)
    assert max_diff(run_loop(model, vdt.kw, STEPS), vdt.eager) <= ATOL


def test_warmup_builds_every_phase_at_load(vdt):
    make = graphpass.load(vdt.folder, threads=1)._make_runner
    assert len(make._runners) == 2 and len(make.sessions._sessions) == 2
    cold = graphpass.load(vdt.folder, threads=1, warmup=False)
    assert cold._make_runner._runners == {} and cold._make_runner.sessions._sessions == {}
    assert max_diff(run_loop(cold, vdt.kw, STEPS), vdt.eager) <= ATOL
    assert len(cold._make_runner._runners) == 2


def test_cached_tensors_reach_the_next_phase_without_a_copy(vdt):
    """With IO binding a reuse phase binds the stored tensor's own memory as its cache input."""
    model = graphpass.load(vdt.folder, threads=1)
    make = model._make_runner
    bound: list[int] = []
    stored: list[int] = []
    for spec in model.specs:
        runner = make(spec, "onnxruntime")
        real = runner._run_bound

        def spy(feed, real=real, runner=runner):
            bound.extend(t.data_ptr() for n, t in feed.items() if n.startswith("cache."))
            outs = real(feed)
            stored.extend(o.data_ptr() for o in outs[1:])
            return outs

        runner._run_bound = spy
    run_loop(model, vdt.kw, STEPS[:2])  # store, then reuse
    assert bound and set(bound) <= set(stored)


def test_bad_options_name_the_choices():
    with pytest.raises(ArtefactError, match="arena 'big'.*shared, per-session, none"):
        OrtOptions(arena="big")
    with pytest.raises(ArtefactError, match="threads=0"):
        OrtOptions(threads=0)


# --- what a load holds ----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["per-phase", "single-file"])
def test_one_session_per_file_without_private_weight_copies(vdt, vdt_single, layout):
    ex = vdt_single if layout == "single-file" else vdt
    model = graphpass.load(ex.folder, threads=1)
    sessions = model._make_runner.sessions._sessions
    files = {e["file"] for e in ex.manifest["phases"]}
    assert set(sessions) == files and len(files) == (1 if layout == "single-file" else 2)
    for sess in sessions.values():
        so = sess.get_session_options()
        assert so.get_session_config_entry("session.disable_prepacking") == "1"  # no packed copy per session
        assert so.get_session_config_entry("session.use_env_allocators") == "1"  # the one shared arena
        assert not so.enable_mem_pattern
        assert so.graph_optimization_level != ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # no NCHWc weight copies
    assert max_diff(run_loop(model, ex.kw, STEPS), ex.eager) <= ATOL


def test_single_file_binds_every_output_of_every_phase(vdt_single):
    """ONNX Runtime allocates an unbound output in its arena, which keeps that memory for good: every output
    of the one graph is bound, the phase's own outputs and the others alike."""
    model = graphpass.load(vdt_single.folder, threads=1)
    make = model._make_runner
    graph_outputs = [o.name for o in make.sessions.session("model.onnx").get_outputs()]
    for spec in model.specs:
        runner = make(spec, "onnxruntime")
        bound = runner.output_names + list(runner.aliases) + [n for n, _, _ in runner.discard]
        assert sorted(bound) == sorted(graph_outputs)
        # aliased: the regions the phase reuses, each written over its own cached tensor
        assert runner.aliases == {cache_tensor_name(k, output=True): cache_tensor_name(k) for k in spec.cache_inputs}
    assert {len(make(s, "onnxruntime").aliases) for s in model.specs} == {0, 4}  # store 4, reuse 4


def test_single_file_reuse_leaves_the_cached_tensors_intact(vdt_single):
    """The reused regions' outputs are written over their cached tensors: after the reuse step those tensors
    hold the values the store step gave them, and the reuse step's output is eager's."""
    model = graphpass.load(vdt_single.folder, threads=1)
    kw, t = dict(vdt_single.kw), vdt_single.kw["timestep"]
    with torch.no_grad():
        model(**kw | {"timestep": torch.full_like(t, STEPS[0])})  # store 4
        cached = [(model.state().cache.get(k), model.state().cache.get(k).clone())
                  for k in model.state().cache.keys()]
        assert len(cached) == 4
        out = model(**kw | {"timestep": torch.full_like(t, STEPS[1])})  # reuse 4
    assert all(torch.equal(held, value) for held, value in cached)
    opt = graphpass.optimize(vdt_single.case.model, SCHEDULE, example_kwargs=kw, timesteps=STEPS)
    with torch.no_grad():
        opt(**kw | {"timestep": torch.full_like(t, STEPS[0])})
        want = opt(**kw | {"timestep": torch.full_like(t, STEPS[1])})
    assert max_diff([first(out)], [first(want)]) <= ATOL
