"""PAB decisions, presets and plans, checked on values worked out by hand from the published rule:
at model call ``i`` (0-based) with timestep ``t``, a region of kind ``k`` reuses iff
``lo < t < hi and i % range_k != 0``."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from graphpass import PAB, Action, Phase, schedule_from_json
from graphpass.schedules.pab import PRESETS
from conftest import DDIM_50


def region(path, kind):
    return SimpleNamespace(path=path, kind=kind)


S, T, C, J, M = (region(k[0], k) for k in ("spatial", "temporal", "cross", "joint", "mlp"))


def test_rule_on_known_values():
    s = PAB(spatial=2, temporal=3, cross=6, window=(100, 800))
    # spatial, range 2: reuse at odd calls only
    assert [s.reuses(S, 500, i) for i in range(5)] == [False, True, False, True, False]
    # temporal, range 3: compute at 0, 3, 6
    assert [s.reuses(T, 500, i) for i in range(7)] == [False, True, True, False, True, True, False]
    # cross, range 6
    assert [s.reuses(C, 500, i) for i in range(13)] == [i % 6 != 0 for i in range(13)]
    # the window is open at both ends
    assert not s.reuses(S, 800, 1) and not s.reuses(S, 100, 1)
    assert s.reuses(S, 799.5, 1) and s.reuses(S, 100.5, 1)
    assert not s.reuses(S, 900, 1) and not s.reuses(S, 50, 1)
    # kinds without a range never reuse
    assert not any(s.reuses(r, 500, i) for r in (J, M) for i in range(6))


def test_per_kind_windows():
    s = PAB(spatial=2, cross=6, window=(100, 800), windows={"cross": (300, 950)})
    assert s.window_of("cross") == (300.0, 950.0) and s.window_of("spatial") == (100.0, 800.0)
    assert s.reuses(C, 900, 1) and not s.reuses(S, 900, 1)
    assert s.reuses(S, 200, 1) and not s.reuses(C, 200, 1)


def test_reuse_counts_over_ddim_50():
    # DDIM_50 = 981, 961, ..., 1: t_i = 981 - 20 i, inside (100, 800) for i = 10..44 (35 calls).
    # spatial (range 2) reuses the odd i of 11..43: 17; temporal (3): 35 - 11 multiples of 3 (12..42) = 24;
    # cross (6): 35 - 6 multiples of 6 (12..42) = 29.
    s = PAB.preset("latte")
    counts = {r.kind: sum(s.reuses(r, t, i) for i, t in enumerate(DDIM_50)) for r in (S, T, C)}
    assert counts == {"spatial": 17, "temporal": 24, "cross": 29}


def test_presets_match_published_table():
    # Pyramid Attention Broadcast reference code defaults (Zhao et al. 2024), ranges and (lo, hi) windows.
    table = {
        "open-sora": ((2, 4, 6, None), (450, 930)),
        "latte": ((2, 3, 6, None), (100, 800)),
        "open-sora-plan": ((2, 4, 6, None), (100, 850)),
        "cogvideox": ((None, None, None, 2), (100, 850)),  # 3D full attention, "spatial" range 2
    }
    assert set(PRESETS) == set(table)
    for name, ((sp, te, cr, jo), window) in table.items():
        p = PAB.preset(name)
        assert (p.spatial, p.temporal, p.cross, p.joint, p.mlp) == (sp, te, cr, jo, None), name
        assert p.window == (float(window[0]), float(window[1])), name
    for name, ranges in {"pab246": (2, 4, 6), "PAB357": (3, 5, 7), "pab_579": (5, 7, 9)}.items():
        p = PAB.preset(name)
        assert (p.spatial, p.temporal, p.cross) == ranges and p.window == (100.0, 800.0)
    assert PAB.preset("pab246", window=(450, 930)).window == (450.0, 930.0)
    assert PAB.preset("cogvideox").kinds() == {"joint"}


def _expected_actions(schedule, regions, timesteps):
    """Per step, region path -> action, straight from the definition of a plan: reuse by the rule; store at
    a step that does not reuse when the next one does; compute otherwise."""
    reuse = [{r.path: schedule.reuses(r, t, i) for r in regions} for i, t in enumerate(timesteps)]
    out = []
    for i in range(len(timesteps)):
        acts = {}
        for r in regions:
            if reuse[i][r.path]:
                acts[r.path] = Action.REUSE
            elif i + 1 < len(timesteps) and reuse[i + 1][r.path]:
                acts[r.path] = Action.STORE
            else:
                acts[r.path] = Action.COMPUTE
        out.append(acts)
    return out


def test_plan_stores_exactly_before_reuse():
    s = PAB.preset("latte")
    regions = [region(f"b{b}.{k}", k) for b in range(2) for k in ("spatial", "temporal", "cross")]
    plan = s.plan(regions, DDIM_50)
    assert plan.timesteps == DDIM_50 and len(plan) == 50
    expected = _expected_actions(s, regions, DDIM_50)
    for i, phase in enumerate(plan.phases):
        assert {r.path: phase.action(r.path) for r in regions} == expected[i], f"step {i}"
    for r in regions:
        acts = [ph.action(r.path) for ph in plan.phases]
        for i, a in enumerate(acts):
            if a == Action.REUSE:  # every reuse reads a tensor stored by the run of steps just before it
                assert acts[i - 1] in (Action.STORE, Action.REUSE)
            if a == Action.STORE:  # and every store is read by the next step
                assert acts[i + 1] == Action.REUSE
        # the first reuse of the window reads the output of step 9 (t = 801), computed outside the window
        assert acts[9] == (Action.COMPUTE if r.kind == "spatial" else Action.STORE)
    # the cache is empty before and after the window
    assert plan.phases[0] == Phase(()) and plan.phases[-1] == Phase(())


def test_distinct_phases():
    # spatial only: compute-all outside, then alternately store (even i) and reuse (odd i): 3 phases
    plan = PAB(spatial=2, window=(100, 800)).plan([S, region("s2", "spatial")], DDIM_50)
    assert len(plan.distinct()) == 3
    assert plan.distinct()[0] == Phase(())
    # Latte preset on one region of each kind: the distinct action triples of the hand-derived plan
    s = PAB.preset("latte")
    regions = [S, T, C]
    triples = {tuple(a[r.path] for r in regions) for a in _expected_actions(s, regions, DDIM_50)}
    assert len(s.plan(regions, DDIM_50).distinct()) == len(triples) == 7
    # more blocks of the same kinds do not add phases: they act together
    more = regions + [region(f"x.{r.kind}", r.kind) for r in regions]
    assert len(s.plan(more, DDIM_50).distinct()) == 7


def test_phase_identity():
    a = Phase.of({"x": Action.REUSE, "y": Action.COMPUTE, "w": "store"})
    b = Phase.of({"w": Action.STORE, "x": "reuse"})
    assert a == b and hash(a) == hash(b)
    assert a.actions == (("w", Action.STORE), ("x", Action.REUSE))
    assert a.reused == ("x",) and a.stored == ("w",) and a.action("y") == Action.COMPUTE
    assert Phase.of({}) == Phase(()) and Phase(()).label() == "compute-all"


def test_step_phase_fallbacks():
    s = PAB(spatial=2, window=(100, 800))
    # a reuse whose output nothing computed yet computes instead (and stores if the next call may reuse)
    assert s.step_phase([S], 500, 1, cached=set()) == Phase(())
    assert s.step_phase([S], 500, 1, cached={"s"}) == Phase.of({"s": Action.REUSE})
    # a compute step stores only when the next call could reuse
    assert s.step_phase([S], 500, 2, cached=set()) == Phase.of({"s": Action.STORE})
    assert s.step_phase([S], 500, 3, cached=set()) == Phase(())
    # above the window the next call may fall inside it, below it never
    assert s.step_phase([S], 900, 0, cached=set()) == Phase.of({"s": Action.STORE})
    assert s.step_phase([S], 100, 0, cached=set()) == Phase(())
    assert not s.may_reuse_next(S, 100, 0) and s.may_reuse_next(S, 101, 0)


@pytest.mark.parametrize("name", ["latte", "pab246", "open-sora"])
def test_step_by_step_reuses_as_the_plan(name):
    """Steps arriving one by one (the executor keeping what a phase stores, dropping what it computes)
    reuse exactly what the plan reuses, and store at least what it stores."""
    s = PAB.preset(name)
    regions = [S, T, C]
    plan = s.plan(regions, DDIM_50)
    cached: set[str] = set()
    for i, t in enumerate(DDIM_50):
        ph = s.step_phase(regions, t, i, cached)
        assert ph.reused == plan.phases[i].reused, f"step {i}"
        assert set(plan.phases[i].stored) <= set(ph.stored), f"step {i}"
        for r in regions:
            a = ph.action(r.path)
            if a == Action.STORE:
                cached.add(r.path)
            elif a == Action.COMPUTE:
                cached.discard(r.path)


def test_schedule_subclass_keeps_its_parents_json_name_and_a_taken_name_is_refused():
    """A subclass that does not name itself must not take over its parent's JSON entry, and a name that is
    already another class's is refused."""
    from dataclasses import dataclass

    from graphpass.errors import ScheduleError

    @dataclass
    class QuietPAB(PAB):  # no type_name of its own
        pass

    assert QuietPAB(spatial=2).to_json() == PAB(spatial=2).to_json()
    assert type(schedule_from_json(PAB(spatial=2, window=(100, 800)).to_json())) is PAB
    with pytest.raises(ScheduleError, match="'PAB' .* already used by graphpass.schedules.pab.PAB"):
        @dataclass
        class Impostor(PAB):
            type_name = "PAB"
