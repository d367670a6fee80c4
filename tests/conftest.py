"""Shared fixtures: tiny seeded models (VDT-tiny, diffusers Latte and CogVideoX) and a sampling-like loop.

Every case is a :class:`ModelCase`: a fresh model built from a fixed seed, a factory for the keyword
arguments of one call (batch 2, like one batched classifier-free-guidance call), and how the model's
output is returned (``first(out)``: the tensor of a diffusers ``return_dict=False`` tuple).

    >>> case = make_case("latte")
    >>> outs = run_loop(case.model, case.kwargs(), [981, 961, 941])
    >>> len(outs)
    3
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest
import torch

from graphpass.passes.capture import capture
from graphpass.passes.tag import tag_attention

# Tiny models: one thread avoids thread start-up and contention costs that dwarf the work (2 shared cores).
torch.set_num_threads(1)

#: DDIM "leading" spacing of 50 steps on the 0..1000 scale: 981, 961, ..., 1.
DDIM_50 = [float(i * 20 + 1) for i in range(50)][::-1]


@dataclass
class ModelCase:
    """One tiny model and how to call it.

    name: "vdt", "latte" or "cogvideox".
    model: the seeded ``nn.Module`` in eval mode.
    kwargs: returns the keyword arguments of one call (fresh tensors each time, same values).
    """

    name: str
    model: torch.nn.Module
    kwargs: Callable[[], dict[str, Any]]


def first(out) -> torch.Tensor:
    """The output tensor of a call (diffusers models return a 1-tuple with ``return_dict=False``)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _vdt() -> ModelCase:
    from graphpass.models import create

    model = create("vdt-tiny", seed=0)
    # VDT starts adaLN-Zero (every gate and the output layer are zero): perturb all weights so each
    # attention region changes the output.
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    cfg = model.config

    def kwargs():
        g = torch.Generator().manual_seed(2)
        return dict(hidden_states=torch.randn(2, cfg.num_frames, cfg.in_channels, cfg.image_size, cfg.image_size,
                                              generator=g),
                    timestep=torch.full((2,), 500.0),
                    encoder_hidden_states=torch.randint(1, cfg.vocab_size, (2, cfg.cond_len), generator=g),
                    cond_mask=torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])[:, :cfg.num_frames])

    return ModelCase("vdt", model, kwargs)


def _latte() -> ModelCase:
    from diffusers import LatteTransformer3DModel

    torch.manual_seed(0)
    model = LatteTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                    num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=16,
                                    caption_channels=16, num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                                    video_length=3).eval()

    def kwargs():
        g = torch.Generator().manual_seed(2)
        return dict(hidden_states=torch.randn(2, 4, 3, 8, 8, generator=g),  # (B, C, F, H, W)
                    timestep=torch.full((2,), 500, dtype=torch.int64),
                    encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
                    return_dict=False)

    return ModelCase("latte", model, kwargs)


def _cogvideox() -> ModelCase:
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                        num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
                                        text_embed_dim=16, time_embed_dim=8, temporal_compression_ratio=4,
                                        max_text_seq_length=5).eval()

    def kwargs():
        g = torch.Generator().manual_seed(2)
        return dict(hidden_states=torch.randn(2, 3, 4, 8, 8, generator=g),  # (B, F, C, H, W)
                    timestep=torch.full((2,), 500, dtype=torch.int64),
                    encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
                    return_dict=False)

    return ModelCase("cogvideox", model, kwargs)


_FACTORIES = {"vdt": _vdt, "latte": _latte, "cogvideox": _cogvideox}
MODEL_NAMES = tuple(_FACTORIES)


def make_case(name: str) -> ModelCase:
    """A fresh :class:`ModelCase` (new model object, same seeded weights every time)."""
    return _FACTORIES[name]()


@functools.lru_cache(maxsize=None)
def captured_case(name: str, dynamic: bool = False):
    """(model case, capture, tagged regions) of :func:`make_case`'s ``name``, captured once per process (with
    free sizes when ``dynamic``). Do not modify the case's model: graphs read its parameters."""
    case = make_case(name)
    cap = capture(case.model, case.kwargs(), dynamic=dynamic)
    return case, cap, tag_attention(cap)


def step(x: torch.Tensor, out) -> torch.Tensor:
    """A deterministic sampling-like update ``x - 0.1 * eps``; eps is the output cut to the latent's shape
    (Latte predicts 8 channels for 4: noise, then learned variance; the noise comes first)."""
    eps = first(out)
    eps = eps[tuple(slice(0, s) for s in x.shape)]
    return x - 0.1 * eps


def run_loop(model_or_opt, kwargs: dict[str, Any], timesteps: Sequence[float]) -> list[torch.Tensor]:
    """Call ``model_or_opt`` once per timestep (keyword call; the timestep tensor keeps the dtype and
    shape of ``kwargs["timestep"]``), feeding :func:`step` back as the next ``hidden_states`` so every
    step's input differs. Returns each step's output tensor."""
    kw = dict(kwargs)
    x = kw["hidden_states"]
    outs = []
    with torch.no_grad():
        for t in timesteps:
            kw["hidden_states"] = x
            kw["timestep"] = torch.full_like(kwargs["timestep"], t)
            out = model_or_opt(**kw)
            outs.append(first(out))
            x = step(x, out)
    return outs


@pytest.fixture(params=MODEL_NAMES)
def case(request) -> ModelCase:
    return make_case(request.param)


@pytest.fixture
def vdt_case() -> ModelCase:
    return make_case("vdt")


@pytest.fixture
def latte_case() -> ModelCase:
    return make_case("latte")


@pytest.fixture
def cogvideox_case() -> ModelCase:
    return make_case("cogvideox")


# The same models as (model, make_kwargs) pairs.

@pytest.fixture
def vdt_tiny() -> tuple[torch.nn.Module, Callable[[], dict[str, Any]]]:
    """graphpass.models.create("vdt-tiny"): hidden_states (2, F, 3, H, W), float timestep, int64 ids, cond_mask."""
    c = make_case("vdt")
    return c.model, c.kwargs


@pytest.fixture
def latte_tiny() -> tuple[torch.nn.Module, Callable[[], dict[str, Any]]]:
    """diffusers LatteTransformer3DModel: hidden_states (2, 4, 3, 8, 8), int64 timestep, text (2, 5, 16)."""
    c = make_case("latte")
    return c.model, c.kwargs


@pytest.fixture
def cogvideox_tiny() -> tuple[torch.nn.Module, Callable[[], dict[str, Any]]]:
    """diffusers CogVideoXTransformer3DModel: hidden_states (2, 3, 4, 8, 8), int64 timestep, text (2, 5, 16)."""
    c = make_case("cogvideox")
    return c.model, c.kwargs


#: Directories whose test modules share captures or exports through a process-wide cache (``functools.lru_cache``
#: in their helpers; tests/exporters/_exported.py): all their tests go to one xdist worker, so each is made once.
#: tests/parallel's spawned modules read one spawn's results (``_launch.launch_once``), and its spawns share one
#: forkserver.
_SHARED_CAPTURE_DIRS = ("techniques", "adacache", "parallel", "exporters", "hoisting")


def _xdist_group(item: pytest.Item) -> str:
    """The xdist group of a test (run with ``--dist loadgroup``): zoo tests by model case, since each zoo capture
    is cached per process and costs seconds; tests of a shared-capture directory by directory; every other test
    by module, so module- and session-scoped fixtures (captures, exports) are built once, not once per worker."""
    path = item.path.relative_to(Path(__file__).parent)
    params = getattr(item, "callspec", None)
    if path.parts[0] == "zoo" and params is not None and "name" in params.params:
        return f"zoo:{params.params['name']}"
    if path.parts[0] in _SHARED_CAPTURE_DIRS:
        return path.parts[0]
    return str(path)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the marks into the node ids
def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_xdist_group(item)))
