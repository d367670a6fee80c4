"""Video diffusion transformers used as compiler inputs.

The models here know nothing of the compiler: they are plain ``nn.Module``s
with the structure (named Attention / MLP submodules, gates outside them)
that the compiler's passes look for.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .vdt import CONFIGS, VDT, VDTConfig

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

__all__ = ["VDT", "VDTConfig", "CONFIGS", "WeightsError", "load", "create", "weights_path", "read_metadata"]


class WeightsError(ValueError):
    """A shipped weights file is missing, unreadable, or does not match its config."""


def create(name: str = "vdt-tiny", seed: int | None = 0) -> VDT:
    """Randomly initialised model of a named config (eval mode)."""
    if name not in CONFIGS:
        raise KeyError(f"unknown config {name!r}; known: {sorted(CONFIGS)}")
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = VDT(CONFIGS[name])
    else:
        model = VDT(CONFIGS[name])
    return model.eval()


def weights_path(name: str = "vdt-s") -> Path:
    return WEIGHTS_DIR / f"{name}.safetensors"


def _fix_hint(name: str) -> str:
    return (f"re-train with `python -m graphpass.models.train --config {name} "
            f"--out {weights_path(name)}` or restore the file from version control")


def read_metadata(path: str | Path) -> dict[str, str]:
    """safetensors header metadata, raising WeightsError for unreadable files."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises several types for damaged headers
        raise WeightsError(f"cannot read weights file {path}: {e}") from e


def load(name: str = "vdt-s", device: str | torch.device = "cpu", path: str | Path | None = None) -> VDT:
    """Shipped trained model in eval mode, fp32, on ``device``."""
    from safetensors.torch import load_file

    if name not in CONFIGS:
        raise KeyError(f"unknown config {name!r}; known: {sorted(CONFIGS)}")
    path = Path(path) if path is not None else weights_path(name)
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found; {_fix_hint(name)}")
    meta = read_metadata(path)
    cfg = CONFIGS[name]
    if meta.get("config_name") != name:
        raise WeightsError(f"weights file {path} was trained for config {meta.get('config_name')!r}, "
                           f"not {name!r}; {_fix_hint(name)}")
    try:
        saved_cfg = VDTConfig.from_json(meta["config"])
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise WeightsError(f"weights file {path} has no valid config metadata ({e}); {_fix_hint(name)}") from e
    if saved_cfg != cfg:
        raise WeightsError(f"weights file {path} has config {saved_cfg}, but {name!r} is now {cfg}; {_fix_hint(name)}")
    try:
        state = load_file(str(path))
    except Exception as e:
        raise WeightsError(f"weights file {path} is corrupt or truncated ({e}); {_fix_hint(name)}") from e
    model = VDT(cfg)
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"weights file {path} does not match the {name!r} architecture: {e}; "
                           f"{_fix_hint(name)}") from e
    for k, v in model.state_dict().items():
        if not torch.isfinite(v).all():
            raise WeightsError(f"weights file {path} has non-finite values in {k}; {_fix_hint(name)}")
    return model.to(device).eval()
