"""Every misuse gets a graphpass error that names the problem and the fix."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import graphpass
from graphpass import PAB, InputError, Schedule, ScheduleError, TaggingError, schedule_from_json
from conftest import make_case


class NoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, hidden_states, timestep):
        return self.proj(hidden_states) * timestep[:, None, None, None, None]


@pytest.fixture(scope="module")
def cog():
    """CogVideoX tiny (the fastest to capture), optimized with its preset, and one call's kwargs."""
    case = make_case("cogvideox")
    kw = case.kwargs()
    return graphpass.optimize(case.model, "cogvideox", example_kwargs=kw), kw


def test_model_without_attention():
    x = torch.randn(2, 3, 2, 2, 4)
    with pytest.raises(TaggingError, match="no attention op.*scaled_dot_product_attention"):
        graphpass.optimize(NoAttention(), PAB(spatial=2), example_kwargs=dict(hidden_states=x, timestep=torch.ones(2)))


def test_schedule_kind_the_model_lacks():
    case = make_case("cogvideox")
    with pytest.raises(ScheduleError, match=r"temporal.*it has: joint, mlp"):
        graphpass.optimize(case.model, PAB(temporal=3), example_kwargs=case.kwargs())


def test_schedule_kinds_checked_against_regions(cog):
    opt, _ = cog
    with pytest.raises(ScheduleError, match="cross, spatial, temporal"):
        PAB.preset("pab246").check_model({r.kind for r in opt.regions})


def test_missing_timestep_at_optimize():
    case = make_case("cogvideox")
    kw = case.kwargs()
    del kw["timestep"]
    with pytest.raises(InputError, match="no 'timestep'.*timestep_arg="):
        graphpass.optimize(case.model, "cogvideox", example_kwargs=kw)
    with pytest.raises(InputError, match="no 't'"):
        graphpass.optimize(case.model, "cogvideox", example_kwargs=case.kwargs(), timestep_arg="t")


@pytest.mark.parametrize("value", [None, 500, 500.0])
def test_timestep_that_is_not_a_tensor_at_optimize(value):
    # A constant would be bound into the captured graph: every step would run at the example's timestep.
    case = make_case("cogvideox")
    with pytest.raises(InputError, match="not a tensor.*graph input"):
        graphpass.optimize(case.model, "cogvideox", example_kwargs=dict(case.kwargs(), timestep=value))


def test_missing_timestep_at_call(cog):
    opt, kw = cog
    for bad in ({k: v for k, v in kw.items() if k != "timestep"}, dict(kw, timestep=None)):
        with pytest.raises(InputError, match="missing timestep.*'timestep'"):
            opt(**bad)


def test_timestep_differs_within_batch(cog):
    opt, kw = cog
    with pytest.raises(InputError, match="different values in one call"):
        opt(**dict(kw, timestep=torch.tensor([500, 400])))


def test_call_with_another_shape(cog):
    opt, kw = cog
    x = kw["hidden_states"][:, :2]  # two frames for three (the batch is free: another batch runs)
    with pytest.raises(InputError) as e:
        opt(**dict(kw, hidden_states=x))
    msg = str(e.value)
    assert "hidden_states" in msg and "(2, 2, 4, 8, 8)" in msg and "(2, 3, 4, 8, 8)" in msg and "optimize" in msg


def test_call_with_another_dtype_or_argument(cog):
    opt, kw = cog
    with pytest.raises(InputError, match="dtype torch.float64.*float32"):  # values float32 cannot hold
        opt(**dict(kw, hidden_states=kw["hidden_states"].double() / 3))
    with pytest.raises(InputError, match=r"unexpected argument\(s\) \['image_rotary_emb_typo'\]"):
        opt(**dict(kw, image_rotary_emb_typo=torch.ones(1)))
    with pytest.raises(InputError, match="return_dict=True differs.*return_dict=False"):
        opt(**dict(kw, return_dict=True))


def test_positional_call(cog):
    opt, kw = cog
    with pytest.raises(InputError, match="keyword arguments only"):
        opt(kw["hidden_states"], timestep=kw["timestep"])
    assert opt.state().counter == 0  # failed calls do not advance the generation


@pytest.mark.parametrize("kwargs, match", [
    (dict(spatial=0), "spatial=0.*integer >= 1"),
    (dict(spatial=-2), "integer >= 1"),
    (dict(spatial=2.0), "integer >= 1"),
    (dict(spatial=True), "integer >= 1"),
    (dict(spatial=2, window=(800, 100)), "lo must be below hi"),
    (dict(spatial=2, window=(500, 500)), "lo must be below hi"),
    (dict(spatial=2, window=(100,)), "pair"),
    (dict(spatial=2, windows={"cross": (900, 100)}), "lo must be below hi"),
    (dict(spatial=2, windows={"spacial": (100, 800)}), "unknown kinds"),
    (dict(), "reuses nothing"),
    (dict(spatial=1, cross=1), "reuses nothing"),
])
def test_bad_pab_values(kwargs, match):
    with pytest.raises(ScheduleError, match=match):
        PAB(**kwargs)


def test_unknown_preset():
    with pytest.raises(ScheduleError, match="unknown PAB preset 'pab24'.*pab246"):
        PAB.preset("pab24")
    with pytest.raises(ScheduleError, match="unknown PAB preset"):
        graphpass.optimize(NoAttention(), "opensora-fast", example_kwargs=dict(hidden_states=torch.ones(1)))


class _Region:
    """A region as a schedule sees it: a path and a kind."""

    def __init__(self, kind: str):
        self.path, self.kind = f"blocks.0.{kind}", kind


@pytest.mark.parametrize("schedule", [
    PAB(spatial=2, temporal=4, cross=6, window=(100, 800)),
    PAB(joint=2, mlp=3, window=(150.5, 850), windows={"mlp": (300, 700)}),
    *(PAB.preset(n) for n in ("open-sora", "latte", "open-sora-plan", "cogvideox", "pab579")),
])
def test_json_round_trip(schedule, tmp_path):
    text = schedule.to_json()
    assert json.loads(text)["type"] == "PAB"
    back = schedule_from_json(text)
    assert isinstance(back, PAB) and back == schedule
    path = tmp_path / "s.json"
    schedule.save(path)
    assert schedule_from_json(path) == schedule == schedule_from_json(str(path))
    # decisions survive too: the loaded schedule reuses exactly where PAB's rule, read off the JSON text by
    # hand, says it must (range r > 1, lo < t < hi, counter % r != 0)
    d = json.loads(text)
    windows = d.get("windows") or {}
    reused = 0
    for kind in ("spatial", "temporal", "cross", "joint", "mlp"):
        r = d.get(kind) or 1
        lo, hi = windows.get(kind, d["window"])
        for counter, t in enumerate(range(991, 0, -20)):
            expected = r > 1 and lo < t < hi and counter % r != 0
            assert back.reuses(_Region(kind), float(t), counter) == expected, (kind, t, counter)
            reused += expected
    assert reused > 0


@pytest.mark.parametrize("text, match", [
    ('{"type": "PAB", "spatial": 2', "malformed"),
    ('{"type": "Nope", "spatial": 2}', "unknown schedule type 'Nope'.*PAB"),
    ('{"spatial": 2}', "unknown schedule type None"),
    ('{"type": "PAB", "spatial": 2, "speed": 3}', r"unknown fields \['speed'\]"),
    ('{"type": "PAB", "spatial": 0}', "integer >= 1"),
    ("no/such/schedule.json", "does not exist"),
])
def test_bad_schedule_json(text, match):
    with pytest.raises(ScheduleError, match=match):
        schedule_from_json(text)


def test_schedule_type_checked():
    with pytest.raises(TypeError, match="graphpass schedule"):
        graphpass.optimize(NoAttention(), {"spatial": 2}, example_kwargs=dict(hidden_states=torch.ones(1)))
    assert issubclass(ScheduleError, ValueError) and issubclass(InputError, ValueError)
    assert Schedule._registry["PAB"] is PAB


# --- bad schedule files and options: clear errors, not tracebacks ----------------------------------
@pytest.mark.parametrize("content, match", [
    (b"\x80\x81\xfe binary \x00\xff", r"is not text \(not UTF-8\)"),
    (b'{"type": "PAB", "spatial": 2, "window": null}', r"field of the wrong type.*\"window\" is a pair \[lo, hi\]"),
    (b'{"type": "PAB", "spatial": 2, "windows": [[100, 800]]}', r"field of the wrong type.*\"windows\" an object"),
    (b'{"type": "PAB", "spatial": 2, "windows": {"spatial": null}}', "field of the wrong type"),
    (b'[{"type": "PAB"}]', r"must be an object such as \{\"type\": \"PAB\""),
    (b'{"type": ["PAB"], "spatial": 2}', r"unknown schedule type \['PAB'\]"),
], ids=["binary", "window-null", "windows-list", "windows-entry-null", "not-an-object", "type-list"])
def test_bad_schedule_files_are_schedule_errors(tmp_path, content, match):
    path = tmp_path / "s.json"
    path.write_bytes(content)
    with pytest.raises(ScheduleError, match=match):
        schedule_from_json(path)


def test_folder_as_schedule_path_is_a_schedule_error(tmp_path):
    (tmp_path / "schedules.json").mkdir()
    with pytest.raises(ScheduleError, match=r"schedules\.json is a folder; pass a \.json file"):
        schedule_from_json(tmp_path / "schedules.json")


def test_unknown_backend_is_refused_by_optimize_before_capture(monkeypatch):
    import graphpass.api as api

    def no_capture(*a, **k):
        raise AssertionError("captured before checking the backend")

    monkeypatch.setattr(api, "capture", no_capture)
    with pytest.raises(InputError, match=r"unknown backend 'bogus'; choose one of eager, inductor"):
        graphpass.optimize(NoAttention(), "pab246", backend="bogus",
                           example_kwargs=dict(hidden_states=torch.ones(1, 2, 3, 4, 4), timestep=torch.ones(1)))
