"""Saved artefacts: export a plan's phase graphs to ONNX/TensorRT and load them back as runners of the runtime
core (backends that run phase graphs in process, eager and Inductor, are :mod:`graphpass.runtime.backends`).

    >>> opt = graphpass.optimize(model, "pab246", example_kwargs=kw, timesteps=ts)
    >>> graphpass.export(opt, "out/vdt-onnx")                    # one ONNX file per phase + weights.bin
    >>> model = graphpass.load("out/vdt-onnx")                   # ONNX Runtime, same keyword call
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import ArtefactError
from ..schedules.base import Plan
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

    * single file (default when the plan reuses region outputs and ``verify`` is on): ``model.onnx``, one
      graph where every reusable region is an ONNX ``If`` on a boolean input ``reuse.<path>``; one file and
      one session serve every phase. Where the model's regions cannot become ``If`` branches
      (torch.export cannot trace a region whose exits are views of one tensor as a ``cond`` branch, for one)
      or the single file fails the export's check below, the default falls back to per phase with a
      warning; ``single_file=True`` makes that an error.
    * per phase (``single_file=False``; the default for a plan that reuses nothing, for phases that cache
      values of their own such as TaylorSeer's, and with ``verify=False``, since an unchecked ``If`` branch
      could compute something else unseen): ``phase_<i>.onnx`` for each distinct phase, cached tensors as
      named inputs/outputs (``cache.blocks.0.spatial_attn.0``).

    Both read one shared ``weights.bin`` and, once loaded, hold every weight once. Why the single file is
    the default: the memory a load holds beyond the weights. Each ONNX Runtime session holds its graph,
    kernels and plans (about 2.5 MiB per 650-node phase of vdt-s), so per phase that cost is paid once
    per phase; the single file pays it once and runs a few percent slower (``If`` dispatch). Measured
    with ``benchmarks/backends.py`` on vdt-s under pab246 (figures and reasoning in ``docs/deployment.md``)::

        layout               CPU ms/step   peak RSS (load + one generation)
        no reuse                    57.9     58 MiB
        single file (default)       46.2     66 MiB   (1.14x)
        per phase (6 files)         43.2     84 MiB   (1.45x)

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
        single_file: ``True`` the single file, ``False`` one file per phase, ``None`` (default) the single file
            where the plan reuses a region and the model allows it (for TensorRT the layout is
            ``TensorRTConfig.layout``).
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
    single_file = _single_file(single_file, tensorrt, plan, verify)
    if format == "tensorrt":
        require_tensorrt()
    if verify:  # before the export: a missing runtime or a bad call costs nothing
        require_onnxruntime()
        inputs = verification_inputs(opt, example_kwargs)
    with staged(folder, overwrite) as tmp:
        manifest = export_onnx(opt, tmp, timesteps=timesteps, single_file=single_file, opset=opset)
        if verify:
            try:
                verify_export(opt, tmp, manifest, plan, inputs)
            except ArtefactError as e:
                if single_file is not None or manifest["layout"] != "single-file":
                    raise
                warnings.warn(f"graphpass: the single-file export of {opt.captured.model_type} does not reproduce "
                              f"its graph ({e}); exported one file per phase instead (single_file=False asks for "
                              f"that layout, True makes this an error)", stacklevel=2)
                for f in tmp.iterdir():
                    f.unlink()
                manifest = export_onnx(opt, tmp, timesteps=timesteps, single_file=False, opset=opset)
                verify_export(opt, tmp, manifest, plan, inputs)
        if format == "tensorrt":
            export_tensorrt(tmp, tensorrt)
    return Path(folder)


def _single_file(single_file: bool | None, tensorrt: TensorRTConfig | None, plan: Plan,
                 verify: bool) -> bool | None:
    """The layout an export writes (``True``: single file, ``False``: per phase, ``None``: the single file if it
    can be built and passes the check, else per phase): ``single_file`` if given; else, for ONNX, ``None``
    when the plan reuses region outputs and the export checks its files (the single file is the layout
    chosen by measurement, see :func:`export`; unchecked, its ``If`` branches could compute something else
    unseen), per phase otherwise; for TensorRT, ``TensorRTConfig.layout``, which an explicit
    ``single_file`` must agree with.

        >>> _single_file(None, None, pab_plan, True), _single_file(None, None, pab_plan, False)
        (None, False)
        >>> _single_file(None, None, no_reuse_plan, True), _single_file(True, None, pab_plan, False)
        (False, True)
    """
    if tensorrt is None:
        if single_file is None:
            phases = plan.distinct()
            switchable = any(ph.reused for ph in phases) and all(ph.caches_region_outputs for ph in phases)
            return None if switchable and verify else False
        return single_file
    wanted = tensorrt.layout == "single-file"
    if single_file is not None and single_file != wanted:
        asked = "one engine" if single_file else "one engine per phase"
        raise ArtefactError(f"single_file={single_file} asks for {asked}, TensorRTConfig(layout={tensorrt.layout!r}) "
                            f"for the other; drop one of them (the TensorRT layout is chosen by TensorRTConfig.layout)")
    return wanted


__all__ = ["export", "load", "ArtefactModel", "TensorRTConfig", "FORMATS", "check_destination"]
