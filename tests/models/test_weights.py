"""Shipped weights: load, reproduce their recorded loss, and fail clearly when damaged."""

import shutil

import pytest
import torch

from graphpass.models import CONFIGS, WeightsError, load, read_metadata, weights_path
from graphpass.models.train import fixed_batch_loss, save_weights
from graphpass.models.vdt import VDT

SHIPPED = weights_path("vdt-s")
needs_weights = pytest.mark.skipif(not SHIPPED.is_file(),
                                   reason=f"{SHIPPED} not trained yet (python -m graphpass.models.train)")


@needs_weights
def test_shipped_weights_reproduce_recorded_loss():
    meta = read_metadata(SHIPPED)
    model = load("vdt-s")
    assert not model.training
    assert meta["config_name"] == "vdt-s" and int(meta["steps"]) > 0
    assert fixed_batch_loss(model) == pytest.approx(float(meta["recorded_loss"]), rel=1e-3, abs=1e-5)


@needs_weights
def test_shipped_weights_beat_random_init():
    torch.manual_seed(0)
    assert fixed_batch_loss(load("vdt-s")) < 0.5 * fixed_batch_loss(VDT(CONFIGS["vdt-s"]))


def _tiny_file(tmp_path):
    torch.manual_seed(0)
    m = VDT(CONFIGS["vdt-tiny"])
    path = tmp_path / "vdt-tiny.safetensors"
    rec = save_weights(m, "vdt-tiny", 1, path)
    return m, path, rec


def test_round_trip_of_saved_weights(tmp_path):
    m, path, rec = _tiny_file(tmp_path)
    loaded = load("vdt-tiny", path=path)
    for (k, a), b in zip(m.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert fixed_batch_loss(loaded) == pytest.approx(rec, rel=1e-6)


def test_missing_file_names_the_file_and_the_fix(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsError, match="not found") as e:
        load("vdt-tiny", path=missing)
    assert str(missing) in str(e.value) and "graphpass.models.train" in str(e.value)


def test_truncated_file_raises_weights_error(tmp_path):
    _, path, _ = _tiny_file(tmp_path)
    data = path.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated.safetensors"):
        load("vdt-tiny", path=bad)


def test_garbage_file_raises_weights_error(tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"\x00\x01not a safetensors file" * 10)
    with pytest.raises(WeightsError, match="garbage.safetensors"):
        load("vdt-tiny", path=bad)


def test_wrong_config_raises_weights_error(tmp_path):
    _, path, _ = _tiny_file(tmp_path)
    other = tmp_path / "copy.safetensors"
    shutil.copy(path, other)
    with pytest.raises(WeightsError, match="trained for config 'vdt-tiny'"):
        load("vdt-s", path=other)


def test_weights_error_is_a_value_error():
    assert issubclass(WeightsError, ValueError)


def test_training_run_continues_from_init_and_records_history(tmp_path):
    """A short training run from saved weights: writes loadable EMA weights whose metadata carries the
    init's history, and a loss log."""
    import json

    from graphpass.models.train import main

    _, init, _ = _tiny_file(tmp_path)
    out = tmp_path / "run" / "vdt-tiny.safetensors"
    main(["--config", "vdt-tiny", "--init", str(init), "--steps", "3", "--batch", "2", "--out", str(out),
          "--state", str(tmp_path / "state.pt"), "--log-every", "1", "--threads", "1"])
    meta = read_metadata(out)
    assert meta["steps"] == "3" and meta["history"] == "1 steps at batch ?, then 3 steps at batch 2"
    log = json.loads(out.with_name("vdt-tiny.loss.json").read_text())
    assert log["step"][-1] == 3 and all(v > 0 for v in log["loss"])
    load("vdt-tiny", path=out)
