"""Saved artefacts: export a plan's phase graphs to ONNX/TensorRT and load them back as runners of the runtime
core (backends that run phase graphs in process, eager and Inductor, are :mod:`graphpass.runtime.backends`).

    >>> opt = graphpass.optimize(model, "pab246", example_kwargs=kw, timesteps=ts)
    >>> graphpass.export(opt, "out/vdt-onnx")                    # one ONNX file per phase + weights.bin
    >>> model = graphpass.load("out/vdt-onnx")                   # ONNX Runtime, same keyword call
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import ArtefactError
from .artefact import ArtefactModel, load
from .destination import check_destination, staged
from .onnx_export import export_onnx, plan_for_export
from .tensorrt import TensorRTConfig, export_tensorrt, require_tensorrt
from .verify import require_onnxruntime, verification_inputs, verify_export

if TYPE_CHECKING:
    from ..runtime.executor import OptimizedModel

FORMATS = ("onnx", "tensorrt")


def export(opt: "OptimizedModel", folder: str | Path, format: str = "onnx", *,
           timesteps: Sequence[float] | None = None, single_file: bool | None = None, opset: int | None = None,
           tensorrt: TensorRTConfig | None = None, overwrite: bool = False, verify: bool = True,
           example_kwargs: dict[str, Any] | None = None) -> Path:
    """Save the phases of ``opt``'s plan to ``folder`` for deployment; load them with :func:`graphpass.load`.

    Layouts (``format="onnx"``):

    * per phase (default): ``phase_<i>.onnx`` for each distinct phase of the plan, cached tensors as named
      inputs/outputs (``cache.blocks.0.spatial_attn.0``), all files reading one shared ``weights.bin``.
    * ``single_file=True``: ``model.onnx``, one graph where every reusable region is an ONNX ``If`` on a
      boolean input ``reuse.<path>``; one file and one session serve every phase.

    Why per phase is the default (``benchmarks/backends.py`` on vdt-s, pab246, 30 steps, 1 thread, CPU
    time per step, peak RSS added by load + one generation; ONNX Runtime sessions as :func:`graphpass.load`
    builds them: one shared copy of the weights, one shared arena, IO binding)::

        layout                    ms/step   PAB speedup vs no-reuse ORT   peak RSS
        no reuse (1 phase)          57.8                          1.00x     59 MiB
        per phase (6 files)         44.2                          1.31x     85 MiB
        single file (If)            47.6                          1.21x     76 MiB
        per phase, ORT defaults     44.8                          1.29x    333 MiB   (a copy and an arena per session)

    (eager PAB speedup in the same run: 1.41x.)
    Both layouts hold every weight once in memory, so for a large model they cost the same; per phase is
    a few percent faster (graphs without control flow) and exports for any plan, single file holds one
    session instead of one per phase (about 2.5 MiB each here) and is what TensorRT builds from. The
    folders differ only by graph files (6.2 vs 5.6 MiB, weights.bin 5.3 MiB either way).

    ``format="tensorrt"`` writes the single-file ONNX export and builds one engine from it
    (``model.engine``): TensorRT cannot share weights between engines, so one engine with conditionals is
    what holds the weights once on the device (``TensorRTConfig(layout="per-phase")`` builds one engine per
    phase instead; see :mod:`graphpass.exporters.tensorrt`). It needs an NVIDIA GPU and the ``tensorrt``
    package. Every folder has a ``manifest.json`` (versions, schedule, plan, per-phase inputs/outputs, sha256
    of every file and of the manifest itself).

    The folder is written all at once (see :mod:`graphpass.exporters.destination`): the files go into a
    hidden temporary sibling that is renamed to ``folder`` at the end, so a failed or interrupted export
    leaves ``folder`` as it was. ``folder`` must be new or empty, or hold an earlier graphpass export
    (and nothing else) to be replaced with ``overwrite=True``; anything else is refused before any work.

        >>> graphpass.export(opt, "out/vdt-onnx")                   # new folder
        >>> graphpass.export(opt, "out/vdt-onnx")                   # again: ArtefactError, pass overwrite=True
        >>> graphpass.export(opt, "out/vdt-onnx", overwrite=True)   # replaced once the new one is complete

    Before the folder is written, every exported phase runs once under ONNX Runtime and its outputs are
    compared with the phase graph's eager outputs (:mod:`graphpass.exporters.verify`): NaN/inf where eager is
    finite, or a difference beyond the tolerance, raises :class:`~graphpass.errors.ArtefactError` naming the
    phase and the output, so a lowering that computes something else never yields a folder.

        >>> graphpass.export(opt, "out/vdt-onnx", example_kwargs=kw)   # checked on the call you capture with

    Args:
        opt: the optimized model; its plan (``opt.plan(timesteps)``) fixes which phases exist.
        folder: output folder (created, with its parents).
        timesteps: the sampler's timesteps, if ``opt.plan`` was not called.
        single_file: the single-graph layout above (for TensorRT the layout is ``TensorRTConfig.layout``).
        opset: ONNX opset (default: the exporter's).
        tensorrt: engine options for ``format="tensorrt"``.
        overwrite: replace an earlier graphpass export in ``folder``.
        verify: run each exported phase once under ONNX Runtime against its eager graph (needs onnxruntime).
        example_kwargs: the call ``verify`` runs (default: seeded inputs of the captured shapes and dtypes).

    Returns the folder.
    """
    if format not in FORMATS:
        raise ArtefactError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if format == "onnx" and tensorrt is not None:
        raise ArtefactError("tensorrt= options apply to format='tensorrt' only")
    single_file = _single_file(single_file, tensorrt or TensorRTConfig() if format == "tensorrt" else None)
    if format == "tensorrt":
        tensorrt = tensorrt or TensorRTConfig()
    check_destination(folder, overwrite)  # before the (slow) export: a refused folder costs nothing
    if opt.captured.value_checks:  # the phase files cannot check them: a changed value would run silently
        first = opt.captured.value_checks[0]
        raise ArtefactError(f"{opt.captured.model_type} branches on tensor values (e.g. {first.where} in module "
                            f"{first.module!r}), which graphpass fixes at the example's and checks per call; an "
                            f"exported artefact cannot check them. Export a model whose call does not branch on "
                            f"values, or serve it with graphpass.optimize")
    plan = plan_for_export(opt, timesteps)  # an empty or missing plan is refused before the folder is touched
    if format == "tensorrt":
        require_tensorrt()
    if verify:  # before the export: a missing runtime or a bad call costs nothing
        require_onnxruntime()
        inputs = verification_inputs(opt, example_kwargs)
    with staged(folder, overwrite) as tmp:
        manifest = export_onnx(opt, tmp, timesteps=timesteps, single_file=single_file, opset=opset)
        if verify:
            verify_export(opt, tmp, manifest, plan, inputs)
        if format == "tensorrt":
            export_tensorrt(tmp, tensorrt)
    return Path(folder)


def _single_file(single_file: bool | None, tensorrt: TensorRTConfig | None) -> bool:
    """The layout an export writes: ``single_file`` if given, else the single file (ONNX; the layout chosen by
    measurement, see :func:`export`) or ``TensorRTConfig.layout`` (TensorRT), which an explicit
    ``single_file`` must agree with.

        >>> _single_file(None, None), _single_file(False, None), _single_file(None, TensorRTConfig(layout="per-phase"))
        (True, False, False)
    """
    if tensorrt is None:
        return True if single_file is None else single_file
    wanted = tensorrt.layout == "single-file"
    if single_file is not None and single_file != wanted:
        asked = "one engine" if single_file else "one engine per phase"
        raise ArtefactError(f"single_file={single_file} asks for {asked}, TensorRTConfig(layout={tensorrt.layout!r}) "
                            f"for the other; drop one of them (the TensorRT layout is chosen by TensorRTConfig.layout)")
    return wanted


__all__ = ["export", "load", "ArtefactModel", "TensorRTConfig", "FORMATS", "check_destination"]
