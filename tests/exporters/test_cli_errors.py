"""The command line refuses bad arguments with a message naming the argument and the fix, before any model is
built or sampled (argparse: exit status 2; checks needing the file system: status 1), never with a
traceback, and never touches files it did not write."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest

import graphpass.workloads
from graphpass.cli import main
from graphpass.eval.harness import Workload


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a command gets as far as building a model (every check must come first)."""
    def refuse(*a, **k):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(graphpass.workloads, "example_call", refuse)
    monkeypatch.setattr(Workload, "from_name", classmethod(refuse))


def parse_error(argv, capsys) -> str:
    """stderr of a command line that argparse refuses (exit status 2)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def command_error(argv, capsys) -> str:
    """stderr of a command that stops with a graphpass error (exit status 1)."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("argv, match", [
    (["export", "--steps", "0", "--out", "o"], r"argument --steps: expected a whole number >= 1, got '0'"),
    (["export", "--batch", "0", "--out", "o"], r"argument --batch: expected a whole number >= 1, got '0'"),
    (["export", "--steps", "ten", "--out", "o"], r"argument --steps: expected a whole number, got 'ten'"),
    (["inspect", "--batch", "-2"], r"argument --batch: expected a whole number >= 1, got '-2'"),
    (["demo", "--num-videos", "0"], r"argument --num-videos: expected a whole number >= 1"),
    (["calibrate", "--steps", "0", "--target-psnr", "30"], r"argument --steps: expected a whole number >= 1"),
    (["analyze", "vdt-tiny", "--seeds", "0", "-1"], r"argument --seeds: expected a whole number >= 0, got '-1'"),
    (["search", "vdt-tiny", "--min-psnr", "30", "--max-evals", "0"], r"argument --max-evals: expected a whole"),
])
def test_bad_counts_are_refused_at_the_command_line(argv, match, capsys, tmp_path, monkeypatch, no_model):
    monkeypatch.chdir(tmp_path)
    assert re.search(match, parse_error(argv, capsys))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content, match", [
    (b"\x89PNG\r\n\x1a\n\x00\x00binary", r"argument --schedule: schedule file .*is not text"),
    (b'{"type": "PAB", "spatial": 2, "window": null}', r"argument --schedule: PAB schedule JSON has a field of the "
                                                        r"wrong type.*\"window\" is a pair"),
    (b'{"type": "PAB", "spatial": 2, "windows": [[100, 800]]}', r"argument --schedule: .*\"windows\" an object"),
], ids=["binary", "window-null", "windows-list"])
@pytest.mark.parametrize("command", [["export", "--out", "o"], ["inspect"], ["demo"]])
def test_bad_schedule_files_are_refused_at_the_command_line(command, content, match, tmp_path, capsys,
                                                           monkeypatch, no_model):
    monkeypatch.chdir(tmp_path)
    Path("s.json").write_bytes(content)
    assert re.search(match, parse_error([*command, "--schedule", "s.json"], capsys))


def test_folder_as_schedule_is_refused(tmp_path, capsys, monkeypatch, no_model):
    monkeypatch.chdir(tmp_path)
    Path("mine.json").mkdir()
    err = parse_error(["export", "--out", "o", "--schedule", "mine.json"], capsys)
    assert "argument --schedule: schedule path mine.json is a folder; pass a .json file" in err
    Path("plans").mkdir()
    err = parse_error(["bench", "vdt-tiny", "--schedule", "plans"], capsys)
    assert "argument --schedule: schedule file plans does not exist or is not a file" in err


def test_export_out_checks_come_before_the_model(tmp_path, capsys, monkeypatch, no_model):
    monkeypatch.chdir(tmp_path)
    Path("notes.txt").write_text("mine")
    err = command_error(["export", "--model", "vdt-tiny", "--out", "notes.txt"], capsys)
    assert "export folder notes.txt is a file, not a folder" in err
    err = command_error(["export", "--model", "vdt-tiny", "--out", "notes.txt/sub"], capsys)
    assert "notes.txt: it is a file" in err
    err = command_error(["export", "--model", "vdt-tiny", "--out", ""], capsys)
    assert "export folder name is empty" in err
    mine = Path("mine")
    mine.mkdir()
    for name in ("phase_0.onnx", "weights.bin", "manifest.json"):
        (mine / name).write_text(f"the user's {name}")
    before = digest(mine)
    for extra in ([], ["--overwrite"]):
        err = command_error(["export", "--model", "vdt-tiny", "--out", "mine", *extra], capsys)
        assert "not a graphpass export" in err and "never replaces files it did not write" in err
    assert digest(mine) == before
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("argv, match", [
    (["analyze", "vdt-tiny", "--out", "notes.txt"], r"argument --out: notes\.txt is a file, not a folder"),
    (["bench", "vdt-tiny", "--out", "notes.txt"], r"argument --out: notes\.txt is a file, not a folder"),
    (["demo", "--out", "notes.txt"], r"argument --out: notes\.txt is a file, not a folder"),
    (["inspect", "--out", "notes.txt/graphs"], r"argument --out: cannot create notes\.txt/graphs: .* is a file"),
    (["search", "vdt-tiny", "--min-psnr", "30", "--out", "plans"], r"argument --out: plans is a folder; name a file"),
    (["calibrate", "--target-psnr", "30", "--out", "plans"], r"argument --out: plans is a folder"),
])
def test_other_commands_check_out_before_sampling(argv, match, tmp_path, capsys, monkeypatch, no_model):
    monkeypatch.chdir(tmp_path)
    Path("notes.txt").write_text("mine")
    Path("plans").mkdir()
    assert re.search(match, parse_error(argv, capsys))
    assert Path("notes.txt").read_text() == "mine" and list(Path("plans").iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="permission bits do not stop root")
def test_read_only_out_is_refused_before_the_model(tmp_path, capsys, no_model):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        err = command_error(["export", "--model", "vdt-tiny", "--out", str(ro / "x")], capsys)
        assert "is not writable" in err
        err = parse_error(["analyze", "vdt-tiny", "--out", str(ro)], capsys)
        assert "is not writable" in err
    finally:
        ro.chmod(0o755)


def test_read_only_place_is_refused_before_the_model_as_root_too(tmp_path, capsys, monkeypatch, no_model):
    """Root ignores permission bits, so a read-only mount is what stops it: simulated by the probe folder's
    creation failing with EROFS, as it does on such a mount."""
    import errno
    import tempfile

    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    err = command_error(["export", "--model", "vdt-tiny", "--out", str(tmp_path / "x")], capsys)
    assert f"cannot write the export folder {tmp_path / 'x'}" in err and "Read-only file system" in err
    err = parse_error(["analyze", "vdt-tiny", "--out", str(tmp_path / "a")], capsys)
    assert "argument --out: cannot write" in err and "Read-only file system" in err
    assert list(tmp_path.iterdir()) == []
