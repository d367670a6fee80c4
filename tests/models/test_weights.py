"""Shipped weights: load, reproduce their recorded loss, and fail clearly when damaged."""

import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from graphpass.models import CONFIGS, WeightsError, check_weights_file, load, read_metadata, weights_path
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

    from graphpass.models.train import main

    _, init, _ = _tiny_file(tmp_path)
    out = tmp_path / "run" / "vdt-tiny.safetensors"
    main(["--config", "vdt-tiny", "--init", str(init), "--steps", "3", "--batch", "2", "--out", str(out),
          "--state", str(tmp_path / "state.pt"), "--log-every", "1", "--threads", "1"])
    meta = read_metadata(out)
    assert len(meta["weights_sha256"]) == 64  # training records the tensors' sha256 (checked by load below)
    assert meta["steps"] == "3" and meta["history"] == "1 steps at batch ?, then 3 steps at batch 2"
    log = json.loads(out.with_name("vdt-tiny.loss.json").read_text())
    assert log["step"][-1] == 3 and all(v > 0 for v in log["loss"])
    load("vdt-tiny", path=out)


# --- the tensors' sha256, recorded at save and checked at load --------------------------------------
def _data_start(data: bytes) -> int:
    """Offset of the tensor data in a safetensors file (after the 8-byte length and the JSON header)."""
    return 8 + int.from_bytes(data[:8], "little")


def test_flipped_byte_in_tensor_data_is_refused_naming_the_file(tmp_path):
    m, path, _ = _tiny_file(tmp_path)
    data = bytearray(path.read_bytes())
    i = _data_start(bytes(data)) + 1003  # the high byte of a float32 somewhere in the weights
    i += 3 - (i - _data_start(bytes(data))) % 4
    data[i] ^= 0x7F
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    # the damage is real and silent to safetensors: one parameter now holds a huge value
    before, after = load_file(str(path)), load_file(str(bad))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == 1 and float((after[changed[0]] - before[changed[0]]).abs().max()) > 1e30
    with pytest.raises(WeightsError, match=r"does not match the sha256 of its tensors") as e:
        load("vdt-tiny", path=bad)
    assert str(bad) in str(e.value) and f"--out {bad}" in str(e.value)  # the fix names the file passed


def test_file_without_recorded_sha256_is_refused(tmp_path):
    m, path, _ = _tiny_file(tmp_path)
    meta = {k: v for k, v in read_metadata(path).items() if k != "weights_sha256"}
    plain = tmp_path / "plain.safetensors"
    save_file(load_file(str(path)), str(plain), metadata=meta)
    with pytest.raises(WeightsError, match=r"plain\.safetensors records no weights_sha256"):
        load("vdt-tiny", path=plain)


@needs_weights
def test_shipped_weights_record_their_sha256(tmp_path):
    meta = check_weights_file(SHIPPED)
    assert len(meta["weights_sha256"]) == 64
    # a copy with one tensor value changed (every other byte equal) is refused
    data = bytearray(SHIPPED.read_bytes())
    data[-2] ^= 0x01
    bad = tmp_path / "vdt-s.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"does not match the sha256"):
        load("vdt-s", path=bad)


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory) -> bytes:
    _, path, _ = _tiny_file(tmp_path_factory.mktemp("tiny"))
    return path.read_bytes()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_damage_to_tensors_or_their_table_is_refused(tiny_bytes, tmp_path, data):
    """Flips anywhere in the tensor data, or in the tensor table (names, dtypes, shapes, offsets) of the
    header, and truncations anywhere: never loaded."""
    header = tiny_bytes[8:_data_start(tiny_bytes)].decode()
    names = [k for k in json.loads(header) if k != "__metadata__"]
    # the metadata object comes first; the tensor table runs from the first tensor's entry to the end of
    # the JSON (the header's trailing pad spaces are not part of it)
    table = (8 + min(header.index(f'"{n}":{{"dtype"') for n in names), 8 + len(header.rstrip()))
    if data.draw(st.booleans(), label="truncate"):
        damaged = tiny_bytes[:data.draw(st.integers(0, len(tiny_bytes) - 1), label="length")]
    else:
        spans = [(_data_start(tiny_bytes), len(tiny_bytes)), table]
        lo, hi = data.draw(st.sampled_from(spans), label="region")
        i = data.draw(st.integers(lo, hi - 1), label="offset")
        b = bytearray(tiny_bytes)
        b[i] ^= data.draw(st.integers(1, 255), label="xor")
        damaged = bytes(b)
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(damaged)
    with pytest.raises(WeightsError, match="damaged.safetensors"):
        load("vdt-tiny", path=path)
