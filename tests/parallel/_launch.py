"""Run a function on N fresh processes joined by a gloo process group, with a hard time limit.

``launch(fn, world_size=2, timeout=120)`` starts ``world_size`` processes; each initialises
``torch.distributed`` (gloo, CPU, a free TCP port, 60 s collective timeout), runs ``fn(rank, world_size)``
with one thread, and saves the dict it returns. The parent returns the per-rank dicts in rank order. A
process that raises fails the test with its traceback; processes still running at ``timeout`` are killed and
the test fails instead of blocking.

The ranks are forked from this process when it runs no other thread (they inherit its imports: torch,
diffusers and graphpass are not imported again, and set_num_threads(1) keeps OpenMP out of the children);
otherwise from a clean server process that imports ``preload`` once (``forkserver``).

``launch_once(fn, ...)`` is ``launch`` whose per-rank dicts are kept for the life of the process: the test
modules that read parts of one spawn's results (tests/parallel/_workers.py: ``parallel_checks``) pay for one
spawn between them (their tests share one xdist group, tests/conftest.py).
"""
from __future__ import annotations

import datetime
import functools
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world_size: int, port: int, folder: str) -> None:
    for p in (str(HERE), str(HERE.parent)):
        if p not in sys.path:
            sys.path.insert(0, p)
    torch.set_num_threads(1)
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        result = fn(rank, world_size)
        torch.save(result, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def launch(fn, world_size: int = 2, timeout: float = 120.0, preload: tuple[str, ...] = ()) -> list[dict]:
    method = "fork" if threading.active_count() == 1 else "forkserver"
    if method == "forkserver":
        mp.set_forkserver_preload(["_launch", *preload])
    with tempfile.TemporaryDirectory() as folder:
        ctx = mp.start_processes(_entry, args=(fn, world_size, free_port(), folder), nprocs=world_size,
                                 join=False, start_method=method)
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    pytest.fail(f"{fn.__name__} on {world_size} ranks did not finish in {timeout:.0f} s (hang?)")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return [torch.load(Path(folder) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


@functools.cache
def launch_once(fn, world_size: int = 2, timeout: float = 120.0, preload: tuple[str, ...] = ()) -> list[dict]:
    """:func:`launch`, once per process for the same arguments; callers must not change the dicts."""
    return launch(fn, world_size=world_size, timeout=timeout, preload=preload)


def launch_allowing_exits(fn, world_size: int = 2, timeout: float = 120.0,
                          preload: tuple[str, ...] = ()) -> tuple[dict[int, dict], dict[int, int]]:
    """Like :func:`launch`, for tests where a rank is meant to die: waits for every process (a rank that
    exits does not stop the others) and returns (results of the ranks that finished, exit code per rank).
    Processes still running at ``timeout`` are killed and the test fails."""
    method = "fork" if threading.active_count() == 1 else "forkserver"
    if method == "forkserver":
        mp.set_forkserver_preload(["_launch", *preload])
    with tempfile.TemporaryDirectory() as folder:
        ctx = mp.start_processes(_entry, args=(fn, world_size, free_port(), folder), nprocs=world_size,
                                 join=False, start_method=method)
        deadline = time.monotonic() + timeout
        try:
            for p in ctx.processes:
                p.join(max(0.0, deadline - time.monotonic()))
            if any(p.is_alive() for p in ctx.processes):
                pytest.fail(f"{fn.__name__} on {world_size} ranks did not finish in {timeout:.0f} s (hang?)")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results = {r: torch.load(Path(folder) / f"rank{r}.pt", weights_only=False) for r in range(world_size)
                   if (Path(folder) / f"rank{r}.pt").is_file()}
        return results, {r: p.exitcode for r, p in enumerate(ctx.processes)}
