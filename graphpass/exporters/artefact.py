"""Run an exported folder: the plan's phases on ONNX Runtime sessions or TensorRT engines.

:func:`load` returns an :class:`ArtefactModel`: the runtime core (:class:`~graphpass.runtime.executor.
RuntimeCore`: timestep -> phase, cache contexts, store/reuse/free, new generation when the timestep goes back
up) driving one runner per exported phase. Only the runners differ from an optimized model's.

    >>> model = graphpass.load("out/vdt-onnx")                       # checks version and hashes
    >>> out = model(hidden_states=x, timestep=t, encoder_hidden_states=c, cond_mask=m)

Only the exported phases exist, so calls must follow the exported plan (its timesteps, in order); a call
that does not raises :class:`~graphpass.errors.ArtefactError` saying which step and timestep was expected.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree

from ..errors import ArtefactError
from ..passes.capture import ArgStructure, CallSignature, TensorSpec
from ..runtime.backends import PhaseRunner
from ..runtime.executor import RuntimeCore
from ..schedules.base import Phase, Plan, schedule_from_json
from ..techniques import Decision, StepCall
from .manifest import dtype_of, read_manifest, regions_of, schedule_plan, step_feeds
from .ort_runner import OrtOptions, ort_runner_factory
from .tensorrt import trt_runner_factory

LOAD_BACKENDS = ("onnxruntime", "tensorrt")


@dataclass
class PhaseSpec:
    """One exported phase, as the runtime core sees a phase program (inputs: the model's, then
    ``cache_inputs``; outputs: ``num_user_outputs`` model outputs, then ``cache_outputs``) plus where it lives.

    file: the phase's file in the folder (``model.onnx`` for every phase of the single-file layout).
    engine: its TensorRT engine file, when built.
    """

    id: int
    phase: Phase
    file: str
    cache_inputs: list[str]
    cache_outputs: list[str]
    num_user_outputs: int
    engine: str | None = None


def recorded_call(manifest: dict[str, Any]) -> CallSignature:
    """The call an export serves, as its manifest records it (static shapes: those of the export)."""
    return CallSignature(
        input_names=[e["name"] for e in manifest["inputs"]],
        input_specs=[TensorSpec(tuple(e["shape"]), dtype_of(e["dtype"])) for e in manifest["inputs"]],
        constants=dict(manifest["constants"]),
        structures={k: ArgStructure.from_dict(v) for k, v in manifest.get("structures", {}).items()},
        out_spec=pytree.treespec_loads(manifest["out_spec"]),
        model_type=manifest["model_type"])


class ArtefactModel(RuntimeCore):
    """An exported model: same keyword call and outputs as the model it was exported from.

    ``folder``/``manifest``: where it was loaded from and what it holds; ``backend``: the runtime of the
    phase files (``"onnxruntime"`` or ``"tensorrt"``); ``specs``: the exported phases;
    ``make_runner(spec, backend)`` makes the runner of each (an ONNX Runtime session's or a TensorRT engine's).
    """

    def __init__(self, folder: Path, manifest: dict[str, Any], backend: str,
                 make_runner: Callable[[PhaseSpec, str], PhaseRunner]):
        cached = {r.path: r.cache_keys for r in regions_of(manifest)}  # read_manifest checked them
        schedule = schedule_from_json(json.dumps(manifest["schedule"]))
        super().__init__(None, recorded_call(manifest), schedule, cached, make_runner,
                         timestep_arg=manifest["timestep_arg"], backend=backend)
        self.folder = folder
        self.manifest = manifest
        plan = schedule_plan(manifest)  # the schedule's own phases, which read_manifest matched with the files
        self.specs = [PhaseSpec(id=e["id"], phase=ph, file=e["file"], cache_inputs=e["cache_inputs"],
                                cache_outputs=e["cache_outputs"], num_user_outputs=e["num_user_outputs"],
                                engine=e.get("engine"))
                      for e, ph in zip(manifest["phases"], plan.distinct())]
        self._phase_graphs.update((s.phase, s) for s in self.specs)
        self._plan = Plan(plan.timesteps, [self.specs[i].phase for i in manifest["plan"]["phase_ids"]])
        self._feeds = step_feeds(manifest)  # per step, what the phase reads in place of a cached tensor

    # --- the core's hooks ------------------------------------------------------------------------
    def phase_graph(self, phase: Phase) -> PhaseSpec:
        try:
            return self._phase_graphs[phase]
        except KeyError:
            raise ArtefactError(f"phase {phase.label()!r} was not exported to {self.folder}; only the plan's "
                                f"{len(self.specs)} phases exist: re-export with the timesteps you sample "
                                f"with") from None

    def _decide(self, call: StepCall) -> Decision:
        plan, i, t = self._plan, call.counter, call.timestep
        if i >= len(plan):
            raise ArtefactError(f"call {i + 1} of a generation, but {self.folder} was exported for a plan of "
                                f"{len(plan)} steps; start a new generation (a higher timestep) or call reset()")
        if abs(plan.timesteps[i] - t) > 1e-6:
            raise ArtefactError(f"step {i} got timestep {t:g}, but {self.folder} was exported for timestep "
                                f"{plan.timesteps[i]:g} at that step (plan: {_short(plan.timesteps)}); only the "
                                f"exported phases exist: sample with the exported timesteps or re-export with yours")
        return Decision(plan.phases[i], on_plan=True, feeds=self._feeds[i])  # caches: freed by the next phase

    def plan(self, timesteps: Sequence[float] | torch.Tensor) -> Plan:
        """The exported plan, when ``timesteps`` are its own; an export serves no other."""
        if isinstance(timesteps, torch.Tensor):
            timesteps = timesteps.detach().cpu().flatten().tolist()
        ts = [float(t) for t in timesteps]
        if len(ts) != len(self._plan) or any(abs(a - b) > 1e-6 for a, b in zip(ts, self._plan.timesteps)):
            raise ArtefactError(f"{self.folder} holds the phases of a plan over {_short(self._plan.timesteps)}; it "
                                f"cannot serve {_short(ts)}: re-export with graphpass.export(..., timesteps=...)")
        return self._plan

    def preview_plan(self, timesteps: Sequence[float] | torch.Tensor, **kwargs) -> Plan:
        return self.plan(timesteps)

    def inspect(self, folder: str | None = None, timesteps: Sequence[float] | None = None) -> str:
        m = self.manifest
        lines = [f"{m['model_type']} exported by graphpass {m['graphpass_version']} ({m['format']}, {m['layout']}), "
                 f"backend {self.backend}; schedule {self.schedule}",
                 f"plan: {len(self._plan)} steps, phases per step {m['plan']['phase_ids']}"]
        for s in self.specs:
            lines.append(f"  phase {s.id}: {s.phase.label():<22} file {s.engine or s.file}  reads "
                         f"{len(s.cache_inputs)} cached tensors, stores {len(s.cache_outputs)}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"ArtefactModel({self.manifest['model_type']}, {self.folder}, backend={self.backend!r})"


def _short(ts: Sequence[float]) -> str:
    s = ", ".join(f"{t:g}" for t in ts[:4])
    return f"[{s}{', ...' if len(ts) > 4 else ''}] ({len(ts)} steps)"


# --- load -----------------------------------------------------------------------------------------
def load(folder: str | Path, backend: str | None = None, *, providers: Sequence[str] | None = None,
         threads: int | None = None, verify: bool = True, warmup: bool = True,
         ort_options: OrtOptions | None = None) -> ArtefactModel:
    """Load an exported folder as a runnable model.

    Args:
        folder: written by :func:`graphpass.export`.
        backend: ``"onnxruntime"`` (default for ONNX exports) or ``"tensorrt"`` (default when the folder holds
            engines; needs an NVIDIA GPU and the ``tensorrt`` package).
        providers: ONNX Runtime execution providers (default CPU).
        threads: ONNX Runtime intra-op threads (default: its own choice).
        verify: check the sha256 of every file against the manifest (on by default; the manifest's own
            sha256, its file names and its plan are checked always, see
            :func:`~graphpass.exporters.manifest.read_manifest`).
        warmup: build every phase's session and run it once on zeros now (ONNX Runtime), so that the first
            generation runs at the steady-state speed instead of paying session creation per phase.
        ort_options: how ONNX Runtime sessions are built (:class:`~graphpass.exporters.ort_runner.OrtOptions`;
            default: one shared copy of the weights, one shared arena, IO binding); ``providers`` and
            ``threads`` fill its fields of the same name.

    Raises :class:`~graphpass.errors.ArtefactError` for another graphpass version, an edited manifest, a
    file name outside the folder, a modified or missing file, an unknown backend or a missing runtime.
    """
    if backend is not None and backend not in LOAD_BACKENDS:
        raise ArtefactError(f"unknown backend {backend!r} for an exported folder; choose one of "
                            f"{', '.join(LOAD_BACKENDS)} (or leave backend=None to pick by the folder's format)")
    folder = Path(folder)
    manifest = read_manifest(folder, verify=verify)
    if backend is None:
        backend = "tensorrt" if manifest.get("format") == "tensorrt" else "onnxruntime"
    try:
        if backend == "onnxruntime":
            make = ort_runner_factory(folder, manifest, _ort_options(ort_options, providers, threads))
        else:
            if manifest["format"] != "tensorrt":
                raise ArtefactError(f"{folder} holds no TensorRT engines (format {manifest['format']!r}); export "
                                    f"with graphpass.export(opt, folder, format='tensorrt') or load with "
                                    f"backend='onnxruntime'")
            make = trt_runner_factory(folder, manifest)
        model = ArtefactModel(folder, manifest, backend, make)
        if warmup and backend == "onnxruntime":
            skipped = make.warm_up(model.specs)
            if skipped:
                warnings.warn(f"graphpass.load({folder}): phase(s) {sorted(skipped)} were built but not run at load "
                              f"(zero inputs are not a call this model takes: {next(iter(skipped.values()))}); "
                              f"their first call finishes the warm-up", stacklevel=2)
        return model
    except (KeyError, TypeError, ValueError) as e:
        raise ArtefactError(f"{folder / 'manifest.json'} is incomplete or malformed ({type(e).__name__}: {e}); "
                            f"re-export the model with graphpass.export") from e


def _ort_options(options: OrtOptions | None, providers: Sequence[str] | None, threads: int | None) -> OrtOptions:
    """``options`` with ``providers``/``threads`` filled in when given."""
    options = options or OrtOptions()
    if providers is not None:
        options = replace(options, providers=tuple(providers))
    if threads is not None:
        options = replace(options, threads=threads)
    return options
