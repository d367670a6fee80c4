"""Capture a model call as a flat FX graph with torch.export (non-strict).

The captured graph takes the call's tensor keyword arguments as positional inputs, in a fixed order, and
returns the flat list of output leaves; the output structure (a tensor, a tuple, a diffusers output class)
is kept as a pytree spec so the runtime can rebuild it. Non-tensor keyword arguments (``return_dict=False``,
``None`` options) are bound as constants of the capture. Parameters stay those of the original module:
the graph reads them by attribute, so no weight is copied.

Every node keeps ``meta["nn_module_stack"]`` (module paths, relative to the model) and ``meta["val"]``
(a tensor with the node's shape at the example call), which the tagging and FLOP analyses read.

Dynamic dimensions. With ``dynamic=True`` every non-batch dimension of the floating-point inputs (the
video's frames, height, width and channels; a conditioning sequence's length) is exported as ``Dim.AUTO``;
those the model leaves free stay symbolic in the graph, so one capture serves other sizes. Export may leave
a size free that the model cannot in fact serve (e.g. ``(W // p) * (H // p) == 64`` is only checked by a
later ``view``), so each free size is probed: the graph is run on fake tensors (shapes only, no arithmetic)
at twice its example value, and a size that fails is captured static. A later call with new sizes is checked
the same way once per shape, against export's own guards too. ``meta["val"]`` holds the example's shapes.

    >>> cap = capture(vdt, kwargs, dynamic=True)   # VDT computes its sin-cos positions per call
    >>> cap.dynamic_dims        # (B, F, C, H, W) and the (B, F) mask; the symbol names are export's
    {'hidden_states': {1: 's50', 3: 's87', 4: 's35'}, 'cond_mask': {1: 's50'}}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..errors import CaptureError, InputError

#: Attribute under which the bound wrapper holds the user's model; stripped from module paths.
_MODEL_ATTR = "model"


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype

    def __str__(self) -> str:
        return f"{str(self.dtype).replace('torch.', '')}[{', '.join(map(str, self.shape))}]"


@dataclass
class CapturedGraph:
    """A captured model call.

    gm: flat GraphModule; its placeholders are ``input_names`` in order; it returns a tuple of the output
        leaves described by ``out_spec``.
    constants: non-tensor keyword arguments bound at capture; a later call must pass the same values or omit
        them.
    """

    gm: fx.GraphModule
    input_names: list[str]
    input_specs: list[TensorSpec]
    constants: dict[str, Any]
    out_spec: pytree.TreeSpec
    model_type: str
    extra: dict[str, Any] = field(default_factory=dict)
    #: input name -> {dim: size symbol}: dimensions the graph serves at other sizes than captured (dims with
    #: one symbol must be equal in a call).
    dynamic_dims: dict[str, dict[int, str]] = field(default_factory=dict)
    #: the exported module with export's input guards, run on fake tensors to check a new shape.
    checker: fx.GraphModule | None = field(default=None, repr=False)
    _checked: dict[tuple, str | None] = field(default_factory=dict, repr=False)

    def flatten_call(self, kwargs: dict[str, Any]) -> list[torch.Tensor]:
        """Check a call's keyword arguments against the capture and return the graph inputs in order."""
        unknown = set(kwargs) - set(self.input_names) - set(self.constants)
        if unknown:
            raise InputError(f"unexpected argument(s) {sorted(unknown)}: the model was captured with "
                             f"{self.input_names + sorted(self.constants)}; re-run graphpass.optimize with example "
                             f"inputs that include them")
        for k, v in self.constants.items():
            if k in kwargs and not _same_constant(kwargs[k], v):
                raise InputError(f"argument {k}={kwargs[k]!r} differs from the value {v!r} bound at capture; pass "
                                 f"{k}={v!r} or re-run graphpass.optimize with {k}={kwargs[k]!r} in example_kwargs")
        flat = []
        for name, spec in zip(self.input_names, self.input_specs):
            if name not in kwargs:
                raise InputError(f"missing argument {name!r}: the captured graph needs {self.input_names}")
            v = kwargs[name]
            if not isinstance(v, torch.Tensor):
                raise InputError(f"argument {name!r} must be a tensor like at capture ({spec}), got {type(v).__name__}")
            if tuple(v.shape) != spec.shape:
                self._check_static(name, spec, tuple(v.shape))
            if v.dtype != spec.dtype:
                raise InputError(f"argument {name!r} has dtype {v.dtype} but was captured as {spec.dtype}; cast it or "
                                 f"re-capture with example inputs of this dtype")
            flat.append(v)
        shapes = tuple(tuple(v.shape) for v in flat)
        if shapes != tuple(sp.shape for sp in self.input_specs):
            self._check_free(shapes)
        return flat

    def _check_static(self, name: str, spec: TensorSpec, shape: tuple[int, ...]) -> None:
        free = self.dynamic_dims.get(name, {})
        fixed = [i for i, (a, b) in enumerate(zip(shape, spec.shape)) if a != b and i not in free]
        if len(shape) == len(spec.shape) and not fixed:
            return
        why = f"dimension(s) {fixed} are static in this capture" if fixed else "the rank differs"
        if free:
            hint = f" (its free dimensions: {sorted(free)})"
        elif not self.dynamic_dims:
            hint = " (graphpass.optimize(..., dynamic=True) frees the dimensions the model allows)"
        else:
            hint = ""
        raise InputError(f"argument {name!r} has shape {shape} but the graph was captured for {spec.shape}: {why}"
                         f"{hint}; call graphpass.optimize again with example inputs of this shape")

    def _check_free(self, shapes: tuple[tuple[int, ...], ...]) -> None:
        """New sizes of free dimensions: run export's guards and every op on fake tensors, once per shape."""
        if shapes not in self._checked:
            self._checked[shapes] = shape_error(self.checker, shapes, [s.dtype for s in self.input_specs])
        if self._checked[shapes] is not None:
            got = ", ".join(f"{n} {tuple(s)}" for n, s in zip(self.input_names, shapes))
            raise InputError(f"the captured graph cannot run inputs of shapes {got}: {self._checked[shapes]}; "
                             f"call graphpass.optimize again with example inputs of these shapes")

    def unflatten_outputs(self, leaves) -> Any:
        return pytree.tree_unflatten(list(leaves), self.out_spec)


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


class _Bound(torch.nn.Module):
    """Calls the model with the constant keyword arguments bound, so export sees only tensor inputs."""

    def __init__(self, model: torch.nn.Module, names, constants: dict[str, Any]):
        super().__init__()
        self.model = model
        self.names = list(names)
        self.constants = constants

    def forward(self, *args):
        # Positional: torch.export's dynamic_shapes (Dim.AUTO) binds reliably to positional inputs.
        return self.model(**dict(zip(self.names, args)), **self.constants)


def capture(model: torch.nn.Module, example_kwargs: dict[str, Any], *, dynamic: bool = False) -> CapturedGraph:
    """Export ``model(**example_kwargs)`` into a :class:`CapturedGraph`; with ``dynamic``, keep free the
    non-batch dimensions the model allows (see the module docstring).

    >>> cap = capture(model, dict(hidden_states=x, timestep=t, encoder_hidden_states=c, return_dict=False))
    >>> cap.input_names
    ['hidden_states', 'timestep', 'encoder_hidden_states']
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"graphpass optimises torch.nn.Module models, got {type(model).__name__}")
    if not example_kwargs:
        raise CaptureError("example_kwargs is empty: pass the keyword arguments of one real model call, e.g. "
                           "dict(hidden_states=x, timestep=t, encoder_hidden_states=c)")
    tensors, constants = {}, {}
    for k, v in example_kwargs.items():
        if isinstance(v, torch.Tensor):
            tensors[k] = v
        elif v is None or isinstance(v, (bool, int, float, str)):
            constants[k] = v
        else:
            raise CaptureError(f"example argument {k!r} is a {type(v).__name__}; graphpass captures tensor arguments "
                               f"and binds plain constants (None, bool, int, float, str). Pass tensors directly.")
    names = list(tensors)
    free = {(k, i) for k, v in tensors.items() if dynamic and v.dtype.is_floating_point for i in range(1, v.dim())}
    ep = _export(model, names, constants, tensors, free)
    src = ep.module()  # with export's input guards: probes new shapes now, checks calls' shapes later
    symbols = _free_dims(ep, names) if free else {}
    while symbols:
        bad = {key for key, sym in symbols.items() if _probe(src, names, tensors, symbols, sym) is not None}
        if not bad:
            break
        ep = _export(model, names, constants, tensors, set(symbols) - bad)  # what failed its probe, static
        src = ep.module()
        symbols = _free_dims(ep, names) if set(symbols) - bad else {}
    dynamic_dims: dict[str, dict[int, str]] = {}
    for (k, i), sym in sorted(symbols.items(), key=lambda kv: names.index(kv[0][0])):
        dynamic_dims.setdefault(k, {})[i] = str(sym)

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    outputs = None
    for node in src.graph.nodes:
        if node.op == "call_module" and node.target == "_guards_fn":
            continue  # export's input guards; the runtime checks shapes itself with clearer errors
        if node.op == "output":
            outputs = fx.node.map_arg(node.args[0], lambda n: env[n])
            continue
        if node.op == "placeholder":  # named after the call's keyword arguments, as the analyses expect
            new = graph.placeholder(names[sum(1 for n in graph.nodes if n.op == "placeholder")])
            new.meta = dict(node.meta)
        else:
            new = graph.node_copy(node, lambda n: env[n])
        if "val" in new.meta:
            new.meta["val"] = _concrete(new.meta["val"])
        stack = new.meta.get("nn_module_stack")
        if stack:
            new.meta["nn_module_stack"] = {k: (_strip(p), t) for k, (p, t) in stack.items()
                                           if _strip(p)}
        env[node] = new
    graph.output(tuple(outputs))
    gm = fx.GraphModule(src, graph)
    gm.graph.lint()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(tensors):
        raise CaptureError(f"export produced {len(placeholders)} inputs for {len(tensors)} tensor arguments")
    return CapturedGraph(
        gm=gm,
        input_names=names,
        input_specs=[TensorSpec(tuple(tensors[k].shape), tensors[k].dtype) for k in names],
        constants=constants,
        out_spec=ep.call_spec.out_spec,
        model_type=type(model).__name__,
        dynamic_dims=dynamic_dims,
        checker=src if dynamic_dims else None,
    )


def _export(model, names, constants, tensors, free):
    from torch.export import Dim

    dynamic_shapes = None
    if free:
        dynamic_shapes = (tuple({i: Dim.AUTO for (n, i) in sorted(free) if n == k} or None for k in names),)
    was_training = model.training
    model.eval()
    try:
        return torch.export.export(_Bound(model, names, constants), tuple(tensors[k] for k in names),
                                   dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:  # export errors are long; keep the first line and point at the cause
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaptureError(f"torch.export could not capture {type(model).__name__}: {first}. graphpass needs a model "
                           f"that torch.export.export(..., strict=False) accepts with these example inputs.") from e
    finally:
        model.train(was_training)


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


def _probe(exported: fx.GraphModule, names, tensors, symbols, expr) -> str | None:
    """Run the exported module (with its guards) on fake inputs where ``expr``'s symbols take twice their example
    values: None if it accepts them, else why not."""
    base = {}
    for (k, i), e in symbols.items():
        if e.is_Symbol:
            base[e] = tensors[k].shape[i]
    doubled = {s: (2 * v if s in expr.free_symbols else v) for s, v in base.items()}
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
