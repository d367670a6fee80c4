"""Deterministic synthetic physics videos: coloured balls under gravity.

Why: the shipped model needs training data that is free, instant and has a
known ground truth, so that generated videos can be checked against physics
(parabolic flight, bounces) rather than only against pixels.

Each video shows 1-3 balls of distinct colours on a dark background. Each ball
starts at a random position with a random velocity, falls under constant
gravity and bounces off the floor, the ceiling and both walls with
restitution. Balls do not collide with each other (they pass through; the
later ball is drawn on top). Motion between bounces is integrated exactly
(event-driven), so vertical acceleration is exactly ``gravity`` px/frame^2.

Coordinates are in pixels: x to the right, y downwards, pixel i covers
[i, i+1). A ball of radius r stays inside [r, W - r] x [r, H - r].

Label vocabulary (token ids, fixed length ``LABEL_LEN`` = 7):

====  =========  =================================================
 id    token      meaning
====  =========  =================================================
  0    <null>     unconditional token (classifier-free guidance)
  1    <none>     no ball in this slot
  2    one        ball count
  3    two        ball count
  4    three      ball count
  5    red        ball colour
  6    green      ball colour
  7    blue       ball colour
  8    yellow     ball colour
  9    left       ball's initial horizontal direction
 10    right      ball's initial horizontal direction
====  =========  =================================================

Layout: ``[count, colour_1, dir_1, colour_2, dir_2, colour_3, dir_3]`` with the
balls sorted by colour id and unused slots filled with ``<none>``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

VOCAB = ["<null>", "<none>", "one", "two", "three", "red", "green", "blue", "yellow", "left", "right"]
VOCAB_SIZE = len(VOCAB)
TOKEN = {name: i for i, name in enumerate(VOCAB)}
LABEL_LEN = 7
MAX_BALLS = 3

COLOR_NAMES = ["red", "green", "blue", "yellow"]
# RGB in [0, 1]: saturated and far apart so they can be told apart by thresholding.
COLORS = np.array([
    [0.95, 0.15, 0.15],
    [0.15, 0.90, 0.20],
    [0.20, 0.35, 1.00],
    [0.95, 0.90, 0.15],
], dtype=np.float32)
BACKGROUND = np.array([0.05, 0.05, 0.08], dtype=np.float32)

NUM_FRAMES = 16
SIZE = 32


@dataclass(frozen=True)
class PhysicsParams:
    """Physical constants, scaled to the frame size (values given for 32 px)."""

    size: int = SIZE
    num_frames: int = NUM_FRAMES
    radius_frac: float = 3.2 / 32
    gravity_frac: float = 0.30 / 32      # px/frame^2 per px of frame height
    restitution: float = 0.85           # floor / ceiling
    wall_restitution: float = 0.95

    @property
    def radius(self) -> float:
        return self.radius_frac * self.size

    @property
    def gravity(self) -> float:
        return self.gravity_frac * self.size


@dataclass
class PhysicsVideo:
    """One generated clip with its ground truth."""

    video: torch.Tensor          # (F, 3, H, W) float32 in [-1, 1]
    positions: np.ndarray        # (F, n, 2) ball centres (x, y) in px
    velocities: np.ndarray       # (F, n, 2) px/frame at each frame
    colors: list[int]            # colour index per ball (sorted)
    labels: torch.Tensor         # (LABEL_LEN,) int64 token ids
    bounces: list[list[float]]   # per ball, times (in frames) of vertical bounces


def encode_label(colors: list[int], directions: list[int]) -> torch.Tensor:
    """Token ids for balls given colour index and direction (+1 right, -1 left)."""
    ids = [TOKEN[["one", "two", "three"][len(colors) - 1]]]
    order = np.argsort(colors, kind="stable")
    for i in order:
        ids += [TOKEN[COLOR_NAMES[colors[i]]], TOKEN["right" if directions[i] > 0 else "left"]]
    ids += [TOKEN["<none>"]] * (LABEL_LEN - len(ids))
    return torch.tensor(ids, dtype=torch.long)


def decode_label(ids) -> str:
    """Readable caption, e.g. 'two: red right, blue left'."""
    ids = [int(i) for i in ids]
    if all(i == 0 for i in ids):
        return "<null>"
    balls = [f"{VOCAB[ids[k]]} {VOCAB[ids[k + 1]]}" for k in range(1, LABEL_LEN, 2) if ids[k] != TOKEN["<none>"]]
    return f"{VOCAB[ids[0]]}: " + ", ".join(balls)


def _advance(p: np.ndarray, v: np.ndarray, dt: float, g: float, lo: float, hi: float,
             e_floor: float, e_wall: float, t0: float, bounces: list[float]):
    """Exact motion of one ball over dt frames with reflections at the box walls."""
    p, v = p.copy(), v.copy()
    remaining = dt
    for _ in range(64):
        # earliest wall event in remaining time
        cand = []
        if v[0] > 0:
            cand.append(((hi - p[0]) / v[0], 0))
        elif v[0] < 0:
            cand.append(((lo - p[0]) / v[0], 0))
        # vertical: y(s) = p + v s + g s^2 / 2; find first s > eps with y = hi (floor) or lo (ceiling)
        for target in (hi, lo):
            a, b, c = 0.5 * g, v[1], p[1] - target
            disc = b * b - 4 * a * c
            if disc >= 0:
                sq = np.sqrt(disc)
                for s in sorted(((-b - sq) / (2 * a), (-b + sq) / (2 * a))):
                    vy = v[1] + g * s
                    moving_out = (vy > 0) if target == hi else (vy < 0)
                    if s > 1e-9 and moving_out:
                        cand.append((s, 1))
                        break
        events = [(s, ax) for s, ax in cand if s <= remaining]
        if not events:
            break
        s, ax = min(events)
        s = max(s, 0.0)
        p = p + v * s + np.array([0.0, 0.5 * g * s * s])
        v = v + np.array([0.0, g * s])
        if ax == 0:
            v[0] = -e_wall * v[0]
        else:
            v[1] = -e_floor * v[1]
            bounces.append(t0 + dt - remaining + s)
        p = np.clip(p, lo, hi)
        remaining -= s
    p = p + v * remaining + np.array([0.0, 0.5 * g * remaining * remaining])
    v = v + np.array([0.0, g * remaining])
    return np.clip(p, lo, hi), v


def render(positions: np.ndarray, colors: list[int], size: int, radius: float) -> np.ndarray:
    """Anti-aliased discs (coverage ~ clip(r + 0.5 - dist)) over the background. Returns (F, H, W, 3) in [0, 1]."""
    n_frames = positions.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    frames = np.broadcast_to(BACKGROUND, (n_frames, size, size, 3)).copy()
    for b, ci in enumerate(colors):
        px = positions[:, b, 0][:, None, None]
        py = positions[:, b, 1][:, None, None]
        dist = np.sqrt((xx[None] - px) ** 2 + (yy[None] - py) ** 2)
        cov = np.clip(radius + 0.5 - dist, 0.0, 1.0)[..., None]
        frames = frames * (1 - cov) + COLORS[ci] * cov
    return frames


def generate(seed: int, params: PhysicsParams = PhysicsParams()) -> PhysicsVideo:
    """One video, fully determined by ``seed``."""
    rng = np.random.default_rng(seed)
    size, r, g = params.size, params.radius, params.gravity
    lo, hi = r, size - r
    n = int(rng.integers(1, MAX_BALLS + 1))
    colors = sorted(rng.choice(len(COLOR_NAMES), size=n, replace=False).tolist())
    scale = size / 32.0
    pos = np.empty((params.num_frames, n, 2))
    vel = np.empty((params.num_frames, n, 2))
    dirs, bounces = [], []
    for b in range(n):
        p = np.array([rng.uniform(lo + 2 * scale, hi - 2 * scale), rng.uniform(lo, lo + 0.55 * (hi - lo))])
        direction = 1 if rng.random() < 0.5 else -1
        v = np.array([direction * rng.uniform(0.5, 1.5) * scale, rng.uniform(-1.5, 0.8) * scale])
        dirs.append(direction)
        bl: list[float] = []
        for f in range(params.num_frames):
            pos[f, b], vel[f, b] = p, v
            p, v = _advance(p, v, 1.0, g, lo, hi, params.restitution, params.wall_restitution, float(f), bl)
        bounces.append(bl)
    frames = render(pos, colors, size, r)
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous() * 2 - 1
    return PhysicsVideo(video=video.float(), positions=pos, velocities=vel, colors=colors,
                        labels=encode_label(colors, dirs), bounces=bounces)


def make_batch(seeds, params: PhysicsParams = PhysicsParams()) -> tuple[torch.Tensor, torch.Tensor]:
    """Videos (B, F, 3, H, W) and labels (B, LABEL_LEN) for a list of seeds."""
    items = [generate(int(s), params) for s in seeds]
    return torch.stack([it.video for it in items]), torch.stack([it.labels for it in items])


class PhysicsDataset(torch.utils.data.Dataset):
    """Fixed-size dataset: item i is ``generate(base_seed + i)``; returns (video, labels)."""

    def __init__(self, size: int, base_seed: int = 0, params: PhysicsParams = PhysicsParams()):
        self.size, self.base_seed, self.params = size, base_seed, params

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        if not 0 <= i < self.size:
            raise IndexError(i)
        it = generate(self.base_seed + i, self.params)
        return it.video, it.labels
