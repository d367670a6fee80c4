"""TaylorSeer through graphpass.export/load: the manifest records each call's step gap (the per-step feeds of
the plan) and the loaded artefact feeds them back, so the exported loop in onnxruntime equals the eager
graphpass TaylorSeer loop; a manifest whose feeds do not fit its phases is refused."""
from __future__ import annotations

import json

import pytest
import torch

import graphpass
from graphpass import ArtefactError
from graphpass.exporters.manifest import manifest_digest, render_manifest
from graphpass.techniques.taylorseer import TaylorSeer
from technique_loops import TS, graphpass_caller, loop, tiny

torch.set_num_threads(1)

#: second order (gaps 1, 2, 3 all occur), feed-forwards zeroed on predict calls, fp32 factors
SCHEDULE = TaylorSeer(cache_identifiers=[r"blocks\.\d+\.attn\d"], skip_predict_identifiers=[r"blocks\.\d+\.ffn"],
                      taylor_factors_dtype="float32", disable_cache_before_step=2, cache_interval=4, max_order=2)


#: cond and uncond calls in their own cache contexts: each context's counter picks the step, so each is fed the
#: gap of its own call (batched guidance is one context: the same mechanism with one counter)
CONTEXTS = {"cond": slice(0, 1), "uncond": slice(1, 2)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, kw = tiny("wan")
    one = {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    opt = graphpass.optimize(model, SCHEDULE, example_kwargs=one, timesteps=TS)
    ref = loop(graphpass_caller(opt), kw, CONTEXTS)
    folder = graphpass.export(opt, tmp_path_factory.mktemp("taylor") / "artefact", verify=False)  # the tests compare
    return opt, kw, ref, folder


def test_exported_loop_replays_each_contexts_gaps_and_equals_eager_graphpass_taylorseer(exported):
    opt, kw, ref, folder = exported
    loaded = graphpass.load(folder, threads=1)
    ours = loop(graphpass_caller(loaded), kw, CONTEXTS)
    assert all(loaded.decisions(c) == opt.decisions(c) == "CCRCRRRCRRRCRR" for c in CONTEXTS)
    assert max(float((a - b).abs().max()) for a, b in zip(ours, ref)) < 1e-4
    # the comparison can fail: the same artefact fed a wrong gap at every predict call drifts away
    loaded._feeds = [{k: v + 1 for k, v in f.items()} for f in loaded._feeds]
    wrong = loop(graphpass_caller(loaded), kw, CONTEXTS)
    assert max(float((a - b).abs().max()) for a, b in zip(wrong, ref)) > 1e-3


def test_manifest_records_the_gap_of_every_call(exported):
    """The gaps written are the calls since the last refresh (counted here from the decisions), fed only to
    phases that read them."""
    opt, _, _, folder = exported
    manifest = json.loads((folder / "manifest.json").read_text())
    decisions = opt.decisions("cond")
    gaps, last = [], None
    for i, d in enumerate(decisions):
        gaps.append(None if last is None else i - last)
        if d == "C":
            last = i
    recorded = [f["taylorseer:gap"]["values"][0] if f else None for f in manifest["plan"]["feeds"]]
    assert recorded == [None] + gaps[1:]
    assert set(recorded[1:]) == {1.0, 2.0, 3.0, 4.0}
    for f, i in zip(manifest["plan"]["feeds"], manifest["plan"]["phase_ids"]):
        assert ("taylorseer:gap" in f) == ("taylorseer:gap" in manifest["phases"][i]["cache_inputs"])


def _edit(folder, edit):
    path = folder / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    m["manifest_sha256"] = manifest_digest(m)
    path.write_text(render_manifest(m))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["plan"]["feeds"].pop(), "one object per timestep"),
    (lambda m: m["plan"]["feeds"][0].update({"taylorseer:gap": {"shape": [], "dtype": "float32", "values": [1.0]}}),
     "feeds 'taylorseer:gap' at step 0, which phase 0 does not read"),
    (lambda m: m["plan"]["feeds"][3]["taylorseer:gap"].update(values=[1.0, 2.0]), "not a tensor entry"),
    (lambda m: [f.clear() for f in m["plan"]["feeds"]], "no phase stores and no step feeds"),
], ids=["short", "unread", "malformed", "dropped"])
def test_feeds_that_do_not_fit_the_phases_are_refused(exported, tmp_path, edit, message):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(exported[3], folder)
    _edit(folder, edit)
    with pytest.raises(ArtefactError, match=message):
        graphpass.load(folder)


def test_single_file_layout_is_refused_with_the_fix(exported, tmp_path):
    opt = exported[0]
    with pytest.raises(ArtefactError, match=r"TaylorSeer's phases cache values of their own.*single_file=False"):
        graphpass.export(opt, tmp_path / "single", single_file=True, verify=False)
    assert not (tmp_path / "single").exists() or not any((tmp_path / "single").iterdir())
