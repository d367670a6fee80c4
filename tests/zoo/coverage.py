"""Write docs/models.md: what graphpass does on every diffusers video transformer of the zoo.

Runs each zoo case (tests/zoo/<family>.py) through what its tests check, and records per case: capture,
the attention kinds graphpass finds (and whether they equal the kinds read from the source), PAB against
the module-level reference over 20 steps, AdaCache (always-compute equal to eager; a replayed decision
sequence runs), static ONNX export of a PAB plan in onnxruntime, and the dimensions ``dynamic=True`` frees.
A failing column shows the first line of the error. Run from the repository root::

    python tests/zoo/coverage.py            # writes docs/models.md (a few minutes on 2 cores)
    python tests/zoo/coverage.py wan ltx2   # these cases only, printed
    python tests/zoo/coverage.py --update mochi   # recompute these rows of docs/models.md
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the checkout's graphpass (not an installed one) and tests/: the zoo package and the references
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent)]

import torch  # noqa: E402

import graphpass  # noqa: E402
from graphpass import PAB  # noqa: E402
from graphpass.passes.capture import capture  # noqa: E402
from graphpass.runtime.executor import OptimizedModel  # noqa: E402
from zoo import ZOO  # noqa: E402
from zoo._harness import RANGES, STEPS, attention_kinds, captured, loop, rel, run_pab  # noqa: E402


def _first_line(e: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    text = text.splitlines()[0] if text else type(e).__name__
    return f"{type(e).__name__}: {text}"[:160].replace("|", "\\|")


def _pab(name):
    opt, got, _, want = run_pab(name)
    reused = sum(len(ph.reused) for _, ph in opt.state().trace)
    return f"{rel(got, want):.0e} rel, {reused} reuses"


def _adacache(name):
    case = ZOO[name]
    model, cap, regions = captured(name)
    kinds = case.extra.get("kinds_override")
    opt = graphpass.optimize(model, graphpass.FrozenAdaCache(decisions="C" * len(STEPS)),
                             example_kwargs=case.kwargs(), video_input=case.video_input, kinds=kinds)
    eager = loop(case, model, case.kwargs())
    same = rel(loop(case, opt, case.kwargs()), eager)
    replay = graphpass.optimize(model, graphpass.FrozenAdaCache(decisions="CCRCRRCC" + "C" * (len(STEPS) - 8)),
                                example_kwargs=case.kwargs(), video_input=case.video_input, kinds=kinds)
    outs = loop(case, replay, case.kwargs())
    assert all(torch.isfinite(o).all() for o in outs)
    chain = f"; chain {replay.span.path}" if "residual_blocks" in case.extra else ""
    return f"always-compute {same:.0e}; replay ok{chain}"


def _onnx(name):
    case = ZOO[name]
    model, cap, regions = captured(name)
    modules = attention_kinds(case)
    ranges = {k: RANGES[k] for k in set(modules.values())}
    opt = OptimizedModel(model, cap, regions, PAB(**ranges, window=(0, 1000)))
    steps = STEPS[:4]
    opt.plan(steps)
    want = loop(case, opt, case.kwargs(), steps)
    with tempfile.TemporaryDirectory() as d:
        # verified on the case's own call: seeded inputs change shapes that follow input values (Mochi keeps the
        # text tokens its mask selects: 5 under seeded inputs, 3 in the case's second sample)
        folder = graphpass.export(opt, Path(d) / "a", format="onnx", example_kwargs=case.kwargs())
        runner = graphpass.load(folder, backend="onnxruntime")
        got = loop(case, runner, case.kwargs(), steps)
    return f"{max(float((a - b).abs().max()) for a, b in zip(got, want)):.0e} abs"


def _dynamic(name):
    case = ZOO[name]
    cap = capture(case.build(), case.kwargs(), dynamic=True)
    dims = {k: sorted(v) for k, v in cap.dynamic_dims.items()}
    return ", ".join(f"{k} {v}" for k, v in dims.items()) or "none (static)"


def row(name: str) -> dict[str, str]:
    case = ZOO[name]
    out = {"case": name, "class": case.cls}
    if case.unsupported:
        out.update(capture="unsupported", kinds="", pab="", adacache="", onnx="", dynamic="",
                   notes=f"clear error matching `{case.unsupported}`")
        return out
    t0 = time.perf_counter()
    try:
        _, _, regions = captured(name)
        out["capture"] = "ok"
    except Exception as e:  # noqa: BLE001 - the table records any failure
        out.update(capture=_first_line(e), kinds="", pab="", adacache="", onnx="", dynamic="")
        return out
    found = {r.path: r.kind for r in regions if r.kind != "mlp"}
    expected = attention_kinds(case)
    kinds = ", ".join(sorted(set(found.values())))
    out["kinds"] = kinds + (" (= source)" if found == expected else
                            f" (differs on {sum(found.get(p) != k for p, k in expected.items())} module(s))")
    for col, fn in (("pab", _pab), ("adacache", _adacache), ("onnx", _onnx), ("dynamic", _dynamic)):
        try:
            out[col] = fn(name)
        except Exception as e:  # noqa: BLE001
            out[col] = _first_line(e)
    out["notes"] = f"{time.perf_counter() - t0:.0f} s"
    return out


HEADER = """# Model coverage

What graphpass does on a tiny random config of every video transformer class diffusers 0.42.1 ships (the
zoo: `tests/zoo/<family>.py`, whose tests check the same things against eager and module-level references).
Generated by `python tests/zoo/coverage.py`; do not edit by hand.

* **capture**: `torch.export` through graphpass (pytree arguments flattened, data-dependent values specialized).
* **kinds**: attention kinds found in the graph; "= source" when every module's kind equals the one read from
  the model's source (written with the reason in the zoo case).
* **PAB**: every kind the model has reused (ranges spatial 2, temporal 3, cross 4, joint 2, text 3, other 3)
  over 20 steps, relative difference to the module-level reference and number of region reuses.
* **AdaCache**: a frozen always-compute decision sequence against eager, and a sequence with reuse steps;
  the cached chain's blocks when it does not start at the first block. Modules between blocks that add to the
  hidden state (Wan-Animate's face adapters, ConsisID's identity cross-attention, WanVACE's control blocks and
  their hints) are inside the chain and skipped with it; `tests/zoo/test_adapter_adacache.py` checks those
  models against a chain-level reference, the others against a per-block one.
* **ONNX**: per-phase export of a 4-step PAB plan (each phase checked under onnxruntime at export, after the
  rewrites of `graphpass/exporters/onnx_rewrites.py`) run in onnxruntime, largest difference to graphpass eager.
* **dynamic**: input dimensions `dynamic=True` leaves free (others are fixed by the model).

"""


def _row_quietly(name: str) -> dict[str, str]:
    import warnings

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    r = row(name)
    print(" | ".join(r.values()), flush=True)
    return r


def main(argv: list[str]) -> None:
    import multiprocessing as mp

    update = bool(argv) and argv[0] == "--update"
    if update:
        argv = argv[1:]
    names = argv or list(ZOO)
    with mp.get_context("spawn").Pool(min(len(names), os.cpu_count() or 1), maxtasksperchild=4) as pool:
        rows = pool.map(_row_quietly, names, chunksize=1)
    cols = ["class", "case", "capture", "kinds", "pab", "adacache", "onnx", "dynamic", "notes"]
    path = HERE.parent.parent / "docs" / "models.md"
    lines = {r["case"]: "| " + " | ".join(r.get(c, "") for c in cols) + " |" for r in rows}
    if update:  # keep the other rows as the last full run wrote them
        for old in path.read_text().splitlines():
            parts = old.split(" | ")
            if old.startswith("| ") and len(parts) > 2 and parts[1] in ZOO and parts[1] not in lines:
                lines[parts[1]] = old
    if update or not argv:
        body = sorted(lines.values(), key=lambda line: line.split(" | ")[:2])
        table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols), *body]
        path.write_text(HEADER + "\n".join(table) + "\n")
        print("wrote docs/models.md")


if __name__ == "__main__":
    main(sys.argv[1:])
