"""The package's structure: every module imports alone, the import graph is acyclic and follows the layers of
DEVELOPERS.md, techniques are found through the registry, and the worked example of docs/architecture.md
(a technique in one module) optimizes a tiny model like a hand-written reference, exports and loads.
"""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import graphpass
from conftest import first, make_case, run_loop
from graphpass import PAB, AdaCache, FrozenAdaCache, ScheduleError
from graphpass.runtime.inspection import _fmt_bytes
from graphpass.schedules.base import Schedule
from graphpass.techniques import Technique, register, technique_for
from graphpass.techniques.base import StaticPlan, tagged_regions

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "graphpass"

#: Layers, lowest first: a module imports only from its own layer or lower ones (DEVELOPERS.md, "Layers").
LAYERS = [
    {"errors", "version"},
    {"models", "model_inputs", "workloads"},  # the models and their inputs know nothing of the compiler
    {"schedules"},  # data
    {"passes"},  # graphs; they read phases and never run a schedule
    {"techniques"},  # schedules + passes
    {"runtime"},  # techniques + backends
    {"exporters"},
    {"api", "pipelines"},
    {"eval", "demo"},
    {"commands", "cli"},
    {"graphpass"},  # the package's __init__: the public API
]
RANK = {part: i for i, layer in enumerate(LAYERS) for part in layer}
#: Six sampling steps, all inside the PAB window used below.
TS = [741.0 - 120 * i for i in range(6)]


# --- the import graph ------------------------------------------------------------------------------
def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (packages by their __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The package module that ``name`` (a module, or a name inside one) lives in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> set[str]:
    """Package modules ``module`` imports anywhere in its file: at module level, inside functions and under
    ``if TYPE_CHECKING``, relative or absolute; ``from X import name`` counts as importing ``X.name`` when
    that is a module."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names]
        else:
            continue
        out.update(r for r in map(_resolve, (t for t in targets if t.split(".")[0] == "graphpass")) if r)
    out.discard(module)
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "graphpass"


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_import_graph_reader_sees_late_and_type_checking_imports(tmp_path):
    # the reader must see what the checks below rely on: a function-level import and a TYPE_CHECKING one
    path = tmp_path / "probe.py"
    path.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..runtime.executor import X\n"
                    "def f():\n    from ..schedules import pab\n    import graphpass.passes.tag\n")
    assert _imports("graphpass.exporters.probe", path) == {
        "graphpass.runtime.executor", "graphpass.schedules.pab", "graphpass.passes.tag"}
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_import_graph_is_acyclic():
    assert len(GRAPH) > 50 and sum(map(len, GRAPH.values())) > 200  # the whole package was read
    cycle = _find_cycle(GRAPH)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_imports_follow_the_layers():
    assert {_layer(m) for m in MODULES} <= set(RANK), "a new top-level module needs a layer in LAYERS"
    upward = sorted(f"{m} -> {d}" for m, deps in GRAPH.items() for d in deps if RANK[_layer(d)] > RANK[_layer(m)])
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


@pytest.mark.parametrize("lower, forbidden", [
    ("models", {"schedules", "passes", "techniques", "runtime", "exporters", "eval", "api"}),
    ("schedules", {"passes", "techniques", "runtime", "exporters", "eval", "api"}),
    ("passes", {"techniques", "runtime", "exporters", "eval", "api"}),
    ("techniques", {"runtime", "exporters", "eval", "api"}),
    ("runtime", {"exporters", "eval", "commands", "api", "pipelines"}),
    ("exporters", {"eval", "commands", "api"}),
])
def test_layer_rules_of_developers_md(lower, forbidden):
    bad = sorted(f"{m} -> {d}" for m, deps in GRAPH.items() if _layer(m) == lower for d in deps
                 if _layer(d) in forbidden)
    assert not bad, "\n".join(bad)


_IMPORT_EACH = """
import importlib, json, sys, traceback
import torch
torch.set_num_threads(1)
failures, covered = {}, set()
for name in json.loads(sys.argv[1]):  # sorted: a package comes before the modules under it
    if name in covered:
        continue
    for loaded in [m for m in sys.modules if m == "graphpass" or m.startswith("graphpass.")]:
        del sys.modules[loaded]  # a fresh graphpass for each module: it must import alone
    try:
        importlib.import_module(name)
    except Exception:
        failures[name] = traceback.format_exc(limit=3)
        continue
    # Importing a module alone runs its packages' __init__ first, in the same order every time; a module
    # under ``name`` that this import loaded would, imported alone, repeat exactly this import.
    covered.update(m for m in sys.modules if m.startswith(name + "."))
print(json.dumps({"failures": failures, "covered": sorted(covered)}))
"""


def test_every_module_imports_alone():
    # One interpreter (torch imported once), graphpass forgotten before each module. Importing
    # ``graphpass.a.b`` alone imports ``graphpass`` (whose __init__ loads the public API), then
    # ``graphpass.a``, then ``b``: a module that its packages' imports already load is imported alone by
    # them, so it is not imported again (graphpass alone loads about 50 of the 80-odd modules).
    names = sorted(MODULES)
    done = subprocess.run([sys.executable, "-c", _IMPORT_EACH, json.dumps(names)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert not report["failures"], "\n".join(f"{n}:\n{tb}" for n, tb in report["failures"].items())
    alone = [n for n in names if n not in report["covered"]]
    assert "graphpass" in alone and "graphpass.cli" in alone and "graphpass.eval.harness" in alone, alone
    assert set(report["covered"]) <= set(names)  # nothing outside the package was counted as checked


#: What the code that picks or runs a technique holds: asking one of them for an attribute by name is sniffing.
_TECHNIQUE_OBJECTS = {"opt", "schedule", "phase", "technique", "policy", "target", "runtime"}


def test_no_attribute_sniffing_where_techniques_are_chosen():
    # optimize, the evaluation harness, export, inspection and the runtime ask the registry
    sniffing = []
    for module, path in MODULES.items():
        for n in ast.walk(ast.parse(path.read_text())):
            if (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("hasattr", "getattr")
                    and len(n.args) > 1 and isinstance(n.args[0], ast.Name) and n.args[0].id in _TECHNIQUE_OBJECTS
                    and isinstance(n.args[1], ast.Constant)):  # a named attribute (proxies pass names through)
                sniffing.append(f"{module}:{n.lineno} {ast.unparse(n)}")
    assert not sniffing, "\n".join(sniffing)
    assert not [m for m, p in MODULES.items() if "runtime_class" in p.read_text()]


# --- the registry ----------------------------------------------------------------------------------
def test_registry_serves_builtin_schedules_and_subclasses():
    assert technique_for(PAB.preset("pab246")).name == "PAB"
    assert technique_for(AdaCache.preset("slow")).name == "AdaCache"
    assert technique_for(FrozenAdaCache("CCR")).name == "FrozenAdaCache"
    assert technique_for(AdaCache()).export.refusal is not None and technique_for(PAB(spatial=2)).export.refusal is None

    class MyPAB(PAB):  # a subclass is served by its base's technique (MRO walk)
        type_name = "ArchitectureTestPAB"  # its own JSON name: an inherited one would take over "PAB"

    assert technique_for(MyPAB(spatial=2)) is technique_for(PAB(spatial=2))


class _Unregistered(Schedule):
    def kinds(self):
        return set()

    def reuses(self, region, t, counter):
        return False

    def may_reuse_next(self, region, t, counter):
        return False

    def to_dict(self):
        return {}

    @classmethod
    def from_dict(cls, d):
        return cls()


def test_unregistered_schedule_is_a_clear_error_before_capture():
    with pytest.raises(ScheduleError, match=r"no caching technique is registered for _Unregistered.*register"):
        technique_for(_Unregistered())
    case = make_case("vdt")
    with pytest.raises(ScheduleError, match="_Unregistered"):
        graphpass.optimize(case.model, _Unregistered(), example_kwargs=case.kwargs())


def test_a_served_type_cannot_get_a_second_technique():
    other = Technique(name="OtherPAB", schedules=(PAB,), target=tagged_regions, specialize=lambda c, t, p: None,
                      policy=lambda s, t, c: StaticPlan(s, t))
    with pytest.raises(ScheduleError, match="already served by the technique 'PAB'"):
        register(other)
    assert technique_for(PAB(spatial=2)).name == "PAB"


# --- one cache-freeing rule ------------------------------------------------------------------------
def test_inspect_reports_the_cache_the_runtime_holds():
    # inspect() simulates the plan with the runtime's freeing rule; the runtime measures what it holds
    case = make_case("vdt")
    opt = graphpass.optimize(case.model, PAB(spatial=2, cross=3, window=(100, 800)), example_kwargs=case.kwargs(),
                             timesteps=TS)
    kw, held = case.kwargs(), []
    x = kw["hidden_states"]
    with torch.no_grad():
        for t in TS:
            out = first(opt(**dict(kw, hidden_states=x, timestep=torch.full_like(kw["timestep"], t))))
            held.append(opt.cache_nbytes)
            x = x - 0.1 * out[tuple(slice(0, s) for s in x.shape)]  # conftest.step
    reported = re.findall(r"(\d+): t=\s*[\d.]+ P\d+\s+([\d.]+ (?:B|KiB|MiB|GiB))", opt.inspect())
    assert [int(i) for i, _ in reported] == list(range(len(TS)))
    assert [b for _, b in reported] == [_fmt_bytes(h) for h in held]
    assert len(set(held)) > 2 and held[-1] == 0  # the cache grew, shrank and was emptied


# --- the worked example of docs/architecture.md ----------------------------------------------------
def _doc_module() -> types.ModuleType:
    """The technique module written out in docs/architecture.md, executed as a module of its own."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    section = doc[doc.index("## How to add a technique"):]
    source = next(b for b in re.findall(r"```python\n(.*?)```", section, re.S) if not b.startswith(">>>"))
    module = types.ModuleType("every_other")
    sys.modules[module.__name__] = module  # dataclasses resolve annotations through sys.modules
    exec(compile(source, "docs/architecture.md", "exec"), module.__dict__)
    return module


EXAMPLE = _doc_module()


class BlockResidualReference:
    """Every VDT block wrapped: at a compute step it runs and its residual (output - input) is kept; at a reuse
    step it returns its input plus the kept residual."""

    def __init__(self, model: torch.nn.Module):
        self.reuse = False
        self.kept: dict[int, torch.Tensor] = {}
        for i, block in enumerate(model.blocks):
            block.forward = self._wrap(i, block.forward)

    def _wrap(self, i, forward):
        def wrapped(x, *args, **kwargs):
            if self.reuse:
                return x + self.kept[i]
            out = forward(x, *args, **kwargs)
            self.kept[i] = out - x
            return out

        return wrapped


def _reference(decisions: str) -> list[torch.Tensor]:
    case = make_case("vdt")
    ref = BlockResidualReference(case.model)
    kw, outs = case.kwargs(), []
    x = kw["hidden_states"]
    with torch.no_grad():
        for t, d in zip(TS, decisions):
            ref.reuse = d == "R"
            out = first(case.model(**dict(kw, hidden_states=x, timestep=torch.full_like(kw["timestep"], t))))
            outs.append(out)
            x = x - 0.1 * out[tuple(slice(0, s) for s in x.shape)]  # conftest.step
    return outs


def _max_diff(xs, ys) -> float:
    return max((a - b).abs().max().item() for a, b in zip(xs, ys))


def test_worked_example_registers_and_runs_like_a_hand_written_reference():
    schedule = EXAMPLE.EveryOther()
    assert technique_for(schedule) is EXAMPLE.EVERY_OTHER
    case = make_case("vdt")
    opt = graphpass.optimize(case.model, schedule, example_kwargs=case.kwargs(), timesteps=TS)
    assert opt.technique.name == "EveryOther" and opt.regions == [opt.span.region]
    assert [ph.label() for ph in opt.current_plan.phases] == ["store 1", "reuse 1"] * 3  # as the doc shows
    outs = run_loop(opt, case.kwargs(), TS)
    assert opt.decisions() == "CRCRCR"
    assert _max_diff(outs, _reference("CRCRCR")) < 1e-5
    assert _max_diff(outs, run_loop(make_case("vdt").model, case.kwargs(), TS)) > 1e-3  # reuse changed it
    assert len(opt.state().cache) == 0  # the last reuse freed the residual


def test_worked_example_exports_and_loads(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    case = make_case("vdt")
    opt = graphpass.optimize(case.model, EXAMPLE.EveryOther(), example_kwargs=case.kwargs(), timesteps=TS)
    folder = graphpass.export(opt, tmp_path / "every-other")
    loaded = graphpass.load(folder)
    assert repr(loaded.schedule) == "EveryOther(start=1)" and len(loaded.specs) == 2
    assert _max_diff(run_loop(loaded, case.kwargs(), TS), run_loop(opt, case.kwargs(), TS)) < 1e-4
    assert loaded.cache_nbytes == 0
