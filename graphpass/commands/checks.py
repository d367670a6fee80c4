"""Argument types of the command line: every value is checked when the command line is read, before any
model is built or sampled, and a bad one ends the command with a message naming the argument and the fix
(argparse prints ``graphpass <command>: error: argument --steps: ...`` and exits with status 2).

    >>> p.add_argument("--steps", type=positive_int, default=50)
    >>> p.add_argument("--schedule", type=schedule_arg, default="pab246")    # a Schedule object
    >>> p.add_argument("--out", type=output_folder, default="out/demo")      # not a file, writable
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from ..errors import ScheduleError
from ..schedules import PAB, Schedule, schedule_from_json


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def positive_int(text: str) -> int:
    """A count that must be at least 1 (steps, batch, videos, iterations).

        >>> positive_int("50")
        50
        >>> positive_int("0")
        Traceback (most recent call last):
        argparse.ArgumentTypeError: expected a whole number >= 1, got '0'
    """
    n = _whole_number(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return n


def non_negative_int(text: str) -> int:
    """A whole number >= 0 (seeds; thread counts where 0 means torch's default)."""
    n = _whole_number(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return n


def schedule_arg(text: str) -> Schedule:
    """A PAB preset name (``pab246``, ``latte``...), JSON text, or a schedule JSON file, read now.

        >>> schedule_arg("pab246")
        PAB(spatial=2, temporal=4, cross=6, ...)
        >>> schedule_arg("out/")            # a folder
        Traceback (most recent call last):
        argparse.ArgumentTypeError: schedule path out is a folder; pass a .json file ...
    """
    try:
        if text.endswith(".json") or text.lstrip().startswith("{") or Path(text).exists():
            return schedule_from_json(text)
        return PAB.preset(text)
    except ScheduleError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def schedule_file(text: str) -> str:
    """A schedule JSON file that must load (``graphpass bench --schedule``); returns the path as given."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"schedule file {text} does not exist or is not a file; pass the .json "
                                         f"written by `graphpass search`")
    schedule_arg(text)
    return text


def _writable_ancestor(path: Path) -> Path:
    """The nearest existing folder above ``path`` (which is created later), checked writable by creating and
    removing an empty probe folder in it (permission bits alone miss read-only mounts and root)."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create {path}: {parent} is a file; choose another path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".graphpass-probe-", dir=parent))
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write {path}: {parent} is not writable ({e.strerror}); choose "
                                         f"a path you can write to") from None
    return parent


def output_folder(text: str) -> Path:
    """A folder the command writes into (created if missing): not a file, not empty, in a writable place."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the output folder name is empty; name a folder, e.g. out/run1")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file, not a folder; choose a folder name")
    if path.is_dir():
        target = path / ".graphpass-probe"  # probe inside the existing folder itself
        _writable_ancestor(target)
    else:
        _writable_ancestor(path)
    return path


def output_file(text: str) -> Path:
    """A file the command writes (e.g. a schedule JSON): not a folder, in a writable place."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the output file name is empty; name a file, e.g. schedule.json")
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder; name a file inside it, e.g. {path / 'schedule.json'}")
    _writable_ancestor(path)
    return path
