"""Step-invariant hoisting on and off: FLOPs saved per step (from ``inspect()``) and CPU wall time.

Two models, random weights, batch 2 (one batched classifier-free-guidance call):

* ``vdt-s``: graphpass's VDT at the vdt-s config (16 frames of 32x32, 4 blocks, 7 condition tokens);
* ``latte``: a diffusers LatteTransformer3DModel (4 blocks, inner dim 64, 8 frames of 16x16 latents) with
  a 120-token caption of 64 channels, Latte's shape of text at a CPU-sized width.

Each is optimized twice with the same schedule (``--schedule none``: a PAB window no step enters, so every
step runs the full graph; or a PAB preset), with ``hoist=True`` and ``hoist=False``. The two run a 10-step
loop (``x - 0.1 * eps`` fed back) in lockstep, alternating which goes first, so load changes on a shared
machine hit both; the figure is the median over ``--repeats`` generations of the summed call times. Outputs
are checked bit-identical. Run::

    python benchmarks/hoisting.py                       # both models, full graph every step
    python benchmarks/hoisting.py --model latte --schedule latte --repeats 7
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import graphpass
from graphpass.models import create
from graphpass import PAB

STEPS = [float(t) for t in torch.linspace(981, 41, 10).round()]


def vdt_s():
    model = create("vdt-s", seed=0)
    cfg = model.config
    g = torch.Generator().manual_seed(2)
    kw = dict(hidden_states=torch.randn(2, cfg.num_frames, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g),
              timestep=torch.full((2,), 500.0),
              encoder_hidden_states=torch.randint(1, cfg.vocab_size, (2, cfg.cond_len), generator=g),
              cond_mask=torch.zeros(2, cfg.num_frames))
    return model, kw, "spatial"


def latte():
    from diffusers import LatteTransformer3DModel

    torch.manual_seed(0)
    model = LatteTransformer3DModel(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8,
                                    num_layers=4, sample_size=16, patch_size=2, cross_attention_dim=64,
                                    caption_channels=64, num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                                    video_length=8).eval()
    g = torch.Generator().manual_seed(2)
    kw = dict(hidden_states=torch.randn(2, 4, 8, 16, 16, generator=g), timestep=torch.full((2,), 500, dtype=torch.int64),
              encoder_hidden_states=torch.randn(2, 120, 64, generator=g), return_dict=False)
    return model, kw, "spatial"


MODELS = {"vdt-s": vdt_s, "latte": latte}


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def lockstep(opts: dict, kw: dict) -> tuple[dict[str, float], dict[str, list[torch.Tensor]]]:
    """One generation of each optimized model, step i of each in turn: (seconds per model, outputs)."""
    xs = {k: kw["hidden_states"] for k in opts}
    secs = {k: 0.0 for k in opts}
    outs = {k: [] for k in opts}
    with torch.no_grad():
        for i, t in enumerate(STEPS):
            order = list(opts) if i % 2 == 0 else list(opts)[::-1]
            for k in order:
                call = dict(kw, hidden_states=xs[k], timestep=torch.full_like(kw["timestep"], t))
                t0 = time.perf_counter()
                out = _first(opts[k](**call))
                secs[k] += time.perf_counter() - t0
                outs[k].append(out)
                xs[k] = xs[k] - 0.1 * out[tuple(slice(0, s) for s in xs[k].shape)]
    return secs, outs


def run(name: str, schedule: str, repeats: int) -> None:
    model, kw, kind = MODELS[name]()
    sched = PAB(**{kind: 2}, window=(2000, 3000)) if schedule == "none" else PAB.preset(schedule)
    opts = {"hoist": graphpass.optimize(model, sched, example_kwargs=kw, timesteps=STEPS),
            "no hoist": graphpass.optimize(model, sched, example_kwargs=kw, timesteps=STEPS, hoist=False)}
    report = opts["hoist"].inspect()
    print(f"== {name}, schedule {sched}")
    print(report[report.index("hoisted ("):report.index("\n\nplan (")])
    lockstep(opts, kw)  # warm-up
    times = {k: [] for k in opts}
    for _ in range(repeats):
        secs, outs = lockstep(opts, kw)
        assert all(torch.equal(a, b) for a, b in zip(outs["hoist"], outs["no hoist"])), "outputs differ"
        for k, s in secs.items():
            times[k].append(s)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"wall per {len(STEPS)}-step generation, median of {repeats}: hoist {med['hoist'] * 1e3:.1f} ms, "
          f"no hoist {med['no hoist'] * 1e3:.1f} ms -> {med['no hoist'] / med['hoist']:.3f}x (outputs bit-identical)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=[*MODELS, "all"], default="all")
    ap.add_argument("--schedule", default="none", help="'none' (full graph every step) or a PAB preset name")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in (MODELS if args.model == "all" else [args.model]):
        run(name, args.schedule, args.repeats)


if __name__ == "__main__":
    main()
