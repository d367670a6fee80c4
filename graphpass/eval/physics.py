"""Physics plausibility of generated ball videos.

Why: PSNR/SSIM against the baseline only say an optimized sampler changed
little; this check says whether a video still *moves like the physics world*
the model was trained on (graphpass.models.physics).

Procedure per video (F, 3, H, W) in [-1, 1]:

1. Detection. For each palette colour, pixels within ``color_tol`` (RGB
   distance, 0..1 units) of it form a mask; the largest 4-connected blob with
   at least ``min_area`` pixels is that colour's ball, its centroid the position.
2. Tracking. Colours are distinct within a video, so a track is one colour.
   Colours seen in at least ``min_track_frac`` of the frames are tracks.
3. Fitting. Vertical position is fitted piecewise by parabolas with the
   world's known acceleration (gravity, px/frame^2), horizontal position
   piecewise by lines; breakpoints (bounces) are chosen by dynamic programming
   (at most ``max_segments`` pieces, each with at least 3 points, and a cost
   ``break_penalty`` px^2 per extra piece). ``residual_px`` is the RMS fit
   error over x and y. A free shared acceleration is also fitted and reported.
4. Score. Per track ``detection_rate * exp(-residual_px / tau)`` with
   ``tau = 1 px``; tracks with fewer than 6 detections use ``residual_px = 5``.
   The video's ``plausibility`` is the mean over tracks (0 when no track is
   found): in [0, 1], higher is better. Real generator videos score about 0.9.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..models.physics import BACKGROUND, COLOR_NAMES, COLORS, PhysicsParams

TAU_PX = 1.0
MISSING_RESIDUAL_PX = 5.0


@dataclass
class Track:
    color: str
    frames: list[int]
    positions: np.ndarray        # (n, 2) x, y
    detection_rate: float
    residual_px: float
    fitted_gravity: float        # free shared vertical acceleration, px/frame^2 (nan if too few points)
    score: float


@dataclass
class PhysicsReport:
    plausibility: float          # 0..1, higher is better
    detection_rate: float        # mean over tracks (0 if none)
    residual_px: float           # mean over tracks (nan if none)
    num_tracks: int
    tracks: list[Track] = field(default_factory=list)


def _largest_blob(mask: np.ndarray) -> np.ndarray | None:
    """Pixel coordinates (n, 2) as (row, col) of the largest 4-connected component."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        stack, comp = [(r0, c0)], []
        seen[r0, c0] = True
        while stack:
            r, c = stack.pop()
            comp.append((r, c))
            for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        if len(comp) > len(best):
            best = comp
    return np.array(best) if best else None


def detect(video: torch.Tensor, color_tol: float = 0.4, min_area: int = 4) -> dict[int, dict[int, tuple[float, float]]]:
    """{colour index: {frame: (x, y) centroid in px}} for a (F, 3, H, W) video in [-1, 1]."""
    rgb = ((video.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()  # (F, H, W, 3)
    n_frames, h, w, _ = rgb.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    out: dict[int, dict[int, tuple[float, float]]] = {}
    for ci, col in enumerate(COLORS):
        dist = np.sqrt(((rgb - col) ** 2).sum(-1))
        masks = dist < color_tol
        # coverage of the colour over the background, for sub-pixel centroids of anti-aliased edges
        axis = col - BACKGROUND
        cover = np.clip(((rgb - BACKGROUND) @ axis) / (axis @ axis), 0.0, 1.0)
        off_axis = np.linalg.norm(rgb - BACKGROUND - cover[..., None] * axis, axis=-1) < color_tol / 2
        for f in range(n_frames):
            if masks[f].sum() < min_area:
                continue
            blob = _largest_blob(masks[f])
            if blob is None or len(blob) < min_area:
                continue
            region = np.zeros((h, w), dtype=bool)
            region[blob[:, 0], blob[:, 1]] = True
            ring = region.copy()  # blob grown by one pixel to take in its soft edge
            ring[1:] |= region[:-1]
            ring[:-1] |= region[1:]
            ring[:, 1:] |= region[:, :-1]
            ring[:, :-1] |= region[:, 1:]
            wgt = np.where(region, 1.0, np.where(ring & off_axis[f], cover[f], 0.0))
            x = float((wgt * xx).sum() / wgt.sum())
            y = float((wgt * yy).sum() / wgt.sum())
            out.setdefault(ci, {})[f] = (x, y)
    return out


def _seg_sse(t: np.ndarray, z: np.ndarray) -> float:
    a = np.stack([np.ones_like(t), t], axis=1)
    coef, *_ = np.linalg.lstsq(a, z, rcond=None)
    return float(((a @ coef - z) ** 2).sum())


def piecewise_sse(t: np.ndarray, z: np.ndarray, max_segments: int = 3, min_points: int = 3,
                  break_penalty: float = 1.0) -> float:
    """SSE of the best piecewise-linear fit of z(t) (breaks between samples), via DP;
    each extra piece must lower the SSE by more than ``break_penalty``."""
    n = len(t)
    if n < min_points:
        return 0.0
    cost = np.full((n + 1, n + 1), np.inf)
    for i in range(n):
        for j in range(i + min_points, n + 1):
            cost[i, j] = _seg_sse(t[i:j], z[i:j])
    best = np.full((max_segments + 1, n + 1), np.inf)
    best[0, 0] = 0.0
    for k in range(1, max_segments + 1):
        for j in range(1, n + 1):
            best[k, j] = min((best[k - 1, i] + cost[i, j] for i in range(j)), default=np.inf)
    k = min(range(1, max_segments + 1), key=lambda k: best[k, n] + break_penalty * (k - 1))
    return float(best[k, n])  # the penalty picks the number of pieces but is not part of the error


def _free_gravity(t: np.ndarray, y: np.ndarray) -> float:
    """Acceleration of the best single parabola over the longest stretch without a bounce."""
    if len(t) < 5:
        return math.nan
    vy = np.diff(y) / np.diff(t)
    # split where downward motion turns upward (a floor bounce)
    cuts = [i + 1 for i in range(len(vy) - 1) if vy[i] > 0 and vy[i + 1] < 0]
    bounds = [0, *cuts, len(t)]
    seg = max(zip(bounds[:-1], bounds[1:]), key=lambda s: s[1] - s[0])
    ts, ys = t[seg[0]:seg[1]], y[seg[0]:seg[1]]
    if len(ts) < 4:
        return math.nan
    return float(2 * np.polyfit(ts, ys, 2)[0])


def evaluate(video: torch.Tensor, params: PhysicsParams | None = None, color_tol: float = 0.4,
             min_area: int = 4, min_track_frac: float = 0.25, max_segments: int = 3,
             break_penalty: float = 1.0) -> PhysicsReport:
    """Physics plausibility report for one video (F, 3, H, W) in [-1, 1]."""
    if video.dim() != 4 or video.shape[1] != 3:
        raise ValueError(f"expected one video (F, 3, H, W), got {tuple(video.shape)}")
    n_frames, _, h, _ = video.shape
    params = params or PhysicsParams(size=h, num_frames=n_frames)
    g = params.gravity
    det = detect(video, color_tol, min_area)
    tracks: list[Track] = []
    for ci, hits in sorted(det.items()):
        if len(hits) < max(1, math.ceil(min_track_frac * n_frames)):
            continue
        frames = sorted(hits)
        t = np.array(frames, dtype=np.float64)
        pos = np.array([hits[f] for f in frames])
        rate = len(frames) / n_frames
        if len(frames) < 6:
            resid, grav = MISSING_RESIDUAL_PX, math.nan
        else:
            sse_y = piecewise_sse(t, pos[:, 1] - 0.5 * g * t ** 2, max_segments, 3, break_penalty)
            sse_x = piecewise_sse(t, pos[:, 0], max_segments, 3, break_penalty)
            resid = math.sqrt((sse_x + sse_y) / (2 * len(frames)))
            grav = _free_gravity(t, pos[:, 1])
        tracks.append(Track(COLOR_NAMES[ci], frames, pos, rate, resid, grav, rate * math.exp(-resid / TAU_PX)))
    if not tracks:
        return PhysicsReport(0.0, 0.0, math.nan, 0, [])
    return PhysicsReport(
        plausibility=float(np.mean([tr.score for tr in tracks])),
        detection_rate=float(np.mean([tr.detection_rate for tr in tracks])),
        residual_px=float(np.mean([tr.residual_px for tr in tracks])),
        num_tracks=len(tracks),
        tracks=tracks,
    )


def physics_score(videos: torch.Tensor, **kw) -> float:
    """Mean plausibility over a batch (B, F, 3, H, W) or a single video."""
    if videos.dim() == 4:
        return evaluate(videos, **kw).plausibility
    return float(np.mean([evaluate(v, **kw).plausibility for v in videos]))
