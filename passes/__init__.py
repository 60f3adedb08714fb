"""Graph rewrites of gnmr_fx. Each pass is ``(GraphModule, config) -> GraphModule``.

See README.md in this folder for the invariants every pass keeps.
"""

from gnmr_fx.passes.counters import counters
from gnmr_fx.passes.discover_units import UnitSite, discover_units, sites_of
from gnmr_fx.passes.insert_dual_path import insert_dual_path
from gnmr_fx.passes.insert_grad_stats import insert_grad_stats

__all__ = ["UnitSite", "counters", "discover_units", "insert_dual_path", "insert_grad_stats", "sites_of"]
