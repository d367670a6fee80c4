"""``graphpass demo``: the shipped model, baseline vs graphpass PAB, side-by-side videos and a table."""
from __future__ import annotations

from .checks import non_negative_int, output_folder, positive_int, schedule_arg


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="generate videos with the shipped model, baseline vs graphpass PAB")
    p.add_argument("--out", type=output_folder, default="out/demo", help="folder for MP4/GIF side-by-sides")
    p.add_argument("--num-videos", type=positive_int, default=4)
    p.add_argument("--steps", type=positive_int, default=50)
    p.add_argument("--schedule", type=schedule_arg, default="pab246", help="PAB preset name or schedule JSON file")
    p.add_argument("--threads", type=non_negative_int, default=1, help="torch CPU threads (0 = torch's default); this "
                   "small model gains little from a second thread")
    p.set_defaults(func=run)


def pab_optimizer(num_steps: int):
    """``optimize_fn(model, schedule)`` for the demo: capture one batched-CFG call and plan the sampler's steps."""
    from ..api import optimize
    from ..models.sampler import ddim_timesteps
    from ..workloads import vdt_example_kwargs

    def optimize_fn(model, schedule):
        return optimize(model, schedule, example_kwargs=vdt_example_kwargs(model),
                        timesteps=[float(t) for t in ddim_timesteps(num_steps)])

    return optimize_fn


def run(args) -> int:
    from ..demo import run as run_demo

    run_demo(out_dir=args.out, num_videos=args.num_videos, num_steps=args.steps, schedule=args.schedule,
             optimize_fn=pab_optimizer(args.steps), threads=args.threads or None)
    return 0
