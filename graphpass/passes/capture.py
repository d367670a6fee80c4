"""Capture a model call as a flat FX graph with torch.export (non-strict).

The captured graph takes the call's tensor keyword arguments as positional inputs, in a fixed order, and
returns the flat list of output leaves; the output structure (a tensor, a tuple, a diffusers output class)
is kept as a pytree spec so the runtime can rebuild it. Non-tensor keyword arguments (``return_dict=False``,
``None`` options) are bound as constants of the capture. Parameters stay those of the original module:
the graph reads them by attribute, so no weight is copied.

Structured arguments. A tuple, list or dict (rotary embeddings ``(cos, sin)``, lists of features) is
flattened as a pytree: each tensor leaf is an input named by its path (``image_rotary_emb.0``,
``opts.scale``), constant leaves are bound. Every call is flattened the same way; another structure is an
InputError that shows both. An input whose dtype differs from the capture's is cast when every value
survives the cast (an int64 timestep 500 for a float32 capture), else refused.

Every node keeps ``meta["nn_module_stack"]`` (module paths, relative to the model) and ``meta["val"]``
(a tensor with the node's shape at the example call), which the tagging and FLOP analyses read.

Dynamic dimensions. The batch (dim 0 of the first floating-point input of rank >= 3, and of every input
whose dim 0 has that size) is exported as ``Dim.AUTO`` in every capture, since pipelines switch guidance on
and off. With ``dynamic=True`` every non-batch dimension of the floating-point inputs (the video's frames,
height, width and channels; a conditioning sequence's length) is too; those the model leaves free stay
symbolic in the graph, so one capture serves other sizes. Export may leave a size free that the model cannot
in fact serve (e.g. ``(W // p) * (H // p) == 64`` is only checked by a later ``view``), so each free size is
probed: the graph is run on fake tensors (shapes only, no arithmetic) at twice its example value (all batch
dims at once), and a size that fails is captured static. A later call with new sizes is checked the same way
once per shape, against export's own guards too. ``meta["val"]`` holds the example's shapes. Export fixes
sizes 0 and 1, so an example with one frame (or a batch of one) captures that dimension static.

    >>> cap = capture(vdt, kwargs, dynamic=True)   # VDT computes its sin-cos positions per call
    >>> cap.dynamic_dims        # (B, F, C, H, W) and the (B, F) mask; the symbol names are export's
    {'hidden_states': {0: 's21', 1: 's50', 3: 's87', 4: 's35'}, ..., 'cond_mask': {0: 's21', 1: 's50'}}

Values read from tensors. A model that branches on a tensor's value (``if torch.all(image_embeds == 0):``),
reads one as a number (``.item()``, ``int(t)``) or slices with one (``mask[i, :lengths[i]] = True``) cannot be
traced for every value. When export fails on such a read, the example call is run once to record each value
with its source line and module (:class:`ValueReads`), and export replays them: the graph is the example's
branch. ``value_graph`` computes the values read from each call's inputs and ``flatten_call`` refuses a call
whose values differ (InputError naming the line, the module and both values). Sizes that depend on values
(``nonzero``, boolean masks) need no fixing: they stay symbolic in the graph and take any value.

A model export cannot capture gets a CaptureError naming the module and the line of the model's code.
"""
from __future__ import annotations

import linecache
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch.overrides import TorchFunctionMode

from ..errors import CaptureError, InputError

#: Attribute under which the bound wrapper holds the user's model; stripped from module paths.
_MODEL_ATTR = "model"


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    def __str__(self) -> str:
        return f"{str(self.dtype).replace('torch.', '')}[{', '.join(map(str, self.shape))}]"


_PLAIN = (bool, int, float, str)


def _is_plain(v) -> bool:
    return v is None or isinstance(v, _PLAIN)


def _key_name(key) -> str:
    """One step of a pytree key path as it appears in an input name: ``0`` of a tuple, ``fps`` of a dict."""
    if isinstance(key, pytree.SequenceKey):
        return str(key.idx)
    if isinstance(key, pytree.MappingKey):
        return str(key.key)
    if isinstance(key, pytree.GetAttrKey):
        return key.name
    return str(key).strip(".[]'\"")


def describe(v) -> str:
    """A short picture of a structured value: which leaves are tensors and which constants.

        >>> describe((torch.ones(2, 3), None))
        'tuple(tensor[2, 3], None)'
    """
    if isinstance(v, torch.Tensor):
        return f"tensor[{', '.join(map(str, v.shape))}]"
    if isinstance(v, dict):
        return "dict(" + ", ".join(f"{k}={describe(x)}" for k, x in v.items()) + ")"
    if isinstance(v, (tuple, list)):
        return f"{type(v).__name__}(" + ", ".join(describe(x) for x in v) + ")"
    return repr(v)


@dataclass(frozen=True)
class ArgStructure:
    """A tuple/list/dict argument: its pytree spec, the graph-input names of its tensor leaves, and its
    constant leaves (bound at capture like top-level constants).

        >>> st = ArgStructure.of("image_rotary_emb", (cos, sin))
        >>> st.tensor_names
        ('image_rotary_emb.0', 'image_rotary_emb.1')
    """

    name: str
    spec: pytree.TreeSpec
    tensor_names: tuple[str, ...]
    constants: tuple  # the leaves in order, with None at tensor leaves (see ``is_tensor``)
    is_tensor: tuple[bool, ...]
    picture: str  # describe() of the example value, for error messages

    def to_dict(self) -> dict[str, Any]:
        """JSON form (an exported artefact's manifest keeps it, so a loaded artefact takes the same call)."""
        return {"name": self.name, "spec": pytree.treespec_dumps(self.spec), "tensor_names": list(self.tensor_names),
                "constants": list(self.constants), "is_tensor": list(self.is_tensor), "picture": self.picture}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ArgStructure":
        return cls(d["name"], pytree.treespec_loads(d["spec"]), tuple(d["tensor_names"]), tuple(d["constants"]),
                   tuple(d["is_tensor"]), d["picture"])

    @classmethod
    def of(cls, name: str, value) -> "ArgStructure":
        leaves, spec = pytree.tree_flatten_with_path(value)
        names, consts, is_tensor = [], [], []
        for path, leaf in leaves:
            leaf_name = ".".join([name, *(_key_name(k) for k in path)])
            if isinstance(leaf, torch.Tensor):
                names.append(leaf_name)
            elif not _is_plain(leaf):
                raise CaptureError(f"example argument {name!r} holds a {type(leaf).__name__} at {leaf_name!r}; "
                                   f"graphpass captures tensors and binds plain constants (None, bool, int, float, "
                                   f"str) inside tuples, lists and dicts. Pass tensors there.")
            consts.append(None if isinstance(leaf, torch.Tensor) else leaf)
            is_tensor.append(isinstance(leaf, torch.Tensor))
        return cls(name, spec, tuple(names), tuple(consts), tuple(is_tensor), describe(value))

    def flatten(self, value) -> list[torch.Tensor]:
        """The tensor leaves of a call's value, checked against the captured structure."""
        try:
            leaves, spec = pytree.tree_flatten(value)
        except Exception:
            spec = None
        if spec != self.spec or len(leaves) != len(self.is_tensor):
            raise InputError(f"argument {self.name!r} is {describe(value)} but was captured as {self.picture}: the "
                             f"structure differs; pass the same structure or call graphpass.optimize again with "
                             f"this one in example_kwargs")
        tensors = []
        for i, (leaf, tensor, const) in enumerate(zip(leaves, self.is_tensor, self.constants)):
            if tensor != isinstance(leaf, torch.Tensor) or (not tensor and not _same_constant(leaf, const)):
                raise InputError(f"argument {self.name!r} is {describe(value)} but was captured as {self.picture}: "
                                 f"leaf {i} differs (constants are bound at capture); pass the captured value or "
                                 f"call graphpass.optimize again with this one in example_kwargs")
            if tensor:
                tensors.append(leaf)
        return tensors

    def rebuild(self, tensors) -> Any:
        it = iter(tensors)
        return pytree.tree_unflatten([next(it) if t else c for t, c in zip(self.is_tensor, self.constants)],
                                     self.spec)


@dataclass(kw_only=True)
class CallSignature:
    """How a model is called: its keyword arguments as a flat list of tensor inputs, and the leaves it
    returns as its output. A :class:`CapturedGraph` is one; so is the call an exported folder records.

    input_names: the flat inputs in order. A tuple/list/dict argument gives one input per tensor leaf, named
        by its path (``image_rotary_emb.0``), see ``structures``.
    constants: non-tensor keyword arguments bound at capture; a later call must pass the same values or omit
        them.
    out_spec: the structure of the output leaves.
    """

    input_names: list[str]
    input_specs: list[TensorSpec]
    constants: dict[str, Any]
    out_spec: pytree.TreeSpec
    model_type: str
    #: input name -> {dim: size symbol}: dimensions the graph serves at other sizes than captured (dims with
    #: one symbol must be equal in a call).
    dynamic_dims: dict[str, dict[int, str]] = field(default_factory=dict)
    #: the exported module with export's input guards, run on fake tensors to check a new shape.
    checker: fx.GraphModule | None = field(default=None, repr=False)
    #: structured (tuple/list/dict) arguments by name.
    structures: dict[str, ArgStructure] = field(default_factory=dict)
    #: whether the capture was asked to free the non-batch dimensions too (``dynamic=True``).
    dynamic: bool = False
    #: tensor values the model read (``if mask.all():``) that the capture fixed at the example's; each call's
    #: values are computed by ``value_graph`` (graph inputs -> the tensors read) and must be the same.
    value_checks: list[ValueCheck] = field(default_factory=list)
    value_graph: fx.GraphModule | None = field(default=None, repr=False)
    _checked: dict[tuple, str | None] = field(default_factory=dict, repr=False)

    @property
    def arguments(self) -> list[str]:
        """The call's keyword arguments the graph reads (a structured one once), in capture order."""
        out: list[str] = []
        leaf_owner = {n: st.name for st in self.structures.values() for n in st.tensor_names}
        for n in self.input_names:
            owner = leaf_owner.get(n, n)
            if owner not in out:
                out.append(owner)
        return out + [k for k in self.structures if k not in out]

    def flatten_call(self, kwargs: dict[str, Any]) -> list[torch.Tensor]:
        """Check a call's keyword arguments against the capture and return the graph inputs in order."""
        arguments = self.arguments
        unknown = set(kwargs) - set(arguments) - set(self.constants)
        if unknown:
            raise InputError(f"unexpected argument(s) {sorted(unknown)}: the model was captured with "
                             f"{arguments + sorted(self.constants)}; re-run graphpass.optimize with example "
                             f"inputs that include them")
        for k, v in self.constants.items():
            if k in kwargs and not _same_constant(kwargs[k], v):
                raise InputError(f"argument {k}={kwargs[k]!r} differs from the value {v!r} bound at capture; pass "
                                 f"{k}={v!r} or re-run graphpass.optimize with {k}={kwargs[k]!r} in example_kwargs")
        values: dict[str, Any] = {}
        for k in arguments:
            if k not in kwargs:
                raise InputError(f"missing argument {k!r}: the captured graph needs {arguments}")
            if k in self.structures:
                values.update(zip(self.structures[k].tensor_names, self.structures[k].flatten(kwargs[k])))
            else:
                values[k] = kwargs[k]
        flat = []
        for name, spec in zip(self.input_names, self.input_specs):
            v = values[name]
            if not isinstance(v, torch.Tensor):
                raise InputError(f"argument {name!r} must be a tensor like at capture ({spec}), got {type(v).__name__}")
            if tuple(v.shape) != spec.shape:
                self._check_static(name, spec, tuple(v.shape))
            if v.dtype != spec.dtype:
                v = cast_exact(name, v, spec.dtype)
            flat.append(v)
        shapes = tuple(tuple(v.shape) for v in flat)
        if shapes != tuple(sp.shape for sp in self.input_specs):
            self._check_free(shapes)
        if self.value_checks:
            self._check_values(flat)
        return flat

    def _check_values(self, flat: list[torch.Tensor]) -> None:
        """The tensor values the capture fixed must be the example's: else the graph's branch is wrong."""
        with torch.no_grad():
            got = self.value_graph(*flat)
        for chk, t in zip(self.value_checks, got):
            value = chk.read(t)
            if value != chk.value:
                raise InputError(f"the capture fixed the tensor value read at {chk.describe()} to {chk.value!r}, "
                                 f"the example call's, and traced the model's code for it; this call gives "
                                 f"{value!r}, for which the graph would compute something else. Call "
                                 f"graphpass.optimize again with example inputs that give {value!r}")

    def _check_static(self, name: str, spec: TensorSpec, shape: tuple[int, ...]) -> None:
        free = self.dynamic_dims.get(name, {})
        fixed = [i for i, (a, b) in enumerate(zip(shape, spec.shape)) if a != b and i not in free]
        if len(shape) == len(spec.shape) and not fixed:
            return
        why = f"dimension(s) {fixed} are static in this capture" if fixed else "the rank differs"
        hint = f" (its free dimensions: {sorted(free)})" if free else ""
        ones = [i for i in fixed if spec.shape[i] in (0, 1)]
        if ones:  # export fixes sizes 0 and 1 (it cannot tell "one" from "any" by tracing)
            hint += (f"; dimension(s) {ones} had size {spec.shape[ones[0]]} in the example, which export always "
                     f"captures static: give an example of size 2 or more there")
        elif not self.dynamic:
            hint += " (graphpass.optimize(..., dynamic=True) frees the dimensions the model allows)"
        raise InputError(f"argument {name!r} has shape {shape} but the graph was captured for {spec.shape}: {why}"
                         f"{hint}; call graphpass.optimize again with example inputs of this shape")

    def _check_free(self, shapes: tuple[tuple[int, ...], ...]) -> None:
        """New sizes of free dimensions: run export's guards and every op on fake tensors, once per shape."""
        if shapes not in self._checked:
            why = shape_error(self.checker, shapes, [s.dtype for s in self.input_specs])
            # export's guards speak of positional args: args_0.size()[3] -> hidden_states.size()[3]
            self._checked[shapes] = why and re.sub(r"\bargs_(\d+)\b", lambda m: self.input_names[int(m[1])]
                                                   if int(m[1]) < len(self.input_names) else m[0], why)
        if self._checked[shapes] is not None:
            got = ", ".join(f"{n} {tuple(s)}" for n, s in zip(self.input_names, shapes))
            raise InputError(f"the captured graph cannot run inputs of shapes {got}: {self._checked[shapes]}; "
                             f"call graphpass.optimize again with example inputs of these shapes")

    def unflatten_outputs(self, leaves) -> Any:
        return pytree.tree_unflatten(list(leaves), self.out_spec)


@dataclass(kw_only=True)
class CapturedGraph(CallSignature):
    """A captured model call: its :class:`CallSignature` and its graph.

    gm: flat GraphModule; its placeholders are ``input_names`` in order (a structured argument's leaf
        ``image_rotary_emb.0`` is the placeholder ``image_rotary_emb_0``); it returns a tuple of the output
        leaves described by ``out_spec``.
    """

    gm: fx.GraphModule


def cast_exact(name: str, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``v`` cast to the captured ``dtype`` when every value survives the cast exactly (an int64 timestep
    500 as float32 500.0), else an InputError.

        >>> cast_exact("timestep", torch.tensor([500]), torch.float32)
        tensor([500.])
        >>> cast_exact("timestep", torch.tensor([500.5]), torch.int64)
        InputError: argument 'timestep' has dtype torch.float32 but was captured as torch.int64 ...
    """
    out = v.to(dtype)
    if torch.equal(out.to(v.dtype), v):  # a round trip that changes nothing lost nothing
        return out
    raise InputError(f"argument {name!r} has dtype {v.dtype} but was captured as {dtype}, and its values do not "
                     f"survive the cast exactly; cast it or re-capture with example inputs of this dtype")


def shape_error(gm: fx.GraphModule, shapes, dtypes) -> str | None:
    """Run ``gm`` on fake tensors of these shapes (no arithmetic, no memory): None if every op accepts them,
    else the first line of the error."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            fx.Interpreter(gm).run(*(torch.empty(s, dtype=d) for s, d in zip(shapes, dtypes)))
    except Exception as e:
        text = str(e).strip()
        return text.splitlines()[0] if text else type(e).__name__
    return None


def _same_constant(a, b) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:
        return a is b


# --- data-dependent values ---------------------------------------------------------------------------------
#: Tensor methods that turn a tensor's value into a Python value (``if mask.all():``, ``n = int(x.sum())``).
_VALUE_READS = (torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.__float__,
                torch.Tensor.__index__)
_TORCH_DIR = os.path.dirname(torch.__file__)


@dataclass(frozen=True)
class ValueCheck:
    """A tensor value the model turned into a Python value, fixed at the value the example call gave.

    where: the source line (``transformer_hunyuan_video15.py:702 if is_t2v:``); module: the module path
    ('' for the model itself) that ran it.
    """

    value: Any
    where: str
    module: str
    method: str = "__bool__"  # how the model read it: bool(t), t.item(), int(t), float(t), operator.index(t)

    def read(self, t: torch.Tensor) -> Any:
        return getattr(t, self.method)()

    def describe(self) -> str:
        return f"`{self.where}` (in module {self.module or '<model>'!r})"


def _call_site() -> str:
    """``file.py:line code`` of the innermost frame outside torch and graphpass: the model's own line."""
    here = os.path.dirname(os.path.dirname(__file__))
    f = sys._getframe(1)
    while f is not None and (f.f_code.co_filename.startswith(_TORCH_DIR) or f.f_code.co_filename.startswith(here)):
        f = f.f_back
    if f is None:
        return "<unknown>"
    line = linecache.getline(f.f_code.co_filename, f.f_lineno).strip()
    return f"{os.path.basename(f.f_code.co_filename)}:{f.f_lineno} {line}"


class ModuleStack:
    """While active, ``current`` is the path of the innermost module running (global forward hooks), so that
    errors and checks can say where in the model they arose."""

    def __init__(self, model: torch.nn.Module):
        self.names = {id(m): n for n, m in model.named_modules()}
        self.stack: list[str] = []

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else ""

    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self._handles = [register_module_forward_pre_hook(self._enter), register_module_forward_hook(self._exit)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()

    def _enter(self, module, args):
        if id(module) in self.names:
            self.stack.append(self.names[id(module)])

    def _exit(self, module, args, out):
        if id(module) in self.names and self.stack:
            self.stack.pop()


class ValueReads(TorchFunctionMode):
    """Records (eager example call) or replays (export) the values the model reads out of tensors.

    Recording runs the model on the real example; replaying hands export the recorded value at the same
    source line, so the traced branch is the example's, and keeps the tensor that was read (``tensors``):
    the capture returns it as an extra output from which each call's value is checked.

        >>> with ModuleStack(model) as where, ValueReads(where) as rec:
        ...     model(**kwargs)
        >>> rec.checks
        [ValueCheck(value=True, where='transformer_hunyuan_video15.py:702 if is_t2v:', module='')]
    """

    def __init__(self, where: ModuleStack, replay: list[ValueCheck] | None = None):
        super().__init__()
        self.where = where
        self.replay = replay
        self.checks: list[ValueCheck] = []
        self.tensors: list[torch.Tensor] = []
        self._next = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INDEXING and _tensor_bounds(args[1]):
            # x[:, :n] with n a 0-d tensor: the bound is read in C++; read it here, as an int.
            bounds = [self._read(torch.Tensor.__index__, t) for t in _tensor_bounds(args[1])]
            return func(args[0], _with_bounds(args[1], iter(bounds)), *args[2:], **kwargs)
        if func not in _VALUE_READS:
            return func(*args, **kwargs)
        return self._read(func, args[0])

    def _read(self, func, t: torch.Tensor):
        site = _call_site()
        if self.replay is None:
            with torch._C.DisableTorchFunction():
                value = func(t)
            self.checks.append(ValueCheck(value, site, self.where.current, func.__name__))
            return value
        # The next recorded read at this line (eager-only code, e.g. under `not is_compiling()`, may read more).
        i = next((j for j in range(self._next, len(self.replay)) if self.replay[j].where == site), None)
        if i is None:
            raise CaptureError(f"the model reads a tensor's value at `{site}` (in module "
                               f"{self.where.current or '<model>'!r}) when exported but not at this point of the "
                               f"example call; graphpass cannot fix that value. Rewrite the branch with torch.cond "
                               f"or make it depend on shapes only")
        self._next = i + 1
        self.checks.append(self.replay[i])
        self.tensors.append(t)
        return self.replay[i].value


_INDEXING = (torch.Tensor.__getitem__, torch.Tensor.__setitem__)


def _tensor_bounds(index) -> list[torch.Tensor]:
    """The 0-d tensors used as slice bounds in an index (``x[i, :n]``)."""
    parts = index if isinstance(index, tuple) else (index,)
    return [b for p in parts if isinstance(p, slice) for b in (p.start, p.stop, p.step)
            if isinstance(b, torch.Tensor) and b.dim() == 0]


def _with_bounds(index, values):
    """``index`` with its tensor slice bounds replaced, in order, by ``values``."""
    def bound(b):
        return next(values) if isinstance(b, torch.Tensor) and b.dim() == 0 else b

    def part(p):
        return slice(bound(p.start), bound(p.stop), bound(p.step)) if isinstance(p, slice) else p

    return tuple(part(p) for p in index) if isinstance(index, tuple) else part(index)


def _data_dependent(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, GuardOnDataDependentSymNode) or "data-dependent" in str(e).split("\n", 1)[0]:
            return True
        e = e.__cause__ or e.__context__
    return False


def _read_values(model, kwargs: dict[str, Any]) -> list[ValueCheck]:
    """The values the model reads out of tensors on the example call, with where it reads them."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), ModuleStack(model) as where, ValueReads(where) as rec:
            model(**kwargs)
    finally:
        model.train(was_training)
    return rec.checks



class _Bound(torch.nn.Module):
    """Calls the model with the constant keyword arguments bound and the structured ones rebuilt from their
    tensor leaves, so export sees only flat tensor inputs."""

    def __init__(self, model: torch.nn.Module, names, constants: dict[str, Any],
                 structures: dict[str, ArgStructure], reads: list[ValueCheck] | None = None, sink=None):
        super().__init__()
        self.model = model
        self.names = list(names)
        self.constants = constants
        self.structures = structures
        self.reads = reads
        self.sink = sink  # called with the reads export made (a function: export copies module state)

    def forward(self, *args):
        # Positional: torch.export's dynamic_shapes (Dim.AUTO) binds reliably to positional inputs.
        values = dict(zip(self.names, args))
        kwargs = {k: v for k, v in values.items() if k not in self._leaves()}
        for k, st in self.structures.items():
            kwargs[k] = st.rebuild(values[n] for n in st.tensor_names)
        if self.reads is None:
            return self.model(**kwargs, **self.constants)
        # Replay the example's values; return the tensors they were read from, after the model's outputs.
        with ModuleStack(self.model) as where, ValueReads(where, self.reads) as rep:
            out = self.model(**kwargs, **self.constants)
        self.sink(rep.checks)  # the reads export made, in order: the extra outputs
        return out, tuple(t.detach().clone() for t in rep.tensors)

    def _leaves(self) -> set[str]:
        return {n for st in self.structures.values() for n in st.tensor_names}


def _split_arguments(example_kwargs: dict[str, Any]):
    """(tensor inputs by input name, plain constants, structured arguments) of one call."""
    tensors, constants, structures = {}, {}, {}
    for k, v in example_kwargs.items():
        if isinstance(v, torch.Tensor):
            tensors[k] = v
        elif _is_plain(v):
            constants[k] = v
        elif isinstance(v, (tuple, list, dict)):
            st = structures[k] = ArgStructure.of(k, v)
            leaves = [x for x in pytree.tree_leaves(v) if isinstance(x, torch.Tensor)]
            tensors.update(zip(st.tensor_names, leaves))
        else:
            raise CaptureError(f"example argument {k!r} is a {type(v).__name__}; graphpass captures tensors (alone or "
                               f"in tuples, lists and dicts) and binds plain constants (None, bool, int, float, str)")
    return tensors, constants, structures


def batch_dims(tensors: dict[str, torch.Tensor]) -> set[tuple[str, int]]:
    """(input, 0) for every input whose first dimension is the batch: the size of dim 0 of the first
    floating-point input of rank >= 3 (the latent video), shared by the timestep, the text embeddings...

        >>> batch_dims({"hidden_states": torch.empty(2, 4, 3, 8, 8), "timestep": torch.empty(2),
        ...             "freqs": torch.empty(48, 8)})
        {('hidden_states', 0), ('timestep', 0)}
    """
    video = next((v for v in tensors.values() if v.dtype.is_floating_point and v.dim() >= 3), None)
    if video is None:
        return set()
    return {(k, 0) for k, v in tensors.items() if v.dim() >= 1 and v.shape[0] == video.shape[0]}


def capture(model: torch.nn.Module, example_kwargs: dict[str, Any], *, dynamic: bool = False) -> CapturedGraph:
    """Export ``model(**example_kwargs)`` into a :class:`CapturedGraph`. The batch stays free where the model
    allows; with ``dynamic``, the other dimensions the model allows too (see the module docstring).

    >>> cap = capture(model, dict(hidden_states=x, timestep=t, encoder_hidden_states=c, return_dict=False))
    >>> cap.input_names
    ['hidden_states', 'timestep', 'encoder_hidden_states']
    >>> capture(wan, dict(..., image_rotary_emb=(cos, sin))).input_names[-2:]
    ['image_rotary_emb.0', 'image_rotary_emb.1']
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"graphpass optimizes torch.nn.Module models, got {type(model).__name__}")
    if not example_kwargs:
        raise CaptureError("example_kwargs is empty: pass the keyword arguments of one real model call, e.g. "
                           "dict(hidden_states=x, timestep=t, encoder_hidden_states=c)")
    tensors, constants, structures = _split_arguments(example_kwargs)
    # A sliced example (x[:, :1]) would have export guard on its strides, which no other size could meet.
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    names = list(tensors)
    free_batch = batch_dims(tensors)
    free = set(free_batch)
    if dynamic:
        free |= {(k, i) for k, v in tensors.items() if v.dtype.is_floating_point for i in range(1, v.dim())}
    reads, checks, failure = None, [], None
    try:
        ep, _ = _export(model, names, constants, structures, tensors, free)
    except CaptureError as e:
        ep, failure = None, e
    if ep is None and free and not _data_dependent(failure.__cause__):
        # Some models cannot be traced with symbolic sizes at all (Cosmos hands a size to numpy): fewer free
        # dimensions, down to none, as the probe decides for the sizes it can test.
        for fewer in ([free - set(free_batch)] if dynamic and free_batch else []) + [set()]:
            try:
                ep, _ = _export(model, names, constants, structures, tensors, fewer)
            except CaptureError:
                continue
            free = fewer
            free_batch = type(free_batch)(k for k in free_batch if k in fewer)
            break
    if ep is None:
        if not _data_dependent(failure.__cause__):
            raise failure
        # The model branches on tensor values (``if mask.all():``): fix them at the example's values, each
        # checked on every call (CapturedGraph.value_checks).
        reads = _read_values(model, example_kwargs)
        if not reads:  # it branches on sizes that depend on values, not on values graphpass could fix
            raise failure
        ep, checks = _export(model, names, constants, structures, tensors, free, reads)
    src = ep.module()  # with export's input guards: probes new shapes now, checks calls' shapes later
    symbols = _free_dims(ep, names) if free else {}
    while symbols:
        bad = set()
        for group in probe_groups(symbols, free_batch):
            if _probe(src, names, tensors, symbols, {s for k in group for s in symbols[k].free_symbols}):
                bad |= group
        if not bad:
            break
        ep, checks = _export(model, names, constants, structures, tensors, set(symbols) - bad, reads)  # static
        src = ep.module()
        symbols = _free_dims(ep, names) if set(symbols) - bad else {}
    dynamic_dims: dict[str, dict[int, str]] = {}
    for (k, i), sym in sorted(symbols.items(), key=lambda kv: names.index(kv[0][0])):
        dynamic_dims.setdefault(k, {})[i] = str(sym)

    out_spec = ep.call_spec.out_spec
    n_out = out_spec.num_leaves
    if reads is not None:  # (model outputs, read tensors)
        out_spec = out_spec.child(0)
        n_out = out_spec.num_leaves
    example = [tensors[k] for k in names]
    gm = _copy_export_graph(src, names, slice(0, n_out), example)
    value_graph = _copy_export_graph(src, names, slice(n_out, None), example) if reads else None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(tensors):
        raise CaptureError(f"export produced {len(placeholders)} inputs for {len(tensors)} tensor arguments")
    return CapturedGraph(
        gm=gm,
        input_names=names,
        input_specs=[TensorSpec(tuple(tensors[k].shape), tensors[k].dtype) for k in names],
        constants=constants,
        out_spec=out_spec,
        model_type=type(model).__name__,
        dynamic_dims=dynamic_dims,
        checker=src if dynamic_dims else None,
        structures=structures,
        dynamic=dynamic,
        value_checks=list(checks) if reads is not None else [],
        value_graph=value_graph,
    )


def _copy_export_graph(src: fx.GraphModule, names: list[str], outputs: slice, example) -> fx.GraphModule:
    """The exported graph with placeholders named after the inputs, module paths relative to the model,
    ``meta["val"]`` at the example's shapes, and only the ``outputs`` leaves (what only the others needed
    is dropped)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    leaves = None
    unresolved = False
    for node in src.graph.nodes:
        if node.op == "call_module" and node.target == "_guards_fn":
            continue  # export's input guards; the runtime checks shapes itself with clearer errors
        if node.op == "output":
            leaves = fx.node.map_arg(node.args[0], lambda n: env[n])
            continue
        if node.op == "placeholder":  # named after the call's keyword arguments, as the analyses expect
            name = names[sum(1 for n in graph.nodes if n.op == "placeholder")]
            new = graph.placeholder(name.replace(".", "_"))
            new.meta = dict(node.meta)
        else:
            new = graph.node_copy(node, lambda n: env[n])
        if "val" in new.meta:
            try:
                new.meta["val"] = _concrete(new.meta["val"])
            except Exception:  # a size that depends on values (nonzero, masked select): read off the example
                unresolved = True
        stack = new.meta.get("nn_module_stack")
        if stack:
            new.meta["nn_module_stack"] = {k: (_strip(p), t) for k, (p, t) in stack.items()
                                           if _strip(p)}
        env[node] = new
    kept = list(leaves)[outputs]
    dropped = [n for n in list(leaves) if n not in kept and isinstance(n, fx.Node)]
    graph.output(tuple(kept))
    _drop_unused(graph, dropped)
    if not unresolved:  # (with sizes read off the example run, the writes stay: DCE reads them by memory)
        functionalise_slice_writes(graph)
    gm = fx.GraphModule(src, graph)
    gm.graph.lint()
    if unresolved:
        _example_meta(gm, example)
    return gm


def functionalise_slice_writes(graph: fx.Graph) -> int:
    """Rewrite writes into slices of a tensor the graph made as out-of-place ``slice_scatter``; returns how
    many. ``out = empty_like(q); out[..., 0::2] = a`` (rotary embeddings in Wan, CogVideoX) is exported as
    ``copy_(slice(out, -1, 0, None, 2), a)``; it becomes ``out_1 = slice_scatter(out, a, -1, 0, None, 2)`` and
    every later reader of ``out`` reads ``out_1``, so passes that follow data flow (region exits, block
    spans) see the write. A write is left in place (dead-code elimination still reads it by memory) when the
    tensor is a graph input or parameter, or is read through a view taken before the write.

        >>> functionalise_slice_writes(gm.graph)   # Wan, 2 blocks: q and k, even and odd lanes
        8
    """
    aten = torch.ops.aten
    order = {n: i for i, n in enumerate(graph.nodes)}
    done = 0
    for c in list(graph.nodes):
        if not (c.op == "call_function" and c.target == aten.copy_.default and len(c.args) == 2 and not c.users):
            continue
        chain, base = [], c.args[0]  # slices from the base tensor to the written view, innermost first
        while isinstance(base, fx.Node) and base.op == "call_function" and base.target == aten.slice.Tensor:
            chain.append(base)
            base = base.args[0]
        if not chain or not isinstance(base, fx.Node) or base.op != "call_function" \
                or getattr(base.target, "_schema", None) is None or _aliases_input(base) \
                or any(len(v.users) != 1 or v.kwargs for v in chain) \
                or any(order[u] < order[c] for u in base.users if u is not chain[-1]):
            continue
        src, dst = c.args[1], c.args[0].meta.get("val")
        sv = src.meta.get("val") if isinstance(src, fx.Node) else None
        if not isinstance(dst, torch.Tensor) or (isinstance(src, fx.Node) and not isinstance(sv, torch.Tensor)):
            continue
        with graph.inserting_before(c):
            if not isinstance(src, fx.Node):  # a number: copy_ fills the view with it
                src = _with_meta(graph.call_function(aten.full.default, (list(dst.shape), src),
                                                     {"dtype": dst.dtype}), c, dst.shape, dst.dtype)
            else:  # copy_ casts and broadcasts its source to the view
                if sv.dtype != dst.dtype:
                    src = _with_meta(graph.call_function(aten._to_copy.default, (src,), {"dtype": dst.dtype}),
                                     c, sv.shape, dst.dtype)
                if tuple(sv.shape) != tuple(dst.shape):
                    src = _with_meta(graph.call_function(aten.expand.default, (src, list(dst.shape))), c,
                                     dst.shape, dst.dtype)
            new = src
            for view in chain:  # innermost first: scatter into each enclosing tensor
                outer = view.args[0].meta["val"]
                new = _with_meta(graph.call_function(aten.slice_scatter.default, (view.args[0], new, *view.args[1:])),
                                 c, outer.shape, outer.dtype)
        for u in [u for u in base.users if u in order and u is not chain[-1] and order[u] > order[c]]:
            u.replace_input_with(base, new)
        graph.erase_node(c)
        for view in chain:
            if not view.users:
                graph.erase_node(view)
        order = {n: i for i, n in enumerate(graph.nodes)}
        done += 1
    return done


def _aliases_input(node: fx.Node) -> bool:
    """Whether ``node`` may share memory with a graph input or parameter (a view of one)."""
    while node.op == "call_function":
        schema = getattr(node.target, "_schema", None)
        if schema is None or not any(a.alias_info is not None for a in schema.arguments):
            return False
        node = node.args[0]
        if not isinstance(node, fx.Node):
            return False
    return True


def _with_meta(new: fx.Node, like: fx.Node, shape, dtype) -> fx.Node:
    """``new`` with ``like``'s module path and a contiguous meta tensor of this shape and dtype."""
    new.meta["nn_module_stack"] = like.meta.get("nn_module_stack")
    new.meta["val"] = torch.empty_strided(tuple(shape), _contiguous_strides(shape), dtype=dtype, device="meta")
    return new


def _contiguous_strides(shape) -> list[int]:
    out, acc = [], 1
    for s in reversed(list(shape)):
        out.append(acc)
        acc *= int(s)
    return out[::-1]


def _drop_unused(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase ``nodes`` and what only they needed, where nothing else reads it and it has no side effect."""
    todo = list(nodes)
    while todo:
        n = todo.pop()
        if n.graph is graph and not n.users and n.op == "call_function" and not n.is_impure():
            todo.extend(n.all_input_nodes)
            graph.erase_node(n)


def _example_meta(gm: fx.GraphModule, example) -> None:
    """Set every node's ``meta["val"]`` from a run on the example inputs (for sizes export left symbolic
    because they depend on tensor values)."""
    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            n.meta["val"] = _as_meta(out)
            return out

    with torch.no_grad():
        Recorder(gm).run(*example)


def _as_meta(v):
    if isinstance(v, torch.Tensor):
        return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")
    if isinstance(v, (list, tuple)):
        return type(v)(_as_meta(x) for x in v)
    return v


def _export(model, names, constants, structures, tensors, free, reads=None):
    """(exported program, the value reads it replayed: its outputs after the model's)."""
    from torch.export import Dim

    dynamic_shapes = None
    if free:
        dynamic_shapes = (tuple({i: Dim.AUTO for (n, i) in sorted(free) if n == k} or None for k in names),)
    was_training = model.training
    model.eval()
    where = ModuleStack(model)
    try:
        replayed: list[ValueCheck] = []

        def sink(checks):
            replayed[:] = checks

        with where:
            # Fresh tensor objects (views, no copy): export marks dynamic dimensions on the example tensors and
            # a failed export leaves those marks, which would make a static retry symbolic too.
            ep = torch.export.export(_Bound(model, names, constants, structures, reads, sink),
                                     tuple(tensors[k].view_as(tensors[k]) for k in names),
                                     dynamic_shapes=dynamic_shapes, strict=False)
        return ep, replayed
    except CaptureError:
        raise
    except Exception as e:
        raise _export_error(model, e, where.current) from e
    finally:
        model.train(was_training)


def _export_error(model, e: BaseException, module: str) -> CaptureError:
    """Export's error in a few lines: what failed, at which line of the model's code, in which module."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    where = f" in module {module!r}" if module else ""
    site = _model_line(e)
    site = f" at {site}" if site else ""
    what = ("a branch on a tensor's value that graphpass could not fix"
            if _data_dependent(e) else "an operation torch.export does not support")
    return CaptureError(f"torch.export could not capture {type(model).__name__}{where}{site} ({what}): {first}. "
                        f"graphpass needs a model that torch.export.export(..., strict=False) accepts with these "
                        f"example inputs; rewrite that line (torch.cond for a branch) or pass kwargs that avoid it.")


def _model_line(e: BaseException) -> str:
    """``file.py:line `code``` of the innermost frame of ``e``'s traceback outside torch and graphpass: the
    model's line that export failed on."""
    import traceback

    here = os.path.dirname(os.path.dirname(__file__))
    found = ""
    while e is not None:
        for fr in traceback.extract_tb(e.__traceback__):
            if not fr.filename.startswith(_TORCH_DIR) and not fr.filename.startswith(here):
                found = f"{os.path.basename(fr.filename)}:{fr.lineno} `{(fr.line or '').strip()}`"
        e = e.__cause__
    return found


def _user_inputs(ep, names) -> list[fx.Node]:
    ph = [n for n in ep.graph.nodes if n.op == "placeholder"]
    return ph[len(ph) - len(names):]  # parameters and buffers are lifted in front of the user inputs


def _free_dims(ep, names) -> dict[tuple[str, int], Any]:
    """{(input, dim): sympy expression} of the input sizes that stayed symbolic in the export."""
    out = {}
    for name, node in zip(names, _user_inputs(ep, names)):
        val = node.meta.get("val")
        for i, s in enumerate(getattr(val, "shape", ())):
            if isinstance(s, torch.SymInt) and s.node.expr.free_symbols:
                out[(name, i)] = s.node.expr
    return out


def probe_groups(symbols: dict[tuple[str, int], Any], batch: set[tuple[str, int]]) -> list[set[tuple[str, int]]]:
    """The sets of free dims probed together: every batch dim at once (export may give the video's, the
    timestep's and the text's batch separate symbols tied only by guards such as ``s0 * F == s1 * F``), then
    the other dims, one size (symbol expression) at a time.

        >>> probe_groups({("x", 0): s0, ("t", 0): s1, ("x", 2): s2, ("m", 1): s2}, {("x", 0), ("t", 0)})
        [{('x', 0), ('t', 0)}, {('x', 2), ('m', 1)}]
    """
    groups = [set(batch) & set(symbols)] if set(batch) & set(symbols) else []
    by_size: dict[Any, set] = {}
    for key, e in symbols.items():
        if key not in batch:
            by_size.setdefault(e, set()).add(key)
    return groups + list(by_size.values())


def _probe(exported: fx.GraphModule, names, tensors, symbols, doubled_symbols) -> str | None:
    """Run the exported module (with its guards) on fake inputs where ``doubled_symbols`` take twice their
    example values: None if it accepts them, else why not."""
    base = {}
    for (k, i), e in symbols.items():
        if e.is_Symbol:
            base[e] = tensors[k].shape[i]
    doubled = {s: (2 * v if s in doubled_symbols else v) for s, v in base.items()}
    shapes = []
    for k in names:
        shape = list(tensors[k].shape)
        for (n, i), e in symbols.items():
            if n == k:
                shape[i] = int(e.xreplace(doubled))
        shapes.append(tuple(shape))
    return shape_error(exported, shapes, [tensors[k].dtype for k in names])


def _concrete(v):
    """The example-call value of a possibly symbolic meta value: shapes and sizes as plain ints."""
    from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw as hint_int

    if isinstance(v, torch.SymInt):
        return hint_int(v)
    if isinstance(v, torch.Tensor):
        if any(isinstance(s, torch.SymInt) for s in (*v.shape, *v.stride())):
            return torch.empty_strided([hint_int(s) for s in v.shape], [hint_int(s) for s in v.stride()],
                                       dtype=v.dtype, device="meta")
        return v
    if isinstance(v, (list, tuple)):
        return type(v)(_concrete(x) for x in v)
    return v


def _strip(path: str) -> str:
    """Module path relative to the user's model ('' for the model itself)."""
    if path == _MODEL_ATTR:
        return ""
    if path.startswith(_MODEL_ATTR + "."):
        return path[len(_MODEL_ATTR) + 1:]
    return path


def module_path(node: fx.Node) -> list[tuple[str, str]]:
    """The module stack of a node, outermost first, as (path, qualified type name)."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for p, t in stack.values():
        tname = t if isinstance(t, str) else f"{t.__module__}.{t.__qualname__}"
        out.append((p, tname))
    return out
