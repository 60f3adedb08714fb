"""insert_dual_path: rewrite each unit into a guarded dual-path node.

Every slotted unit ``y = op(...)`` becomes::

    y_hp = op(...)                         # high path: the op as written
    y_lp = low_path(op, ..., recipe=...)   # low path: the config's recipe
    y    = select_path(_gnmr_plan, slot, y_hp, y_lp)

``_gnmr_plan`` (``passes.state.PLAN``) is a bool buffer registered on ``gm`` (one entry per slot, on
the units' device). The controller writes it in place once per optimizer
step, so a new plan changes no guard and compiles nothing.

Guarantees: the graph lints; no output aliases a new input; with an all-high
plan the result equals the original graph exactly (the high path *is* the
original call and the low path gets an exactly-zero gradient).
"""

from __future__ import annotations

import torch
import torch.fx

from gnmr_fx.backends.host_dispatch import dual_linear, dual_matmul, kernel_for
from gnmr_fx.backends.paths import high_path, low_path
from gnmr_fx.config import GNMRConfig
from gnmr_fx.passes.counters import counters
from gnmr_fx.passes.graph_utils import device_of, get_attr_at_top, slotted_units
from gnmr_fx.passes.nodes import select_path
from gnmr_fx.passes.state import PLAN, PLAN_HOST


def insert_dual_path(gm: torch.fx.GraphModule, config: GNMRConfig) -> torch.fx.GraphModule:
    """Replace every unit of ``gm`` that has a slot by its two branches and a select."""
    nodes, n_slots, device = slotted_units(gm, "insert_dual_path")
    if not nodes:
        return gm
    if not hasattr(gm, PLAN):
        gm.register_buffer(PLAN, torch.zeros(n_slots, dtype=torch.bool, device=device))
    nodes = _insert_host_dispatch(gm, config, nodes, n_slots)
    if not nodes:
        gm.graph.lint()
        gm.recompile()
        return gm
    plan = get_attr_at_top(gm, PLAN)
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


# ---------------------------------------------------------------------------
# Host dispatch (real low-precision kernels). A separate path: units that
# have a real kernel on their device leave the torch.where path above and
# become one ``dual_linear`` call that reads a host-resident plan, so only
# one branch runs (see gnmr_fx.backends.host_dispatch). Units without one
# stay on the torch.where path, unchanged.
# ---------------------------------------------------------------------------

def _insert_host_dispatch(gm: torch.fx.GraphModule, config: GNMRConfig, nodes: list, n_slots: int) -> list:
    """Rewrite the units that have a real kernel; return the other nodes."""
    emulate = config.emulate
    chosen, rest = [], []
    for node in nodes:
        site = node.meta["gnmr_unit"]
        kernel = kernel_for(site.spec.name, site.a_shape, site.b_shape, config.recipe, device_of(node), emulate)
        site.extra["kernel"] = kernel or "emulated"
        (chosen if kernel else rest).append(node)
    if not chosen:
        return nodes
    if not hasattr(gm, PLAN_HOST):
        # On the CPU whatever the units' device: the dual ops read it on the
        # host. Initial value = the controller's initial plan for the policy.
        gm.register_buffer(PLAN_HOST, torch.full((n_slots,), config.policy == "always_high", dtype=torch.bool))
    plan_host = get_attr_at_top(gm, PLAN_HOST)
    for node in chosen:
        site = node.meta["gnmr_unit"]
        a, b = node.args[site.spec.a_index], node.args[site.spec.b_index]
        kw = {"plan": plan_host, "slot": site.slot, "recipe": config.recipe, "high": config.high_path}
        with gm.graph.inserting_before(node):
            if site.spec.name == "linear":
                bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
                dual = gm.graph.call_function(dual_linear, (a, b, bias), kw)
            else:
                dual = gm.graph.call_function(dual_matmul, (a, b), kw)
        dual.meta.update({k: v for k, v in node.meta.items() if k != "gnmr_unit"})
        dual.meta["gnmr_dual"] = site
        dual.meta["gnmr_branch"] = ("host", site.name)
        node.replace_all_uses_with(dual)
        gm.graph.erase_node(node)
        counters["insert_dual_path"]["host_dispatch_nodes"] += 1
    return rest
