"""Write videos as MP4 / GIF, upscaled with nearest-neighbour so 32 px clips are visible."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def to_uint8(video: torch.Tensor, scale: int = 8) -> np.ndarray:
    """(F, C, H, W) in [-1, 1] -> (F, H*scale, W*scale, 3) uint8."""
    v = video.detach().float().cpu().clamp(-1, 1)
    arr = ((v + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    if scale > 1:
        arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    return np.ascontiguousarray(arr)


def side_by_side(*videos: torch.Tensor, gap: int = 1) -> torch.Tensor:
    """Concatenate (F, C, H, W) videos horizontally with a white separator column."""
    if not videos:
        raise ValueError("side_by_side needs at least one video")
    f, c, h, _ = videos[0].shape
    sep = torch.ones(f, c, h, gap, dtype=videos[0].dtype)
    parts = []
    for i, v in enumerate(videos):
        if v.shape[:3] != (f, c, h):
            raise ValueError(f"video {i} has shape {tuple(v.shape)}, expected (F={f}, C={c}, H={h}, W)")
        if i:
            parts.append(sep)
        parts.append(v.detach().cpu())
    return torch.cat(parts, dim=3)


def write_gif(video: torch.Tensor, path: str | Path, fps: int = 8, scale: int = 8) -> Path:
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.mimsave(path, list(to_uint8(video, scale)), duration=1000 / fps, loop=0)
    return path


def write_mp4(video: torch.Tensor, path: str | Path, fps: int = 8, scale: int = 8) -> Path:
    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = to_uint8(video, scale)
    # H.264 wants even sizes; pad one pixel if needed.
    ph, pw = frames.shape[1] % 2, frames.shape[2] % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)))
    with imageio.get_writer(path, fps=fps, codec="libx264", quality=8, macro_block_size=1,
                            ffmpeg_log_level="error") as w:
        for fr in frames:
            w.append_data(fr)
    return path


def write_video(video: torch.Tensor, stem: str | Path, fps: int = 8, scale: int = 8) -> list[Path]:
    """Write both ``stem.mp4`` and ``stem.gif``."""
    stem = Path(stem)
    return [write_mp4(video, stem.with_suffix(".mp4"), fps, scale), write_gif(video, stem.with_suffix(".gif"), fps, scale)]


def write_frame_strip(videos: list[torch.Tensor], path: str | Path, frames: tuple[int, ...] = (0, 3, 6, 9, 12, 15),
                      scale: int = 3) -> Path:
    """A PNG with one row per (F, C, H, W) video and one column per frame index (1 px white gaps)."""
    import imageio.v2 as imageio

    rows = []
    for v in videos:
        cells = [to_uint8(v[f:f + 1], scale)[0] for f in frames]
        gap = np.full((cells[0].shape[0], scale, 3), 255, np.uint8)
        rows.append(np.concatenate([x for c in cells for x in (c, gap)][:-1], axis=1))
    hgap = np.full((scale, rows[0].shape[1], 3), 255, np.uint8)
    img = np.concatenate([x for r in rows for x in (r, hgap)][:-1], axis=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.imwrite(path, img)
    return path
