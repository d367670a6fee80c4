"""Shared by the zoo's tests and its coverage table (tests/zoo/coverage.py): captures made once per case,
the 20-step loop, and the comparison helpers."""
from __future__ import annotations

import functools
import inspect
import sys
from pathlib import Path

import torch

from graphpass.passes.capture import capture
from graphpass.passes.tag import tag_attention
from zoo import ZOO, ZooCase

sys.path.insert(0, str(Path(__file__).parent.parent / "adacache"))
from adacache_helpers import BlockResidualReuse  # noqa: E402

STEPS = [float(t) for t in range(981, 0, -50)]  # 20 falling timesteps
RTOL = 1e-5
ATTENTION_KINDS = ("spatial", "temporal", "cross", "joint", "text", "other")
#: Broadcast ranges per kind for the PAB test: co-prime-ish so the kinds reuse at different steps.
RANGES = {"spatial": 2, "temporal": 3, "cross": 4, "joint": 2, "text": 3, "other": 3}

SUPPORTED = [n for n, c in ZOO.items() if c.unsupported is None]
UNSUPPORTED = [n for n, c in ZOO.items() if c.unsupported is not None]


def leaf(case: ZooCase, out) -> torch.Tensor:
    leaves = out if isinstance(out, (tuple, list)) else (out.sample if hasattr(out, "sample") else out,)
    return leaves[case.out_index]


def at_timestep(example: torch.Tensor, t: float) -> torch.Tensor:
    """The example's timestep tensor moved to ``t``: entries at the example's noisiest value become ``t``,
    others (clean conditioning frames or tokens held at 0) keep theirs."""
    return torch.where(example == example.max(), torch.full_like(example, t), example)


def loop(case: ZooCase, call, kwargs, timesteps=STEPS) -> list[torch.Tensor]:
    """Call once per timestep, feeding x - 0.1 * eps (cut to the latent's shape) back as the video input."""
    kw = dict(kwargs)
    x = kw[case.video_input]
    outs = []
    with torch.no_grad():
        for t in timesteps:
            kw[case.video_input] = x
            kw[case.timestep_arg] = at_timestep(kwargs[case.timestep_arg], t)
            eps = leaf(case, call(**kw))
            outs.append(eps)
            if eps.dim() == x.dim():  # the prediction may cover part of the input (i2v: latents + condition)
                common = tuple(slice(0, min(a, b)) for a, b in zip(x.shape, eps.shape))
                x = x.clone()
                x[common] -= 0.1 * eps[common]
    return outs


def rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-12)) for x, y in zip(a, b))


@functools.lru_cache(maxsize=None)
def captured(name: str):
    """(model, capture, regions) of a zoo case, once per session (tests must not change the model)."""
    case = ZOO[name]
    model = case.build()
    cap = capture(model, case.kwargs())
    return model, cap, tag_attention(cap, video_input=case.video_input, kinds=case.extra.get("kinds_override"))


@functools.lru_cache(maxsize=None)
def eager_loop(name: str, steps: tuple[float, ...]) -> tuple[torch.Tensor, ...]:
    """The eager model's outputs over :func:`loop` at ``steps``, computed once per session: several tests compare
    with the same run (callers must not modify the tensors)."""
    model, _, _ = captured(name)
    return tuple(loop(ZOO[name], model, ZOO[name].kwargs(), steps))


def attention_kinds(case: ZooCase) -> dict[str, str]:
    return {p: k for p, (k, _) in case.kinds.items() if k in ATTENTION_KINDS}




def top_blocks(model: torch.nn.Module, case: ZooCase) -> list[str]:
    """The model's transformer blocks, read from its module tree: entries of its top-level module lists that
    hold an attention module of ``case.kinds``, in the order one eager call runs them; or, for a model whose
    earlier blocks only feed the chain other inputs, the chain's blocks written in the case
    (``extra["residual_blocks"]``, with the reason read from the source)."""
    if "residual_blocks" in case.extra:
        return list(case.extra["residual_blocks"][0])
    lists = {name for name, m in model.named_children() if isinstance(m, torch.nn.ModuleList)}
    wanted = {".".join(p.split(".")[:2]) for p, (k, _) in case.kinds.items() if k in ATTENTION_KINDS
              and p.split(".")[0] in lists}
    order: list[str] = []
    handles = [model.get_submodule(p).register_forward_pre_hook(lambda m, a, p=p: order.append(p)) for p in wanted]
    try:
        with torch.no_grad():
            model(**case.kwargs())
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(order))


def run_pab(name: str, steps=STEPS):
    """graphpass PAB (every kind of the case, window (0, 1000), planned) and the module-level reference on the
    same loop: (optimized model, its outputs, the reference, the reference's outputs)."""
    from graphpass import PAB
    from graphpass.runtime.executor import OptimizedModel
    from reference_pab import ReferencePAB

    case = ZOO[name]
    model, cap, regions = captured(name)
    modules = attention_kinds(case)
    ranges = {k: RANGES[k] for k in set(modules.values())}
    opt = OptimizedModel(model, cap, regions, PAB(**ranges, window=(0, 1000)))
    opt.plan(steps)
    got = loop(case, opt, case.kwargs(), steps)
    ref = ReferencePAB(model, modules, ranges, window=(0, 1000), timestep_arg=case.timestep_arg)
    try:
        want = loop(case, ref, case.kwargs(), steps)
    finally:
        ref.restore()
    return opt, got, ref, want


class ChainResidualReuse(BlockResidualReuse):
    """:class:`BlockResidualReuse` for blocks that may return ``None`` in place of a hidden state (Kandinsky 6's
    visual blocks return ``(visual, audio)``, audio ``None`` for a video-only call): a ``None`` output has no
    residual and stays ``None`` on reuse steps."""

    def _wrap(self, path, forward):
        signature = inspect.signature(forward)

        def wrapped(*args, **kwargs):
            inputs = list(signature.bind(*args, **kwargs).arguments.values())
            if self.reuse:
                outs = tuple(None if r is None else x + r for x, r in zip(inputs, self.cache[path]))
                return outs if len(outs) > 1 else outs[0]
            out = forward(*args, **kwargs)
            outs = out if isinstance(out, tuple) else (out,)
            self.cache[path] = tuple(None if o is None else o - x for o, x in zip(outs, inputs))
            return out

        return wrapped
