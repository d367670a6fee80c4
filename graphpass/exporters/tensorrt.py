"""TensorRT engines from the per-phase ONNX files, and a runner that executes them (TensorRT 10 API).

``graphpass.export(opt, folder, format="tensorrt")`` first writes the per-phase ONNX export, then builds
``phase_<i>.engine`` from each ``phase_<i>.onnx``. By default engines are *weight-stripped* and refittable
with identical weights (``STRIP_PLAN`` + ``REFIT_IDENTICAL``): an engine keeps only its kernels and plan,
and at load time its weights are refitted from the phase's ONNX file, whose initializers all point into
the one shared ``weights.bin``; the weights are therefore stored once on disk for all phases.

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
from .manifest import cache_tensor_name, read_manifest, write_manifest

PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass
class TensorRTConfig:
    """Engine build options.

    precision: ``"fp32"``; ``"fp16"`` or ``"bf16"`` let TensorRT pick reduced-precision kernels (inputs and
        outputs, including cached tensors, keep the ONNX types).
    strip_weights: build weight-stripped engines (``STRIP_PLAN`` + ``REFIT_IDENTICAL``) refitted from the
        shared ONNX weights at load; ``False`` embeds the weights in every engine.
    refittable: with ``strip_weights=False``, still allow refitting other weights (``REFIT``).
    workspace_bytes: builder workspace memory pool limit.
    """

    precision: str = "fp32"
    strip_weights: bool = True
    refittable: bool = False
    workspace_bytes: int = 4 << 30

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ArtefactError(f"TensorRT precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")


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
    """Build an engine for every phase of a per-phase ONNX export in ``folder`` and update its manifest."""
    manifest = read_manifest(folder)
    if manifest["layout"] != "per-phase":
        raise ArtefactError("TensorRT engines are built from a per-phase ONNX export (single_file=False)")
    for entry in manifest["phases"]:
        name = Path(entry["file"]).with_suffix(".engine").name
        entry["engine"] = name
        entry["build_seconds"] = round(build_engine(folder / entry["file"], folder / name, cfg), 3)
    manifest["format"] = "tensorrt"
    manifest["tensorrt"] = asdict(cfg)
    write_manifest(folder, manifest)
    return manifest


_TRT_TO_TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                 "INT64": torch.int64, "BOOL": torch.bool, "INT8": torch.int8, "UINT8": torch.uint8}


class TrtPhaseRunner:
    """Runs one phase engine on the current CUDA stream: binds inputs and fresh output tensors by name."""

    def __init__(self, trt, engine, input_names: list[str], output_names: list[str]):
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise ArtefactError("TensorRT could not create an execution context (out of GPU memory?)")
        io = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        engine_inputs = {n for n in io if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        self.input_names = input_names
        self._keep = [n in engine_inputs for n in input_names]
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
        for name, keep, a in zip(self.input_names, self._keep, args):
            if keep:
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
    """A ``make_runner(spec, backend)`` that deserialises (and, for stripped engines, refits) each engine."""
    trt = require_tensorrt()
    logger = _logger(trt)
    runtime = trt.Runtime(logger)
    user_out = [e["name"] for e in manifest["user_outputs"]]
    in_names = [e["name"] for e in manifest["inputs"]]
    stripped = manifest.get("tensorrt", {}).get("strip_weights", False)

    def make(spec, backend: str) -> Callable:
        if not spec.engine:
            raise ArtefactError(f"phase {spec.id} of {folder} has no TensorRT engine; re-export with format='tensorrt'")
        engine = runtime.deserialize_cuda_engine((folder / spec.engine).read_bytes())
        if engine is None:
            raise ArtefactError(f"TensorRT could not deserialise {spec.engine}: engines are tied to the TensorRT "
                                f"version and GPU they were built with; re-export on this machine")
        if stripped:
            refitter = trt.Refitter(engine, logger)
            parser_refitter = trt.OnnxParserRefitter(refitter, logger)
            if not parser_refitter.refit_from_file(str(folder / spec.file)) or not refitter.refit_cuda_engine():
                raise ArtefactError(f"could not refit the weights of {spec.engine} from {spec.file}")
        return TrtPhaseRunner(trt, engine, in_names + [cache_tensor_name(k) for k in spec.cache_inputs],
                              user_out + [cache_tensor_name(k) for k in spec.cache_outputs])

    return make
