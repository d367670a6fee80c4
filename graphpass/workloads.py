"""Workloads for the command line and benchmarks: a model plus one real call's inputs.

A workload is a shipped name (:data:`WORKLOADS`) or a local diffusers model folder, as written by
``save_pretrained`` (``config.json`` naming the class in ``_class_name``, plus the weights): the folder's
model is loaded with ``from_pretrained`` and called with inputs built from its config
(:mod:`graphpass.model_inputs`).

>>> model, kwargs, timesteps = example_call("vdt-tiny", batch=2, num_steps=10)
>>> sorted(kwargs)
['cond_mask', 'encoder_hidden_states', 'hidden_states', 'timestep']

A folder (here a tiny Latte saved a moment before)::

    >>> model, kwargs, timesteps = example_call("out/latte-folder", batch=2, num_steps=10)  # doctest: +SKIP
    >>> type(model).__name__, timesteps[:2]                                                # doctest: +SKIP
    ('LatteTransformer3DModel', [901.0, 801.0])
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diffusers
import torch

from . import model_inputs
from .errors import ArtefactError, GraphpassError, InputError

WORKLOADS = ("vdt-s", "vdt-tiny", "latte-tiny")


def is_model_folder(name_or_path: str | Path) -> bool:
    """Whether ``name_or_path`` names a folder on disk (a diffusers model folder) rather than a workload name."""
    return Path(name_or_path).expanduser().is_dir()


def looks_like_path(name: str) -> bool:
    """Whether ``name`` is written as a path (has a separator or starts with ``.`` or ``~``), not a shipped name.

    >>> looks_like_path("vdt-s"), looks_like_path("models/latte"), looks_like_path("./latte")
    (False, True, True)
    """
    return "/" in name or "\\" in name or name.startswith((".", "~"))


def folder_class_name(path: str | Path) -> str:
    """The diffusers class a model folder was saved from (``_class_name`` of its ``config.json``), checked to
    be one graphpass builds inputs for.

    Raises :class:`~graphpass.errors.ArtefactError` for a folder without a readable ``config.json`` or one
    without ``_class_name``, and :class:`~graphpass.errors.InputError` for a class diffusers does not have or
    graphpass has no input builder for.
    """
    path = Path(path).expanduser()
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ArtefactError(f"{path} has no config.json: --model takes a shipped name ({', '.join(WORKLOADS)}) or "
                            f"a diffusers model folder written by save_pretrained (for a pipeline, its "
                            f"'transformer' subfolder)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ArtefactError(f"{config_file} is not valid JSON ({e}); re-save the model with save_pretrained") from e
    name = config.get("_class_name") if isinstance(config, dict) else None
    if not name:
        raise ArtefactError(f"{config_file} has no '_class_name': it was not written by a diffusers model's "
                            f"save_pretrained; re-save the model with save_pretrained")
    if not isinstance(getattr(diffusers, name, None), type):
        raise InputError(f"{config_file} names class {name!r}, which diffusers {diffusers.__version__} does not "
                         f"have; use a diffusers version that has it, or one of the supported classes: "
                         f"{', '.join(model_inputs.supported_classes())}")
    model_inputs.builder_for(name)  # a clear error naming the supported classes
    return name


def load_folder(path: str | Path) -> torch.nn.Module:
    """The diffusers model saved in ``path`` (``from_pretrained``), in eval mode."""
    cls = getattr(diffusers, folder_class_name(path))
    try:
        model = cls.from_pretrained(str(Path(path).expanduser()))
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ArtefactError(f"cannot load {cls.__name__} from {path}: {first}; the folder needs the config.json "
                            f"and weights (diffusion_pytorch_model.safetensors) that save_pretrained writes") from e
    return model.eval()


def load_model(name: str | Path) -> torch.nn.Module:
    """The model of a workload: a diffusers model folder's saved model, shipped weights for ``vdt-s``,
    seeded random weights otherwise."""
    if is_model_folder(name):
        return load_folder(name)
    name = str(name)
    if looks_like_path(name):
        raise ArtefactError(f"no folder {name}: --model takes a shipped name ({', '.join(WORKLOADS)}) or the path of "
                            f"an existing diffusers model folder (save_pretrained)")
    if name.startswith("vdt-"):
        from . import models

        if name not in models.CONFIGS:
            raise GraphpassError(f"unknown model {name!r}; known: {', '.join(WORKLOADS)}")
        if models.weights_path(name).is_file() or name == "vdt-s":
            return models.load(name)
        return randomise_zero_init(models.create(name))
    if name == "latte-tiny":
        from diffusers import LatteTransformer3DModel

        torch.manual_seed(0)
        return LatteTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                       num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=16,
                                       caption_channels=16, num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                                       video_length=4).eval()
    raise GraphpassError(f"unknown model {name!r}; known: {', '.join(WORKLOADS)}, or the path of a diffusers "
                         f"model folder (save_pretrained)")


def check_samplable(model: torch.nn.Module, kwargs: dict[str, Any]) -> None:
    """Check that the evaluation sampler (``analyze``, ``search``, ``bench``) can sample videos with a diffusers
    ``model`` called as ``kwargs``: it draws a 5-D latent video of the input's channels and takes the noise
    prediction from the first of the output's channels, so the latents must be 5-D (not packed into tokens)
    and the model must predict at least as many channels as it takes (not image or control latents
    concatenated to the input).

    >>> check_samplable(load_model("latte-tiny"), example_call("latte-tiny", num_steps=2)[1])  # in 4, out 8
    """
    name = type(model).__name__
    x = kwargs["hidden_states"]
    if x.dim() != 5:
        raise InputError(f"{name} takes its latents packed as {x.dim()}-D tokens {tuple(x.shape)}; analyze, search and "
                         f"bench sample 5-D latent videos: optimize it inside its pipeline instead "
                         f"(graphpass.optimize_pipeline, or pipe.transformer = graphpass.optimize(...))")
    cfg = model.config
    c_in, c_out = cfg.get("in_channels"), cfg.get("out_channels") or cfg.get("in_channels")
    if c_in is not None and c_out < c_in:
        raise InputError(f"{name} takes {c_in} input channels but predicts {c_out}: its pipeline concatenates "
                         f"conditioning (image, mask or control latents) to the noisy latents, which the sampler of "
                         f"analyze, search and bench does not make; optimize it inside its pipeline instead "
                         f"(graphpass.optimize_pipeline)")


def randomise_zero_init(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """Give adaLN-Zero's zero-initialised parameters small random values, so a random-weight model's
    attention actually reaches its output (with zeros every block is the identity and the output is 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def vdt_example_kwargs(model: torch.nn.Module, batch: int = 2, timestep: float = 981.0) -> dict[str, Any]:
    """One call of a VDT model as the sampler makes it (batch 2 = one video with batched guidance)."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(batch, cfg.num_frames, cfg.in_channels, cfg.image_size, cfg.image_size,
                                          generator=g),
                timestep=torch.full((batch,), float(timestep)),
                encoder_hidden_states=torch.zeros(batch, cfg.cond_len, dtype=torch.long),
                cond_mask=torch.zeros(batch, cfg.num_frames))


def example_call(name: str | Path, batch: int = 2, num_steps: int = 50
                 ) -> tuple[torch.nn.Module, dict[str, Any], list[float]]:
    """(model, example keyword arguments of one call, the sampler's timesteps for ``num_steps``).

    For a diffusers model folder the call is built from the model's config
    (:func:`graphpass.model_inputs.example_inputs`, default small latent size) at the first of the family's
    timesteps (:func:`graphpass.model_inputs.timesteps_for`), computed without diffusers' schedulers as the
    family's default scheduler spaces them: DDIM 'leading' spacing on 0..1000 for DDPM-trained models
    (CogVideoX, ConsisID, Latte, Allegro), shifted flow-matching ``1000 * sigma`` for flow models (Wan family,
    HunyuanVideo, LTX-Video, EasyAnimate, SANA-Video, Kandinsky 5; Mochi's reversed), EDM's ``0.25 log sigma``
    for Cosmos.
    """
    from .models.sampler import ddim_timesteps

    if is_model_folder(name):
        model = load_folder(name)
        kwargs, timesteps = model_inputs.example_inputs(model, batch, num_steps)
        return model, kwargs, timesteps
    name = str(name)
    model = load_model(name)
    timesteps = [float(t) for t in ddim_timesteps(num_steps)]
    g = torch.Generator().manual_seed(0)
    if name.startswith("vdt-"):
        kwargs = vdt_example_kwargs(model, batch, timesteps[0])
    else:
        kwargs = dict(hidden_states=torch.randn(batch, 4, 4, 8, 8, generator=g),
                      timestep=torch.full((batch,), int(timesteps[0]), dtype=torch.long),
                      encoder_hidden_states=torch.randn(batch, 5, 16, generator=g), return_dict=False)
    return model, kwargs, timesteps
