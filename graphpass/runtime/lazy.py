"""LazyOptimizedModel: optimize on the first real call, as torch.compile does.

``graphpass.optimize(model, schedule)`` without ``example_kwargs`` returns one. Its first call is the
example: it is captured, tagged and specialized, then run through the optimized graphs like every later call.
Until then it is the model's face (``config``, ``dtype``, ``device``...), so a pipeline can hold it from
construction on. ``cache_context`` and ``plan`` called before the first call are kept and applied to the
optimized model once it exists. ``.to(device or dtype)`` moves the model and drops the optimized graphs;
the next call captures again at the new device and dtype.

    >>> pipe.transformer = graphpass.optimize(pipe.transformer, "pab246")
    >>> video = pipe(prompt_embeds=..., num_inference_steps=30).frames   # captured at the first step
    >>> print(pipe.transformer.inspect())
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch

from ..errors import InputError
from .executor import OptimizedModel
from .facade import ModelFacade

#: Builds the optimized model from one real call's keyword arguments.
Builder = Callable[[dict[str, Any]], OptimizedModel]


class LazyOptimizedModel(ModelFacade):
    """The model until its first call, then the :class:`~graphpass.OptimizedModel` built from that call.

    ``optimized``: the optimized model (None before the first call); every attribute graphpass adds
    (``inspect``, ``state``, ``regions``, ``phase_calls``...) is read from it once it exists.
    """

    def __init__(self, model: torch.nn.Module, build: Builder):
        super().__init__()
        self._hold(model)
        self._build = build
        self.__dict__["optimized"] = None  # not a submodule: its parameters are the model's
        self._context: tuple[str, dict[str, Any]] | None = None
        self._pending_plan: tuple[tuple, dict] | None = None

    def forward(self, *args, **kwargs):
        opt = self.optimized
        if opt is None:
            if args:
                raise InputError(f"call the optimized model with keyword arguments only (got {len(args)} "
                                 f"positional); graphpass captures the first call's keyword arguments")
            opt = self.__dict__["optimized"] = self._build(kwargs)
            if self._pending_plan is not None:
                opt.plan(*self._pending_plan[0], **self._pending_plan[1])
        if self._context is None:
            return opt(*args, **kwargs)
        name, info = self._context
        with opt.cache_context(name, **info):
            return opt(*args, **kwargs)

    @contextlib.contextmanager
    def cache_context(self, name: str, **info):
        """As :meth:`OptimizedModel.cache_context`; usable before the first call (pipelines enter it
        around the call that captures)."""
        prev, self._context = self._context, (name, dict(info))
        try:
            yield
        finally:
            self._context = prev

    def plan(self, timesteps: Sequence[float] | torch.Tensor, **kwargs):
        """As :meth:`OptimizedModel.plan`; before the first call, kept and made once the model is captured."""
        if self.optimized is None:
            self._pending_plan = ((timesteps,), kwargs)
            return None
        return self.optimized.plan(timesteps, **kwargs)

    def reset(self) -> None:
        if self.optimized is not None:
            self.optimized.reset()

    def inspect(self, *args, **kwargs) -> str:
        return self._require().inspect(*args, **kwargs)

    def to(self, *args, **kwargs):
        """Move or cast the model; the optimized graphs (made for the old device and dtype) are dropped and
        the next call captures again."""
        before = (self.device, self.dtype)
        self.model.to(*args, **kwargs)
        if (self.device, self.dtype) != before:
            self.__dict__["optimized"] = None
        return self

    def _require(self) -> OptimizedModel:
        if self.optimized is None:
            raise InputError("the model is optimized on its first call and has not been called yet: call it once "
                             "(or pass example_kwargs= to graphpass.optimize to capture up front)")
        return self.optimized

    def __getattr__(self, name: str) -> Any:
        opt = self.__dict__.get("optimized")
        if opt is not None and not name.startswith("__"):
            return getattr(opt, name)  # graphpass's attributes first; the optimized model falls back to the model's
        if name in _OPTIMIZED_ATTRS:
            self._require()
        return super().__getattr__(name)

    def __repr__(self) -> str:
        inner = repr(self.optimized) if self.optimized is not None else "not captured yet"
        return f"LazyOptimizedModel({type(self.model).__name__}, {inner})"


#: What an optimized model adds to the model's face: asked before the first call, a clear error.
_OPTIMIZED_ATTRS = frozenset({"captured", "regions", "schedule", "backend", "state", "current_plan", "phase_graph",
                              "phase_calls", "cache_nbytes", "timestep_arg", "timestep_order", "decisions", "records",
                              "span", "metric", "metric_reads", "attention_regions", "technique", "target",
                              "policy", "freeze", "with_schedule"})
