"""diffusers' own cache hooks, configured to do what a graphpass schedule does: the rows graphpass is
compared against in benchmarks.

diffusers' ``PyramidAttentionBroadcastConfig`` picks each attention module's kind by ``re.search`` of
identifier patterns against its name (spatial first, then temporal, then cross, the last also requiring
``module.is_cross_attention``). :func:`pab_hook_config` anchors one pattern per module so every module gets
the kind it is given, whatever its name; joint (3D full) attention takes PAB's "spatial" slot, as in the
reference code.

    >>> cfg = pab_hook_config({"transformer_blocks.0.attn1": "joint"}, PAB.preset("cogvideox"),
    ...                       lambda: pipe.current_timestep)
    >>> pipe.transformer.enable_cache(cfg)
"""
from __future__ import annotations

import re
from typing import Callable

from ..errors import ScheduleError
from ..schedules.pab import PAB

#: graphpass kind -> the slot of diffusers' PAB config that serves it.
HOOK_SLOTS = {"spatial": "spatial", "joint": "spatial", "temporal": "temporal", "cross": "cross"}


def pab_hook_config(kinds: dict[str, str], schedule: PAB, current_timestep: Callable[[], float]):
    """diffusers' PAB config applying ``schedule`` to the modules of ``kinds`` (module path -> kind).

    Kinds sharing a slot (spatial and joint) must share a range and a window; kinds the hook has no slot for
    (mlp, text, other) are refused. Only timestep windows: the hook reads the pipeline's current timestep.
    """
    from diffusers import PyramidAttentionBroadcastConfig

    if schedule.needs_trajectory:
        raise ScheduleError("diffusers' PAB hook windows are timesteps; use a PAB with window_unit='timestep'")
    patterns: dict[str, list[str]] = {"spatial": [], "temporal": [], "cross": []}
    setting: dict[str, tuple[int, tuple[float, float]]] = {}
    for path, kind in kinds.items():
        r = schedule.range_of(kind)
        if r <= 1:
            continue
        if kind not in HOOK_SLOTS:
            raise ScheduleError(f"diffusers' PAB hook has no slot for {kind} attention ({path})")
        slot = HOOK_SLOTS[kind]
        window = schedule.window_of(kind)
        if setting.setdefault(slot, (r, window)) != (r, window):
            raise ScheduleError(f"kinds sharing the hook's {slot} slot need one range and window: {setting[slot]} vs "
                                f"{(r, window)} for {path}")
        patterns[slot].append("^" + re.escape(path) + "$")
    if not setting:
        raise ScheduleError(f"{schedule} reuses none of the given modules")
    never = [r"^$"]  # a pattern matching no module name: the slot is unused
    kw = {}
    for slot in patterns:
        r, window = setting.get(slot, (None, (0, 0)))
        kw[f"{slot}_attention_block_skip_range"] = r
        kw[f"{slot}_attention_timestep_skip_range"] = tuple(int(w) if float(w).is_integer() else w for w in window)
        kw[f"{slot}_attention_block_identifiers"] = patterns[slot] or never
    return PyramidAttentionBroadcastConfig(current_timestep_callback=current_timestep, **kw)
