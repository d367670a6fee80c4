"""Where an export is written: only into a new or empty folder, or over an earlier graphpass export, and
always all at once.

An export is written into a hidden temporary sibling of the destination (``.<name>.graphpass-<random>``)
and renamed into place at the end, so an export that fails or is interrupted leaves the folder as it was:
no half-written artefact, and an earlier artefact still loads. Files graphpass did not write are never
replaced or deleted: a folder holding any is refused, even with ``overwrite=True``.

    >>> check_destination("out/new-folder")                     # fine: does not exist yet
    PosixPath('out/new-folder')
    >>> check_destination("README.md")
    Traceback (most recent call last):
    ArtefactError: export folder README.md is a file, not a folder; choose a new folder name ...
    >>> with staged("out/vdt-onnx", overwrite=True) as tmp:     # write the files into tmp
    ...     export_onnx(opt, tmp)                               # out/vdt-onnx is replaced on success only
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import ArtefactError
from .manifest import MANIFEST

#: Prefix of the temporary sibling an export is written into (hidden, named after the destination).
STAGING_PREFIX = ".{name}.graphpass-"


def _is_graphpass_export(folder: Path) -> dict | None:
    """The manifest of ``folder`` when it looks like a graphpass export (a JSON object with
    ``graphpass_version`` and ``files``), else None. Nothing else in the folder is opened."""
    path = folder / MANIFEST
    if not path.is_file() or path.is_symlink():
        return None
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(m, dict) and "graphpass_version" in m and isinstance(m.get("files"), dict):
        return m
    return None


def _foreign_entries(folder: Path, manifest: dict) -> list[str]:
    """Entries of an export folder that its manifest does not list (files the user added, folders)."""
    ours = set(manifest["files"]) | {MANIFEST}
    return sorted(p.name for p in folder.iterdir() if p.name not in ours or not p.is_file() or p.is_symlink())


def _listing(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_destination(folder: str | Path, overwrite: bool = False) -> Path:
    """Check that an export may be written to ``folder``, before any work; returns it as a Path.

    Accepted: a folder that does not exist yet (its parents are created), an empty folder, or, with
    ``overwrite``, an earlier graphpass export holding nothing but the files its manifest lists.
    Refused with an :class:`~graphpass.errors.ArtefactError` naming the fix: an empty name (which would mean
    the current folder), a file, a folder holding anything else, an export without ``overwrite``, a
    location that cannot be written.
    """
    if not str(folder).strip():
        raise ArtefactError("the export folder name is empty; name a new folder, e.g. --out out/vdt-onnx "
                            "(graphpass.export(opt, 'out/vdt-onnx'))")
    folder = Path(folder)
    if folder.is_symlink():
        raise ArtefactError(f"export folder {folder} is a symbolic link; name a real folder (graphpass replaces "
                            f"the folder itself when it finishes, which would replace the link)")
    if folder.exists() and not folder.is_dir():
        raise ArtefactError(f"export folder {folder} is a file, not a folder; choose a new folder name")
    if folder.is_dir() and any(folder.iterdir()):
        manifest = _is_graphpass_export(folder)
        if manifest is None:
            names = sorted(p.name for p in folder.iterdir())
            raise ArtefactError(f"export folder {folder} is not empty and is not a graphpass export (it holds "
                                f"{_listing(names)}); graphpass never replaces files it did not write: export "
                                f"into a new or empty folder")
        foreign = _foreign_entries(folder, manifest)
        if foreign:
            raise ArtefactError(f"export folder {folder} holds a graphpass export and other files ({_listing(foreign)})"
                                f"; graphpass never replaces files it did not write: move them out or export into a "
                                f"new folder")
        if not overwrite:
            raise ArtefactError(f"export folder {folder} already holds a graphpass export; pass overwrite=True "
                                f"(--overwrite) to replace it, or choose a new folder")
    _check_writable(_existing_ancestor(folder.absolute().parent), folder)
    return folder


def _check_writable(parent: Path, folder: Path) -> None:
    """Create and remove an empty probe folder in ``parent``: the one check that also holds for read-only
    mounts and for users whom permission bits do not stop."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=STAGING_PREFIX.format(name=folder.name), dir=parent))
    except OSError as e:
        raise ArtefactError(f"cannot write the export folder {folder}: {parent} is not writable ({e.strerror}); "
                            f"choose a folder you can write to") from None


def _existing_ancestor(path: Path) -> Path:
    """The nearest existing ancestor of ``path`` (itself if it exists); refuses a file on the way."""
    while not path.exists():
        path = path.parent
    if not path.is_dir():
        raise ArtefactError(f"cannot create a folder under {path}: it is a file; choose another export folder")
    return path


@contextlib.contextmanager
def staged(folder: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``folder`` to write an export into; on success move it to
    ``folder`` (replacing an earlier export when ``overwrite``), on any error delete it and leave ``folder``
    as it was."""
    folder = check_destination(folder, overwrite)
    folder.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX.format(name=folder.name), dir=folder.absolute().parent))
    try:
        # mkdtemp makes a private (0700) folder: give the export the permissions a plain mkdir would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        yield tmp
        check_destination(folder, overwrite)  # again: the folder may have changed during a long export
        _commit(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit(tmp: Path, folder: Path) -> None:
    """Move the finished export ``tmp`` to ``folder``. An earlier export there is first moved aside and
    deleted only once the new one is in place (file by file: only what its manifest lists)."""
    if not folder.exists():
        os.rename(tmp, folder)
        return
    old_manifest = _is_graphpass_export(folder)
    if old_manifest is None:  # an empty folder (check_destination refused anything else)
        os.rmdir(folder)
        os.rename(tmp, folder)
        return
    aside = tmp.with_name(tmp.name + "-old")
    os.rename(folder, aside)
    try:
        os.rename(tmp, folder)
    except BaseException:
        os.rename(aside, folder)
        raise
    ours = set(old_manifest["files"]) | {MANIFEST}
    for p in aside.iterdir():  # entries of the folder itself: a listed "../x" cannot reach outside it
        if p.name in ours and p.is_file() and not p.is_symlink():
            p.unlink()
    with contextlib.suppress(OSError):  # left in place if something unexpected appeared in it
        aside.rmdir()
