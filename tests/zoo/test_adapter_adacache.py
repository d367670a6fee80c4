"""AdaCache on models with modules between their blocks, against a chain-level residual reference.

Wan-Animate adds a face adapter's output to the hidden state after every ``inject_face_latents_blocks``-th block,
ConsisID an identity cross-attention after every ``cross_attn_interval``-th block, and WanVACE a control block's
hint after each block of ``vace_layers``. The per-block reference of tests/zoo/test_zoo.py skips blocks one by one
and would still run those modules; graphpass skips the whole chain, so the reference here does too.

:class:`SpanResidualReuse` is written from the models' sources, not from graphpass's span: each case names the
span's blocks, the modules inside it that add to the hidden state (*adders*), and where the span ends, with the
reason read from the model's ``forward``. On a compute step the model runs and the span keeps, per hidden state,
``end - start``; on a reuse step the blocks pass their hidden states through, the adders add zeros (their work is
skipped: their contribution of the last compute step is in the residual), and the end becomes
``start + kept residual``. graphpass's AdaCache with a fixed decision sequence must give the same
outputs within 1e-5 relative over a 10-step loop; its always-compute sequence equals eager bit for bit.

    cd <repo> && python -m pytest tests/zoo/test_adapter_adacache.py -q -p no:xdist
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
import pytest
import torch

from graphpass import FrozenAdaCache
from graphpass.runtime.adaptive import ResidualModel
from zoo import ZOO
from zoo._harness import RTOL, STEPS, ChainResidualReuse, captured, loop, rel

torch.set_num_threads(1)

STEPS_10 = STEPS[:10]
DECISIONS = "CCRCRRCCRC"  # a reuse after one compute, two reuses in a row, a reuse at the end


@dataclass(frozen=True)
class Span:
    """The chain a reuse step skips, read from the model's source.

    blocks: the transformer blocks of the chain, in call order; the first one's hidden-state arguments are
        where the chain starts (one per hidden state the block returns).
    adders: modules inside the chain whose output the model adds to a hidden state between blocks.
    end: ``(path, "output")`` when the chain ends with that block's outputs, ``(path, "input")`` when it ends
        with the first argument of the module that follows it (a term added after the last block).
    why: the reason, with the lines of the model's ``forward`` it comes from.
    """

    blocks: tuple[str, ...]
    adders: tuple[str, ...]
    end: tuple[str, str]
    why: str


SPANS = {
    "wan-animate": Span(
        ("blocks.0", "blocks.1"), ("face_adapter.0",), ("blocks.1", "output"),
        "WanAnimateTransformer3DModel.forward: `hidden_states = block(...)`, then for block_idx % "
        "inject_face_latents_blocks == 0 `hidden_states = face_adapter[block_idx // ...](hidden_states, "
        "motion_vec) + hidden_states`. With 2 blocks and inject_face_latents_blocks=2 the adapter runs after "
        "blocks.0 on its output and blocks.1 reads the sum: inside the chain. None runs after blocks.1 (1 % 2), "
        "so the chain ends at its output. motion_vec comes from face_pixel_values alone and runs every step."),
    "consisid": Span(
        ("transformer_blocks.0", "transformer_blocks.1"), ("perceiver_cross_attention.0",),
        ("transformer_blocks.1", "output"),
        "ConsisIDTransformer3DModel.forward: blocks return (hidden_states, encoder_hidden_states); for i % "
        "cross_attn_interval == 0 `hidden_states = hidden_states + local_face_scale * "
        "perceiver_cross_attention[ca_idx](valid_face_emb, hidden_states)`. With 2 blocks and interval 2 it "
        "runs after block 0 only: inside the chain. Both streams leave the last block (the text tokens are "
        "concatenated back before norm_final), so both are cached. valid_face_emb comes from the face inputs "
        "alone and runs every step."),
    "wan-vace": Span(
        ("blocks.0", "blocks.1"), ("vace_blocks.0", "vace_blocks.1"), ("norm_out", "input"),
        "WanVACETransformer3DModel.forward: the control blocks run first, vace_blocks.0 reading the hidden "
        "state entering the main blocks (proj_in(control) + hidden_states), and each returns (hint, control); "
        "after each main block i in vace_layers `hidden_states = hidden_states + hint_i * scale_i`. With "
        "vace_layers=[0, 1] and 2 blocks the last hint is added after blocks.1, so the chain ends where "
        "norm_out reads the hidden state; every hint depends on the chain's input: the control blocks are "
        "skipped with it."),
}


class SpanResidualReuse:
    """Reuse one residual per hidden state over a span of the model's forward (see :class:`Span`); set
    ``reuse`` before each call.

    Compute step: everything runs; the first block's hidden-state arguments (``start``) and the span's end
    are recorded, and ``residual = end - start``. Reuse step: blocks return their hidden-state arguments,
    adders return zeros shaped like their last output (so ``h + adder(h)`` is ``h``), and the end becomes
    ``start + residual``. Example: blocks ``b0, b1``, adder ``a`` between them, ``h1 = b0(h0); h2 = h1 + a(h1);
    h3 = b1(h2)``: a reuse step gives ``h3 = h0 + (h3' - h0')`` with the primes of the last compute step.
    """

    def __init__(self, model: torch.nn.Module, span: Span):
        self.model, self.span = model, span
        self.reuse = False
        self.start: tuple[torch.Tensor, ...] = ()
        self.residual: tuple[torch.Tensor, ...] = ()
        self.arity: dict[str, int] = {}
        self.zeros: dict[str, object] = {}
        for path in span.blocks:
            block = model.get_submodule(path)
            block.forward = self._block(path, block.forward)
        for path in span.adders:
            adder = model.get_submodule(path)
            adder.forward = self._adder(path, adder.forward)
        path, where = span.end
        if where == "input":
            model.get_submodule(path).register_forward_pre_hook(self._end_input)

    def _block(self, path: str, forward):
        signature = inspect.signature(forward)
        first, last = path == self.span.blocks[0], path == self.span.blocks[-1]
        ends_here = self.span.end == (path, "output")

        def wrapped(*args, **kwargs):
            inputs = list(signature.bind(*args, **kwargs).arguments.values())
            if self.reuse:
                n = self.arity[path]
                if first:
                    self.start = tuple(inputs[:n])
                outs = tuple(inputs[:n])
                if ends_here:
                    outs = tuple(s + r for s, r in zip(self.start, self.residual))
                return outs if n > 1 else outs[0]
            out = forward(*args, **kwargs)
            outs = out if isinstance(out, tuple) else (out,)
            self.arity[path] = len(outs)
            if first:
                self.start = tuple(inputs[:len(outs)])
            if last and ends_here:
                self.residual = tuple(o - s for o, s in zip(outs, self.start))
            return out

        return wrapped

    def _adder(self, path: str, forward):
        def wrapped(*args, **kwargs):
            if self.reuse:
                return self.zeros[path]
            out = forward(*args, **kwargs)
            self.zeros[path] = tuple(torch.zeros_like(o) for o in out) if isinstance(out, tuple) else \
                torch.zeros_like(out)
            return out

        return wrapped

    def _end_input(self, module, args):
        if self.reuse:
            return (self.start[0] + self.residual[0], *args[1:])
        self.residual = (args[0] - self.start[0],)
        return None


def _reference_outputs(name: str, decisions: str) -> list[torch.Tensor]:
    case = ZOO[name]
    model = case.build()  # wrapped forwards: not the captured model
    ref = SpanResidualReuse(model, SPANS[name])
    calls = iter(decisions)

    def call(**kw):
        ref.reuse = next(calls) == "R"
        return model(**kw)

    return loop(case, call, case.kwargs(), STEPS_10)


@functools.lru_cache(maxsize=None)  # shared by the tests of a case; they do not modify the outputs
def _graphpass_outputs(name: str, decisions: str) -> list[torch.Tensor]:
    case = ZOO[name]
    model, cap, regions = captured(name)
    opt = ResidualModel(model, cap, regions, FrozenAdaCache(decisions))
    opt.plan(STEPS_10)
    return loop(case, opt, case.kwargs(), STEPS_10)


@functools.lru_cache(maxsize=None)
def _eager(name: str) -> list[torch.Tensor]:
    case = ZOO[name]
    return loop(case, case.build(), case.kwargs(), STEPS_10)


@pytest.mark.parametrize("name", sorted(SPANS))
def test_always_compute_equals_eager(name):
    eager = _eager(name)
    assert all(torch.equal(a, b) for a, b in zip(_graphpass_outputs(name, "C" * len(STEPS_10)), eager))


@pytest.mark.parametrize("name", sorted(SPANS))
def test_reference_with_no_reuse_is_eager(name):
    """The reference's hooks change nothing on compute steps (so a difference comes from reuse steps)."""
    eager = _eager(name)
    assert all(torch.equal(a, b) for a, b in zip(_reference_outputs(name, "C" * len(STEPS_10)), eager))


@pytest.mark.parametrize("name", sorted(SPANS))
def test_decisions_equal_the_chain_reference(name):
    got = _graphpass_outputs(name, DECISIONS)
    assert rel(got, _reference_outputs(name, DECISIONS)) <= RTOL
    assert rel(got, _eager(name)) > 1e-4  # reuse changed the outputs: the comparison can fail


@pytest.mark.parametrize("name", sorted(SPANS))
def test_the_per_block_reference_is_another_computation(name):
    """Reusing each block's residual while the modules between blocks run on every step (the per-block
    reference of test_zoo.py) differs from the chain by more than 1e-4: the comparison above tells the two
    apart, so it checks that graphpass's chain holds the adders."""
    case = ZOO[name]
    model = case.build()
    ref = ChainResidualReuse(model, list(SPANS[name].blocks))
    calls = iter(DECISIONS)

    def call(**kw):
        ref.reuse = next(calls) == "R"
        return model(**kw)

    assert rel(_graphpass_outputs(name, DECISIONS), loop(case, call, case.kwargs(), STEPS_10)) > 1e-4
