"""Capture a model call as a flat FX graph with torch.export (non-strict).

The captured graph takes the call's tensor keyword arguments as positional inputs, in a fixed order, and
returns the flat list of output leaves; the output structure (a tensor, a tuple, a diffusers output class)
is kept as a pytree spec so the runtime can rebuild it. Non-tensor keyword arguments (``return_dict=False``,
``None`` options) are bound as constants of the capture. Parameters stay those of the original module:
the graph reads them by attribute, so no weight is copied.

Every node keeps ``meta["nn_module_stack"]`` (module paths, relative to the model) and ``meta["val"]``
(a FakeTensor with its shape), which the tagging and FLOP analyses read.
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
                raise InputError(
                    f"argument {name!r} has shape {tuple(v.shape)} but the graph was captured for {spec.shape}; "
                    f"graphs are specialised to the captured shapes (batch, frames, height, width): call "
                    f"graphpass.optimize again with example inputs of this shape")
            if v.dtype != spec.dtype:
                raise InputError(f"argument {name!r} has dtype {v.dtype} but was captured as {spec.dtype}; cast it or "
                                 f"re-capture with example inputs of this dtype")
            flat.append(v)
        return flat

    def unflatten_outputs(self, leaves) -> Any:
        return pytree.tree_unflatten(list(leaves), self.out_spec)


def _same_constant(a, b) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:
        return a is b


class _Bound(torch.nn.Module):
    """Calls the model with the constant keyword arguments bound, so export sees only tensor inputs."""

    def __init__(self, model: torch.nn.Module, constants: dict[str, Any]):
        super().__init__()
        self.model = model
        self.constants = constants

    def forward(self, **kwargs):
        return self.model(**kwargs, **self.constants)


def capture(model: torch.nn.Module, example_kwargs: dict[str, Any]) -> CapturedGraph:
    """Export ``model(**example_kwargs)`` into a :class:`CapturedGraph`.

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
    was_training = model.training
    model.eval()
    try:
        ep = torch.export.export(_Bound(model, constants), (), kwargs=tensors, strict=False)
    except Exception as e:  # export errors are long; keep the first line and point at the cause
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaptureError(f"torch.export could not capture {type(model).__name__}: {first}. graphpass needs a model "
                           f"that torch.export.export(..., strict=False) accepts with these example inputs.") from e
    finally:
        model.train(was_training)

    src = ep.module()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    outputs = None
    for node in src.graph.nodes:
        if node.op == "call_module" and node.target == "_guards_fn":
            continue  # export's input guards; the runtime checks shapes itself with clearer errors
        if node.op == "output":
            outputs = fx.node.map_arg(node.args[0], lambda n: env[n])
            continue
        new = graph.node_copy(node, lambda n: env[n])
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
    names = list(tensors)
    return CapturedGraph(
        gm=gm,
        input_names=names,
        input_specs=[TensorSpec(tuple(tensors[k].shape), tensors[k].dtype) for k in names],
        constants=constants,
        out_spec=ep.call_spec.out_spec,
        model_type=type(model).__name__,
    )


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
