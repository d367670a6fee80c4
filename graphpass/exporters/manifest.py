"""The manifest of an exported folder: what was exported, for which plan, and the hash of every file.

An exported folder holds the phase files (``phase_<i>.onnx``, or ``model.onnx`` for the single-file
layout), one shared weights file (``weights.bin``), TensorRT engines when built (``phase_<i>.engine``) and
``manifest.json``::

    {"graphpass_version": "0.1.0", "torch_version": ..., "onnx_version": ..., "format": "onnx",
     "layout": "per-phase", "model_type": "VDT", "timestep_arg": "timestep",
     "inputs": [{"name": "hidden_states", "shape": [2, 4, 3, 16, 16], "dtype": "float32"}, ...],
     "constants": {}, "out_spec": "<pytree spec>", "user_outputs": [...],
     "schedule": {"type": "PAB", ...}, "regions": [{"path": ..., "kind": ..., "cache_keys": [...], ...}],
     "plan": {"timesteps": [...], "phase_ids": [0, 1, 2, 1, ...]},
     "phases": [{"id": 0, "label": ..., "actions": [[path, action], ...], "file": "phase_0.onnx",
                 "inputs": [...], "outputs": [...], "cache_inputs": [...], "cache_outputs": [...], ...}],
     "files": {"phase_0.onnx": "<sha256>", "weights.bin": "<sha256>", ...}}

Cached tensors are named after their cache keys: key ``blocks.0.spatial_attn:0`` is the tensor
``cache.blocks.0.spatial_attn.0`` (see :func:`cache_tensor_name`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ..errors import ArtefactError

MANIFEST = "manifest.json"
WEIGHTS_FILE = "weights.bin"
#: Version of the manifest layout itself (bumped when its fields change meaning).
MANIFEST_FORMAT = 1


def cache_tensor_name(key: str, *, output: bool = False) -> str:
    """The ONNX/TensorRT tensor name of a cache entry: ``blocks.0.spatial_attn:0`` -> ``cache.blocks.0.spatial_attn.0``.

    Per-phase files use the same name for a cache input and a cache output (a phase never both reads and
    writes one key). The single-file layout reads and writes every key, so its outputs get ``.next``.
    """
    name = "cache." + key.replace(":", ".")
    return name + ".next" if output else name


def user_output_name(i: int) -> str:
    return f"output.{i}"


def reuse_flag_name(path: str) -> str:
    """Boolean input of the single-file layout: true when region ``path`` reuses its cached output."""
    return f"reuse.{path}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_of(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ArtefactError(f"manifest names an unknown dtype {name!r}")
    return dt


def tensor_entry(name: str, shape, dtype: torch.dtype) -> dict[str, Any]:
    return {"name": name, "shape": [int(s) for s in shape], "dtype": dtype_name(dtype)}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Versions recorded in a manifest (graphpass's is checked on load; the others are informative)."""
    from .. import __version__

    out = {"graphpass_version": __version__, "torch_version": torch.__version__}
    for mod in ("onnx", "onnxruntime", "tensorrt"):
        try:
            out[f"{mod}_version"] = __import__(mod).__version__
        except ImportError:
            pass
    return out


def artefact_files(manifest: dict[str, Any]) -> list[str]:
    """The files an export wrote: phase files, engines, the shared weights (relative to its folder)."""
    names = {e[k] for e in manifest["phases"] for k in ("file", "engine") if e.get(k)}
    if manifest.get("weights"):
        names.add(manifest["weights"]["file"])
    return sorted(names)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Hash the export's files (:func:`artefact_files`) into ``manifest["files"]`` and write the manifest."""
    manifest["files"] = {}
    for rel in artefact_files(manifest):
        if not (folder / rel).is_file():
            raise ArtefactError(f"export did not write {rel} into {folder}")
        manifest["files"][rel] = sha256_file(folder / rel)
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read_manifest(folder: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """Read and check ``folder/manifest.json``: same graphpass version, every listed file present and
    matching its sha256. Raises :class:`~graphpass.errors.ArtefactError` naming the problem."""
    from .. import __version__

    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtefactError(f"{folder} has no {MANIFEST}: it is not a graphpass export (write one with "
                            f"graphpass.export(opt, {str(folder)!r}))")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtefactError(f"{path} is not valid JSON ({e}); re-export the model with graphpass.export") from e
    if not isinstance(manifest, dict) or "graphpass_version" not in manifest:
        raise ArtefactError(f"{path} is not a graphpass manifest (no graphpass_version); re-export the model")
    if manifest["graphpass_version"] != __version__:
        raise ArtefactError(f"{folder} was exported by graphpass {manifest['graphpass_version']}, but this is "
                            f"graphpass {__version__}; phase graphs and cache layouts may differ between versions: "
                            f"re-export the model with this version (graphpass.export or `graphpass export`)")
    if manifest.get("manifest_format") != MANIFEST_FORMAT:
        raise ArtefactError(f"{path} has manifest format {manifest.get('manifest_format')!r}, expected "
                            f"{MANIFEST_FORMAT}; re-export the model")
    if verify:
        for rel, digest in manifest.get("files", {}).items():
            f = folder / rel
            if not f.is_file():
                raise ArtefactError(f"{folder} is missing {rel}, listed in its manifest; copy the whole exported "
                                    f"folder or re-export the model")
            actual = sha256_file(f)
            if actual != digest:
                raise ArtefactError(f"{f} does not match the sha256 in {MANIFEST} ({actual[:12]}... != "
                                    f"{digest[:12]}...): the file was modified or truncated; re-export the model")
    return manifest
