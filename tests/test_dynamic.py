"""Dynamic frame/height/width dimensions: ``graphpass.optimize(..., dynamic=True)``.

VDT computes its sin-cos positions from each call's sizes, so its frames, height and width stay free in the
capture (frames tied to ``cond_mask``'s second dimension); diffusers' Latte keeps a position table of fixed
size, so its height and width are captured static and only the caption length is free. One optimized VDT
then serves other video sizes: over a full PAB loop at a size it was not captured at, its outputs equal the
module-level reference PAB run at that size.
"""
from __future__ import annotations

import re

import pytest
import torch

import graphpass
from graphpass import PAB
from graphpass.errors import InputError
from conftest import DDIM_50, make_case, run_loop
from reference_pab import ReferencePAB
from test_equivalence import ATOL, MODULES

SCHED = PAB.preset("pab246", mlp=3, window=(100, 800))


def _vdt_kwargs(frames: int, height: int, width: int, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, frames, 3, height, width, generator=g),
                timestep=torch.full((2,), 500.0),
                encoder_hidden_states=torch.randint(1, 11, (2, 7), generator=g),
                cond_mask=torch.zeros(2, frames).index_fill_(1, torch.tensor([0]), 1.0))


@pytest.fixture(scope="module")
def vdt_dynamic():
    case = make_case("vdt")
    return case, graphpass.optimize(case.model, SCHED, example_kwargs=case.kwargs(), dynamic=True)


@pytest.fixture(scope="module")
def vdt_static():
    """VDT optimized for SCHED without ``dynamic``: only the batch is free."""
    case = make_case("vdt")
    return graphpass.optimize(case.model, SCHED, example_kwargs=case.kwargs())


def test_vdt_free_dimensions(vdt_dynamic, vdt_static):
    free = vdt_dynamic[1].captured.dynamic_dims
    # (B, F, C, H, W): batch, frames, height and width free; channels (conv weight) static.
    assert sorted(free["hidden_states"]) == [0, 1, 3, 4]
    assert free["cond_mask"] == {0: free["hidden_states"][0], 1: free["hidden_states"][1]}  # one B, one F
    assert len({free["hidden_states"][i] for i in (0, 1, 3, 4)}) == 4  # height and width are not tied
    assert free["encoder_hidden_states"] == {0: free["hidden_states"][0]}  # integer ids: only the batch
    # The static capture keeps every shape but the batch fixed.
    batch = free["hidden_states"][0]
    static = vdt_static.captured.dynamic_dims
    assert static == {k: {0: static["hidden_states"][0]} for k in free} and batch


@pytest.mark.parametrize("size", [(6, 20, 12), (3, 16, 16)], ids=["6x20x12", "3x16x16"])
def test_pab_at_another_size_matches_reference(vdt_dynamic, size):
    case, opt = vdt_dynamic
    kw = _vdt_kwargs(*size)
    opt.reset()
    got = run_loop(opt, kw, DDIM_50)
    assert got[0].shape == kw["hidden_states"].shape
    ranges = {k: SCHED.range_of(k) for k in ("spatial", "temporal", "cross", "joint", "mlp")}
    ref = ReferencePAB(make_case("vdt").model, MODULES["vdt"], ranges, window=SCHED.window)
    want = run_loop(ref, kw, DDIM_50)
    ref.restore()
    diff = max(float((a - b).abs().max()) for a, b in zip(got, want))
    assert diff <= ATOL, f"max |graphpass - reference| at {size} = {diff}"
    assert sum(ref.reused.values()) > 0
    assert sum(len(ph.reused) for _, ph in opt.state().trace) == sum(ref.reused.values())


def test_never_reusing_equals_eager_at_another_size():
    case = make_case("vdt")
    opt = graphpass.optimize(case.model, PAB(spatial=2, window=(2000, 3000)), example_kwargs=case.kwargs(),
                             dynamic=True)
    kw = _vdt_kwargs(5, 8, 24)
    for g, e in zip(run_loop(opt, kw, DDIM_50[:6]), run_loop(case.model, kw, DDIM_50[:6])):
        assert torch.equal(g, e)


def test_new_size_starts_a_new_generation(vdt_dynamic):
    _, opt = vdt_dynamic
    opt.reset()
    run_loop(opt, _vdt_kwargs(4, 16, 16), DDIM_50[:12])
    st = opt.state()
    assert st.counter == 12 and st.cache.nbytes > 0
    # Same timestep sequence continuing, but a new size: the caches of the old size must not be read.
    kw = _vdt_kwargs(6, 12, 12)
    opt(**dict(kw, timestep=torch.full((2,), DDIM_50[12])))
    assert st.counter == 1
    assert st.shapes[0] == (2, 6, 3, 12, 12)
    # Step 0 of the new generation stored every region afresh, at the new size (frames x 3x3 tokens).
    spatial = st.cache.get("blocks.0.spatial_attn:0")
    assert spatial.shape[:2] == (2 * 6, 9)


def test_shape_the_model_cannot_serve(vdt_dynamic):
    _, opt = vdt_dynamic
    opt.reset()
    # 18 is not a multiple of the patch size 4: the free height is checked on fake tensors first.
    with pytest.raises(InputError, match=r"cannot run inputs of shapes hidden_states \(2, 4, 3, 18, 16\)"):
        opt(**_vdt_kwargs(4, 18, 16))
    # Channels are static in the capture.
    with pytest.raises(InputError, match=r"dimension\(s\) \[2\] are static.*free dimensions: \[0, 1, 3, 4\]"):
        opt(**dict(_vdt_kwargs(4, 16, 16), hidden_states=torch.randn(2, 4, 4, 16, 16)))
    # Frames of the video and of the mask must agree (one symbol).
    with pytest.raises(InputError, match="cannot run"):
        opt(**dict(_vdt_kwargs(4, 16, 16), cond_mask=torch.zeros(2, 5)))


def test_latte_keeps_its_fixed_size_dimensions_static():
    case = make_case("latte")
    kw = case.kwargs()
    opt = graphpass.optimize(case.model, "latte", example_kwargs=kw, dynamic=True)
    # Latte's position table has a fixed size: export leaves H and W symbolic but guarded to the example's
    # patch grid, the probe at twice the size fails, so they are captured static. The caption length is free.
    dims = opt.captured.dynamic_dims
    assert dims == {"hidden_states": {0: dims["hidden_states"][0]}, "timestep": {0: dims["hidden_states"][0]},
                    "encoder_hidden_states": {0: dims["hidden_states"][0], 1: dims["encoder_hidden_states"][1]}}
    with pytest.raises(InputError, match=r"dimension\(s\) \[3, 4\] are static"):
        opt(**dict(kw, hidden_states=torch.randn(2, 4, 3, 12, 12)))
    # A longer caption runs and equals eager (no reuse at t=981).
    kw2 = dict(kw, encoder_hidden_states=torch.randn(2, 9, 16), timestep=torch.full((2,), 981, dtype=torch.int64))
    assert torch.equal(opt(**kw2)[0], case.model(**kw2)[0])


def test_static_capture_error_names_dynamic_option(vdt_static):
    with pytest.raises(InputError, match=r"dimension\(s\) \[3, 4\] are static.*dynamic=True"):
        vdt_static(**_vdt_kwargs(4, 20, 12))


def test_inspect_reports_free_sizes(vdt_dynamic):
    _, opt = vdt_dynamic
    text = opt.inspect()
    assert re.search(r"shapes: free sizes hidden_states dims 0=s\d+, 1=s\d+, 3=", text)
    assert re.search(r"cond_mask dims 0=s\d+, 1=", text)


def test_dynamic_with_parallel_is_refused():
    from graphpass import SequenceParallel

    case = make_case("vdt")
    with pytest.raises(InputError, match="dynamic=True with parallel"):
        graphpass.optimize(case.model, SCHED, example_kwargs=case.kwargs(), dynamic=True,
                           parallel=SequenceParallel(world_size=2))


def test_inspect_cli_dynamic(capsys):
    from graphpass.cli import main

    assert main(["inspect", "--model", "vdt-tiny", "--steps", "10", "--dynamic"]) == 0
    assert re.search(r"shapes: free sizes hidden_states dims 0=s\d+, 1=s\d+, 3=", capsys.readouterr().out)
    assert main(["inspect", "--model", "vdt-tiny", "--steps", "10"]) == 0
    # Without --dynamic only the batch is free.
    assert re.search(r"shapes: free sizes hidden_states dims 0=s\d+;", capsys.readouterr().out)


def test_one_frame_example_captures_frames_static():
    # Export fixes sizes 0 and 1: with a one-frame example the frames are static (a sliced example is fine:
    # the capture does not guard on its strides); height and width stay free and run at other sizes.
    case = make_case("vdt")
    kw = case.kwargs()
    kw.update(hidden_states=kw["hidden_states"][:, :1], cond_mask=kw["cond_mask"][:, :1])
    opt = graphpass.optimize(case.model, PAB(temporal=2, window=(2000, 3000)), example_kwargs=kw, dynamic=True)
    assert sorted(opt.captured.dynamic_dims["hidden_states"]) == [0, 3, 4]
    kw2 = dict(kw, hidden_states=torch.randn(2, 1, 3, 16, 12))
    assert torch.equal(opt(**kw2), case.model(**kw2))
    with pytest.raises(InputError, match=r"dimension\(s\) \[1\] are static.*had size 1 in the example.*size 2 or "
                                         r"more"):
        opt(**dict(kw, hidden_states=torch.randn(2, 4, 3, 8, 8), cond_mask=torch.zeros(2, 4)))


def test_guard_text_names_the_inputs(vdt_dynamic):
    _, opt = vdt_dynamic
    opt.reset()
    # Export's guards speak of positional args; the message names the inputs instead.
    with pytest.raises(InputError, match=r"Guard failed: hidden_states.size\(\)\[3\] % 4 == 0"):
        opt(**_vdt_kwargs(4, 18, 16))
    with pytest.raises(InputError, match=r"Guard failed: cond_mask.size\(\)\[1\] == hidden_states.size\(\)\[1\]"):
        opt(**dict(_vdt_kwargs(4, 16, 16), cond_mask=torch.zeros(2, 5)))
