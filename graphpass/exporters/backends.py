"""Turn a phase graph into a callable for a backend. ``eager`` runs the FX graph as is."""
from __future__ import annotations

from typing import Callable

from ..errors import GraphpassError
from ..passes.specialise import PhaseGraph

BACKENDS = ("eager", "inductor")


def make_runner(pg: PhaseGraph, backend: str) -> Callable:
    if backend == "eager":
        return pg.gm
    if backend == "inductor":
        import torch

        return torch.compile(pg.gm, fullgraph=True, dynamic=False)
    raise GraphpassError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} (ONNX Runtime and "
                         f"TensorRT run exported artefacts: graphpass.export(...) then graphpass.load(...))")
