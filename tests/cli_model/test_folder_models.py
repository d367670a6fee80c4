"""A diffusers model folder as a workload: ``load_model`` gives the saved weights back, the inputs built from the
config run the model eagerly, and graphpass captures them for the classes that capture today.

Captured today: CogVideoX (without rotary embeddings), Latte, Wan (T2V and I2V), SkyReels-V2, ChronoEdit, Wan
VACE, HunyuanVideo, EasyAnimate, SANA-Video, Cosmos, Motif-Video. Not yet: CogVideoX with rotary embeddings, ConsisID,
Allegro, LTX-Video (tuple arguments), Kandinsky 5 (list arguments), Mochi and HunyuanVideo 1.5
(data-dependent shapes or branches on the text mask / image embeddings).
"""
from __future__ import annotations

import pytest
import torch

from cli_model_cases import CASES
from graphpass.model_inputs import INPUT_BUILDERS
from graphpass.passes.capture import capture
from graphpass.workloads import example_call, load_model

STEPS = 10


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Every case saved once: name -> (folder, the model that was saved)."""
    root = tmp_path_factory.mktemp("folders")
    return {name: (root / name, case.save(root / name)) for name, case in CASES.items()}


def test_every_builder_has_a_case():
    assert {c.class_name for c in CASES.values()} == set(INPUT_BUILDERS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_load_model_gives_the_saved_weights(folders, name):
    folder, saved = folders[name]
    loaded = load_model(str(folder))
    assert type(loaded) is type(saved) and not loaded.training
    want, got = saved.state_dict(), loaded.state_dict()
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_call_runs_the_model(folders, name):
    folder, saved = folders[name]
    model, kwargs, timesteps = example_call(str(folder), batch=2, num_steps=STEPS)
    assert len(timesteps) == STEPS and float(kwargs["timestep"].flatten()[0]) == timesteps[0]
    with torch.no_grad():
        out = model(**kwargs)[0]
        again = saved(**kwargs)[0]  # the model as saved, before the round trip
    assert tuple(out.shape) == CASES[name].out_shape
    assert torch.isfinite(out).all() and out.abs().sum() > 0
    torch.testing.assert_close(out, again, rtol=0, atol=0)


CAPTURED = sorted(n for n, c in CASES.items() if c.captures)


@pytest.mark.parametrize("name", CAPTURED)
def test_capture_matches_the_model(folders, name):
    folder, _ = folders[name]
    model, kwargs, _ = example_call(str(folder), batch=2, num_steps=STEPS)
    graph = capture(model, kwargs)
    with torch.no_grad():
        want = model(**kwargs)[0]
        got = graph.gm(*graph.flatten_call(kwargs))[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
