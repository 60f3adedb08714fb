"""insert_grad_stats: add one grad-stats node per unit, which records its gradient norm.

For a unit with a weight, the node wraps the weight operand, so backward
adds ||dL/dW||^2 (the gradient through this unit) to ``probe.grad[slot]``.
For a weightless unit it wraps the unit's output: ||dL/dY||^2.

Guarantees: values are unchanged (the node is an identity in forward), the
graph lints, and exactly one node is added per unit with a slot. The probe is
registered on ``gm`` as the parameter ``_gnmr_probe`` (``passes.state.PROBE``) (float32, one entry per
slot, on the units' device); accumulation over micro-batches is ordinary
``.grad`` accumulation, read and cleared once per optimizer step.
"""

from __future__ import annotations

import torch
import torch.fx

from gnmr_fx.config import GNMRConfig
from gnmr_fx.passes.counters import counters
from gnmr_fx.passes.graph_utils import get_attr_at_top, slotted_units
from gnmr_fx.passes.nodes import grad_stats
from gnmr_fx.passes.state import PROBE


def insert_grad_stats(gm: torch.fx.GraphModule, config: GNMRConfig) -> torch.fx.GraphModule:
    """Insert a ``grad_stats`` node for every unit of ``gm`` that has a slot."""
    nodes, n_slots, device = slotted_units(gm, "insert_grad_stats")
    if not nodes:
        return gm
    if not hasattr(gm, PROBE):
        gm.register_parameter(PROBE, torch.nn.Parameter(torch.zeros(n_slots, device=device)))
    probe = get_attr_at_top(gm, PROBE)
    for node in nodes:
        site = node.meta["gnmr_unit"]
        if site.weight is not None:
            w = node.args[site.spec.b_index]
            with gm.graph.inserting_before(node):
                stats = gm.graph.call_function(grad_stats, (w, probe, site.slot))
            args = list(node.args)
            args[site.spec.b_index] = stats
            node.args = tuple(args)
        else:
            with gm.graph.inserting_after(node):
                stats = gm.graph.call_function(grad_stats, (node, probe, site.slot))
            node.replace_all_uses_with(stats, delete_user_cb=lambda user: user is not stats)
        stats.meta["gnmr_grad_stats"] = site.name
        counters["insert_grad_stats"]["stats_nodes"] += 1
    gm.graph.lint()
    gm.recompile()
    return gm
