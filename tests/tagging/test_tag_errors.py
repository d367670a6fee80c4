"""Clear errors of tagging: kinds= patterns that match nothing, empty examples, and the new kinds in
schedules' validation."""
from __future__ import annotations

import pytest
import torch

import graphpass
from conftest import make_case
from graphpass import PAB, ScheduleError, TaggingError
from graphpass.passes.capture import capture
from graphpass.passes.tag import tag_attention
from graphpass.schedules.base import KINDS


@pytest.fixture(scope="module")
def latte_capture():
    case = make_case("latte")
    return capture(case.model, case.kwargs())


def test_kinds_pattern_that_matches_nothing_is_refused(latte_capture):
    # "transformer_block" (no s): a typo that would otherwise leave the regions tagged as before
    with pytest.raises(TaggingError) as info:
        tag_attention(latte_capture, kinds={"transformer_block.*.attn1": "spatial"})
    msg = str(info.value)
    assert "'transformer_block.*.attn1'" in msg and "matches no" in msg
    assert "transformer_blocks.0.attn1" in msg  # real region paths, to fix the pattern from


def test_kinds_pattern_matching_an_mlp_region_is_accepted(latte_capture):
    kinds = {r.path: r.kind for r in tag_attention(latte_capture, kinds={"transformer_blocks.0.ff": "text"})}
    assert kinds["transformer_blocks.0.ff"] == "text" and kinds["transformer_blocks.1.ff"] == "mlp"


def test_empty_batch_example_gives_a_clear_error():
    case = make_case("vdt")
    kw = {k: v[:0] if isinstance(v, torch.Tensor) else v for k, v in case.kwargs().items()}
    with pytest.raises(TaggingError, match=r"'hidden_states' has shape \(0, .*batch >= 1"):
        graphpass.optimize(case.model, "pab246", example_kwargs=kw)


def test_new_kinds_are_validated_like_the_others():
    assert {"text", "other"} <= set(KINDS)
    with pytest.raises(ScheduleError, match="other=0"):
        PAB(other=0)
    assert PAB.from_dict(PAB(text=2, other=3).to_dict()) == PAB(text=2, other=3)
    assert PAB(text=2).kinds() == {"text"}
    with pytest.raises(ScheduleError, match="text"):  # a model without text regions refuses a text schedule
        PAB(text=2).check_model({"spatial", "temporal", "cross"})
    with pytest.raises(ScheduleError, match="unknown PAB preset.*hunyuanvideo"):  # family names are listed
        PAB.preset("hunyuan")


def test_published_presets_are_unchanged():
    """PAB's published defaults (reference code): ranges and windows."""
    assert PAB.preset("open-sora") == PAB(spatial=2, temporal=4, cross=6, window=(450, 930))
    assert PAB.preset("latte") == PAB(spatial=2, temporal=3, cross=6, window=(100, 800))
    assert PAB.preset("open-sora-plan") == PAB(spatial=2, temporal=4, cross=6, window=(100, 850))
    assert PAB.preset("cogvideox") == PAB(joint=2, window=(100, 850))
