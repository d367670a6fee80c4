"""Exported folders cannot hurt their users: export never touches files graphpass did not write and
replaces an earlier export all at once; load refuses any manifest or file that is not exactly what export
wrote, before opening anything outside the folder.

One tiny VDT is exported once per module (``exported``); each test works on a copy of that folder inside
its own ``tmp_path``, next to a sentinel file that must stay untouched.
"""
from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphpass
from graphpass import PAB, ArtefactError, InputError
from graphpass.exporters import onnx_export
from graphpass.exporters.manifest import manifest_digest, render_manifest
from conftest import make_case, run_loop
from _exported import SCHEDULE, STEPS, Exported, shared_export

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SENTINEL = b"user data that graphpass must never read or change\n"


@pytest.fixture(scope="module")
def exported() -> Exported:
    """A tiny VDT under SCHEDULE, its eager outputs and its export (shared: tests work on copies)."""
    return shared_export("vdt")


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every entry under ``folder`` (recursively), by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def sentinel(tmp_path) -> Path:
    """A user's file next to the exported folders; every test checks it is unchanged at the end."""
    path = tmp_path / "keep.txt"
    path.write_bytes(SENTINEL)
    yield path
    assert path.read_bytes() == SENTINEL


@pytest.fixture
def artefact(exported, tmp_path, sentinel) -> Path:
    dst = tmp_path / "artefact"
    shutil.copytree(exported.folder, dst)
    return dst


def max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def edit_manifest(folder: Path, edit, reseal: bool = True) -> None:
    """Apply ``edit(manifest)``; ``reseal`` recomputes its own sha256, as a deliberate editor would, so that
    the checks behind the digest are reached."""
    m = json.loads((folder / "manifest.json").read_text())
    edit(m)
    if reseal:
        m["manifest_sha256"] = manifest_digest(m)
    (folder / "manifest.json").write_text(render_manifest(m))


@pytest.fixture
def opened(monkeypatch):
    """Records every path Python opens (builtins.open, io.open and so pathlib, os.open)."""
    seen: list[Path] = []
    real_open, real_os_open = builtins.open, os.open

    def rec_open(file, *a, **k):
        if isinstance(file, (str, os.PathLike)):
            seen.append(Path(os.fspath(file)).absolute())
        return real_open(file, *a, **k)

    def rec_os_open(path, *a, **k):
        seen.append(Path(os.fspath(path)).absolute())
        return real_os_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", rec_open)
    monkeypatch.setattr(io, "open", rec_open)
    monkeypatch.setattr(os, "open", rec_os_open)
    return seen


def only_inside(paths: list[Path], folder: Path) -> None:
    outside = [p for p in paths if folder.resolve() not in p.resolve().parents]
    assert not outside, f"opened outside {folder}: {outside}"


# --- export: user files are never touched ----------------------------------------------------------
def test_export_refuses_a_folder_of_user_files(exported, tmp_path, sentinel):
    folder = tmp_path / "mine"
    folder.mkdir()
    for name, data in {"model.onnx": b"my model", "phase_0.onnx": b"mine too", "weights.bin": b"\x01\x02",
                       "manifest.json": b'{"my": "manifest"}', "notes.txt": b"notes"}.items():
        (folder / name).write_bytes(data)
    before = snapshot(folder)
    for overwrite in (False, True):
        with pytest.raises(ArtefactError, match=r"not empty and is not a graphpass export.*never replaces files "
                                                r"it did not write"):
            graphpass.export(exported.opt, folder, overwrite=overwrite)
    assert snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "mine"]  # no staging folder left


def test_export_refuses_an_artefact_holding_user_files(exported, artefact):
    (artefact / "README.md").write_text("my notes on this export")
    before = snapshot(artefact)
    with pytest.raises(ArtefactError, match=r"holds a graphpass export and other files \(README\.md\)"):
        graphpass.export(exported.opt, artefact, overwrite=True)
    assert snapshot(artefact) == before


def test_export_needs_overwrite_to_replace_an_artefact(exported, artefact, tmp_path):
    before = snapshot(artefact)
    with pytest.raises(ArtefactError, match=r"already holds a graphpass export; pass overwrite=True"):
        graphpass.export(exported.opt, artefact)
    assert snapshot(artefact) == before
    # replaced with another schedule's export: the folder now holds exactly the new one, and it runs (one step:
    # a plan of one phase, exported in one go, is all the replacement needs)
    case = make_case("vdt")
    spatial_only = PAB(spatial=2, window=(100, 800))
    steps = STEPS[:1]
    other = graphpass.optimize(case.model, spatial_only, example_kwargs=exported.kw, timesteps=steps)
    graphpass.export(other, artefact, overwrite=True, verify=False)  # compared with eager below
    m = json.loads((artefact / "manifest.json").read_text())
    assert graphpass.schedule_from_json(json.dumps(m["schedule"])) == spatial_only != SCHEDULE
    assert sorted(p.name for p in artefact.iterdir()) == sorted(list(m["files"]) + ["manifest.json"])
    assert sorted(m["files"]) == ["phase_0.onnx", "weights.bin"]  # the old phase_1.onnx is gone
    loaded = graphpass.load(artefact, threads=1)
    assert max_diff(run_loop(loaded, exported.kw, steps), run_loop(other, exported.kw, steps)) <= 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artefact", "keep.txt"]


def test_empty_name_file_and_unwritable_destinations_are_refused(exported, tmp_path, sentinel, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "" would mean this folder, which holds the sentinel
    for bad in ("", " "):
        with pytest.raises(ArtefactError, match="export folder name is empty; name a new folder"):
            graphpass.export(exported.opt, bad)
    with pytest.raises(ArtefactError, match=r"keep\.txt is a file, not a folder"):
        graphpass.export(exported.opt, sentinel)
    with pytest.raises(ArtefactError, match=r"cannot create a folder under .*keep\.txt: it is a file"):
        graphpass.export(exported.opt, sentinel / "sub")
    with pytest.raises(ArtefactError, match=r"not empty and is not a graphpass export"):
        graphpass.export(exported.opt, ".")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="permission bits do not stop root")
def test_read_only_parent_is_refused_before_any_work(exported, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ArtefactError, match=r"cannot write the export folder .* is not writable"):
            graphpass.export(exported.opt, ro / "out")
    finally:
        ro.chmod(0o755)


def test_empty_timesteps_are_refused_before_writing(exported, tmp_path):
    with pytest.raises(InputError, match=r"empty list of timesteps.*pass the sampler's timesteps"):
        graphpass.export(exported.opt, tmp_path / "out", timesteps=[])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_export_leaves_the_old_artefact_intact(exported, artefact, tmp_path, monkeypatch, error):
    before = snapshot(artefact)
    calls = []

    def fails_on_second_phase(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise error
        # the first phase's graph as the shared export wrote it (weights read back inline): exporting it again
        # would cost seconds and the interruption, not the file, is under test
        return onnx.load(str(exported.folder / "phase_0.onnx"))

    monkeypatch.setattr(onnx_export, "to_onnx", fails_on_second_phase)
    with pytest.raises(type(error)):
        graphpass.export(exported.opt, artefact, overwrite=True, single_file=False)  # a file per phase
    assert len(calls) == 2  # it did fail midway, after writing the first phase
    assert snapshot(artefact) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artefact", "keep.txt"]  # staging folder removed
    outs = run_loop(graphpass.load(artefact, threads=1), exported.kw, STEPS)
    assert max_diff(outs, exported.eager) <= 1e-4


def test_failed_first_export_leaves_nothing(exported, tmp_path, monkeypatch):
    def fail(*a, **k):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(onnx_export, "to_onnx", fail)
    with pytest.raises(RuntimeError):
        graphpass.export(exported.opt, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


# --- load: the manifest names only its own files, hashed, with a consistent plan --------------------
def test_edited_manifest_is_refused_by_its_own_hash(artefact):
    edit_manifest(artefact, lambda m: m["plan"]["phase_ids"].reverse(), reseal=False)
    with pytest.raises(ArtefactError, match=r"does not match its own sha256.*re-export"):
        graphpass.load(artefact)


def test_whitespace_edit_of_manifest_is_refused(artefact):
    path = artefact / "manifest.json"
    path.write_text(path.read_text().replace("\n  ", "\n\t", 1))
    with pytest.raises(ArtefactError, match="edited or damaged"):
        graphpass.load(artefact)


@pytest.mark.parametrize("where", ["absolute", "dotdot", "subfolder"])
def test_phase_path_outside_the_folder_is_refused(exported, artefact, tmp_path, opened, where):
    other = tmp_path / "other"  # another artefact (same model, another plan would do): never opened
    shutil.copytree(exported.folder, other)
    name = {"absolute": str(other / "phase_1.onnx"), "dotdot": "../other/phase_1.onnx",
            "subfolder": "sub/phase_1.onnx"}[where]

    def point_elsewhere(m):
        m["files"][name] = m["files"].pop(m["phases"][1]["file"])
        m["phases"][1]["file"] = name

    edit_manifest(artefact, point_elsewhere)
    opened.clear()
    with pytest.raises(ArtefactError, match=r"phases\[1\]\.file is .*not a file name inside the exported folder"):
        graphpass.load(artefact)
    only_inside(opened, artefact)


def test_files_entry_outside_the_folder_is_never_opened(artefact, opened):
    edit_manifest(artefact, lambda m: m["files"].update({"../../../../etc/passwd": "0" * 64}))
    opened.clear()
    with pytest.raises(ArtefactError, match=r"files entry '\.\./\.\./\.\./\.\./etc/passwd'.*not a file name"):
        graphpass.load(artefact)
    only_inside(opened, artefact)
    assert all(p.name != "passwd" for p in opened)


def test_dropped_files_entry_is_refused(artefact, opened):
    edit_manifest(artefact, lambda m: m["files"].pop("phase_1.onnx"))
    (artefact / "phase_1.onnx").write_bytes(b"not the exported graph")  # the check it would have turned off
    with pytest.raises(ArtefactError, match=r"records no sha256 for phase_1\.onnx, which the model runs"):
        graphpass.load(artefact)
    only_inside(opened, artefact)


def test_unused_files_entry_is_refused(artefact):
    (artefact / "extra.bin").write_bytes(b"x")
    edit_manifest(artefact, lambda m: m["files"].update({"extra.bin": hashlib.sha256(b"x").hexdigest()}))
    with pytest.raises(ArtefactError, match=r"lists extra\.bin, which no phase uses"):
        graphpass.load(artefact)


def test_file_linking_outside_the_folder_is_refused(exported, artefact, tmp_path):
    outside = tmp_path / "weights-elsewhere.bin"
    shutil.copy(exported.folder / "weights.bin", outside)  # same bytes: only the link gives it away
    (artefact / "weights.bin").unlink()
    (artefact / "weights.bin").symlink_to(outside)
    with pytest.raises(ArtefactError, match=r"weights\.bin links to .*outside the exported folder"):
        graphpass.load(artefact)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["plan"].update(phase_ids=[1, 0, 1, 0, 1, 0]), "does not give for its timesteps"),
    (lambda m: m["plan"].update(phase_ids=[0, 1, 0, 1, 0, 7]), r"phase_ids .*one phase id \(0\.\.1\)"),
    (lambda m: m["plan"].update(phase_ids=[0, 1]), r"phase_ids \[0, 1\]: one phase id"),
    (lambda m: m["plan"].update(timesteps=[]), "not a non-empty list of numbers"),
    (lambda m: m["plan"].update(timesteps=[741.0, 621.0, 501.0, 381.0, 261.0, 50.0]), "does not give"),
    (lambda m: m["phases"][1].update(actions=[]), "does not give for its timesteps"),
    (lambda m: m["phases"][1].update(actions=[["blocks.0.spatial_attn", "teleport"]]), "malformed actions"),
    (lambda m: m["phases"][0].update(id=3), r"lists phase 3 at position 0"),
    (lambda m: m["phases"][1]["cache_inputs"].pop(), r"phase 1 lists cache_inputs"),
    (lambda m: m["phases"][0].update(cache_outputs=[]), r"phase 0 lists cache_outputs \[\]"),
    (lambda m: m["schedule"].update(spatial=3), "does not give for its timesteps"),
], ids=["swapped-ids", "id-out-of-range", "short-plan", "no-timesteps", "other-timestep", "actions-dropped",
        "bad-action", "phase-id", "cache-input-dropped", "cache-outputs-dropped", "schedule-changed"])
def test_edited_plan_is_refused_with_a_clear_error(artefact, edit, message):
    edit_manifest(artefact, edit)
    with pytest.raises(ArtefactError, match=message) as e:
        graphpass.load(artefact)
    assert "re-export" in str(e.value)


def test_untouched_copy_loads_and_matches_eager(exported, artefact):
    """The checks above refuse edits, not valid folders: an untouched copy elsewhere loads and runs."""
    outs = run_loop(graphpass.load(artefact, threads=1), exported.kw, STEPS)
    assert max_diff(outs, exported.eager) <= 1e-4


def test_unknown_backend_is_refused_before_reading(artefact, opened):
    opened.clear()
    with pytest.raises(ArtefactError, match=r"unknown backend 'bogus'.*onnxruntime, tensorrt"):
        graphpass.load(artefact, backend="bogus")
    assert opened == []


# --- property: any flipped byte or truncation of any file is refused ---------------------------------
@pytest.fixture(scope="module")
def scratch(exported, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("flips") / "artefact"
    shutil.copytree(exported.folder, dst)
    return dst


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_flipped_byte_or_truncation_is_refused(scratch, data):
    name = data.draw(st.sampled_from(_files(scratch)), label="file")
    path = scratch / name
    original = path.read_bytes()
    if data.draw(st.booleans(), label="truncate"):
        damaged = original[:data.draw(st.integers(0, len(original) - 1), label="length")]
    else:
        i = data.draw(st.integers(0, len(original) - 1), label="offset")
        mask = data.draw(st.integers(1, 255), label="xor")
        damaged = original[:i] + bytes([original[i] ^ mask]) + original[i + 1:]
    path.write_bytes(damaged)
    try:
        with pytest.raises(ArtefactError):
            graphpass.load(scratch)
    finally:
        path.write_bytes(original)


def test_scratch_copy_is_restored_and_loads(scratch, exported):
    assert snapshot(scratch) == snapshot(exported.folder)
    torch.manual_seed(0)
    outs = run_loop(graphpass.load(scratch, threads=1), exported.kw, STEPS)
    assert max_diff(outs, exported.eager) <= 1e-4
