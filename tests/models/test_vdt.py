"""VDT forward contract that the sampler and the compiler rely on."""

import copy

import pytest
import torch

from graphpass.models import CONFIGS, VDT, create
from graphpass.models.diffusion import alphas_cumprod
from graphpass.models.train import TASKS, fixed_batch_loss, masked_loss, task_mask
from graphpass.models.vdt import Attention, Mlp


def _inputs(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.num_frames, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.tensor([10.0, 900.0])[:b]
    ids = torch.randint(0, cfg.vocab_size, (b, cfg.cond_len), generator=g)
    return x, t, ids


def _perturbed(name="vdt-tiny"):
    """Random init with the zero-initialised adaLN/output layers perturbed, so outputs are non-trivial."""
    m = create(name)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


@pytest.mark.parametrize("task", TASKS + ("none",))
def test_forward_shape_every_task(task):
    m = _perturbed()
    cfg = m.config
    x, t, ids = _inputs(cfg)
    g = torch.Generator().manual_seed(0)
    mask = None if task == "none" else torch.stack([task_mask(task, cfg.num_frames, g) for _ in range(2)])
    out = m(hidden_states=x, timestep=t, encoder_hidden_states=ids, cond_mask=mask)
    assert isinstance(out, torch.Tensor) and out.shape == x.shape
    assert torch.isfinite(out).all()


def test_zero_init_v_output_and_mask_matters_after_perturbation():
    # adaLN-Zero init: the network's v output is 0, so eps = sqrt(1 - alpha_bar[t]) * x_t
    m = create("vdt-tiny")
    x, t, ids = _inputs(m.config)
    ab = alphas_cumprod()[t.long()].float()
    expected = (1 - ab).sqrt().reshape(-1, 1, 1, 1, 1) * x
    torch.testing.assert_close(m(hidden_states=x, timestep=t, encoder_hidden_states=ids), expected)
    m = _perturbed()
    f = m.config.num_frames
    a = m(hidden_states=x, timestep=t, encoder_hidden_states=ids, cond_mask=torch.zeros(2, f))
    b = m(hidden_states=x, timestep=t, encoder_hidden_states=ids, cond_mask=torch.ones(2, f))
    assert not torch.allclose(a, b)


def test_module_structure_for_the_compiler():
    m = create("vdt-tiny")
    names = dict(m.named_modules())
    for i in range(m.config.depth):
        for kind in ("spatial_attn", "temporal_attn", "cross_attn"):
            mod = names[f"blocks.{i}.{kind}"]
            assert type(mod).__name__ == "Attention" and isinstance(mod, Attention)
            assert {"q", "k", "v", "out"} <= set(dict(mod.named_children()))
        assert isinstance(names[f"blocks.{i}.mlp"], Mlp)


def test_cross_attention_kv_depend_only_on_labels():
    m = _perturbed()
    cfg = m.config
    seen = {}
    blk = m.blocks[0].cross_attn
    hooks = [blk.k.register_forward_hook(lambda mod, i, o: seen.setdefault("k", []).append(o)),
             blk.v.register_forward_hook(lambda mod, i, o: seen.setdefault("v", []).append(o))]
    x, t, ids = _inputs(cfg)
    m(hidden_states=x, timestep=t, encoder_hidden_states=ids)
    m(hidden_states=torch.randn_like(x), timestep=t + 37, encoder_hidden_states=ids)
    for h in hooks:
        h.remove()
    assert torch.equal(seen["k"][0], seen["k"][1]) and torch.equal(seen["v"][0], seen["v"][1])


def test_batch_elements_are_independent():
    m = _perturbed()
    x, t, ids = _inputs(m.config)
    full = m(hidden_states=x, timestep=t, encoder_hidden_states=ids)
    one = m(hidden_states=x[1:], timestep=t[1:], encoder_hidden_states=ids[1:])
    torch.testing.assert_close(full[1:], one, rtol=1e-4, atol=1e-5)


def test_given_frames_are_excluded_from_the_loss():
    m = _perturbed()
    cfg = m.config
    x, t, ids = _inputs(cfg)
    noise = torch.randn_like(x)
    mask = torch.zeros(2, cfg.num_frames)
    mask[:, 0] = 1
    base = masked_loss(m, x, ids, mask, t.long(), noise)
    noise2 = noise.clone()
    noise2[:, 0] += 5.0  # target changes only on given frames; the clean input there hides the noise
    assert torch.isclose(base, masked_loss(m, x, ids, mask, t.long(), noise2))


def test_fixed_batch_loss_is_deterministic():
    """The recorded loss depends on the weights only: a copy of the model, evaluated under another global RNG
    state (the batch, noise and timesteps are drawn from their own seeds), gives the same number; other
    weights give another."""
    m = _perturbed()
    torch.manual_seed(0)
    first = fixed_batch_loss(m)
    torch.manual_seed(12345)
    torch.rand(1000)  # move the global generator on
    assert fixed_batch_loss(copy.deepcopy(m)) == first
    other = copy.deepcopy(m)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.05)
    assert abs(fixed_batch_loss(other) - first) > 1e-4


def test_export_non_strict_static_shapes():
    m = create("vdt-tiny")
    x, t, ids = _inputs(m.config)
    mask = torch.zeros(2, m.config.num_frames)
    ep = torch.export.export(m, (), dict(hidden_states=x, timestep=t, encoder_hidden_states=ids, cond_mask=mask),
                             strict=False)
    torch.testing.assert_close(ep.module()(hidden_states=x, timestep=t, encoder_hidden_states=ids, cond_mask=mask),
                               m(hidden_states=x, timestep=t, encoder_hidden_states=ids, cond_mask=mask))


def test_closed_form_schedule_matches_the_table():
    from graphpass.models.diffusion import alpha_bar_coefficients

    t = torch.arange(1000).float()
    a, s = alpha_bar_coefficients(t)
    ab = alphas_cumprod()
    torch.testing.assert_close(a.double(), ab.sqrt(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s.double(), (1 - ab).sqrt(), rtol=1e-5, atol=1e-7)


def test_grow_state_dict_keeps_the_function():
    """Weights of a config without patch overlap / conv head load into one with them and compute the same."""
    import dataclasses

    from graphpass.models.vdt import grow_state_dict

    cfg = CONFIGS["vdt-tiny"]
    small = VDT(dataclasses.replace(cfg, patch_overlap=0, head_channels=0)).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in small.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    big = VDT(cfg).eval()
    notes = grow_state_dict(big, small.state_dict())
    assert any(n.startswith("patch_embed.weight") for n in notes) and "head_conv.weight kept at init" in notes
    x = torch.randn(2, cfg.num_frames, 3, cfg.image_size, cfg.image_size, generator=g)
    t, ids = torch.full((2,), 300.0), torch.randint(1, cfg.vocab_size, (2, cfg.cond_len), generator=g)
    with torch.no_grad():
        assert torch.equal(big(x, t, ids), small(x, t, ids))
    # The head is live: once its conv is non-zero the output changes.
    with torch.no_grad():
        big.head_conv.weight.fill_(0.01)
        assert not torch.allclose(big(x, t, ids), small(x, t, ids))
    with pytest.raises(KeyError, match="lack"):
        grow_state_dict(big, {k: v for k, v in small.state_dict().items() if k != "final_linear.weight"})


def test_other_frame_counts_and_resolutions():
    """Positions are computed per call: the model runs at other frame counts and (patch-multiple) sizes,
    and refuses a size that is not a multiple of the patch."""
    m = create("vdt-tiny")
    out = m(torch.randn(1, 6, 3, 12, 20), torch.full((1,), 500.0), torch.ones(1, 7, dtype=torch.long))
    assert out.shape == (1, 6, 3, 12, 20)
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        m(torch.randn(1, 4, 3, 14, 16), torch.full((1,), 500.0), torch.ones(1, 7, dtype=torch.long))
