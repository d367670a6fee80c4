"""What an optimized model shows the code around it: the wrapped model's face.

Samplers and diffusers pipelines read more than ``forward`` from their transformer: ``config``, ``dtype``,
``device``, ``cache_context(name, **kwargs)``, and ``save_pretrained`` through the pipeline's own
``save_pretrained``, which picks a component's save method from its class. :class:`ModelFacade` gives an
optimized model that face:

* attributes the optimized module does not define are read from the wrapped model (``opt.config.patch_size``,
  ``opt.dtype``...), so a pipeline reads what it would read from the model itself;
* ``__class__`` is the wrapped model's class, as transparent proxies do (``type(opt)`` stays the
  graphpass class): a pipeline that does ``pipe.transformer = opt`` records the original class in its
  config, and ``pipe.save_pretrained`` saves the original weights with the original class name, so the
  saved folder loads back as a plain diffusers pipeline;
* ``save_pretrained`` and ``state_dict`` are the wrapped model's: the weights, not graphpass's state.

    >>> opt = graphpass.optimize(pipe.transformer, "pab246")
    >>> isinstance(opt, type(pipe.transformer)), type(opt).__name__
    (True, 'LazyOptimizedModel')
"""
from __future__ import annotations

from typing import Any

import torch


class ModelFacade(torch.nn.Module):
    """Base of optimized modules: delegates what is not its own to ``self.model`` (see the module
    docstring). Subclasses hold the wrapped model as the submodule ``model``."""

    model: torch.nn.Module

    def _hold(self, model: torch.nn.Module | None) -> None:
        """Register ``model`` as the wrapped model (its parameters stay this module's) and take its module name:
        pipelines record a component's class from its module and name."""
        self.model = model
        if model is not None:
            self.__dict__["__module__"] = type(model).__module__

    @property  # type: ignore[misc]
    def __class__(self):  # noqa: D401 - the proxy's class is the wrapped model's
        model = self.__dict__.get("_modules", {}).get("model")
        return type(self) if model is None else type(model)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules of this module
        except AttributeError:
            pass
        model = self.__dict__.get("_modules", {}).get("model")
        if model is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return getattr(model, name)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the wrapped model's floating-point parameters (what pipelines cast latents to)."""
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    @property
    def device(self) -> torch.device:
        """The device of the wrapped model's parameters."""
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    def save_pretrained(self, *args, **kwargs):
        """Save the wrapped model (its weights and config) as its own ``save_pretrained`` does; the schedule
        is not saved: optimize the reloaded model again."""
        return self.model.save_pretrained(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        """The wrapped model's state dict (the weights): an optimized module holds no other state to save."""
        return self.model.state_dict(*args, **kwargs)

    def __reduce_ex__(self, protocol):
        raise TypeError(f"an optimized {type(self.model).__name__} cannot be pickled or deep-copied (its graphs and "
                        f"caches are tied to this process); save the model with save_pretrained/state_dict and "
                        f"optimize it again where it is loaded")
