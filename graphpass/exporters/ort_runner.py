"""ONNX Runtime sessions for an exported folder: one copy of the weights, one arena, zero-copy phase calls.

An exported folder holds one ONNX file for every phase (or one file per phase), all reading one
``weights.bin``. Left to itself, ONNX Runtime gives every session its own copy of every weight (read
from ``weights.bin``, then packed again for its MatMul kernels) and its own memory arena, so memory
grows with the number of phases (vdt-s under pab246, a file per phase for its 6 phases: 334 MiB of peak RSS added by
load + one generation, against 87 MiB with the sharing below; ``benchmarks/backends.py``, figures in
``docs/deployment.md``). :class:`OrtSessions` builds the sessions of one folder
so that they share what can be shared:

* weights: ``weights.bin`` is mapped once (copy-on-write ``numpy.memmap``: the pages are the OS file
  cache's, never written back) and every distinct tensor in it becomes one ``OrtValue``, handed to every
  session that names it with ``SessionOptions.add_initializer``. Two things would still give a session
  a private copy, and are turned off: kernels that pre-pack constant weights (``session.disable_prepacking``;
  ONNX Runtime's ``PrepackedWeightsContainer``, which would share the packed copies, is not in its Python
  API), and the layout optimizations of level ``ORT_ENABLE_ALL`` (NCHWc), which rewrite Conv weights into
  new tensors: sessions optimize at ``ORT_ENABLE_EXTENDED`` (every fusion, no layout change). The tests
  check it by changing the shared buffer in memory and comparing with sessions that read the changed
  file;
* scratch memory: one CPU arena registered on the ONNX Runtime environment
  (``create_and_register_allocator``) and used by every session (``session.use_env_allocators``), tensor
  by tensor (no per-session memory pattern), so the phases, which run one at a time, reuse the same blocks;
* phase calls: inputs and outputs are bound to torch tensors' memory (IO binding), so the cached tensors
  a phase stores are the tensors the next phase reads, with no copy in between; in the single-file
  layout, the graph outputs a phase does not keep are bound too (see :class:`OrtPhaseRunner`), so that
  ONNX Runtime never grows its arena for them.

    >>> sessions = OrtSessions(folder, manifest, OrtOptions(threads=2))
    >>> for e in manifest["phases"]:
    ...     sess = sessions.session(e["file"])                            # built with the shared OrtValues
    >>> sessions.shared_bytes == manifest["weights"]["stored_bytes"]     # every stored weight, once
    True
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import ArtefactError, InputError
from .manifest import WEIGHTS_FILE, cache_tensor_name, dtype_of, phase_output_names, single_file_consts

ARENAS = ("shared", "per-session", "none")


@dataclass(frozen=True)
class OrtOptions:
    """How :class:`OrtSessions` builds sessions (the defaults are what :func:`graphpass.load` uses).

    share_weights: give every session the same ``OrtValue`` per weight (one copy in memory); ``False``
        lets each session read its own copy from ``weights.bin``.
    prepacking: let kernels pre-pack constant weights (faster MatMul on some shapes, but a private packed
        copy per session); off by default when weights are shared.
    arena: ``"shared"`` (one CPU arena for all sessions of the process), ``"per-session"`` (ONNX
        Runtime's default: one arena each) or ``"none"`` (plain malloc/free).
    memory_pattern: let each session pre-plan its scratch memory as one block per input shape (ONNX
        Runtime's default). Off by default: phases plan blocks of different sizes, and one arena keeps a
        block of each size, while tensor-by-tensor allocation reuses the same blocks across phases.
    io_binding: bind inputs/outputs to torch tensors' memory instead of passing numpy arrays.
    threads: intra-op threads per session (``None``: ONNX Runtime's choice).
    providers: execution providers (default CPU).
    """

    share_weights: bool = True
    prepacking: bool = False
    arena: str = "shared"
    memory_pattern: bool = False
    io_binding: bool = True
    threads: int | None = None
    providers: tuple[str, ...] = ("CPUExecutionProvider",)

    @classmethod
    def unshared(cls, **kw) -> "OrtOptions":
        """ONNX Runtime's own defaults: every session with its own weights, packed weights, arena and memory
        pattern, fed numpy arrays (what sessions built without these options hold; for comparison)."""
        return cls(**{"share_weights": False, "prepacking": True, "arena": "per-session", "memory_pattern": True,
                      "io_binding": False, **kw})

    def __post_init__(self):
        if self.arena not in ARENAS:
            raise ArtefactError(f"ONNX Runtime arena {self.arena!r}: choose one of {', '.join(ARENAS)}")
        if self.threads is not None and self.threads < 1:
            raise ArtefactError(f"threads={self.threads}: pass a positive number of intra-op threads, or None")


def require_onnxruntime():
    """The ``onnxruntime`` module, or an :class:`ArtefactError` saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise ArtefactError("loading with backend='onnxruntime' needs the onnxruntime package: "
                            "pip install onnxruntime (or 'graphpass[onnx]')") from None
    return onnxruntime


# --- one CPU arena for every session ---------------------------------------------------------------
_ENV_ARENA = False  # registered on ONNX Runtime's process-wide environment, which cannot unregister it


def register_shared_arena(ort) -> None:
    """Register one CPU arena on ONNX Runtime's environment (once per process); sessions whose options set
    ``session.use_env_allocators`` allocate from it instead of from an arena of their own.

    ``arena_extend_strategy`` 1 (kSameAsRequested) grows the arena by what a request needs, not by powers
    of two, so its size tracks the largest phase's working set.
    """
    global _ENV_ARENA
    if _ENV_ARENA:
        return
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    cfg = ort.OrtArenaCfg({"arena_extend_strategy": 1})
    ort.create_and_register_allocator(info, cfg)
    _ENV_ARENA = True


# --- one OrtValue per weight -----------------------------------------------------------------------
def external_initializers(model_path: Path) -> list[tuple[str, int, int, int, tuple[int, ...]]]:
    """``(name, offset, length, onnx_type, shape)`` of the main-graph initializers of ``model_path`` whose
    data lives in ``weights.bin`` (read without loading any weight).

        >>> external_initializers(folder / "phase_0.onnx")[0]
        ('model.token_pos', 0, 2688, 1, (7, 96))
    """
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    out = []
    for t in proto.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        ext = {e.key: e.value for e in t.external_data}
        if ext.get("location") != WEIGHTS_FILE:
            raise ArtefactError(f"{model_path.name}: initializer {t.name} reads {ext.get('location')!r}, not the "
                                f"folder's {WEIGHTS_FILE}; re-export the model with graphpass.export")
        out.append((t.name, int(ext.get("offset", 0)), int(ext["length"]), int(t.data_type), tuple(t.dims)))
    return out


class SharedWeights:
    """``weights.bin`` mapped once; :meth:`value` gives the one ``OrtValue`` of each stored tensor.

    ``values`` counts the distinct OrtValues made and ``shared_bytes`` their bytes: with every phase's
    initializers handed out, ``shared_bytes`` equals the bytes ``weights.bin`` stores (the manifest's
    ``weights.stored_bytes``), however many sessions read them.
    """

    def __init__(self, ort, path: Path):
        self._ort = ort
        # Copy-on-write map: pages come from (and stay shared with) the OS file cache; nothing is written back.
        self.buffer = np.memmap(path, dtype=np.uint8, mode="c")
        self._values: dict[tuple[int, int, int, tuple[int, ...]], Any] = {}
        self.shared_bytes = 0

    @property
    def values(self) -> int:
        return len(self._values)

    def value(self, offset: int, length: int, onnx_type: int, shape: tuple[int, ...]):
        key = (offset, length, onnx_type, shape)
        if key not in self._values:
            if offset + length > self.buffer.size:
                raise ArtefactError(f"{WEIGHTS_FILE} holds {self.buffer.size} bytes, but a phase reads bytes "
                                    f"{offset}..{offset + length}: the folder is damaged, re-export the model")
            raw = np.asarray(self.buffer[offset:offset + length])
            self._values[key] = self._ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                raw.view(_storage_dtype(onnx_type)).reshape(shape), onnx_type)
            self.shared_bytes += length
        return self._values[key]

    def add_to(self, so, model_path: Path) -> int:
        """Hand ``so`` the shared OrtValue of every initializer of ``model_path`` stored in ``weights.bin``;
        returns how many."""
        inits = external_initializers(model_path)
        for name, offset, length, onnx_type, shape in inits:
            so.add_initializer(name, self.value(offset, length, onnx_type, shape))
        return len(inits)


#: numpy dtype with the element size of each ONNX tensor type (bfloat16 travels as uint16 bits).
_STORAGE = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64, 9: np.bool_,
            10: np.float16, 11: np.float64, 16: np.uint16}


def _storage_dtype(onnx_type: int):
    try:
        return _STORAGE[onnx_type]
    except KeyError:
        raise ArtefactError(f"{WEIGHTS_FILE} holds a tensor of ONNX type {onnx_type}, which graphpass cannot share "
                            f"between sessions; export float32/float16/bfloat16/integer weights") from None


# --- sessions -------------------------------------------------------------------------------------
class OrtSessions:
    """The ONNX Runtime sessions of one exported folder, one per file, built with :class:`OrtOptions`."""

    def __init__(self, folder: Path, manifest: dict[str, Any], options: OrtOptions | None = None):
        self.ort = require_onnxruntime()
        self.folder = folder
        self.options = options or OrtOptions()
        self.weights = (SharedWeights(self.ort, folder / manifest["weights"]["file"])
                        if self.options.share_weights and manifest.get("weights") else None)
        if self.options.arena == "shared":
            register_shared_arena(self.ort)
        self._sessions: dict[str, Any] = {}

    @property
    def shared_bytes(self) -> int:
        return self.weights.shared_bytes if self.weights else 0

    def session_options(self, file: str):
        o, ort = self.options, self.ort
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if o.threads:
            so.intra_op_num_threads = o.threads
            so.inter_op_num_threads = 1
        so.enable_cpu_mem_arena = o.arena != "none"
        so.enable_mem_pattern = o.memory_pattern
        if o.arena == "shared":
            so.add_session_config_entry("session.use_env_allocators", "1")
        if not o.prepacking:
            so.add_session_config_entry("session.disable_prepacking", "1")
        if self.weights is not None:
            # ORT_ENABLE_ALL's layout pass (NCHWc) copies Conv weights into new tensors, one per session
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            self.weights.add_to(so, self.folder / file)
        return so

    def session(self, file: str):
        if file not in self._sessions:
            self._sessions[file] = self.ort.InferenceSession(str(self.folder / file), self.session_options(file),
                                                             providers=list(self.options.providers))
        return self._sessions[file]


# --- one phase ------------------------------------------------------------------------------------
class OrtPhaseRunner:
    """Runs one phase on a session: feeds the model's inputs and the cached tensors by name, returns the
    phase's outputs as torch tensors on the inputs' device.

    ``outputs``: ``(name, shape, dtype)`` of each output, in the phase's order. ``consts``: inputs the
    runner feeds itself (the single-file layout's reuse flags, and zeros for cached tensors of branches
    the phase does not take). With IO binding, inputs are bound to the torch tensors' memory and outputs
    are written straight into fresh torch tensors: a cached tensor goes from one phase to the next
    without a copy.

    Graph outputs the phase does not return (the single-file layout returns every switchable region's
    exits at every step) are bound too, so that ONNX Runtime never allocates them in its arena, which
    would keep that memory for good: ``aliases`` (output -> input) writes an output into the memory of an
    input it equals (a reused region's exit is its cached tensor: the ``If`` branch copies it onto itself,
    no new memory), and ``discard`` lists outputs written into fresh tensors that are dropped after the run.

        >>> runner = OrtPhaseRunner(sess, ["x", "cache.a"], [("y", (2, 4), torch.float32)],
        ...                         aliases={"cache.a.next": "cache.a"})
        >>> y, = runner(x, cached_a)                                 # cache.a.next written over cached_a
    """

    def __init__(self, session, input_names: list[str], outputs: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                 consts: dict[str, torch.Tensor] | None = None, io_binding: bool = True,
                 aliases: dict[str, str] | None = None,
                 discard: Sequence[tuple[str, tuple[int, ...], torch.dtype]] = ()):
        self.session = session
        self.input_names = input_names
        self.outputs = list(outputs)
        self.output_names = [n for n, _, _ in self.outputs]
        wanted = {i.name for i in session.get_inputs()}
        self._keep = [n in wanted for n in input_names]
        self._consts = {n: t.contiguous() for n, t in (consts or {}).items() if n in wanted}
        self._io_binding = io_binding
        self.aliases = dict(aliases or {})
        self.discard = list(discard)

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        if len(args) != len(self.input_names):
            raise InputError(f"phase expects {len(self.input_names)} inputs, got {len(args)}")
        device = args[0].device if args else torch.device("cpu")
        feed = dict(self._consts)
        for name, keep, a in zip(self.input_names, self._keep, args):
            if keep:
                feed[name] = a.detach().cpu().contiguous()
        outs = self._run_bound(feed) if self._io_binding else self._run_numpy(feed)
        return [o.to(device) for o in outs]

    def _run_bound(self, feed: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        binding = self.session.io_binding()
        for name, t in feed.items():
            _bind(binding.bind_input, name, t)
        outs = [torch.empty(shape, dtype=dt) for _, shape, dt in self.outputs]
        for (name, _, _), o in zip(self.outputs, outs):
            _bind(binding.bind_output, name, o)
        for name, source in self.aliases.items():
            _bind(binding.bind_output, name, feed[source])
        scratch = [torch.empty(shape, dtype=dt) for _, shape, dt in self.discard]  # alive until the run ends
        for (name, _, _), t in zip(self.discard, scratch):
            _bind(binding.bind_output, name, t)
        self.session.run_with_iobinding(binding)
        return outs

    def _run_numpy(self, feed: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        outs = self.session.run(self.output_names, {n: t.numpy() for n, t in feed.items()})
        return [torch.from_numpy(o) for o in outs]


def _bind(bind, name: str, t: torch.Tensor) -> None:
    """Bind ``name`` to the memory of ``t`` (``bind`` is an IO binding's ``bind_input`` or ``bind_output``)."""
    bind(name, "cpu", 0, _numpy_dtype(t.dtype), tuple(t.shape), t.data_ptr())


_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64, torch.int64: np.int64,
          torch.int32: np.int32, torch.bool: np.bool_, torch.int8: np.int8, torch.uint8: np.uint8}


def _numpy_dtype(dtype: torch.dtype):
    try:
        return _NUMPY[dtype]
    except KeyError:
        raise ArtefactError(f"ONNX Runtime IO binding of a {dtype} tensor is not supported; load with "
                            f"OrtOptions(io_binding=False)") from None


def output_specs(entries: Sequence[dict[str, Any]], names: Sequence[str]) -> list[tuple[str, tuple[int, ...],
                                                                                        torch.dtype]]:
    """``(name, shape, dtype)`` of ``names``, looked up in the manifest's tensor entries."""
    by_name = {e["name"]: e for e in entries}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ArtefactError(f"manifest.json lists no shape for outputs {missing}; re-export the model")
    return [(n, tuple(by_name[n]["shape"]), dtype_of(by_name[n]["dtype"])) for n in names]


# --- the executor's make_runner -------------------------------------------------------------------
class OrtRunnerFactory:
    """``make_runner(spec, backend)`` for an exported folder: one :class:`OrtPhaseRunner` per phase, all on
    the sessions of one :class:`OrtSessions` (a single-file export serves every phase from one session).

    :meth:`warm_up` builds every phase's runner and runs it once on zeros, so that session creation and
    ONNX Runtime's first-run allocations happen at load, not in the first generation.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any], options: OrtOptions | None = None):
        self.sessions = OrtSessions(folder, manifest, options)
        self.manifest = manifest
        self._user_out = [e["name"] for e in manifest["user_outputs"]]
        self._in_names = [e["name"] for e in manifest["inputs"]]
        self._single = manifest.get("single_file")
        self._entries = {e["name"]: e for e in manifest["inputs"]}
        for e in manifest["phases"]:
            self._entries.update({x["name"]: x for x in e.get("inputs", []) + e.get("outputs", [])})
        if self._single:
            self._entries.update({x["name"]: x for x in self._single["inputs"] + self._single["outputs"]})
        self._runners: dict[int, OrtPhaseRunner] = {}
        self._unread: dict[tuple, torch.Tensor] = {}  # zeros for unread cache inputs, shared by all phases

    def __call__(self, spec, backend: str) -> OrtPhaseRunner:
        if spec.id not in self._runners:
            self._runners[spec.id] = self._build(spec)
        return self._runners[spec.id]

    def _build(self, spec) -> OrtPhaseRunner:
        sess = self.sessions.session(spec.file)
        io_binding = self.sessions.options.io_binding
        inputs = self._in_names + [cache_tensor_name(k) for k in spec.cache_inputs]
        if self._single is None:
            outs = self._user_out + phase_output_names(spec.cache_inputs, spec.cache_outputs)
            return OrtPhaseRunner(sess, inputs, output_specs(list(self._entries.values()), outs),
                                  io_binding=io_binding)
        consts = single_file_consts(self._single, spec.phase, spec.cache_inputs, zeros=self._unread)
        outs = self._user_out + [cache_tensor_name(k, output=True) for k in spec.cache_outputs]
        unused = [k for k in self._single["cache_keys"] if k not in spec.cache_outputs]
        aliases = {cache_tensor_name(k, output=True): cache_tensor_name(k) for k in unused if k in spec.cache_inputs}
        discard = [cache_tensor_name(k, output=True) for k in unused if k not in spec.cache_inputs]
        entries = list(self._entries.values())
        return OrtPhaseRunner(sess, inputs, output_specs(entries, outs), consts=consts, io_binding=io_binding,
                              aliases=aliases, discard=output_specs(entries, discard))

    def _zeros(self, name: str) -> torch.Tensor:
        e = self._entries[name]
        return torch.zeros(e["shape"], dtype=dtype_of(e["dtype"]))

    def warm_up(self, specs: Sequence) -> dict[int, str]:
        """Build and run every phase once on zero inputs (outputs discarded). Returns the phases whose run was
        skipped, and why: zeros are not a call every model can take (Mochi's text mask selects tokens, and
        its phase graphs hold the example's token count), so such a phase is only built, and its first real
        call pays the rest of the warm-up."""
        skipped = {}
        for spec in specs:
            runner = self(spec, "onnxruntime")
            try:
                runner(*(self._zeros(n) for n in runner.input_names))
            except Exception as e:  # ONNX Runtime's own error types differ by build; the session is built
                skipped[spec.id] = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return skipped


def ort_runner_factory(folder: Path, manifest: dict[str, Any], options: OrtOptions | None = None) -> OrtRunnerFactory:
    """The ``make_runner`` of :func:`graphpass.load` for ``backend="onnxruntime"``."""
    return OrtRunnerFactory(folder, manifest, options)
