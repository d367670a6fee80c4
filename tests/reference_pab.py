"""A plain module-level Pyramid Attention Broadcast, written for the tests as the reference graphpass must match.

It knows nothing of graphs or of graphpass: the test names the attention modules and their kinds, and this
wraps each module's ``forward``. Rule (reference code): at model call ``counter`` (0 at the start of a
generation, +1 per model call) with timestep ``t``, a module of kind ``k`` returns its cached output iff
``lo_k < t < hi_k and counter % range_k != 0``; otherwise it runs and its output is always written to the cache.

    >>> ref = ReferencePAB(model, {"blocks.0.attn": "spatial"}, ranges={"spatial": 2}, window=(100, 800))
    >>> out = ref(hidden_states=x, timestep=t)     # the model's call, with module outputs broadcast
    >>> ref.computed, ref.reused                   # per-kind counts of module calls run / skipped
    >>> ref.restore()                              # unwrap the modules
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode


class ReferencePAB:
    """Wraps the ``forward`` of the named modules of ``model`` with PAB's broadcast rule.

    modules: module path -> kind ("spatial", "temporal", "cross", "joint", "mlp").
    ranges: kind -> broadcast range (kinds missing or with range 1 always compute).
    window: (lo, hi) exclusive timestep window; windows: per-kind overrides.
    timestep_arg: the keyword argument that holds the timestep (one value for the whole batch).
    """

    def __init__(self, model: torch.nn.Module, modules: dict[str, str], ranges: dict[str, int],
                 window: tuple[float, float] = (100, 800), windows: dict[str, tuple[float, float]] | None = None,
                 timestep_arg: str = "timestep"):
        self.model = model
        self.ranges = dict(ranges)
        self.windows = {k: (windows or {}).get(k, window) for k in set(modules.values())}
        self.timestep_arg = timestep_arg
        self.counter = 0
        self.t: float | None = None
        self.last_t: float | None = None
        self.cache: dict[str, Any] = {}
        self.computed: Counter = Counter()
        self.reused: Counter = Counter()
        self.steps: list[dict[str, bool]] = []  # per call: module path -> reused?
        self._wrapped = []
        named = dict(model.named_modules())
        for path, kind in modules.items():
            if path not in named:
                raise KeyError(f"model has no module {path!r}")
            mod = named[path]
            self._wrapped.append(mod)
            mod.forward = self._wrap(path, kind, mod.forward)

    def _wrap(self, path: str, kind: str, original):
        def forward(*args, **kwargs):
            r = self.ranges.get(kind, 1)
            lo, hi = self.windows[kind]
            reuse = r > 1 and lo < self.t < hi and self.counter % r != 0 and path in self.cache
            self.steps[-1][path] = reuse
            if reuse:
                self.reused[kind] += 1
                return self.cache[path]
            out = original(*args, **kwargs)
            self.cache[path] = out
            self.computed[kind] += 1
            return out

        return forward

    def reset(self) -> None:
        self.counter, self.t, self.last_t = 0, None, None
        self.cache.clear()

    def __call__(self, **kwargs):
        t = kwargs[self.timestep_arg]
        # per-token timesteps (a clean conditioning frame at 0 beside noisy tokens): the step is the noisiest
        t = float(t.max()) if isinstance(t, torch.Tensor) else float(t)
        if self.last_t is not None and t > self.last_t:
            self.reset()  # the timestep went back up: a new generation
        self.t = t
        self.steps.append({})
        out = self.model(**kwargs)
        self.counter += 1
        self.last_t = t
        return out

    def restore(self) -> None:
        for mod in self._wrapped:
            del mod.forward  # drop the instance attribute: the class's forward is back
        self._wrapped = []


class SDPACounter(TorchFunctionMode):
    """Counts scaled-dot-product-attention calls while active (eager modules and FX graphs alike)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product_attention" in getattr(func, "__name__", str(func)):
            self.count += 1
        return func(*args, **(kwargs or {}))
