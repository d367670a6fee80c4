"""Whole-model captures for the single-process tests of the sequence-parallel passes, made once per process
and shared by tests/parallel/test_passes.py and test_residual_sharding.py (which build each rank's graph
from them and never change them).

    >>> cap, regions = captured("vdt")
    >>> captured("vdt")[0] is cap
    True
"""
from __future__ import annotations

import functools

from conftest import make_case
from graphpass.passes.capture import CapturedGraph, capture
from graphpass.passes.tag import Region, tag_attention


@functools.lru_cache(maxsize=None)
def captured(name: str) -> tuple[CapturedGraph, list[Region]]:
    """(capture, tagged regions) of the tiny model ``name`` of tests/conftest.py at its example inputs."""
    case = make_case(name)
    cap = capture(case.model, case.kwargs())
    return cap, tag_attention(cap)
