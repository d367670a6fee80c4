"""Shared by the technique tests: tiny seeded diffusers models built here (2-layer Wan and CogVideoX), a
sampling-like loop over batched-CFG calls or separate cond/uncond cache contexts, and a counter of host reads."""
from __future__ import annotations

import contextlib
import functools

import torch

torch.set_num_threads(1)
TS = [float(t) for t in range(950, 0, -70)]  # 14 calls per generation


def tiny(name: str):
    """(model, kwargs of one batched-CFG call): 2-layer seeded Wan or CogVideoX."""
    import diffusers

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    if name == "wan":
        model = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32).eval()
        x = torch.randn(2, 4, 3, 8, 8, generator=g)  # (B, C, F, H, W)
    else:
        model = diffusers.CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2,
            sample_width=8, sample_height=8, sample_frames=9, patch_size=2, text_embed_dim=16, time_embed_dim=8,
            temporal_compression_ratio=4, max_text_seq_length=5).eval()
        x = torch.randn(2, 3, 4, 8, 8, generator=g)  # (B, F, C, H, W)
    text = torch.randn(2, 5, 16, generator=g)
    return model, dict(hidden_states=x, timestep=torch.full((2,), 500, dtype=torch.int64),
                       encoder_hidden_states=text, return_dict=False)


@functools.lru_cache(maxsize=None)
def optimized_tiny(name: str, batch: int = 2):
    """(model, kwargs at ``batch``, ``graphpass.optimize(model, ComputeAll(), example_kwargs=kwargs)``) of a tiny
    model, made once per pytest process: tests build their schedule on it with :func:`on_tiny` (do not modify
    the model or run the shared base)."""
    import graphpass
    from graphpass.eval.harness import ComputeAll

    model, kw = tiny(name)
    kw = {k: v[:batch] if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    return model, kw, graphpass.optimize(model, ComputeAll(), example_kwargs=kw)


def on_tiny(name: str, schedule, batch: int = 2, timesteps=None):
    """(model, kwargs, model optimized for ``schedule``): what ``graphpass.optimize(model, schedule,
    example_kwargs=kwargs, timesteps=timesteps)`` returns, built on the shared capture of :func:`optimized_tiny`
    with ``with_schedule`` (same capture, regions and hoisting; fresh run state)."""
    model, kw, base = optimized_tiny(name, batch)
    opt = base.with_schedule(schedule)
    if timesteps is not None:
        opt.plan(timesteps)
    return model, kw, opt


def loop(call, kw, contexts=None):
    """A sampling-like loop over TS (``x <- x - 0.1 * out``). ``contexts``: per cache-context name, the rows
    of the batch it runs (separate cond/uncond calls, each in ``call(name)``'s context); None: one call."""
    x = kw["hidden_states"].clone()
    outs = []
    with torch.no_grad():
        for t in TS:
            step = dict(kw, hidden_states=x, timestep=torch.full_like(kw["timestep"], int(t)))
            if contexts is None:
                with call("cond_uncond") as f:
                    out = f(**step)[0]
            else:
                parts = []
                for name, rows in contexts.items():
                    with call(name) as f:
                        parts.append(f(**{k: v[rows] if isinstance(v, torch.Tensor) else v
                                          for k, v in step.items()})[0])
                out = torch.cat(parts)
            outs.append(out)
            x = x - 0.1 * out
    return outs


def graphpass_caller(opt):
    @contextlib.contextmanager
    def call(name):
        with opt.cache_context(name):
            yield opt
    return call


def rel_err(xs, ys) -> float:
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(xs, ys))


class HostReads:
    """Counts reads of tensor values into Python (``item``, ``tolist``, ``bool``, ``float``, ``int``)."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch):
        self.count = 0
        for n in self.NAMES:
            orig = getattr(torch.Tensor, n)

            def counted(t, *a, _orig=orig, **k):
                self.count += 1
                return _orig(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, n, counted)


def reads_per_call(opt, kw, monkeypatch) -> list[int]:
    """Host reads (:class:`HostReads`) of each call of one batched loop over :data:`TS`, feeding
    ``x - 0.1 * eps`` back."""
    reads = HostReads(monkeypatch)
    calls, x = [], kw["hidden_states"]
    with torch.no_grad():
        for t in TS:
            before = reads.count
            x = x - 0.1 * opt(**dict(kw, hidden_states=x, timestep=torch.full((2,), int(t))))[0]
            calls.append(reads.count - before)
    monkeypatch.undo()
    return calls
