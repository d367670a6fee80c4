"""Check an export before it is kept: every exported phase runs once under ONNX Runtime and must give the
outputs of its phase graph run eagerly.

An op whose ONNX lowering computes something else (a dropped constant, a kernel that differs) would
otherwise give a folder that loads and runs and returns wrong numbers, NaN included. One call per phase
(eager and ONNX Runtime) is cheap next to the export itself.

    >>> graphpass.export(opt, "out/model")                      # verify=True: checked, then written
    ArtefactError: phase 0 (store 4) exported to ONNX does not reproduce its graph under ONNX Runtime:
    output output.0 has 288 NaN/inf values where eager has none (first in Reciprocal node_reciprocal_1, ...)

Inputs: the ``example_kwargs`` given to :func:`graphpass.export` (the capture's own call is the natural
choice), else seeded ones: floating inputs and cached tensors drawn from N(0, 1), integer and boolean inputs
ones (masks keep every token, indices stay valid). The same tensors go to both runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ArtefactError
from ..schedules.base import Plan
from .artefact import PhaseSpec
from .onnx_export import cache_input_specs
from .ort_runner import ort_runner_factory

if TYPE_CHECKING:
    from ..runtime.executor import OptimizedModel

#: Allowed difference per dtype: ``atol + rtol * max|eager output|`` (float32 kernels of ONNX Runtime and
#: PyTorch differ by ~1e-6 relative on the zoo's models; reduced precisions by their rounding).
TOLERANCE = {torch.float32: (1e-5, 1e-3), torch.float64: (1e-8, 1e-6), torch.float16: (1e-3, 1e-2),
             torch.bfloat16: (1e-2, 3e-2)}


def require_onnxruntime() -> None:
    """``verify=True`` runs the exported files; say how to get the runtime (or skip the check)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ArtefactError("graphpass.export(..., verify=True) runs every exported phase once under ONNX Runtime: "
                            "pip install onnxruntime (or 'graphpass[onnx]'), or pass verify=False") from None


def _seeded(shape, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """N(0, 1) for floating tensors; ones for integer and boolean ones: a mask of ones keeps every token (a mask
    of zeros would mask whole rows, whose softmax PyTorch and ONNX Runtime resolve differently) and an index of
    one is valid wherever indices are."""
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.ones(shape, dtype=dtype)


def verification_inputs(opt: "OptimizedModel", example_kwargs: dict[str, Any] | None) -> list[torch.Tensor]:
    """The graph inputs both runs get: ``example_kwargs`` flattened as a call would be, else seeded ones.

    >>> [tuple(t.shape) for t in verification_inputs(opt, None)]
    [(2, 4, 3, 8, 8), (2, 5, 16), (2,)]
    """
    if example_kwargs is not None:
        return [t.detach().cpu() for t in opt.captured.flatten_call(example_kwargs)]
    gen = torch.Generator().manual_seed(0)
    return [_seeded(s.shape, s.dtype, gen) for s in opt.captured.input_specs]


def _mismatch(got: torch.Tensor, want: torch.Tensor) -> str | None:
    """Why ``got`` (ONNX Runtime) is not ``want`` (eager), or None when it is within :data:`TOLERANCE`.

    >>> _mismatch(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]))
    'has 1 NaN/inf values where eager has none'
    """
    if tuple(got.shape) != tuple(want.shape):
        return f"has shape {tuple(got.shape)}, eager {tuple(want.shape)}"
    if not want.is_floating_point():
        bad = int((got != want).sum())
        return f"differs in {bad} of {want.numel()} values" if bad else None
    atol, rtol = TOLERANCE.get(want.dtype, TOLERANCE[torch.float32])
    got, want = got.to(torch.float64), want.to(torch.float64)
    finite = torch.isfinite(want)
    lost = int((~torch.isfinite(got) & finite).sum())
    if lost:
        return f"has {lost} NaN/inf values where eager has none"
    both = finite & torch.isfinite(got)
    if not both.any():
        return None
    scale = float(want[both].abs().max())
    diff = float((got[both] - want[both]).abs().max())
    if diff > atol + rtol * scale:
        return f"differs by {diff:.3g} (largest eager value {scale:.3g}, tolerance {atol + rtol * scale:.3g})"
    return None


def first_nonfinite_node(path: Path, feed: dict[str, Any]) -> str | None:
    """The first node of the ONNX file at ``path`` (in graph order) whose output holds NaN/inf on ``feed``,
    as ``"<OpType> <node name> (<module scope>)"``; None when none does or the file cannot be probed."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    typed = {v.name: v for v in model.graph.value_info}
    known = {o.name for o in model.graph.output}
    order = []
    for node in model.graph.node:
        for o in node.output:
            if o in typed and o not in known:
                model.graph.output.append(typed[o])
                order.append((o, node))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every node's output
    try:
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        wanted = {i.name for i in sess.get_inputs()}
        values = dict(zip(names, sess.run(names, {k: v for k, v in feed.items() if k in wanted})))
    except Exception:  # noqa: BLE001 - a diagnostic only: the caller's error stands without it
        return None
    for name, node in order:
        v = values.get(name)
        if v is not None and v.dtype.kind == "f" and not np.isfinite(v).all():
            scope = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
            return f"{node.op_type} {node.name}" + (f" ({scope.rsplit('/', 2)[-2]})" if scope.count("/") else "")
    return None


def at_timestep(opt: "OptimizedModel", inputs: list[torch.Tensor], t: float) -> list[torch.Tensor]:
    """``inputs`` with the timestep input set to ``t``: each phase is checked at a step where the plan runs it,
    since a lowering may hold at one timestep and overflow at another (e.g. an op of an ``If`` branch at the
    first, noisiest step). Unchanged when the timestep is not one of the graph's tensor inputs.

        >>> [float(x) for x in at_timestep(opt, inputs, 981.0)[2]]     # vdt: inputs (x, ids, timestep)
        [981.0, 981.0]
    """
    names = list(opt.captured.input_names)
    if opt.timestep_arg not in names:
        return list(inputs)
    i = names.index(opt.timestep_arg)
    return inputs[:i] + [torch.full_like(inputs[i], t)] + inputs[i + 1:]


def verify_export(opt: "OptimizedModel", folder: Path, manifest: dict[str, Any], plan: Plan,
                  inputs: list[torch.Tensor]) -> None:
    """Run every phase of the export in ``folder`` once under ONNX Runtime on ``inputs`` (at the first timestep
    where the plan runs the phase, :func:`at_timestep`; plus seeded cached tensors) and compare with the phase
    graph run eagerly; raise :class:`ArtefactError` naming the phase and its first output that differs."""
    make = ort_runner_factory(folder, manifest)
    gen = torch.Generator().manual_seed(1)
    for entry, phase in zip(manifest["phases"], plan.distinct()):
        pg = opt.phase_graph(phase)
        caches = [_seeded(shape, dtype, gen) for shape, dtype in cache_input_specs(pg)]
        device = next((p.device for p in pg.gm.parameters()), torch.device("cpu"))
        args = [a.to(device) for a in at_timestep(opt, inputs, plan.timesteps[plan.phases.index(phase)]) + caches]
        with torch.no_grad():
            want = [w.detach().cpu() for w in pg.gm(*args)]
        spec = PhaseSpec(id=entry["id"], phase=phase, file=entry["file"], cache_inputs=entry["cache_inputs"],
                         cache_outputs=entry["cache_outputs"], num_user_outputs=entry["num_user_outputs"])
        runner = make(spec, "onnxruntime")
        got = runner(*[a.cpu() for a in args])
        for name, g, w in zip(runner.output_names, got, want):
            why = _mismatch(g, w)
            if why is None:
                continue
            culprit = None
            if "NaN" in why and manifest.get("single_file") is None:
                feed = {n: a.cpu().contiguous().numpy() for n, a in zip(runner.input_names, args)}
                culprit = first_nonfinite_node(folder / entry["file"], feed)
            raise ArtefactError(
                f"phase {entry['id']} ({phase.label()}) exported to ONNX does not reproduce its graph under ONNX "
                f"Runtime: output {name} {why}" + (f" (first non-finite value made by {culprit})" if culprit else "")
                + ". An op of this phase lowers to ONNX as something else; serve the model with graphpass.optimize "
                  "(eager or inductor), or pass verify=False to write the files anyway (their outputs will be "
                  "wrong)")

