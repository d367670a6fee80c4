"""``graphpass inspect``: regions, phases and plan of a model under a schedule; optionally dump the graphs."""
from __future__ import annotations

from .checks import output_folder, positive_int, schedule_arg


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="show regions, phases and the per-step plan of a model under a schedule")
    p.add_argument("--model", default="vdt-s", help="shipped model name (vdt-s, vdt-tiny, latte-tiny) or a diffusers "
                   "model folder (save_pretrained: config.json + weights, e.g. a pipeline's transformer/ folder)")
    p.add_argument("--schedule", type=schedule_arg, default="pab246",
                   help="PAB preset name (pab246, latte, open-sora...) or a JSON file")
    p.add_argument("--steps", type=positive_int, default=50, help="sampling steps of the plan shown")
    p.add_argument("--batch", type=positive_int, default=2, help="batch of the capture (2 = one video with batched CFG)")
    p.add_argument("--dynamic", action="store_true",
                   help="capture with free frame/height/width dimensions where the model allows")
    p.add_argument("--out", type=output_folder, default=None, help="folder to write phase graphs (.py and .dot) and the report")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..api import optimize
    from ..workloads import example_call

    model, kwargs, timesteps = example_call(args.model, batch=args.batch, num_steps=args.steps)
    opt = optimize(model, args.schedule, example_kwargs=kwargs, timesteps=timesteps, dynamic=args.dynamic)
    print(opt.inspect(folder=args.out))
    return 0
