"""Train a VDT on synthetic physics videos (DDPM epsilon prediction).

    python -m graphpass.models.train --config vdt-s --steps 1500 --batch 8 \
        --out graphpass/models/weights/vdt-s.safetensors --threads 1

Every sample gets a random mask-modelling task (unconditional, first-k frames
given, first+last given, random frames given) and its label is dropped to the
null token 10% of the time so classifier-free guidance works. The EMA weights
are written (atomically) every few minutes and at the end, so a run that is
cut short still leaves usable weights, together with a JSON loss log.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch

from . import diffusion, save_weights_file
from .physics import PhysicsParams, make_batch
from .vdt import CONFIGS, VDT, VDTConfig

FORMAT_VERSION = "1"
MAX_FILE_BYTES = 24 * 1024 * 1024
FIXED_BATCH_SEED = 1_000_000
FIXED_BATCH_SIZE = 8
TASKS = ("unconditional", "first_k", "first_last", "random")
TASK_PROBS = (0.35, 0.35, 0.15, 0.15)


def params_for(cfg: VDTConfig) -> PhysicsParams:
    """Physics video shape matching a model config."""
    return PhysicsParams(size=cfg.image_size, num_frames=cfg.num_frames)


def task_mask(task: str, num_frames: int, gen: torch.Generator, k: int | None = None) -> torch.Tensor:
    """(F,) float mask, 1 = frame given clean. Never marks every frame as given."""
    m = torch.zeros(num_frames)
    if task == "unconditional":
        pass
    elif task == "first_k":
        if k is None:
            k = int(torch.randint(1, max(2, num_frames // 2 + 1), (1,), generator=gen))
        m[:k] = 1
    elif task == "first_last":
        m[0] = 1
        m[-1] = 1
    elif task == "random":
        m = (torch.rand(num_frames, generator=gen) < 0.25).float()
        if m.sum() == num_frames:
            m[-1] = 0
    else:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return m


def random_masks(batch: int, num_frames: int, gen: torch.Generator) -> torch.Tensor:
    probs = torch.tensor(TASK_PROBS)
    idx = torch.multinomial(probs, batch, replacement=True, generator=gen)
    return torch.stack([task_mask(TASKS[int(i)], num_frames, gen) for i in idx])


def masked_loss(model, x0: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                t: torch.Tensor, noise: torch.Tensor, snr_gamma: float | None = None) -> torch.Tensor:
    """Epsilon MSE on non-given frames only; given frames are fed clean.

    ``snr_gamma`` switches to a v-space loss: per sample the eps error is rescaled to the v error
    (v_err = eps_err / sqrt(ab) for the v parametrisation) and weighted by min(1, gamma / SNR),
    i.e. plain v-MSE at high noise (where the video's layout is decided) and Min-SNR-style
    down-weighting (Hang et al. 2023) of the low-noise steps. The recorded fixed-batch loss is
    always the unweighted eps-MSE."""
    xt = diffusion.add_noise(x0, noise, t)
    m = mask[:, :, None, None, None]
    xt = m * x0 + (1 - m) * xt
    eps = model(hidden_states=xt, timestep=t.float(), encoder_hidden_states=labels, cond_mask=mask)
    per = ((eps.float() - noise) ** 2).mean(dim=(2, 3, 4))  # (B, F)
    w = 1 - mask
    if snr_gamma is not None:
        ab = diffusion.alphas_cumprod().to(per.device)[t.long()]
        snr = ab / (1 - ab)
        w = w * ((snr_gamma / snr).clamp(max=1.0) / ab).float()[:, None]
        return (per * w).sum() / (1 - mask).sum().clamp_min(1.0)
    return (per * w).sum() / w.sum().clamp_min(1.0)


def fixed_batch(cfg: VDTConfig):
    """The seeded batch behind the recorded loss: data, masks, timesteps, noise all fixed."""
    gen = torch.Generator().manual_seed(1234)
    x0, labels = make_batch(range(FIXED_BATCH_SEED, FIXED_BATCH_SEED + FIXED_BATCH_SIZE), params_for(cfg))
    mask = torch.stack([task_mask(TASKS[i % len(TASKS)], cfg.num_frames, gen, k=4 if i % 4 == 1 else None)
                        for i in range(FIXED_BATCH_SIZE)])
    t = torch.randint(0, diffusion.NUM_TRAIN_TIMESTEPS, (FIXED_BATCH_SIZE,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    return x0, labels, mask, t, noise


@torch.no_grad()
def fixed_batch_loss(model: VDT) -> float:
    """Loss of ``model`` on the fixed seeded batch (the number stored as 'recorded_loss')."""
    was_training = model.training
    model.eval()
    x0, labels, mask, t, noise = fixed_batch(model.config)
    p = next(model.parameters())
    loss = masked_loss(model, x0.to(p.device), labels.to(p.device), mask.to(p.device), t.to(p.device),
                       noise.to(p.device))
    model.train(was_training)
    return float(loss)


def export_state(model: VDT) -> tuple[dict[str, torch.Tensor], str]:
    """State dict in fp32 if it fits the size budget, else fp16."""
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    nbytes = sum(v.numel() * 4 for v in sd.values())
    dtype = torch.float32 if nbytes <= MAX_FILE_BYTES else torch.float16
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}, str(dtype).replace("torch.", "")


def save_weights(model: VDT, config_name: str, steps: int, path: str | os.PathLike, extra: dict | None = None) -> float:
    """Atomically write safetensors with metadata; returns the recorded loss of the saved weights."""
    sd, dtype = export_state(model)
    probe = VDT(model.config)
    probe.load_state_dict({k: v.float() for k, v in sd.items()})
    rec = fixed_batch_loss(probe)
    meta = {
        "format_version": FORMAT_VERSION,
        "config_name": config_name,
        "config": model.config.to_json(),
        "steps": str(steps),
        "recorded_loss": repr(rec),
        "dtype": dtype,
    }
    for k, v in (extra or {}).items():
        meta[k] = str(v)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_weights_file(sd, path, meta)  # atomic, with the tensors' sha256 in the metadata
    return rec


def lr_at(step: int, base: float, warmup: int, total: int, time_frac: float = 0.0) -> float:
    """Linear warmup, then cosine decay to 10% of ``base``. Progress is the larger of the step
    fraction and ``time_frac`` (elapsed / time budget), so a run slowed by a busy machine still
    anneals before its time limit."""
    if step < warmup:
        return base * (step + 1) / warmup
    prog = min(1.0, max((step - warmup) / max(1, total - warmup), time_frac))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="vdt-s", choices=sorted(CONFIGS))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--cond-drop", type=float, default=0.1)
    ap.add_argument("--snr-gamma", type=float, default=5.0,
                    help="v-space loss weighted min(1, gamma/SNR) (see masked_loss); 0 = plain eps-MSE")
    ap.add_argument("--out", default="graphpass/models/weights/vdt-s.safetensors")
    ap.add_argument("--loss-log", default=None, help="default: <out without .safetensors>.loss.json")
    ap.add_argument("--state", default=None, help="resumable optimizer state (default runs/<config>.state.pt)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--init", default=None, help="start from these weights (safetensors of the same config, or of one "
                    "without the patch overlap / conv head, grown to the same function)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--save-every-min", type=float, default=5.0)
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop (and save) after this wall time; the LR schedule also follows elapsed time")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.manual_seed(args.seed)
    cfg = CONFIGS[args.config]
    params = params_for(cfg)
    out = Path(args.out)
    loss_log_path = Path(args.loss_log) if args.loss_log else out.with_name(out.name.replace(".safetensors", "") + ".loss.json")
    state_path = Path(args.state) if args.state else Path("runs") / f"{args.config}.state.pt"

    model = VDT(cfg)
    prior = ""  # what the init weights were trained with, so the shipped file tells its whole history
    if args.init:
        from safetensors.torch import load_file

        from . import check_weights_file, read_metadata
        from .vdt import grow_state_dict

        check_weights_file(args.init)
        notes = grow_state_dict(model, {k: v.float() for k, v in load_file(args.init).items()})
        print(f"initialised from {args.init}" + "".join(f"\n  {n}" for n in notes), flush=True)
        m = read_metadata(args.init)
        prior = (m.get("history") or f"{m.get('steps', '?')} steps at batch {m.get('train_batch', '?')}") + ", then "
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(args.seed)
    log = {"config_name": args.config, "snr_gamma": args.snr_gamma, "ema": args.ema, "init": args.init, "config": json.loads(cfg.to_json()), "batch": args.batch, "lr": args.lr,
           "total_steps": args.steps, "threads": args.threads, "step": [], "loss": [], "it_per_s": [],
           "wall_s": [], "fixed_batch_loss": []}
    start_step, wall_offset = 0, 0.0
    if args.resume and state_path.exists():
        st = torch.load(state_path, weights_only=False)
        model.load_state_dict(st["model"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        log, start_step, wall_offset = st["log"], st["step"], st["wall"]
        print(f"resumed from {state_path} at step {start_step}", flush=True)

    nparams = sum(p.numel() for p in model.parameters())
    print(f"config {args.config}: {nparams / 1e6:.2f}M params, {cfg.num_frames}x{cfg.image_size}x{cfg.image_size}, "
          f"batch {args.batch}, steps {args.steps}, threads {torch.get_num_threads()}", flush=True)

    def checkpoint(step: int, wall: float) -> None:
        rec = save_weights(ema, args.config, step, out, extra={"train_batch": args.batch, "wall_s": f"{wall:.0f}",
                                                                "history": f"{prior}{step} steps at batch {args.batch}"})
        log["fixed_batch_loss"].append([step, rec])
        log["recorded_loss"], log["steps_trained"] = rec, step
        tmp = loss_log_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(log, indent=1))
        os.replace(tmp, loss_log_path)
        state_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "gen": gen.get_state(), "log": log, "step": step, "wall": wall}, state_path)
        print(f"saved {out} at step {step} (fixed-batch loss {rec:.4f})", flush=True)

    model.train()
    t0 = time.time()
    last_save = t0
    win_loss, win_n, win_t = 0.0, 0, time.time()
    step = start_step
    ema_params = list(ema.parameters())
    model_params = list(model.parameters())
    while step < args.steps:
        seeds = torch.randint(0, 2**31 - 1, (args.batch,), generator=gen).tolist()
        x0, labels = make_batch(seeds, params)
        mask = random_masks(args.batch, cfg.num_frames, gen)
        drop = torch.rand(args.batch, generator=gen) < args.cond_drop
        labels = torch.where(drop[:, None], torch.zeros_like(labels), labels)
        t = torch.randint(0, diffusion.NUM_TRAIN_TIMESTEPS, (args.batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)

        time_frac = 0.0
        if args.max_minutes:
            time_frac = (wall_offset + time.time() - t0) / (args.max_minutes * 60)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lr, args.warmup, args.steps, time_frac)
        loss = masked_loss(model, x0, labels, mask, t, noise, snr_gamma=args.snr_gamma or None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, model_params, 1 - decay)

        win_loss += float(loss.detach())
        win_n += 1
        now = time.time()
        if step % args.log_every == 0 or step == args.steps:
            ips = win_n / (now - win_t)
            wall = wall_offset + now - t0
            eta = (args.steps - step) / max(ips, 1e-9)
            print(f"step {step}/{args.steps} loss {win_loss / win_n:.4f} {ips:.2f} it/s "
                  f"lr {opt.param_groups[0]['lr']:.2e} elapsed {wall / 60:.1f}m eta {eta / 60:.1f}m", flush=True)
            log["step"].append(step)
            log["loss"].append(win_loss / win_n)
            log["it_per_s"].append(ips)
            log["wall_s"].append(wall)
            win_loss, win_n, win_t = 0.0, 0, time.time()
        if now - last_save > args.save_every_min * 60:
            checkpoint(step, wall_offset + now - t0)
            last_save = time.time()
        if args.max_minutes is not None and wall_offset + now - t0 > args.max_minutes * 60:
            print(f"time limit of {args.max_minutes} min reached at step {step}", flush=True)
            break
    checkpoint(step, wall_offset + time.time() - t0)
    print("done", flush=True)


if __name__ == "__main__":
    main()
