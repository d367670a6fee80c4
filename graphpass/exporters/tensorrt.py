"""TensorRT engines from the exported ONNX files, and a runner that executes them (TensorRT 10 API).

One copy of the weights on the device, however many phases: ``graphpass.export(opt, folder,
format="tensorrt")`` builds **one engine** from the single-file layout (``model.onnx``, an ONNX ``If`` per
reusable region), which TensorRT turns into ``IIfConditional`` layers that run only the branch their
boolean input selects ("Working with Conditionals",
https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-with-conditionals.html). Every
phase is that engine with other ``reuse.<path>`` flags, run on one execution context: its weights and its
activation memory exist once.

Why not one engine per phase sharing weights: TensorRT 10 has no API for two engines to read one weight
buffer. Refitting (``IRefitter.set_named_weights``, also from device memory with ``TensorLocation.kDEVICE``)
*updates weights in an engine* ("Refitting an Engine",
https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/refitting-engines.html): each
refitted engine holds its own copy, so N phase engines hold the weights N times on the device; the
weight-stripped plans (``STRIP_PLAN`` + ``REFIT_IDENTICAL``) only keep the copies off the disk. The
per-phase layout stays available (``TensorRTConfig(layout="per-phase")``) for graphs TensorRT cannot
build with conditionals; :func:`engine_plan` prints what each layout puts on the device.

Needs an NVIDIA GPU and the ``tensorrt`` package; without them export and load raise
:class:`~graphpass.errors.ArtefactError` saying what is missing.

    >>> graphpass.export(opt, "out/vdt-trt", format="tensorrt", tensorrt=TensorRTConfig(precision="fp16"))
    >>> model = graphpass.load("out/vdt-trt")                      # backend "tensorrt"
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ArtefactError, InputError
from .manifest import cache_tensor_name, phase_output_names, read_manifest, single_file_consts, write_manifest
from .onnx_export import graph_tensors

PRECISIONS = ("fp32", "fp16", "bf16")
TRT_LAYOUTS = ("single-file", "per-phase")


@dataclass
class TensorRTConfig:
    """Engine build options.

    precision: ``"fp32"``; ``"fp16"`` or ``"bf16"`` let TensorRT pick reduced-precision kernels (inputs and
        outputs, including cached tensors, keep the ONNX types).
    strip_weights: build weight-stripped engines (``STRIP_PLAN`` + ``REFIT_IDENTICAL``) refitted from the
        shared ONNX weights at load; ``False`` embeds the weights in every engine.
    refittable: with ``strip_weights=False``, still allow refitting other weights (``REFIT``).
    workspace_bytes: builder workspace memory pool limit.
    layout: ``"single-file"`` (one engine with conditionals for every phase: one copy of the weights on the
        device) or ``"per-phase"`` (one engine per phase, each holding the weights its phase reads).
    """

    precision: str = "fp32"
    strip_weights: bool = True
    refittable: bool = False
    workspace_bytes: int = 4 << 30
    layout: str = "single-file"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ArtefactError(f"TensorRT precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.layout not in TRT_LAYOUTS:
            raise ArtefactError(f"TensorRT layout {self.layout!r}: choose one of {', '.join(TRT_LAYOUTS)} "
                                f"(single-file: one engine, one copy of the weights on the device)")


def require_tensorrt():
    """The ``tensorrt`` module, or an :class:`ArtefactError` naming what is missing (package, GPU)."""
    missing = []
    try:
        import tensorrt as trt
    except ImportError:
        trt = None
        missing.append("the `tensorrt` Python package (pip install tensorrt)")
    if not torch.cuda.is_available():
        missing.append("an NVIDIA GPU visible to PyTorch (torch.cuda.is_available() is False)")
    if missing:
        raise ArtefactError(f"TensorRT export/load needs {' and '.join(missing)}; on this machine use format='onnx' "
                            f"and backend='onnxruntime' instead")
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise ArtefactError(f"graphpass needs TensorRT >= 10 (tensor-address API), found {trt.__version__}")
    return trt


def _logger(trt):
    return trt.Logger(trt.Logger.WARNING)


def build_engine(onnx_path: Path, engine_path: Path, cfg: TensorRTConfig) -> float:
    """Parse ``onnx_path`` (its external weights resolve next to it) and write a serialised engine; returns
    the build time in seconds."""
    trt = require_tensorrt()
    t0 = time.perf_counter()
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArtefactError(f"TensorRT could not parse {onnx_path.name}: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_bytes)
    if cfg.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif cfg.precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    if cfg.strip_weights:
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
        config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
    elif cfg.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise ArtefactError(f"TensorRT failed to build an engine from {onnx_path.name} (see the TensorRT log above)")
    engine_path.write_bytes(bytes(memoryview(blob)))
    return time.perf_counter() - t0


def export_tensorrt(folder: Path, cfg: TensorRTConfig) -> dict[str, Any]:
    """Build the engines :func:`engine_plan` lists for the ONNX export in ``folder`` and update its manifest
    (``tensorrt``: the options and the device-memory plan)."""
    manifest = read_manifest(folder)
    plan = engine_plan(folder, manifest, cfg)
    built: dict[str, float] = {}
    for onnx_file, engine in plan.engines:
        built[engine] = round(build_engine(folder / onnx_file, folder / engine, cfg), 3)
    for entry in manifest["phases"]:
        entry["engine"] = engine_name(entry["file"])
        entry["build_seconds"] = built[entry["engine"]]
    if manifest.get("single_file"):
        manifest["single_file"]["engine"] = engine_name(manifest["single_file"]["file"])
    manifest["format"] = "tensorrt"
    manifest["tensorrt"] = asdict(cfg) | {"device_weight_bytes": plan.device_weight_bytes(cfg.precision)}
    write_manifest(folder, manifest)
    return manifest


# --- what the engines put on the device --------------------------------------------------------------
def engine_name(onnx_file: str) -> str:
    """``phase_0.onnx`` -> ``phase_0.engine``."""
    return Path(onnx_file).with_suffix(".engine").name


def initializer_bytes(onnx_path: Path) -> int:
    """Bytes of every initializer of ``onnx_path``, in its main graph and its ``If`` branches, whether stored
    inline or in ``weights.bin`` (read without loading the weights)."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    total = 0
    for t in graph_tensors(proto.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int({e.key: e.value for e in t.external_data}["length"])
        else:
            total += len(t.raw_data) if t.HasField("raw_data") else onnx.numpy_helper.to_array(t).nbytes
    return total


@dataclass
class EnginePlan:
    """The engines an export builds (``(onnx file, engine file)``) and the weight bytes each holds on the
    device (from its ONNX file, at the exported precision).

        >>> plan = engine_plan(folder, manifest, TensorRTConfig())        # single-file layout: one engine
        >>> plan.engines, plan.device_weight_bytes("fp32") == plan.weight_bytes["model.engine"]
        ([('model.onnx', 'model.engine')], True)
    """

    layout: str
    engines: list[tuple[str, str]]
    weight_bytes: dict[str, int]
    phases: int

    def device_weight_bytes(self, precision: str) -> int:
        """Weights on the device once every engine is loaded: each engine holds its own (refitting copies into
        the engine). fp16/bf16 builds store float weights at 2 bytes: about half (an estimate: TensorRT may
        keep a layer in fp32)."""
        total = sum(self.weight_bytes.values())
        return total if precision == "fp32" else total // 2

    def describe(self, precision: str = "fp32") -> str:
        lines = [f"TensorRT {self.layout} layout: {len(self.engines)} engine(s) for {self.phases} phase(s)"]
        for onnx_file, engine in self.engines:
            lines.append(f"  {engine:<18} from {onnx_file:<16} weights {_mib(self.weight_bytes[engine])} (fp32)")
        lines.append(f"expected device memory for weights ({precision}): {_mib(self.device_weight_bytes(precision))}"
                     f" = {' + '.join(_mib(b) for b in self.weight_bytes.values())}"
                     + ("" if precision == "fp32" else " / 2") + "; activations: one execution context per engine "
                     "(ICudaEngine.device_memory_size_v2 once built)")
        return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def engine_plan(folder: Path, manifest: dict[str, Any], cfg: TensorRTConfig) -> EnginePlan:
    """What :func:`export_tensorrt` would build from the ONNX export in ``folder`` (no GPU needed)."""
    single = manifest.get("single_file")
    if (cfg.layout == "single-file") != (single is not None):
        have = "single-file" if single else "per-phase"
        raise ArtefactError(f"TensorRT layout {cfg.layout!r} builds from a {cfg.layout} ONNX export, but {folder} "
                            f"holds a {have} one; export with graphpass.export(..., format='tensorrt', "
                            f"tensorrt=TensorRTConfig(layout={cfg.layout!r}))")
    files = [single["file"]] if single else [e["file"] for e in manifest["phases"]]
    engines = [(f, engine_name(f)) for f in files]
    return EnginePlan(layout=cfg.layout, engines=engines,
                      weight_bytes={e: initializer_bytes(folder / f) for f, e in engines},
                      phases=len(manifest["phases"]))


_TRT_TO_TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                 "INT64": torch.int64, "BOOL": torch.bool, "INT8": torch.int8, "UINT8": torch.uint8}


class TrtPhaseRunner:
    """Runs one phase on an engine's execution context (shared by the phases of a single-file engine: one
    activation memory) on the current CUDA stream: binds inputs, ``consts`` (the single-file layout's reuse
    flags and placeholder caches) and fresh output tensors by name."""

    def __init__(self, trt, engine, context, input_names: list[str], output_names: list[str],
                 consts: dict[str, torch.Tensor] | None = None):
        self.engine = engine
        self.context = context
        io = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        engine_inputs = {n for n in io if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        self.input_names = input_names
        self._keep = [n in engine_inputs for n in input_names]
        self._consts = {n: t for n, t in (consts or {}).items() if n in engine_inputs}
        self.output_names = output_names
        self._out = []
        for n in output_names:
            if n not in io:
                raise ArtefactError(f"engine has no output {n!r} (has {io}); rebuild it with graphpass.export")
            dt = _TRT_TO_TORCH.get(engine.get_tensor_dtype(n).name)
            if dt is None:
                raise ArtefactError(f"engine output {n} has TensorRT type {engine.get_tensor_dtype(n)}, unsupported")
            self._out.append((n, tuple(engine.get_tensor_shape(n)), dt))

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        if len(args) != len(self.input_names):
            raise InputError(f"phase expects {len(self.input_names)} inputs, got {len(args)}")
        device = torch.device("cuda", torch.cuda.current_device())
        keep_alive = []
        feed = [(n, a) for n, keep, a in zip(self.input_names, self._keep, args) if keep]
        for name, a in feed + list(self._consts.items()):
            a = a.to(device).contiguous()
            keep_alive.append(a)
            self.context.set_tensor_address(name, a.data_ptr())
        outs = [torch.empty(shape, dtype=dt, device=device) for _, shape, dt in self._out]
        for (name, _, _), o in zip(self._out, outs):
            self.context.set_tensor_address(name, o.data_ptr())
        stream = torch.cuda.current_stream(device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise ArtefactError("TensorRT execution failed (see the TensorRT log)")
        return outs


def trt_runner_factory(folder: Path, manifest: dict[str, Any]) -> Callable:
    """A ``make_runner(spec, backend)`` that deserializes (and, for stripped engines, refits) each engine
    once, with one execution context per engine shared by the phases it serves."""
    trt = require_tensorrt()
    logger = _logger(trt)
    runtime = trt.Runtime(logger)
    user_out = [e["name"] for e in manifest["user_outputs"]]
    in_names = [e["name"] for e in manifest["inputs"]]
    stripped = manifest.get("tensorrt", {}).get("strip_weights", False)
    single = manifest.get("single_file")
    loaded: dict[str, tuple[Any, Any]] = {}  # engine file -> (engine, execution context)
    unread: dict[tuple, torch.Tensor] = {}  # zeros on the device for unread cache inputs, shared by all phases

    def engine_and_context(spec) -> tuple[Any, Any]:
        if spec.engine in loaded:
            return loaded[spec.engine]
        engine = runtime.deserialize_cuda_engine((folder / spec.engine).read_bytes())
        if engine is None:
            raise ArtefactError(f"TensorRT could not deserialize {spec.engine}: engines are tied to the TensorRT "
                                f"version and GPU they were built with; re-export on this machine")
        if stripped:
            refitter = trt.Refitter(engine, logger)
            parser_refitter = trt.OnnxParserRefitter(refitter, logger)
            if not parser_refitter.refit_from_file(str(folder / spec.file)) or not refitter.refit_cuda_engine():
                raise ArtefactError(f"could not refit the weights of {spec.engine} from {spec.file}")
        context = engine.create_execution_context()
        if context is None:
            raise ArtefactError("TensorRT could not create an execution context (out of GPU memory?)")
        loaded[spec.engine] = (engine, context)
        return loaded[spec.engine]

    def make(spec, backend: str) -> Callable:
        if not spec.engine:
            raise ArtefactError(f"phase {spec.id} of {folder} has no TensorRT engine; re-export with format='tensorrt'")
        engine, context = engine_and_context(spec)
        inputs = in_names + [cache_tensor_name(k) for k in spec.cache_inputs]
        if single is None:
            return TrtPhaseRunner(trt, engine, context, inputs,
                                  user_out + phase_output_names(spec.cache_inputs, spec.cache_outputs))
        return TrtPhaseRunner(trt, engine, context, inputs,
                              user_out + [cache_tensor_name(k, output=True) for k in spec.cache_outputs],
                              consts=single_file_consts(single, spec.phase, spec.cache_inputs, zeros=unread,
                                                        device=torch.device("cuda", torch.cuda.current_device())))

    return make
