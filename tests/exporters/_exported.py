"""The exported VDT the ONNX export and session tests share: a PAB plan whose steps store and reuse in turn,
its eager outputs, and the folder it was exported to."""
from __future__ import annotations

import json
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
        self.folder = graphpass.export(self.opt, folder, single_file=single_file)
        self.manifest = json.loads((folder / "manifest.json").read_text())
