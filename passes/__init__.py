"""Graph rewrites of gnmr_fx. Each pass is ``(GraphModule, GNMRConfig) -> GraphModule``.

They run end to end on a bare ``GraphModule`` (with shapes: a Dynamo graph,
or one after ``ShapeProp``) and a config, in the order of :data:`PASSES`;
:func:`run_passes` runs them. See README.md in this folder for the
invariants every pass keeps.
"""

from __future__ import annotations

import torch.fx

from gnmr_fx.config import GNMRConfig
from gnmr_fx.passes.assign_slots import assign_slots
from gnmr_fx.passes.counters import counters
from gnmr_fx.passes.discover_units import UnitSite, discover_units, sites_of
from gnmr_fx.passes.insert_dual_path import insert_dual_path
from gnmr_fx.passes.insert_grad_stats import insert_grad_stats

PASSES = (discover_units, assign_slots, insert_grad_stats, insert_dual_path)
"""The rewrite, in order."""


def run_passes(gm: torch.fx.GraphModule, config: GNMRConfig) -> torch.fx.GraphModule:
    """Run :data:`PASSES` on ``gm`` in order; returns ``gm``, rewritten in place.

    >>> import torch, torch.nn.functional as F
    >>> from torch.fx.passes.shape_prop import ShapeProp
    >>> gm = torch.fx.symbolic_trace(lambda x, w: F.linear(x, w))
    >>> _ = ShapeProp(gm).propagate(torch.randn(4, 8), torch.randn(3, 8))
    >>> gm = run_passes(gm, GNMRConfig(recipe="int8"))
    >>> [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function"]
    ['dispatch_path', 'grad_stats']
    """
    for rewrite in PASSES:
        gm = rewrite(gm, config)
    return gm


__all__ = ["PASSES", "UnitSite", "assign_slots", "counters", "discover_units", "insert_dual_path",
           "insert_grad_stats", "run_passes", "sites_of"]
