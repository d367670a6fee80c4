"""``graphpass inspect`` and ``graphpass bench`` on a diffusers model folder, and the errors of bad folders."""
from __future__ import annotations

import json
import re

import pytest

from cli_model_cases import CASES
from graphpass.cli import main
from graphpass.errors import ArtefactError, InputError
from graphpass.model_inputs import ddim_timesteps, supported_classes
from graphpass.workloads import load_model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """name -> a saved tiny model folder (CogVideoX and Latte)."""
    root = tmp_path_factory.mktemp("cli")
    out = {}
    for name in ("cogvideox", "latte"):
        CASES[name].save(root / name)
        out[name] = root / name
    return out


def _regions(report: str) -> dict[str, str]:
    """path -> kind from the regions table of ``inspect``'s report."""
    rows = re.findall(r"^\s+(\S+)\s+(spatial|temporal|cross|joint|mlp|text)\s", report, flags=re.M)
    return dict(rows)


# Kinds read from the models' sources: CogVideoXBlock.attn1 attends over text + all video tokens in one
# sequence; Latte's transformer_blocks attend within a frame (attn1) and to the caption (attn2), its
# temporal_transformer_blocks across frames.
EXPECTED = {
    "cogvideox": {**{f"transformer_blocks.{i}.attn1": "joint" for i in range(2)}},
    "latte": {**{f"transformer_blocks.{i}.attn1": "spatial" for i in range(2)},
              **{f"transformer_blocks.{i}.attn2": "cross" for i in range(2)},
              **{f"temporal_transformer_blocks.{i}.attn1": "temporal" for i in range(2)}},
}


@pytest.mark.parametrize("name,schedule", [("cogvideox", "cogvideox"), ("latte", "latte")])
def test_inspect_a_folder(folder, capsys, name, schedule):
    rc = main(["inspect", "--model", str(folder[name]), "--schedule", schedule, "--steps", "10"])
    report = capsys.readouterr().out
    assert rc == 0
    assert CASES[name].class_name in report.splitlines()[0]
    regions = _regions(report)
    assert {p: regions.get(p) for p in EXPECTED[name]} == EXPECTED[name]
    # the plan runs over the family's timesteps (DDIM for these DDPM-trained models)
    plan = report[report.index("plan (step"):]
    shown = {int(i): float(t) for i, t in re.findall(r"(\d+): t=\s*([\d.]+)", plan)}
    assert [shown[i] for i in sorted(shown)] == ddim_timesteps(10)


def test_inspect_a_flow_model_folder(tmp_path, capsys):
    """HunyuanVideo (flow matching, shift 7): one joint attention over video + text per block; the plan runs over
    the shifted flow timesteps as FlowMatchEulerDiscreteScheduler(shift=7) gives them for the pipeline's sigmas."""
    import diffusers
    import numpy as np

    CASES["hunyuanvideo"].save(tmp_path / "hv")
    rc = main(["inspect", "--model", str(tmp_path / "hv"), "--schedule", "cogvideox", "--steps", "10"])
    report = capsys.readouterr().out
    assert rc == 0
    regions = _regions(report)
    assert regions["transformer_blocks.0.attn"] == "joint" and regions["single_transformer_blocks.0.attn"] == "joint"
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0)
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, 11)[:-1])
    plan = report[report.index("plan (step"):]
    shown = {int(i): float(t) for i, t in re.findall(r"(\d+): t=\s*([\d.]+)", plan)}
    assert [shown[i] for i in sorted(shown)] == pytest.approx(sched.timesteps.tolist(), abs=0.05)  # 1 decimal shown


def test_bench_a_folder(folder, tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["bench", str(folder["cogvideox"]), "--steps", "6", "--seeds", "0", "--threads", "1", "--quiet",
               "--methods", "baseline", "graphpass-noreuse", "pab-cogvideox", "diffusers-pab", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "bench.json").read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert all(r["status"] == "ok" for r in rows.values()), {m: r["status"] for m, r in rows.items()}
    # the captured graph with nothing reused samples the baseline's video exactly (PSNR inf -> None)
    assert rows["graphpass-noreuse"]["psnr"] is None
    # graphpass's PAB against diffusers' own PAB hook with the same ranges and window: the same video
    pab, hook = rows["pab-cogvideox"], rows["diffusers-pab"]
    assert pab["ideal_speedup"] > 1.0 and pab["psnr"] is not None
    assert pab["psnr"] == pytest.approx(hook["psnr"], abs=0.5)
    assert "cogvideox" in capsys.readouterr().out


# --- bad folders ---------------------------------------------------------------------------------------------------

def _write_config(folder, config) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))


def test_folder_without_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtefactError, match=r"has no config\.json.*save_pretrained"):
        load_model(str(tmp_path / "empty"))
    assert main(["inspect", "--model", str(tmp_path / "empty")]) == 1
    assert "has no config.json" in capsys.readouterr().err


def test_missing_folder():
    with pytest.raises(ArtefactError, match=r"no folder .*existing diffusers model folder"):
        load_model("no/such/folder")


def test_config_not_json(tmp_path):
    _write_config(tmp_path / "m", "{not json")
    with pytest.raises(ArtefactError, match=r"is not valid JSON"):
        load_model(str(tmp_path / "m"))


def test_config_without_class_name(tmp_path):
    _write_config(tmp_path / "m", {"in_channels": 4})
    with pytest.raises(ArtefactError, match=r"has no '_class_name'"):
        load_model(str(tmp_path / "m"))


def test_unknown_class(tmp_path):
    _write_config(tmp_path / "m", {"_class_name": "NoSuchTransformer3DModel"})
    with pytest.raises(InputError, match=r"'NoSuchTransformer3DModel', which diffusers .* does not have"):
        load_model(str(tmp_path / "m"))


def test_class_without_input_builder_names_the_supported(tmp_path, capsys):
    _write_config(tmp_path / "m", {"_class_name": "AutoencoderKL"})
    with pytest.raises(InputError, match=r"no example-input builder for AutoencoderKL") as e:
        load_model(str(tmp_path / "m"))
    assert all(c in str(e.value) for c in supported_classes())
    assert main(["bench", str(tmp_path / "m"), "--steps", "2", "--quiet"]) == 1
    assert "CogVideoXTransformer3DModel" in capsys.readouterr().err


def test_folder_without_weights(tmp_path, folder):
    config = json.loads((folder["latte"] / "config.json").read_text())
    _write_config(tmp_path / "m", config)
    with pytest.raises(ArtefactError, match=r"cannot load LatteTransformer3DModel from .*weights"):
        load_model(str(tmp_path / "m"))


def test_bench_passes_the_other_arguments(tmp_path):
    """HunyuanVideo needs its text mask, pooled projection and guidance on every call: the sampler's calls carry
    the example's, so the captured graph samples the baseline's video exactly."""
    from graphpass.eval.bench import bench
    from graphpass.eval.harness import Workload

    CASES["hunyuanvideo"].save(tmp_path / "hv")
    wl = Workload.from_name(str(tmp_path / "hv"), num_steps=4)
    res = bench(wl, seeds=[0], methods=["baseline", "graphpass-noreuse"], progress=False)
    row = res.row("graphpass-noreuse")
    assert row["status"] == "ok" and row["psnr"] is None and row["ssim"] == pytest.approx(1.0)


@pytest.mark.parametrize("name,match", [("wan-i2v", r"takes 12 input channels but predicts 4"),
                                        ("ltx", r"packed as 3-D tokens")])
def test_bench_refuses_what_its_sampler_cannot_sample(tmp_path, capsys, name, match):
    CASES[name].save(tmp_path / name)
    assert main(["bench", str(tmp_path / name), "--steps", "2", "--seeds", "0", "--quiet"]) == 1
    assert re.search(match, capsys.readouterr().err)
