"""The eager runner of a phase graph reads the model's own weights as plain attributes: no
``nn.Module.__getattr__`` walk per weight and call, the same tensors (an in-place weight update shows in the
next call, as in the model), and outputs equal to the model's."""
from __future__ import annotations

import torch

import graphpass
from graphpass.eval.harness import ComputeAll
from technique_loops import tiny


def test_eager_runner_reads_the_models_weights_without_module_lookups(monkeypatch):
    model, kw = tiny("wan")
    opt = graphpass.optimize(model, ComputeAll(), example_kwargs=kw, hoist=False)
    with torch.no_grad():
        assert torch.equal(opt(**kw)[0], model(**kw)[0])
        lookups = []
        original = torch.nn.Module.__getattr__

        def counted(self, name):
            lookups.append(name)
            return original(self, name)

        monkeypatch.setattr(torch.nn.Module, "__getattr__", counted)
        (runner,) = opt._runners.values()
        flat = opt.signature.flatten_call(kw)
        runner(*flat)
        monkeypatch.undo()
        assert lookups == []
        # the same tensors: an in-place update of a weight is what the next call computes with
        model.proj_out.bias.add_(1.0)
        later = dict(kw, timestep=kw["timestep"] + 1)
        assert torch.equal(opt(**later)[0], model(**later)[0])
    # the captured graph itself still walks the modules (what the runner saves)
    monkeypatch.setattr(torch.nn.Module, "__getattr__", counted)
    with torch.no_grad():
        opt.captured.gm(*flat)
    monkeypatch.undo()
    assert len(lookups) > 100
