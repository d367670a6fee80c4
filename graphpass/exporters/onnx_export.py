"""ONNX export of an optimized model: one file per distinct phase of its plan, weights stored once.

Each phase graph (:func:`~graphpass.passes.specialize.specialize_phase`) is exported with
``torch.onnx.export(dynamo=True)``; its inputs are the model's tensor arguments then the cached tensors it
reads, its outputs the model's outputs then the cached tensors it stores, all named (see
:func:`~graphpass.exporters.manifest.cache_tensor_name`). Every initializer of 1 KiB or more is then moved
into one external-data file, ``weights.bin``, deduplicated by content: the phases read the same bytes, so a
folder of N phases holds the weights once instead of N times.

    >>> from graphpass.exporters.onnx_export import export_onnx
    >>> manifest = export_onnx(opt, "out/vdt-onnx")          # opt.plan(timesteps) was called before
    >>> [p["file"] for p in manifest["phases"]]
    ['phase_0.onnx', 'phase_1.onnx', 'phase_2.onnx']
"""
from __future__ import annotations

import hashlib
import io
import logging
import time
import warnings
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Sequence

import torch

from ..errors import ArtefactError, GraphpassError, InputError, UnloweredOpError
from ..schedules.base import Action, Plan
from .cond import SwitchGraph, build_switch_graph
from .manifest import (MANIFEST_FORMAT, WEIGHTS_FILE, cache_tensor_name, dtype_name, feed_entry,
                       phase_output_names, reuse_flag_name, tensor_entry, user_output_name, versions, write_manifest)
from .onnx_rewrites import rewrite_for_onnx, unlowered_op_error

if TYPE_CHECKING:
    import onnx

    from ..runtime.executor import OptimizedModel

#: Initializers below this many bytes stay inside their .onnx file (scalars, small shape constants).
EXTERNAL_THRESHOLD = 1024
#: Offsets into the shared weights file are multiples of this (aligned reads, mmap-friendly).
ALIGN = 64


def require_onnx() -> None:
    missing = []
    for mod in ("onnx", "onnxscript"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise ArtefactError(f"ONNX export needs the packages {', '.join(missing)}: pip install 'graphpass[onnx]' "
                            f"(onnx, onnxscript, onnxruntime)")


def plan_for_export(opt: "OptimizedModel", timesteps: Sequence[float] | None) -> Plan:
    """The plan an export covers: ``timesteps`` if given, else the one fixed by ``opt.plan(...)``."""
    refusal = opt.technique.export.refusal
    if refusal is not None:
        raise ArtefactError(refusal)
    if opt.parallel is not None:
        raise ArtefactError("export a single-process model: phase graphs split over ranks hold collectives that "
                            "ONNX cannot express; call graphpass.optimize without parallel= for export")
    if timesteps is not None:
        if isinstance(timesteps, torch.Tensor):
            timesteps = timesteps.detach().cpu().flatten().tolist()
        plan = opt.schedule.plan(opt.regions, [float(t) for t in timesteps])
    elif opt.current_plan is None:
        raise InputError("export needs the sampler's timesteps to know which phases exist: call "
                         "opt.plan(timesteps) first or pass graphpass.export(..., timesteps=...)")
    else:
        plan = opt.current_plan
    if len(plan) == 0:  # an artefact without phases would load and then refuse every call
        raise InputError("export got an empty list of timesteps, so the plan has no step to export; pass the "
                         "sampler's timesteps, e.g. graphpass.export(..., timesteps=scheduler.timesteps)")
    return plan


# --- one graph -> ONNX -----------------------------------------------------------------------------
def to_onnx(module: torch.nn.Module, args: Sequence[torch.Tensor], input_names: list[str], output_names: list[str],
            opset: int | None = None) -> "onnx.ModelProto":
    """Export ``module(*args)`` with the dynamo exporter and return the in-memory model (weights inline)."""
    require_onnx()
    module.eval()
    if isinstance(module, torch.fx.GraphModule):  # ops whose ONNX lowering is wrong or does not run
        module, _ = rewrite_for_onnx(module)
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            prog = torch.onnx.export(module, tuple(args), dynamo=True, input_names=input_names,
                                     output_names=output_names, opset_version=opset, optimize=True, verbose=False,
                                     external_data=False)
        except Exception as e:
            unlowered = unlowered_op_error(module, e)  # name the op and its module when one does not lower
            if unlowered:
                raise UnloweredOpError(f"torch.onnx.export failed on {type(module).__name__}: {unlowered}") from e
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArtefactError(f"torch.onnx.export failed on {type(module).__name__}: {first}") from e
    proto = prog.model_proto
    _strip_node_metadata(proto.graph)
    got_in = [i.name for i in proto.graph.input]
    got_out = [o.name for o in proto.graph.output]
    if got_out != output_names or not set(got_in) <= set(input_names):
        raise ArtefactError(f"the ONNX exporter renamed graph inputs/outputs ({got_in} -> {got_out}); expected "
                            f"{input_names} -> {output_names}")
    return proto


def _strip_node_metadata(graph) -> None:
    """Drop the exporter's per-node stack traces and FX dumps (most of a small model's file size, and
    they hold local source paths); keep ``namespace``, the module scope of each node."""
    for node in graph.node:
        keep = [(p.key, p.value) for p in node.metadata_props if p.key == "namespace"]
        del node.metadata_props[:]
        for k, v in keep:
            node.metadata_props.add(key=k, value=v)
        node.doc_string = ""
        for attr in node.attribute:
            if attr.HasField("g"):
                _strip_node_metadata(attr.g)
            for g in attr.graphs:
                _strip_node_metadata(g)


# --- shared weights ------------------------------------------------------------------------------
def graph_tensors(graph) -> list:
    """Initializers of ``graph`` and of every subgraph (If/Loop branches)."""
    out = list(graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                out.extend(graph_tensors(attr.g))
            for g in attr.graphs:
                out.extend(graph_tensors(g))
    return out


class SharedWeights:
    """Appends initializer bytes to one file, once per distinct content, and points the initializers at it.

    ``stored_bytes`` is what the file holds; ``referenced_bytes`` what the models reference in total (the
    size the folder would have with a weights file per phase).
    """

    def __init__(self, path: Path):
        self.path = path
        self._f: BinaryIO = open(path, "wb")
        self._where: dict[str, tuple[int, int]] = {}
        self.stored_bytes = 0
        self.referenced_bytes = 0
        self.tensors = 0

    def externalise(self, model: "onnx.ModelProto") -> None:
        from onnx import numpy_helper
        from onnx.external_data_helper import set_external_data

        import onnx

        for t in graph_tensors(model.graph):
            if t.data_location == onnx.TensorProto.EXTERNAL:
                continue
            raw = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
            if len(raw) < EXTERNAL_THRESHOLD:
                continue
            digest = hashlib.sha256(raw).hexdigest() + f":{t.data_type}"
            if digest not in self._where:
                pad = (-self._f.tell()) % ALIGN
                self._f.write(b"\0" * pad)
                self._where[digest] = (self._f.tell(), len(raw))
                self._f.write(raw)
                self.stored_bytes += len(raw)
                self.tensors += 1
            self.referenced_bytes += len(raw)
            offset, length = self._where[digest]
            for fld in ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data"):
                t.ClearField(fld)
            t.raw_data = raw
            set_external_data(t, WEIGHTS_FILE, offset=offset, length=length)
            t.ClearField("raw_data")

    def close(self) -> None:
        self._f.close()


# --- export ---------------------------------------------------------------------------------------
def _example_inputs(opt: "OptimizedModel", device: torch.device) -> list[torch.Tensor]:
    return [torch.zeros(s.shape, dtype=s.dtype, device=device) for s in opt.captured.input_specs]


def _cache_specs(opt: "OptimizedModel") -> dict[str, Any]:
    return {k: s for r in opt.regions for k, s in zip(r.cache_keys, r.exit_specs)}


def cache_input_specs(pg) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of a phase graph's cache inputs, in order, from its placeholders (every phase graph
    states what it reads, whichever pass built it: region outputs, TaylorSeer's factors and step gap...)."""
    vals = {n.meta["graphpass_cache_key"]: n.meta["val"] for n in pg.gm.graph.nodes
            if n.op == "placeholder" and "graphpass_cache_key" in n.meta}
    return [(tuple(vals[k].shape), vals[k].dtype) for k in pg.cache_inputs]


def _cache_args(pg, device: torch.device) -> list[torch.Tensor]:
    """Example tensors of a phase graph's cache inputs, in order (:func:`cache_input_specs`)."""
    return [torch.zeros(shape, dtype=dtype, device=device) for shape, dtype in cache_input_specs(pg)]


def _device_of(opt: "OptimizedModel") -> torch.device:
    for p in opt.captured.gm.parameters():
        return p.device
    return torch.device("cpu")


def _user_output_entries(opt: "OptimizedModel") -> list[dict[str, Any]]:
    vals = [n for n in opt.captured.gm.graph.nodes if n.op == "output"][0].args[0]
    out = []
    for i, node in enumerate(vals):
        v = node.meta.get("val") if hasattr(node, "meta") else None
        if not isinstance(v, torch.Tensor):
            raise ArtefactError(f"model output {i} is not a tensor ({type(v).__name__}); graphpass exports models "
                                f"whose outputs are tensors (diffusers: pass return_dict=False)")
        out.append(tensor_entry(user_output_name(i), v.shape, v.dtype))
    return out


def base_manifest(opt: "OptimizedModel", plan: Plan, fmt: str, layout: str) -> dict[str, Any]:
    """Fields every export shares: versions, call signature, schedule, regions and plan."""
    import torch.utils._pytree as pytree

    cap = opt.captured
    try:
        out_spec = pytree.treespec_dumps(cap.out_spec)
    except Exception as e:
        raise ArtefactError(f"the output structure of {cap.model_type} cannot be saved ({e}); export a call that "
                            f"returns tensors or tuples (diffusers: return_dict=False)") from e
    phases = plan.distinct()
    ids = {ph: i for i, ph in enumerate(phases)}
    return {
        **versions(),
        "manifest_format": MANIFEST_FORMAT,
        "format": fmt,
        "layout": layout,
        "model_type": cap.model_type,
        "timestep_arg": opt.timestep_arg,
        "inputs": [tensor_entry(n, s.shape, s.dtype) for n, s in zip(cap.input_names, cap.input_specs)],
        "constants": dict(cap.constants),
        "structures": {k: st.to_dict() for k, st in cap.structures.items()},
        "out_spec": out_spec,
        "user_outputs": _user_output_entries(opt),
        "schedule": opt.schedule.to_dict() | {"type": opt.schedule.type_name},
        "regions": [{"path": r.path, "kind": r.kind, "module_type": r.module_type, "cache_keys": r.cache_keys,
                     "exits": r.exits, "exit_specs": [[list(s.shape), dtype_name(s.dtype)] for s in r.exit_specs],
                     "flops": r.flops, "reason": r.reason, "block": r.block} for r in opt.regions],
        "plan": {"timesteps": list(plan.timesteps), "phase_ids": [ids[ph] for ph in plan.phases],
                 "feeds": plan_feeds(opt, plan)},
        "phases": [{"id": i, "label": ph.label(), "actions": [[p, a.value] for p, a in ph.actions]}
                   for i, ph in enumerate(phases)],
    }


def plan_feeds(opt: "OptimizedModel", plan: Plan) -> list[dict[str, Any]]:
    """Per step, the values the policy feeds its phase (:meth:`~graphpass.techniques.StepPolicy.feeds`) that
    the phase graph reads, as manifest entries (:func:`~graphpass.exporters.manifest.feed_entry`)."""
    return [{k: feed_entry(v) for k, v in feeds.items() if k in opt.phase_graph(ph).cache_inputs}
            for ph, feeds in zip(plan.phases, opt.policy.feeds(plan))]


@dataclass
class _SwitchExport:
    """The single-file graph of a plan, exported to ONNX (weights still inline)."""

    proto: "onnx.ModelProto"
    switch: SwitchGraph
    args: list[torch.Tensor]
    in_names: list[str]
    seconds: float


def _switch_export(opt: "OptimizedModel", plan: Plan, inputs: list[torch.Tensor], user_names: list[str],
                   opset: int | None) -> _SwitchExport:
    """Build the plan's switch graph (:func:`~graphpass.exporters.cond.build_switch_graph`) and export it;
    raises :class:`~graphpass.errors.GraphpassError` when the model's regions cannot become ``If`` branches."""
    t0 = time.perf_counter()
    device = _device_of(opt)
    cache_specs = _cache_specs(opt)
    sw = build_switch_graph(opt.captured, opt.regions, plan)
    args = inputs + [torch.zeros((), dtype=torch.bool, device=device) for _ in sw.switch_paths] + [
        torch.zeros(cache_specs[k].shape, dtype=cache_specs[k].dtype, device=device) for k in sw.cache_keys]
    in_names = (list(opt.captured.input_names) + [reuse_flag_name(p) for p in sw.switch_paths]
                + [cache_tensor_name(k) for k in sw.cache_keys])
    out_names = user_names + [cache_tensor_name(k, output=True) for k in sw.cache_keys]
    proto = to_onnx(sw.gm, args, in_names, out_names, opset)
    return _SwitchExport(proto, sw, args, in_names, time.perf_counter() - t0)


def export_onnx(opt: "OptimizedModel", folder: str | Path, *, timesteps: Sequence[float] | None = None,
                single_file: bool | None = False, opset: int | None = None) -> dict[str, Any]:
    """Write the ONNX files, ``weights.bin`` and ``manifest.json`` of ``opt``'s plan into the empty (or new)
    ``folder``; returns the manifest. See :func:`graphpass.export` for the layouts and for writing into a
    folder safely.

    ``single_file=None`` writes the single file, or one file per phase when the phases cache values of their
    own (TaylorSeer) or the model's regions cannot become ``If`` branches (torch.export cannot trace a
    region whose exits are views of one tensor as a ``cond`` branch, for one; a warning says why); the
    manifest's ``layout`` records which was written.
    """
    require_onnx()
    import onnx

    plan = plan_for_export(opt, timesteps)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):  # graphpass.export stages into a fresh folder; never write over other files
        raise ArtefactError(f"export_onnx writes into an empty folder and {folder} is not empty; use "
                            f"graphpass.export(opt, folder, overwrite=True) to replace an earlier export")
    switchable = all(ph.caches_region_outputs for ph in plan.distinct())
    if single_file and not switchable:
        raise ArtefactError(f"{opt.technique.name}'s phases cache values of their own (not region outputs that an "
                            f"If can switch between): export one file per phase (single_file=False, or "
                            f"TensorRTConfig(layout='per-phase'))")
    device = _device_of(opt)
    inputs = _example_inputs(opt, device)
    user_names = [e["name"] for e in _user_output_entries(opt)]
    single = None
    if single_file is not False and switchable:
        try:
            single = _switch_export(opt, plan, inputs, user_names, opset)
        except GraphpassError as e:
            # An op without a lowering is in some phase too (the single file holds every phase's ops): retrying
            # per phase would fail on it again, after as many exports as the plan has phases.
            if single_file or isinstance(e, UnloweredOpError):
                raise
            warnings.warn(f"graphpass: {opt.captured.model_type} cannot be exported as one graph ({e}); exported one "
                          f"file per phase instead (single_file=False asks for that layout, True makes this an error)",
                          stacklevel=3)
    manifest = base_manifest(opt, plan, "onnx", "single-file" if single else "per-phase")
    weights = SharedWeights(folder / WEIGHTS_FILE)
    try:
        if single:
            weights.externalise(single.proto)
            onnx.save_model(single.proto, str(folder / "model.onnx"))
            manifest["single_file"] = {
                "file": "model.onnx", "switch_regions": single.switch.switch_paths,
                "cache_keys": single.switch.cache_keys, "inputs": _entries(single.args, single.in_names),
                "outputs": _output_entries(single.proto), "export_seconds": round(single.seconds, 3)}
            for entry, ph in zip(manifest["phases"], plan.distinct()):
                entry.update(file="model.onnx",
                             cache_inputs=[k for r in opt.regions if ph.action(r.path) == Action.REUSE
                                           for k in r.cache_keys],
                             cache_outputs=[k for r in opt.regions if ph.action(r.path) == Action.STORE
                                            for k in r.cache_keys],
                             num_user_outputs=len(user_names))
        else:
            for entry, ph in zip(manifest["phases"], plan.distinct()):
                t0 = time.perf_counter()
                pg = opt.phase_graph(ph)
                args = inputs + _cache_args(pg, device)
                in_names = list(opt.captured.input_names) + [cache_tensor_name(k) for k in pg.cache_inputs]
                out_names = user_names + phase_output_names(pg.cache_inputs, pg.cache_outputs)
                proto = to_onnx(pg.gm, args, in_names, out_names, opset)
                weights.externalise(proto)
                name = f"phase_{entry['id']}.onnx"
                onnx.save_model(proto, str(folder / name))
                entry.update(file=name, inputs=_entries(args, in_names), outputs=_output_entries(proto),
                             onnx_inputs=[i.name for i in proto.graph.input],
                             cache_inputs=list(pg.cache_inputs), cache_outputs=list(pg.cache_outputs),
                             num_user_outputs=pg.num_user_outputs, flops=pg.flops, nodes=pg.node_count,
                             export_seconds=round(time.perf_counter() - t0, 3))
    finally:
        weights.close()
    manifest["weights"] = {"file": WEIGHTS_FILE, "stored_bytes": weights.stored_bytes,
                           "referenced_bytes": weights.referenced_bytes, "tensors": weights.tensors,
                           "external_threshold_bytes": EXTERNAL_THRESHOLD}
    write_manifest(folder, manifest)
    return manifest


def _entries(args: Sequence[torch.Tensor], names: Sequence[str]) -> list[dict[str, Any]]:
    return [tensor_entry(n, a.shape, a.dtype) for n, a in zip(names, args)]


_ONNX_TO_TORCH = {1: torch.float32, 10: torch.float16, 16: torch.bfloat16, 11: torch.float64, 7: torch.int64,
                  6: torch.int32, 9: torch.bool, 3: torch.int8, 2: torch.uint8}


def _output_entries(proto) -> list[dict[str, Any]]:
    out = []
    for o in proto.graph.output:
        tt = o.type.tensor_type
        dt = _ONNX_TO_TORCH.get(tt.elem_type)
        if dt is None:
            raise GraphpassError(f"ONNX output {o.name} has element type {tt.elem_type}, which graphpass cannot map")
        out.append(tensor_entry(o.name, [d.dim_value for d in tt.shape.dim], dt))
    return out
