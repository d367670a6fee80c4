"""ONNX Runtime sessions of a per-phase export: one copy of each weight for every phase, outputs unchanged.

The tiny VDT is exported under a PAB schedule whose 6-step plan has two phases (store, reuse), so two
sessions read the same weights. Checks:

* every initializer that a phase file keeps in ``weights.bin`` (read with ``onnx``, independently of the
  loader) is handed to its session as one shared OrtValue, and the distinct OrtValues hold exactly the
  bytes ``weights.bin`` stores, while the phases reference more;
* the sessions hold no private copy (no copy read from the file, no pre-packed or constant-folded one):
  after the shared buffer is changed in memory, the loaded model gives the outputs of a reference folder
  whose ``weights.bin`` holds the same change on disk, loaded with ONNX Runtime's own per-session weights;
* outputs match the eager executor within 1e-4, with and without IO binding, warmed up at load or not.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import graphpass
from graphpass import ArtefactError
from graphpass.exporters.ort_runner import OrtOptions
from conftest import run_loop
from _exported import ATOL, STEPS, Exported, max_diff

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

@pytest.fixture(scope="module")
def vdt(tmp_path_factory) -> Exported:
    return Exported("vdt", tmp_path_factory.mktemp("vdt_sessions") / "export")


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
