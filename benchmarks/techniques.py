"""graphpass's First Block Cache, MagCache and TeaCache against diffusers' hooks of the same methods (CPU).

One random-weight WanTransformer3DModel, one guided loop (batched cond/uncond in one call, the context
``"cond_uncond"``, timesteps 1000 -> 50, ``x - 0.05 * eps`` fed back). Per technique and config, three
variants on the same inputs:

* ``baseline``   the diffusers model as is;
* ``hook``       diffusers' hook (``apply_first_block_cache``, ``apply_mag_cache``); TeaCache has no diffusers
  hook: the row uses the module-level Python implementation of the published algorithm that the tests
  check graphpass against (``tests/techniques/technique_helpers.TeaCacheReference``);
* ``graphpass``  ``graphpass.optimize`` with the same config (eager phase graphs, or ``--backend inductor``).

"s/gen" is the median over ``--reps`` generations of the seconds of one whole generation (variants
interleaved, order rotating, so load on a shared machine hits all alike); "computed" counts the calls that
ran every block; "max |diff|" is the largest difference between graphpass's and the hook's predictions over
all steps, relative to the largest prediction. MagCache's ratios come from graphpass's calibration run
(equal to diffusers' ``calibrate=True``, see tests/techniques). Run::

    python benchmarks/techniques.py                   # 20 steps, 3 reps, 1 thread
    python benchmarks/techniques.py --steps 30 --reps 5 --layers 6
    python benchmarks/techniques.py --backend inductor --only FBC     # phase graphs compiled by inductor

Measured (2 shared CPU cores under other jobs' load, so absolute seconds drift between rows; compare within a
row): with eager phase graphs graphpass runs at 0.97-1.05x the hooks' speed for FBC and 1.00-1.15x for MagCache
(``--only FBC MagCache --reps 5``; the same calls skipped, outputs bit-identical: max diff 0), up from 0.90-0.95x
and 0.97-1.07x in the same run of the code before eager runners bound their weights as plain attributes
(``runtime.backends.bound_attributes``: a captured graph otherwise walks ``nn.Module.__getattr__`` per module
level for every weight of every call, about 600 lookups per call here) and the core read the timestep once;
with ``--backend inductor`` at 1.00-1.31x (max relative diff <= 3e-6), the hooks running on the eager model.
FBC and TeaCache read one value per decided call (19 and 18 of 20), MagCache none.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers.models.cache_utils import CacheMixin

import graphpass
from graphpass.techniques.first_block_cache import FirstBlockCache
from graphpass.techniques.magcache import MagCache
from graphpass.techniques.teacache import TeaCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "techniques"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from technique_helpers import TeaCacheReference  # noqa: E402  (the tests' reference, not a package)


def build(args):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    dim = args.heads * args.head_dim
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=args.heads,
                                  attention_head_dim=args.head_dim, in_channels=16, out_channels=16, text_dim=64,
                                  freq_dim=64, ffn_dim=2 * dim, num_layers=args.layers, rope_max_seq_len=64).eval()
    g = torch.Generator().manual_seed(1)
    kwargs = dict(hidden_states=torch.randn(2, 16, args.frames, args.size, args.size, generator=g),
                  timestep=torch.full((2,), 1000.0), encoder_hidden_states=torch.randn(2, 16, 64, generator=g),
                  return_dict=False)
    return model, kwargs


def generation(model, kwargs, timesteps):
    """One guided generation: (seconds, predictions). A hooked diffusers model starts with fresh hook state,
    as a pipeline leaves it (``maybe_free_model_hooks`` resets it after every call); graphpass starts a new
    generation when the timestep goes back up."""
    if isinstance(model, CacheMixin):
        model._reset_stateful_cache()
    x = kwargs["hidden_states"][:1]
    outs = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for t in timesteps:
            with model.cache_context("cond_uncond"):
                eps = model(hidden_states=torch.cat([x, x]), timestep=torch.full((2,), t),
                            encoder_hidden_states=kwargs["encoder_hidden_states"], return_dict=False)[0]
            eps = eps[1:] + 3.0 * (eps[:1] - eps[1:])
            outs.append(eps)
            x = x - 0.05 * eps
    return time.perf_counter() - t0, outs


def hook_variants(model, n, ratios):
    """(label, config text, graphpass schedule, hooked copy of the model, whether its last call computed)
    per row."""
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, apply_first_block_cache, apply_mag_cache

    rows = []
    for thr in (0.05, 0.1, 0.2):
        m = copy.deepcopy(model)
        apply_first_block_cache(m, FirstBlockCacheConfig(threshold=thr))
        rows.append(("FBC", f"threshold {thr}", FirstBlockCache(thr), m, _leader_counter(m, "fbc_leader_block_hook")))
    for thr, k in ((0.06, 3), (0.12, 4), (0.24, 6)):
        cfg = dict(threshold=thr, max_skip_steps=k, retention_ratio=0.2, num_inference_steps=n, mag_ratios=ratios)
        m = copy.deepcopy(model)
        apply_mag_cache(m, MagCacheConfig(**cfg))
        rows.append(("MagCache", f"threshold {thr}, K {k}", MagCache(**cfg), m,
                     _leader_counter(m, "mag_cache_leader_block_hook")))
    for thr in (0.1, 0.2, 0.4):
        m = copy.deepcopy(model)
        ref = TeaCacheReference(m, [1.0, 0.0], thr, n)
        rows.append(("TeaCache", f"threshold {thr}", TeaCache(threshold=thr, num_inference_steps=n), m,
                     lambda ref=ref: ref.decisions["cond_uncond"][-1] == "C"))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--frames", type=int, default=5)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--backend", default="eager", help="graphpass backend: eager (FX graphs) or inductor")
    p.add_argument("--only", nargs="*", default=None, help="techniques to run, e.g. FBC MagCache")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, kwargs = build(args)
    timesteps = [1000.0 - i * (950.0 / (args.steps - 1)) for i in range(args.steps)]
    timesteps = [float(round(t)) for t in timesteps]  # whole numbers: exact in float32

    cal = graphpass.optimize(model, MagCache(calibrate=True, num_inference_steps=args.steps), example_kwargs=kwargs)
    generation(cal, kwargs, timesteps)
    ratios = cal.records("cond_uncond")

    print(f"Wan {args.layers} layers, dim {args.heads * args.head_dim}, latent (1, 16, {args.frames}, {args.size}, "
          f"{args.size}) batched CFG, {args.steps} steps, {args.threads} thread(s), median of {args.reps}, "
          f"graphpass backend {args.backend}")
    print("| technique | config | baseline s/gen | hook s/gen | graphpass s/gen | graphpass vs hook | computed "
          "(hook / graphpass) | max rel diff | graphpass reads |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, config, schedule, hooked, computed in hook_variants(model, args.steps, ratios):
        if args.only and label not in args.only:
            continue
        opt = graphpass.optimize(model, schedule, example_kwargs=kwargs, backend=args.backend)
        variants = {"baseline": model, "hook": hooked, "graphpass": opt}
        secs = {k: [] for k in variants}
        outs = {}
        for rep in range(args.reps + 1):  # the first round warms up (graphs built, caches allocated)
            names = list(variants)[rep % 3:] + list(variants)[:rep % 3]
            for name in names:
                with contextlib.redirect_stdout(io.StringIO()):
                    s, o = generation(variants[name], kwargs, timesteps)
                if rep:
                    secs[name].append(s)
                outs[name] = o
        reads_before = opt.metric_reads
        generation(opt, kwargs, timesteps)
        reads = opt.metric_reads - reads_before
        hook_computed = _computed(hooked, computed, kwargs, timesteps)
        diff = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(outs["graphpass"], outs["hook"]))
        med = {k: statistics.median(v) for k, v in secs.items()}
        print(f"| {label} | {config} | {med['baseline']:.3f} | {med['hook']:.3f} | {med['graphpass']:.3f} | "
              f"{med['hook'] / med['graphpass']:.2f}x | {hook_computed} / "
              f"{opt.decisions('cond_uncond').count('C')} of {args.steps} | {diff:.1e} | {reads} |")


def _computed(hooked, counter, kwargs, timesteps) -> int:
    """Calls of one generation in which the hooked model ran every block."""
    forward = hooked.forward
    flags = []

    def recording(*a, **k):
        out = forward(*a, **k)
        flags.append(counter())
        return out

    hooked.forward = recording
    with contextlib.redirect_stdout(io.StringIO()):
        generation(hooked, kwargs, timesteps)
    del hooked.forward
    return sum(flags)


def _leader_counter(hooked, leader: str):
    """Reads whether the last call computed, from a diffusers hook's state."""
    hook = hooked.blocks[0]._diffusers_hook.get_hook(leader)
    return lambda: bool(hook.state_manager._state_cache["cond_uncond"].should_compute)


if __name__ == "__main__":
    main()
