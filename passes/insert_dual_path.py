"""insert_dual_path: rewrite each unit into a guarded dual-path node.

Every slotted unit ``y = op(...)`` becomes::

    y_hp = op(...)                         # high path: the op as written
    y_lp = low_path(op, ..., recipe=...)   # low path: the config's recipe
    y    = select_path(_gnmr_plan, slot, y_hp, y_lp)

``_gnmr_plan`` is a bool buffer registered on ``gm`` (one entry per slot, on
the units' device). The controller writes it in place once per optimizer
step, so a new plan changes no guard and compiles nothing.

Guarantees: the graph lints; no output aliases a new input; with an all-high
plan the result equals the original graph exactly (the high path *is* the
original call and the low path gets an exactly-zero gradient).
"""

from __future__ import annotations

import torch
import torch.fx

from gnmr_fx.backends.paths import high_path, low_path
from gnmr_fx.config import GNMRConfig
from gnmr_fx.passes.counters import counters
from gnmr_fx.passes.insert_grad_stats import _device_of
from gnmr_fx.passes.nodes import select_path

PLAN = "_gnmr_plan"


def insert_dual_path(gm: torch.fx.GraphModule, config: GNMRConfig) -> torch.fx.GraphModule:
    """Replace every slotted unit of ``gm`` by its two branches and a select."""
    nodes = [n for n in gm.graph.nodes if n.meta.get("gnmr_unit") is not None and n.meta["gnmr_unit"].slot is not None]
    if not nodes:
        return gm
    n_slots = 1 + max(n.meta["gnmr_unit"].slot for n in nodes)
    if not hasattr(gm, PLAN):
        gm.register_buffer(PLAN, torch.zeros(n_slots, dtype=torch.bool, device=_device_of(nodes[0])))
    first = next(iter(gm.graph.find_nodes(op="placeholder")), None) or next(iter(gm.graph.nodes))
    with gm.graph.inserting_after(first):
        plan = gm.graph.get_attr(PLAN)
    for node in nodes:
        site = node.meta["gnmr_unit"]
        spec = site.spec
        with gm.graph.inserting_before(node):
            if config.high_path == "native":
                hp = gm.graph.call_function(spec.fn, node.args, dict(node.kwargs))
            else:
                hp = gm.graph.call_function(
                    high_path, (spec.name, *node.args), {**node.kwargs, "high": config.high_path}
                )
            lp = gm.graph.call_function(
                low_path,
                (spec.name, *node.args),
                {
                    **node.kwargs,
                    "recipe": config.recipe,
                    "a_index": spec.a_index,
                    "b_index": spec.b_index,
                    "b_kdim": spec.b_kdim,
                    "b_is_weight": site.weight is not None,
                },
            )
            sel = gm.graph.call_function(select_path, (plan, site.slot, hp, lp))
        for new in (hp, lp, sel):
            new.meta.update({k: v for k, v in node.meta.items() if k != "gnmr_unit"})
        hp.meta["gnmr_branch"] = ("high", site.name)
        lp.meta["gnmr_branch"] = ("low", site.name)
        sel.meta["gnmr_dual"] = site
        node.replace_all_uses_with(sel)
        gm.graph.erase_node(node)
        counters["insert_dual_path"]["dual_path_nodes"] += 1
    gm.graph.lint()
    gm.recompile()
    return gm
