"""graphpass dropped into tiny random diffusers pipelines: one line, full generations, against references.

References are independent of graphpass: the plain pipeline (bit-identical when nothing is reused) and
diffusers' own Pyramid Attention Broadcast hook on the same pipeline, with identifiers set per module so
every attention gets its true kind (read from the model source, see ``tiny_pipelines.py``). diffusers' hook
keeps one state for all cache contexts, so in pipelines that call the transformer separately for cond and
uncond (Wan) the uncond call would reuse the cond call's attention; there the reference is the hook with
one state per context (:class:`PerContextHooks`), as graphpass keeps them.
"""
from __future__ import annotations

import copy
import functools
import json
import re

import pytest
import torch

import graphpass
from graphpass import PAB
from graphpass.runtime.lazy import LazyOptimizedModel
from tiny_pipelines import PIPES, PipeCase

RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def _exact(name: str) -> str:
    return "^" + re.escape(name) + "$"


def hook_config(case: PipeCase, ranges: dict[str, int], window, current):
    """diffusers' PAB config giving each module of ``case.modules`` its kind's range (joint attention is
    PAB's "spatial" kind: 3D full attention with the spatial range, as in the reference code)."""
    from diffusers import PyramidAttentionBroadcastConfig

    by = {"spatial": [], "temporal": [], "cross": []}
    for path, kind in case.modules.items():
        slot = {"joint": "spatial"}.get(kind, kind)
        if slot in by and ranges.get(kind, 1) > 1:
            by[slot].append(_exact(path))
    rng = {slot: max((ranges.get(k, 1) for p, k in case.modules.items() if {"joint": "spatial"}.get(k, k) == slot),
                     default=1) for slot in by}
    return PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=rng["spatial"] if by["spatial"] else None,
        temporal_attention_block_skip_range=rng["temporal"] if by["temporal"] else None,
        cross_attention_block_skip_range=rng["cross"] if by["cross"] else None,
        spatial_attention_timestep_skip_range=window, temporal_attention_timestep_skip_range=window,
        cross_attention_timestep_skip_range=window,
        spatial_attention_block_identifiers=by["spatial"] or [r"^$"],
        temporal_attention_block_identifiers=by["temporal"] or [r"^$"],
        cross_attention_block_identifiers=by["cross"] or [r"^$"],
        current_timestep_callback=current)


class PerContextHooks(torch.nn.Module):
    """diffusers' PAB hook with one state per cache context: one hooked copy of the transformer per context
    name (same weights), chosen by ``cache_context``."""

    def __init__(self, transformer, config):
        super().__init__()
        self.copies = torch.nn.ModuleDict()
        self._template, self._config, self._name = transformer, config, "default"

    def _copy(self, name):
        if name not in self.copies:
            m = copy.deepcopy(self._template)
            m.enable_cache(copy.copy(self._config))
            self.copies[name] = m
        return self.copies[name]

    @property
    def config(self):
        return self._template.config

    @property
    def dtype(self):
        return self._template.dtype

    @property
    def device(self):
        return self._template.device

    def cache_context(self, name, **kwargs):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            prev, self._name = self._name, name
            try:
                yield
            finally:
                self._name = prev
        return ctx()

    def forward(self, **kwargs):
        return self._copy(self._name)(**kwargs)

    def _reset_stateful_cache(self):
        for m in self.copies.values():
            m._reset_stateful_cache()


def hook_run(name: str, ranges: dict[str, int], window, steps=10, **overrides) -> torch.Tensor:
    """Latents of a fresh pipeline ``PIPES[name]()`` with diffusers' PAB hook (one state per context where the
    pipeline calls the transformer per context). Without ``overrides`` each distinct run is made once per
    module (several tests compare against the same one); do not modify the tensor returned."""
    if overrides:
        return _hook_run(name, ranges, window, steps, **overrides)
    return _hook_run_once(name, tuple(sorted(ranges.items())), tuple(window), steps)


@functools.lru_cache(maxsize=None)
def _hook_run_once(name: str, ranges: tuple, window: tuple, steps: int) -> torch.Tensor:
    return _hook_run(name, dict(ranges), window, steps)


def _hook_run(name: str, ranges: dict[str, int], window, steps: int, **overrides) -> torch.Tensor:
    fresh = PIPES[name]()
    pipe = fresh.pipe
    config = hook_config(fresh, ranges, window, lambda: pipe.current_timestep)
    for name in ("transformer", "transformer_2"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        for path, kind in fresh.modules.items():
            # the hook takes a module as cross-attention only if it says so; LTX's attention does not
            module.get_submodule(path).is_cross_attention = kind == "cross"
        if fresh.separate_cfg:
            setattr(pipe, name, PerContextHooks(module, config))
        else:
            module.enable_cache(config)
    return fresh.run(pipe, steps=steps, **overrides)


# --- one line, never reusing: bit-identical ---------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _never_reusing(name: str) -> tuple[torch.Tensor, torch.Tensor, LazyOptimizedModel]:
    """(the plain pipeline's latents, those with the one line and a schedule that never reuses, that optimized
    transformer) over 6 steps, made once per module: the PAB comparison builds on its capture."""
    case = PIPES[name]()
    base = case.run(steps=6)
    kind = next(iter(case.modules.values()))
    case.pipe.transformer = graphpass.optimize(case.pipe.transformer, PAB(**{kind: 2}, window=(2000, 3000)))
    return base, case.run(steps=6), case.pipe.transformer


def one_line(case: PipeCase, schedule: PAB) -> LazyOptimizedModel:
    """``graphpass.optimize(case.pipe.transformer, schedule)``, the one line's lazy model, built at its first
    call with ``with_schedule`` on the capture (and hoisting) the never-reusing check made of the same call
    (the same seeded weights)."""
    never = _never_reusing(case.name)[2].optimized
    return LazyOptimizedModel(case.pipe.transformer, lambda kwargs: never.with_schedule(schedule))


@pytest.mark.parametrize("name", ["cogvideox", "cogvideox-rope", "latte", "wan", "hunyuanvideo", "ltx", "wan-ti2v"])
def test_one_line_never_reusing_is_bit_identical(name):
    base, got, opt = _never_reusing(name)
    assert torch.equal(got, base)
    assert opt.phase_calls  # the graphs ran, not the model


# --- PAB against diffusers' hook --------------------------------------------------------------------

PAB_CASES = {
    "cogvideox": dict(joint=2),
    "latte": dict(spatial=2, temporal=3, cross=4),
    "wan": dict(joint=2, cross=3),
    "hunyuanvideo": dict(joint=2),
    "ltx": dict(joint=2, cross=3),
    "cogvideox-rope": dict(joint=2),
    "wan-ti2v": dict(joint=2, cross=3),
}


@pytest.mark.parametrize("name", list(PAB_CASES))
def test_pab_equals_diffusers_hook(name):
    ranges = PAB_CASES[name]
    case = PIPES[name]()
    window = (100, 900) if case.pipe.scheduler.__class__.__name__.startswith("FlowMatch") else (100, 800)
    ref = hook_run(name, ranges, window, steps=10)
    case.pipe.transformer = one_line(case, PAB(**ranges, window=window))
    got = case.run(steps=10)
    assert _rel(got, ref) <= RTOL
    opt = case.pipe.transformer
    reused = sum(len(ph.reused) for ctx in ("default", "cond", "uncond", "cond_uncond")
                 for _, ph in opt.state(ctx).trace)
    assert reused > 0  # the window covered some steps: the comparison is not vacuous


def test_two_expert_pipeline_optimizes_and_plans_both():
    """Wan 2.2: optimize_pipeline optimizes transformer and transformer_2 and plans each over the steps the
    pipeline gives it (split at the boundary); equal to the hook on both experts."""
    ranges, window = PAB_CASES["wan"], (100, 900)
    case = PIPES["wan-2experts"]()
    graphpass.optimize_pipeline(case.pipe, PAB(**ranges, window=window))
    got = case.run(steps=10)
    ts = [float(t) for t in case.pipe.scheduler.timesteps]
    high = [t for t in ts if t >= 875]
    assert case.pipe.transformer.current_plan.timesteps == high
    assert case.pipe.transformer_2.current_plan.timesteps == [t for t in ts if t < 875]
    assert 0 < len(high) < len(ts)
    assert _rel(got, hook_run("wan-2experts", ranges, window, steps=10)) <= RTOL


def test_wan_hook_as_shipped_mixes_cond_and_uncond():
    """diffusers' hook as shipped keeps one state for cond and uncond: on Wan the uncond call reuses the cond
    call's attention, so it differs from the per-context reference graphpass matches."""
    ranges, window = PAB_CASES["wan"], (100, 900)
    per_context = hook_run("wan", ranges, window)
    shipped = PIPES["wan"]()
    pipe = shipped.pipe
    pipe.transformer.enable_cache(hook_config(shipped, ranges, window, lambda: pipe.current_timestep))
    assert _rel(shipped.run(pipe), per_context) > 1e-3


# --- schedules on the trajectory (flow matching) ----------------------------------------------------

#: PAB with Wan's ranges over the middle 70% of any trajectory.
PROGRESS = PAB(joint=2, cross=3, window=(0.15, 0.85), window_unit="progress")


@functools.lru_cache(maxsize=None)
def _wan_progress_planned() -> tuple[PipeCase, torch.Tensor]:
    """(the Wan pipeline optimized with ``optimize_pipeline`` for :data:`PROGRESS`, the latents of its 10-step
    generation), made once per module; read it, do not run it again."""
    case = PIPES["wan"]()
    graphpass.optimize_pipeline(case.pipe, PROGRESS)
    return case, case.run(steps=10)


def test_progress_window_reuses_the_middle_of_a_flow_matching_trajectory():
    """Wan's shifted flow-matching timesteps sit mostly above 800, so a timestep window (100, 800) covers
    few steps; a progress window covers the same fraction of steps on any sampler. Reference: diffusers'
    hook with the timestep window that selects exactly those steps."""
    steps, (lo, hi) = 10, PROGRESS.window
    case, got = _wan_progress_planned()
    ts = [float(t) for t in case.pipe.scheduler.timesteps]
    inside = [i for i in range(steps) if lo < i / (steps - 1) < hi]
    assert inside == list(range(2, 8))
    assert sum(1 for t in ts if 100 < t < 800) <= 3  # the published window would cover these only
    window = (ts[inside[-1] + 1], ts[inside[0] - 1])  # exclusive bounds around steps 2..7
    ref = hook_run("wan", PAB_CASES["wan"], window, steps=steps)
    assert _rel(got, ref) <= RTOL
    trace = case.pipe.transformer.state("cond").trace
    # reuse inside steps 2..7 where the call counter is not a multiple of the range: joint (2) at 3, 5, 7;
    # cross (3) at 2, 4, 5, 7
    assert [i for i, (_, ph) in enumerate(trace) if ph.reused] == [2, 3, 4, 5, 7]


def test_progress_window_from_cache_context_info_in_the_one_line_form():
    """Wan's pipeline passes step_index and num_inference_steps to cache_context: enough for progress
    windows without optimize_pipeline; the result equals the planned form."""
    b = PIPES["wan"]()
    b.pipe.transformer = graphpass.optimize(b.pipe.transformer, PROGRESS)
    assert torch.equal(_wan_progress_planned()[1], b.run(steps=10))


def test_progress_window_without_trajectory_says_how():
    case = PIPES["cogvideox"]()  # its pipeline passes no step_index to cache_context
    case.pipe.transformer = one_line(case, PAB(joint=2, window=(0.1, 0.9), window_unit="progress"))
    with pytest.raises(graphpass.ScheduleError, match="optimize_pipeline"):
        case.run(steps=4)


def test_generations_with_other_step_counts_are_replanned():
    """optimize_pipeline plans every generation from the scheduler: 10 then 20 steps in a row, each equal
    to the hook on a fresh pipeline."""
    ranges, window = PAB_CASES["latte"], (100, 800)
    case = PIPES["latte"]()
    graphpass.optimize_pipeline(case.pipe, PAB(**ranges, window=window))
    for steps in (10, 20):
        got = case.run(steps=steps)
        assert len(case.pipe.transformer.current_plan) == steps
        assert _rel(got, hook_run("latte", ranges, window, steps=steps)) <= RTOL


def test_stale_plan_warns_and_stays_pab():
    """A plan made for 10 steps, run with 20: the run leaves the plan, says so, and goes on step by step
    (still equal to the hook)."""
    ranges, window = PAB_CASES["latte"], (100, 800)
    case = PIPES["latte"]()
    case.pipe.transformer = one_line(case, PAB(**ranges, window=window))
    case.pipe.scheduler.set_timesteps(10)
    case.pipe.transformer.plan(case.pipe.scheduler.timesteps)
    with pytest.warns(UserWarning, match="leaves the plan"):
        got = case.run(steps=20)
    assert _rel(got, hook_run("latte", ranges, window, steps=20)) <= RTOL


# --- what pipelines read and do -------------------------------------------------------------------

def test_face_config_dtype_device_before_and_after_capture():
    case = PIPES["wan"]()
    model = case.pipe.transformer
    opt = graphpass.optimize(model, "pab246")
    assert opt.config is model.config and opt.config.patch_size == model.config.patch_size
    assert opt.dtype == torch.float32 and opt.device == torch.device("cpu")
    assert isinstance(opt, type(model)) and isinstance(opt, graphpass.runtime.lazy.LazyOptimizedModel)
    with pytest.raises(graphpass.InputError, match="first call"):
        opt.inspect()


def test_save_pretrained_saves_the_original_transformer(tmp_path):
    from diffusers import LatteTransformer3DModel

    case = PIPES["latte"]()
    original = case.pipe.transformer
    case.pipe.transformer = graphpass.optimize(original, PAB(**PAB_CASES["latte"]))
    case.run(steps=3)
    case.pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "LatteTransformer3DModel"]
    loaded = LatteTransformer3DModel.from_pretrained(tmp_path / "transformer")
    for (k, a), (k2, b) in zip(original.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_pipe_to_bfloat16_recaptures():
    """pipe.to(torch.bfloat16) after optimizing: the next generation captures again in bf16 and equals the
    plain pipeline in bf16 (nothing reused)."""
    plain = PIPES["cogvideox"]()
    plain.pipe.to(torch.bfloat16)
    base = plain.run(steps=4, prompt_embeds=plain.kwargs["prompt_embeds"].bfloat16(),
                     negative_prompt_embeds=plain.kwargs["negative_prompt_embeds"].bfloat16())
    case = PIPES["cogvideox"]()
    case.pipe.transformer = graphpass.optimize(case.pipe.transformer, PAB(joint=2, window=(2000, 3000)))
    case.run(steps=2)  # captured in fp32
    case.pipe.to(torch.bfloat16)
    assert case.pipe.transformer.dtype == torch.bfloat16
    got = case.run(steps=4, prompt_embeds=case.kwargs["prompt_embeds"].bfloat16(),
                   negative_prompt_embeds=case.kwargs["negative_prompt_embeds"].bfloat16())
    assert got.dtype == torch.bfloat16 and torch.equal(got, base)
    assert case.pipe.transformer.captured.input_specs[0].dtype == torch.bfloat16


def test_batch_changes_between_generations():
    """Captured with batched guidance (batch 2), then guidance off (batch 1) and two prompts (batch 4), one
    generation after the other: each equals the hook on the same call."""
    ranges, window = PAB_CASES["cogvideox"], (100, 800)
    case = PIPES["cogvideox"]()
    pe, ne = case.kwargs["prompt_embeds"], case.kwargs["negative_prompt_embeds"]
    changes = {"guidance-off": (dict(guidance_scale=1.0), 1),
               "two-prompts": (dict(prompt_embeds=torch.cat([pe, ne]), negative_prompt_embeds=torch.cat([ne, pe])), 2)}
    case.pipe.transformer = one_line(case, PAB(**ranges, window=window))
    case.run(steps=3)
    for change, (overrides, batch) in changes.items():
        got = case.run(steps=10, **overrides)
        assert got.shape[0] == batch, change
        assert _rel(got, hook_run("cogvideox", ranges, window, steps=10, **overrides)) <= RTOL, change


def test_adacache_in_a_pipeline_runs_and_reuses():
    case = PIPES["latte"]()
    base = case.run(steps=20)
    graphpass.optimize_pipeline(case.pipe, graphpass.AdaCache(codebook={0.5: 3, 1.0: 2}))
    got = case.run(steps=20)
    decisions = case.pipe.transformer.decisions()
    assert "R" in decisions and decisions[0] == "C"
    assert torch.isfinite(got).all() and got.shape == base.shape
