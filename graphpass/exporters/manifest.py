"""The manifest of an exported folder: what was exported, for which plan, and the hash of every file.

An exported folder holds the phase files (``phase_<i>.onnx``, or ``model.onnx`` for the single-file
layout), one shared weights file (``weights.bin``), TensorRT engines when built (``phase_<i>.engine``) and
``manifest.json``::

    {"graphpass_version": "0.1.0", "torch_version": ..., "onnx_version": ..., "format": "onnx",
     "layout": "per-phase", "model_type": "VDT", "timestep_arg": "timestep",
     "inputs": [{"name": "hidden_states", "shape": [2, 4, 3, 16, 16], "dtype": "float32"}, ...],
     "constants": {}, "out_spec": "<pytree spec>", "user_outputs": [...],
     "schedule": {"type": "PAB", ...}, "regions": [{"path": ..., "kind": ..., "cache_keys": [...], ...}],
     "plan": {"timesteps": [...], "phase_ids": [0, 1, 2, 1, ...], "feeds": [{}, {"taylorseer:gap": ...}, ...]},
     "phases": [{"id": 0, "label": ..., "actions": [[path, action], ...], "file": "phase_0.onnx",
                 "inputs": [...], "outputs": [...], "cache_inputs": [...], "cache_outputs": [...], ...}],
     "files": {"phase_0.onnx": "<sha256>", "weights.bin": "<sha256>", ...},
     "manifest_sha256": "<sha256 of every other field>"}

:func:`read_manifest` checks all of it before anything runs: names, hashes, and plan against schedule.

``plan.feeds`` holds, per step, the values the step's phase reads in place of cached tensors
(:attr:`~graphpass.techniques.Decision.feeds`, e.g. TaylorSeer's step gap), which the loaded artefact feeds
back at that step (:func:`step_feeds`).

Cached tensors are named after their cache keys: key ``blocks.0.spatial_attn:0`` is the tensor
``cache.blocks.0.spatial_attn.0`` (see :func:`cache_tensor_name`).
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from ..errors import ArtefactError, GraphpassError
from ..passes.capture import TensorSpec
from ..passes.tag import Region
from ..schedules.base import Action, Phase, Plan, schedule_from_json
from ..version import __version__

MANIFEST = "manifest.json"
WEIGHTS_FILE = "weights.bin"
#: Version of the manifest layout itself (bumped when its fields change meaning).
MANIFEST_FORMAT = 2
#: Field holding the sha256 of the manifest's other fields (:func:`manifest_digest`).
DIGEST_KEY = "manifest_sha256"


def cache_tensor_name(key: str, *, output: bool = False) -> str:
    """The ONNX/TensorRT tensor name of a cache entry: ``blocks.0.spatial_attn:0`` -> ``cache.blocks.0.spatial_attn.0``.

    Per-phase files use the same name for a cache input and a cache output (a phase never both reads and
    writes one key). The single-file layout reads and writes every key, so its outputs get ``.next``.
    """
    name = "cache." + key.replace(":", ".")
    return name + ".next" if output else name


def phase_output_names(cache_inputs: list[str], cache_outputs: list[str]) -> list[str]:
    """The tensor names of a per-phase file's cache outputs: a key the phase both reads and writes (a
    TaylorSeer update refreshing its factors) gets ``.next``, as the single-file layout's do.

        >>> phase_output_names(["blocks.0.attn1:0:F0"], ["blocks.0.attn1:0:F0", "blocks.0.attn1:0:F1"])
        ['cache.blocks.0.attn1.0.F0.next', 'cache.blocks.0.attn1.0.F1']
    """
    return [cache_tensor_name(k, output=k in cache_inputs) for k in cache_outputs]


def user_output_name(i: int) -> str:
    return f"output.{i}"


def reuse_flag_name(path: str) -> str:
    """Boolean input of the single-file layout: true when region ``path`` reuses its cached output."""
    return f"reuse.{path}"


def single_file_consts(single: dict[str, Any], phase: Phase, cache_inputs: list[str],
                       zeros: dict[str, torch.Tensor] | None = None,
                       device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Inputs of the single-file graph that the runtime fills for ``phase`` itself: each ``reuse.<path>`` flag
    (true where the phase reuses the region) and zeros for the cached tensors the phase does not read (the
    branch that reads them is not taken, so they are never read).

    ``zeros`` (dtype name -> flat tensor) is shared by the caller across phases: one zero buffer per dtype,
    as large as the largest cache input, serves every unread cache input of every phase as a view, instead
    of one tensor per input and phase (vdt-s: 0.75 MiB in place of 2.25 MiB for its three cache shapes).

        >>> c = single_file_consts(manifest["single_file"], store_phase, [], zeros={})
        >>> c["reuse.blocks.0.spatial_attn"], c["cache.blocks.0.spatial_attn.0"].abs().sum()
        (tensor(False), tensor(0.))
    """
    zeros = {} if zeros is None else zeros
    specs = {e["name"]: e for e in single["inputs"]}
    cached = [specs[cache_tensor_name(k)] for k in single["cache_keys"]]
    consts = {reuse_flag_name(p): torch.tensor(phase.action(p) == Action.REUSE, device=device)
              for p in single["switch_regions"]}
    for k in single["cache_keys"]:
        if k not in cache_inputs:
            e = specs[cache_tensor_name(k)]
            if e["dtype"] not in zeros:  # sized once for every cache input of this dtype
                largest = max(math.prod(x["shape"]) for x in cached if x["dtype"] == e["dtype"])
                zeros[e["dtype"]] = torch.zeros(largest, dtype=dtype_of(e["dtype"]), device=device)
            consts[e["name"]] = zeros[e["dtype"]][:math.prod(e["shape"])].view(e["shape"])
    return consts


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
    if manifest.get("single_file"):
        names.add(manifest["single_file"]["file"])
    return sorted(names)


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's content (every field but ``manifest_sha256``), in a canonical JSON form, so
    that a hand edit of any field is detected at load.

        >>> m = {"a": 1, "b": [1.5, "x"]}
        >>> manifest_digest(m) == manifest_digest({"b": [1.5, "x"], "a": 1, "manifest_sha256": "0" * 64})
        True
    """
    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Hash the export's files (:func:`artefact_files`) into ``manifest["files"]``, then the manifest itself
    into ``manifest["manifest_sha256"]``, and write it."""
    manifest["files"] = {}
    for rel in artefact_files(manifest):
        if not (folder / rel).is_file():
            raise ArtefactError(f"export did not write {rel} into {folder}")
        manifest["files"][rel] = sha256_file(folder / rel)
    manifest[DIGEST_KEY] = manifest_digest(manifest)
    path = folder / MANIFEST
    path.write_text(render_manifest(manifest))
    return path


def render_manifest(manifest: dict[str, Any]) -> str:
    """The text of ``manifest.json``: one rendering per content, so that :func:`read_manifest` can refuse
    any byte change, even one JSON ignores (a space turned into a tab)."""
    return json.dumps(manifest, indent=2) + "\n"


def check_file_name(name: Any, where: str) -> str:
    """A file named by a manifest must be a plain file name inside the export folder: no folder part, not
    absolute, not ``..``. Checked before anything is opened.

        >>> check_file_name("phase_0.onnx", "phases[0].file")
        'phase_0.onnx'
        >>> check_file_name("../other/phase_0.onnx", "phases[0].file")
        Traceback (most recent call last):
        ArtefactError: manifest.json: phases[0].file is '../other/phase_0.onnx', not a file name inside the ...
    """
    ok = (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
          and "\0" not in name and ":" not in name and PurePosixPath(name).name == name)
    if not ok:
        raise ArtefactError(f"{MANIFEST}: {where} is {name!r}, not a file name inside the exported folder; an export "
                            f"only names its own files (phase_<i>.onnx, weights.bin): the manifest was edited, "
                            f"re-export the model")
    return name


def _fail(problem: str) -> ArtefactError:
    return ArtefactError(f"{MANIFEST} {problem}; the manifest was edited or damaged: re-export the model with "
                         f"graphpass.export")


def check_files(manifest: dict[str, Any]) -> None:
    """Every file the export runs is named safely and has a sha256 in ``files``, and ``files`` lists nothing
    else; so hashing ``files`` covers everything that runs."""
    phases = manifest.get("phases")
    if not isinstance(phases, list) or not phases or not all(isinstance(e, dict) for e in phases):
        raise _fail("has no list of phases")
    for i, e in enumerate(phases):
        check_file_name(e.get("file"), f"phases[{i}].file")
        if e.get("engine") is not None:
            check_file_name(e["engine"], f"phases[{i}].engine")
    for key in ("weights", "single_file"):
        if manifest.get(key) is not None:
            if not isinstance(manifest[key], dict):
                raise _fail(f"field {key!r} is not an object")
            check_file_name(manifest[key].get("file"), f"{key}.file")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise _fail("has no 'files' table of sha256 digests")
    for rel, digest in files.items():
        check_file_name(rel, f"files entry {rel!r}")
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise _fail(f"lists {rel} with {digest!r}, not a sha256 digest")
    used = set(artefact_files(manifest))
    unhashed = sorted(used - set(files))
    if unhashed:
        raise _fail(f"records no sha256 for {', '.join(unhashed)}, which the model runs")
    unused = sorted(set(files) - used)
    if unused:
        raise _fail(f"lists {', '.join(unused)}, which no phase uses")


def feed_entry(value: torch.Tensor) -> dict[str, Any]:
    """A fed value as the manifest records it (feeds are small: a step gap is one number).

        >>> feed_entry(torch.tensor(2.0))
        {'shape': [], 'dtype': 'float32', 'values': [2.0]}
    """
    return {"shape": list(value.shape), "dtype": dtype_name(value.dtype),
            "values": value.detach().cpu().flatten().tolist()}


def step_feeds(manifest: dict[str, Any], device: torch.device | str = "cpu") -> list[dict[str, torch.Tensor]]:
    """Per step of the plan, the values its phase is fed (``plan.feeds``; none when absent), as tensors on
    ``device``; one tensor per distinct value, shared by the steps that feed it.

        >>> [sorted(f) for f in step_feeds(manifest)][:3]           # TaylorSeer: no gap at the first call
        [[], ['taylorseer:gap'], ['taylorseer:gap']]
    """
    made: dict[str, torch.Tensor] = {}
    out = []
    for step in manifest["plan"].get("feeds") or [{} for _ in manifest["plan"]["phase_ids"]]:
        feeds = {}
        for key, e in step.items():
            text = json.dumps(e, sort_keys=True)
            if text not in made:
                made[text] = torch.tensor(e["values"], dtype=dtype_of(e["dtype"]), device=device).reshape(e["shape"])
            feeds[key] = made[text]
        out.append(feeds)
    return out


def regions_of(manifest: dict[str, Any]) -> list[Region]:
    """The tagged regions recorded in a manifest (no graph nodes: the phases are the exported files)."""
    return [Region(path=r["path"], module_type=r["module_type"], kind=r["kind"], nodes=[], exits=r["exits"],
                   exit_specs=[TensorSpec(tuple(s), dtype_of(d)) for s, d in r["exit_specs"]],
                   flops=r["flops"], reason=r["reason"], block=r["block"]) for r in manifest["regions"]]


def phases_of(manifest: dict[str, Any]) -> list[Phase]:
    """The phases a manifest lists, in order."""
    out = []
    for i, e in enumerate(manifest["phases"]):
        if e.get("id") != i:
            raise _fail(f"lists phase {e.get('id')!r} at position {i} (phase ids must be 0, 1, ... in order)")
        try:
            out.append(Phase(tuple((str(p), Action(a)) for p, a in e["actions"])))
        except (ValueError, TypeError) as err:
            raise _fail(f"phase {i} has malformed actions ({err})") from None
    return out


def schedule_plan(manifest: dict[str, Any]) -> Plan:
    """The plan the manifest's schedule makes over its timesteps: the phases the loaded artefact runs (of the
    schedule's own types, e.g. TaylorSeer's update and predict), which :func:`check_plan` matched with the
    recorded ones."""
    schedule = schedule_from_json(json.dumps(manifest["schedule"]))
    return schedule.plan(regions_of(manifest), [float(t) for t in manifest["plan"]["timesteps"]])


def check_plan(manifest: dict[str, Any], regions: list[Region], phases: list[Phase]) -> None:
    """The plan, phases and cache keys agree with each other and with the schedule: the schedule, applied to
    the recorded regions and timesteps, gives exactly the recorded phases and step-to-phase ids, and each
    phase reads the cache keys of the regions it reuses and stores those of the regions it stores."""
    plan = manifest.get("plan")
    if not isinstance(plan, dict):
        raise _fail("has no plan")
    ts, ids = plan.get("timesteps"), plan.get("phase_ids")
    if not (isinstance(ts, list) and ts and all(isinstance(t, (int, float)) and math.isfinite(t) for t in ts)):
        raise _fail(f"plan has timesteps {ts!r}, not a non-empty list of numbers")
    if not (isinstance(ids, list) and len(ids) == len(ts)
            and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(phases) for i in ids)):
        raise _fail(f"plan has phase_ids {ids!r}: one phase id (0..{len(phases) - 1}) per timestep is needed")
    keys = [k for r in regions for k in r.cache_keys]
    if len(set(keys)) != len(keys):
        raise _fail("lists a cache key under two regions")
    try:
        schedule = schedule_from_json(json.dumps(manifest["schedule"]))
        expected = schedule.plan(regions, [float(t) for t in ts])
    except GraphpassError as e:
        raise _fail(f"holds a schedule that cannot plan its own regions ({e})") from None
    want = expected.distinct()
    # Phases compare by their actions: the schedule's own phase types (TaylorSeer's update and predict) say
    # more than a manifest records, and the loaded artefact runs the schedule's phases, checked here.
    want_ids = [want.index(ph) for ph in expected.phases]
    if [ph.actions for ph in phases] != [ph.actions for ph in want] or ids != want_ids:
        raise _fail(f"holds a plan that its schedule ({schedule}) does not give for its timesteps: phases "
                    f"{[ph.label() for ph in phases]} with ids {ids}, expected {[ph.label() for ph in want]} with ids "
                    f"{want_ids}")
    feeds = _checked_feeds(plan, manifest["phases"], ids)
    by_path = {r.path: r for r in regions}
    stored = {k for e in manifest["phases"] for k in e.get("cache_outputs") or []}
    for i, (e, ph) in enumerate(zip(manifest["phases"], want)):
        if not ph.caches_region_outputs:  # a technique's own cached values: each read is stored or fed
            fed_always = set.intersection(*(set(feeds[s]) for s, j in enumerate(ids) if j == i))
            unknown = [k for k in e.get("cache_inputs") or [] if k not in stored and k not in fed_always]
            if unknown:
                raise _fail(f"phase {i} reads {unknown}, which no phase stores and no step feeds")
            continue
        for field_, action in (("cache_inputs", Action.REUSE), ("cache_outputs", Action.STORE)):
            want_keys = {k for p, a in ph.actions if a == action for k in by_path[p].cache_keys}
            got = e.get(field_)
            if not isinstance(got, list) or set(got) != want_keys or len(got) != len(want_keys):
                raise _fail(f"phase {i} lists {field_} {got!r}, but its actions give {sorted(want_keys)}")
    single = manifest.get("single_file")
    if single is not None:
        names = {x.get("name") for x in single.get("inputs", []) if isinstance(x, dict)}
        if set(single.get("cache_keys", [])) - set(keys) or not {cache_tensor_name(k) for k in
                                                                  single.get("cache_keys", [])} <= names:
            raise _fail("single_file lists cache keys that its regions or inputs do not have")
        if not set(single.get("switch_regions", [])) <= set(by_path):
            raise _fail("single_file switches regions that it does not list")


def _checked_feeds(plan: dict[str, Any], phases: list[dict[str, Any]], ids: list[int]) -> list[dict[str, Any]]:
    """``plan.feeds`` (one object per step, each key a cache input of the step's phase, each value a
    :func:`feed_entry`), or no feeds at all when absent."""
    feeds = plan.get("feeds")
    if feeds is None:
        return [{} for _ in ids]
    if not isinstance(feeds, list) or len(feeds) != len(ids) or not all(isinstance(f, dict) for f in feeds):
        raise _fail(f"plan has feeds {str(feeds)[:80]}: one object per timestep is needed")
    for step, (f, i) in enumerate(zip(feeds, ids)):
        for key, e in f.items():
            if key not in (phases[i].get("cache_inputs") or []):
                raise _fail(f"plan feeds {key!r} at step {step}, which phase {i} does not read")
            ok = (isinstance(e, dict) and isinstance(e.get("shape"), list) and isinstance(e.get("values"), list)
                  and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                          for v in e["values"]) and len(e["values"]) == math.prod(e["shape"]))
            if not ok:
                raise _fail(f"plan feeds {key!r} at step {step} as {str(e)[:80]}, not a tensor entry")
            dtype_of(e.get("dtype", ""))
    return feeds


def read_manifest(folder: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """Read and check ``folder/manifest.json``, opening no other file before its names are checked:

    * same graphpass version and manifest format;
    * the manifest's own sha256 (a hand edit of any field is refused);
    * every file it names is a plain file name inside ``folder``, and every file that runs has a sha256;
    * the plan, phases and cache keys agree with each other and with the schedule (:func:`check_plan`);
    * with ``verify`` (the default), every file is present, inside ``folder`` (no link out of it) and matches
      its sha256.

    Raises :class:`~graphpass.errors.ArtefactError` naming the problem and the fix.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtefactError(f"{folder} has no {MANIFEST}: it is not a graphpass export (write one with "
                            f"graphpass.export(opt, {str(folder)!r}))")
    _inside(folder, MANIFEST)
    try:
        text = path.read_bytes().decode("utf-8")  # bytes as written: no newline translation
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
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
    if manifest.get(DIGEST_KEY) != manifest_digest(manifest) or text != render_manifest(manifest):
        raise ArtefactError(f"{path} does not match its own sha256 ({DIGEST_KEY}): it was edited or damaged after "
                            f"export; re-export the model with graphpass.export")
    try:
        check_files(manifest)
        check_plan(manifest, regions_of(manifest), phases_of(manifest))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ArtefactError(f"{path} is incomplete or malformed ({type(e).__name__}: {e}); re-export the model "
                            f"with graphpass.export") from e
    if verify:
        for rel, digest in manifest["files"].items():
            f = folder / rel
            if not f.is_file():
                raise ArtefactError(f"{folder} is missing {rel}, listed in its manifest; copy the whole exported "
                                    f"folder or re-export the model")
            _inside(folder, rel)
            actual = sha256_file(f)
            if actual != digest:
                raise ArtefactError(f"{f} does not match the sha256 in {MANIFEST} ({actual[:12]}... != "
                                    f"{digest[:12]}...): the file was modified or truncated; re-export the model")
    return manifest


def _inside(folder: Path, name: str) -> None:
    """Refuse a file of the folder that is a link to somewhere outside it."""
    real = (folder / name).resolve()
    if real.parent != folder.resolve():
        raise ArtefactError(f"{folder / name} links to {real}, outside the exported folder; an export is "
                            f"self-contained: copy the real files into {folder} (e.g. cp -rL) or re-export")
