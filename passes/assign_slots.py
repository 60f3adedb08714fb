"""assign_slots: give every unit that the config's filter admits a slot.

A unit's *slot* is its position in its graph's plan and probe tensors
(``passes.state``). The pass runs after ``discover_units`` and before the
insert passes, which rewrite exactly the units that have a slot:

* a unit keeps the name its ``UnitSite`` already has (the runtime's unit
  table names units across graphs before this pass runs); a site with no
  name yet (a bare ``GraphModule``) is named here, within this graph: the
  site's base name, then ``base_1``, ``base_2``... for repeats;
* ``site.included`` is ``config.includes(name, op)`` (the unit filter);
* included units get slots 0, 1, ... in graph order; excluded ones keep
  ``slot=None`` and run as written.

The graph itself does not change; ``gm.meta["gnmr_slots"]`` records the
number of slots, and the insert passes refuse a graph without it.
"""

from __future__ import annotations

import torch.fx

from gnmr_fx.config import GNMRConfig
from gnmr_fx.passes.counters import counters
from gnmr_fx.passes.discover_units import sites_of
from gnmr_fx.passes.state import SLOTS


def assign_slots(gm: torch.fx.GraphModule, config: GNMRConfig) -> torch.fx.GraphModule:
    """Name the unsited units, apply the unit filter and number the included units.

    >>> import torch, torch.nn.functional as F
    >>> from torch.fx.passes.shape_prop import ShapeProp
    >>> from gnmr_fx.passes import discover_units
    >>> gm = torch.fx.symbolic_trace(lambda x, w: F.linear(x, w) @ w)
    >>> _ = ShapeProp(gm).propagate(torch.randn(4, 8), torch.randn(3, 8))
    >>> gm = assign_slots(discover_units(gm, GNMRConfig()), GNMRConfig(unit_filter=["matmul"]))
    >>> [(s.name, s.slot) for s in sites_of(gm)]
    [('linear', None), ('matmul', 0)]
    """
    if "gnmr_skipped" not in gm.meta:
        raise ValueError("assign_slots: run discover_units on this graph first")
    taken: set[str] = set()
    slot = 0
    for site in sites_of(gm):
        if site.name is None:
            name, k = site.base, 0
            while name in taken:
                k += 1
                name = f"{site.base}_{k}"
            site.name = name
        taken.add(site.name)
        site.included = config.includes(site.name, site.op)
        site.slot = slot if site.included else None
        if site.included:
            slot += 1
            counters["assign_slots"]["slots"] += 1
    gm.meta[SLOTS] = slot
    return gm
