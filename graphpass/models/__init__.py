"""Video diffusion transformers used as compiler inputs.

The models here know nothing of the compiler: they are plain ``nn.Module``s
with the structure (named Attention / MLP submodules, gates outside them)
that the compiler's passes look for.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..errors import WeightsError
from .vdt import CONFIGS, VDT, VDTConfig

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

__all__ = ["VDT", "VDTConfig", "CONFIGS", "WeightsError", "load", "create", "weights_path", "read_metadata",
           "save_weights_file", "check_weights_file", "weights_digest"]


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


#: safetensors metadata key holding the sha256 of the file's tensors (:func:`weights_digest`).
DIGEST_KEY = "weights_sha256"


def _fix_hint(name: str, path: str | Path | None = None) -> str:
    """How to get a good weights file; names the file the user passed (``path``) when there is one."""
    shipped = weights_path(name)
    if path is None or Path(path).absolute() == shipped.absolute():
        return (f"re-train with `python -m graphpass.models.train --config {name} --out {shipped}` or restore "
                f"{shipped} from version control")
    return (f"re-train with `python -m graphpass.models.train --config {name} --out {path}`, restore {path} from "
            f"the copy it came from, or load the shipped weights (graphpass.models.load({name!r}))")


def _split(data: bytes, path: str | Path) -> tuple[dict, bytes]:
    """(header without ``__metadata__``, tensor data) of a safetensors file's bytes."""
    try:
        n = int.from_bytes(data[:8], "little")
        if len(data) < 8 or n > len(data) - 8:
            raise ValueError("header length beyond the end of the file")
        header = json.loads(data[8:8 + n])
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:  # json's errors are ValueErrors
        raise WeightsError(f"cannot read weights file {path}: {e}") from e
    header.pop("__metadata__", None)
    return header, data[8 + n:]


def weights_digest(data: bytes, path: str | Path = "<bytes>") -> str:
    """sha256 of the tensors of a safetensors file (its bytes ``data``): the tensor table (names, dtypes,
    shapes, offsets; canonical JSON) then the tensor data. The metadata is left out, so the digest can be
    stored in it.

        >>> from safetensors.torch import save
        >>> a = weights_digest(save({"w": torch.ones(2)}, metadata={"note": "x"}))
        >>> a == weights_digest(save({"w": torch.ones(2)}))     # metadata is not covered
        True
        >>> a == weights_digest(save({"w": torch.tensor([1.0, 1.5])}))
        False
    """
    table, tensors = _split(data, path)
    h = hashlib.sha256(json.dumps(table, sort_keys=True, separators=(",", ":")).encode())
    h.update(tensors)
    return h.hexdigest()


def save_weights_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> str:
    """Write ``tensors`` as safetensors with ``metadata`` and the tensors' sha256 (``weights_sha256``, checked
    by :func:`load`), atomically (a temporary file renamed into place); returns the digest.

        >>> save_weights_file(model.state_dict(), "vdt-tiny.safetensors", {"config_name": "vdt-tiny", ...})
        '3f1c...'
    """
    from safetensors.torch import save

    meta = {k: v for k, v in metadata.items() if k != DIGEST_KEY}
    digest = weights_digest(save(tensors, metadata=meta))
    data = save(tensors, metadata=meta | {DIGEST_KEY: digest})
    if weights_digest(data) != digest:  # the tensor layout does not depend on the metadata; make sure
        raise WeightsError(f"safetensors laid out the tensors of {path} differently on a second write; cannot "
                           f"record their sha256")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return digest


def check_weights_file(path: str | Path, name: str | None = None) -> dict[str, str]:
    """Check the tensors of ``path`` against the sha256 in its metadata; returns the metadata.

    Raises :class:`WeightsError` naming ``path`` when the digest is missing or differs (a flipped bit in
    any tensor, a truncated or edited file)."""
    path = Path(path)
    meta = read_metadata(path)
    hint = _fix_hint(name or meta.get("config_name") or "vdt-s", path)
    recorded = meta.get(DIGEST_KEY)
    if recorded is None:
        raise WeightsError(f"weights file {path} records no {DIGEST_KEY}, so its tensors cannot be checked (it "
                           f"was not written by graphpass.models.save_weights_file); {hint}")
    actual = weights_digest(path.read_bytes(), path)
    if actual != recorded:
        raise WeightsError(f"weights file {path} does not match the sha256 of its tensors ({actual[:12]}... != "
                           f"{recorded[:12]}... recorded): the file was modified or damaged; {hint}")
    return meta


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
    """Shipped trained model in eval mode, fp32, on ``device``; its tensors are checked against the sha256
    recorded in the file (:func:`check_weights_file`) before use."""
    from safetensors.torch import load_file

    if name not in CONFIGS:
        raise KeyError(f"unknown config {name!r}; known: {sorted(CONFIGS)}")
    path = Path(path) if path is not None else weights_path(name)
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found; {_fix_hint(name, path)}")
    meta = read_metadata(path)
    cfg = CONFIGS[name]
    if meta.get("config_name") != name:
        raise WeightsError(f"weights file {path} was trained for config {meta.get('config_name')!r}, "
                           f"not {name!r}; {_fix_hint(name, path)}")
    try:
        saved_cfg = VDTConfig.from_json(meta["config"])
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise WeightsError(f"weights file {path} has no valid config metadata ({e}); {_fix_hint(name, path)}") from e
    if saved_cfg != cfg:
        raise WeightsError(f"weights file {path} has config {saved_cfg}, but {name!r} is now {cfg}; "
                           f"{_fix_hint(name, path)}")
    check_weights_file(path, name)
    try:
        state = load_file(str(path))
    except Exception as e:
        raise WeightsError(f"weights file {path} is corrupt or truncated ({e}); {_fix_hint(name, path)}") from e
    model = VDT(cfg)
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"weights file {path} does not match the {name!r} architecture: {e}; "
                           f"{_fix_hint(name, path)}") from e
    for k, v in model.state_dict().items():
        if not torch.isfinite(v).all():
            raise WeightsError(f"weights file {path} has non-finite values in {k}; {_fix_hint(name, path)}")
    return model.to(device).eval()
