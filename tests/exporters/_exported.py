"""The exported VDT the ONNX export, session and TensorRT-plan tests share: a PAB plan whose steps store and
reuse in turn, its eager outputs, and the folder it was exported to.

An export costs seconds per phase, so :func:`shared_export` exports each (model, layout) once per test
process and every module reads the same folder (tests that change a folder work on a copy). Both layouts are
what ``graphpass.export`` writes by default: the per-phase folder is the unchecked default
(``verify=False``: the tests compare ONNX Runtime with the eager outputs themselves, so the export's own
check would run the same phases a second time), the single file the checked default (``verify=True``), so
the tests of the default layout read these folders instead of exporting the same plan again.

    >>> ex = shared_export("vdt")                  # per phase; shared_export("vdt", single_file=True)
    >>> max_diff(run_loop(graphpass.load(ex.folder), ex.kw, STEPS), ex.eager) <= ATOL
    True
"""
from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch

import graphpass
from graphpass import PAB
from conftest import make_case, run_loop

ATOL = 1e-4
#: 6 steps inside (100, 800): with PAB(spatial=2, cross=2) they store and reuse in turn.
STEPS = [741.0 - 120 * i for i in range(6)]
SCHEDULE = PAB(spatial=2, cross=2, window=(100, 800))


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


class Exported:
    def __init__(self, name: str, folder: Path, single_file: bool = False, steps: list[float] = STEPS):
        self.case = make_case(name)
        self.kw = self.case.kwargs()
        self.opt = graphpass.optimize(self.case.model, SCHEDULE, example_kwargs=self.kw, timesteps=steps)
        self.eager = run_loop(self.opt, self.kw, steps)
        # the defaults: unchecked, a file per phase; checked, the single file (the plan reuses)
        self.folder = graphpass.export(self.opt, folder, verify=single_file)
        self.manifest = json.loads((folder / "manifest.json").read_text())


@functools.cache
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="graphpass-shared-exports-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


@functools.cache
def shared_export(name: str, single_file: bool = False) -> Exported:
    """``name`` under :data:`SCHEDULE` and :data:`STEPS`, exported once per process (read-only for tests):
    ``single_file=True`` is ``graphpass.export(opt, folder)``, ``False`` the same with ``verify=False``."""
    return Exported(name, _root() / f"{name}-{'single' if single_file else 'per-phase'}", single_file=single_file)
