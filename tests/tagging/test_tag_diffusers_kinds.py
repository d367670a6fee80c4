"""Kinds of every attention region of diffusers video transformers beyond Latte/CogVideoX, asserted
module by module against the kinds read from their source (tests/tagging/tiny_video_dits.py says why)."""
from __future__ import annotations

import pytest

import tiny_video_dits as dits
from graphpass import PAB, ScheduleError
from graphpass.passes.capture import capture
from graphpass.passes.tag import tag_attention

CASES = {"hunyuan_video": dits.HUNYUAN_KINDS, "ltx2": dits.LTX2_KINDS, "motif_video": dits.MOTIF_KINDS,
         "sana_video": dits.SANA_KINDS, "wan": dits.WAN_KINDS, "ltx_video": dits.LTX_KINDS,
         "allegro": dits.ALLEGRO_KINDS}
#: the PAB preset of each family that has one
PRESETS = {"hunyuan_video": "hunyuanvideo", "ltx2": "ltx2", "sana_video": "sana-video", "wan": "wan",
           "ltx_video": "ltx-video", "allegro": "allegro"}


@pytest.fixture(scope="module")
def tagged():
    """name -> attention regions (no MLPs) by path, captured once for the module."""
    out = {}
    for name in CASES:
        model, kwargs = getattr(dits, name)()
        regions = tag_attention(capture(model, kwargs()))
        out[name] = {r.path: r for r in regions if r.kind != "mlp"}
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_kinds_match_the_source(tagged, name):
    got = {p: r.kind for p, r in tagged[name].items()}
    assert got == CASES[name]
    for r in tagged[name].values():  # decided from the graph, not from module names
        assert not r.reason.startswith("by name"), r


def test_hunyuan_token_refiner_is_text_not_cross(tagged):
    """The refiner attends the 5 text tokens to each other: neither queries nor keys hold video."""
    r = tagged["hunyuan_video"]["context_embedder.token_refiner.refiner_blocks.0.attn"]
    assert r.kind == "text" and r.attention_shape[-2] == 5
    assert "encoder_hidden_states" in r.reason


def test_ltx2_audio_attention_is_other(tagged):
    regions = tagged["ltx2"]
    # audio self-attention of block 1 depends on video data (through block 0's video-to-audio attention),
    # yet its 6 tokens are the audio stream's
    assert regions["transformer_blocks.1.audio_attn1"].attention_shape[-2] == 6
    assert "audio_hidden_states" in regions["transformer_blocks.1.audio_attn1"].reason
    assert "audio_hidden_states" in regions["transformer_blocks.0.audio_to_video_attn"].reason
    assert not any(r.kind == "cross" and "audio" in p for p, r in regions.items())


def test_motif_cross_attention_in_single_stream_blocks_is_cross(tagged):
    """Keys/values are the 5 text positions of the stream, although after joint attention they carry video."""
    r = tagged["motif_video"]["single_transformer_blocks.1.cross_attn"]
    assert r.kind == "cross" and "5 tokens of encoder_hidden_states" in r.reason
    assert r.attention_shape[-2] == 48  # queries: the video tokens


def test_sana_linear_attention_is_found_without_sdpa(tagged):
    r = tagged["sana_video"]["transformer_blocks.0.attn1"]
    assert r.form == "linear" and r.kind == "joint" and r.attention_shape[-2] == 48
    assert tagged["sana_video"]["transformer_blocks.0.attn2"].form == "sdpa"


@pytest.mark.parametrize("name", list(PRESETS))
def test_family_preset_reuses_every_video_kind_of_its_model_and_nothing_else(tagged, name):
    kinds = {r.kind for r in tagged[name].values()}
    schedule = PAB.preset(PRESETS[name])
    schedule.check_model(kinds)  # would raise if the preset named a kind the model lacks
    assert schedule.kinds() == kinds - {"text", "other"}


def test_preset_naming_a_kind_the_model_lacks_is_refused(tagged):
    """HunyuanVideo has no cross-attention (text joins the joint attention): Wan's preset, which reuses
    cross-attention, is refused by the check ``graphpass.optimize`` runs after tagging (tests/test_errors.py
    checks that ``optimize`` raises it)."""
    kinds = {r.kind for r in tagged["hunyuan_video"].values()}
    with pytest.raises(ScheduleError, match="cross"):
        PAB.preset("wan").check_model(kinds)
