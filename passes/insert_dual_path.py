"""insert_dual_path: rewrite each unit into a dual-path node that runs its planned branch.

Every slotted unit ``y = op(...)`` becomes, by ``GNMRConfig.dispatch``:

* ``host`` (default): one node that runs only the branch its plan entry picks::

      y = dispatch_path(..., plan=plan, slot=slot, op=..., recipe=..., high=...)

  ``plan`` is on the CPU: ``_gnmr_plan`` itself for CPU units, the host copy
  ``_gnmr_plan_host`` (``passes.state.PLAN_HOST``) for units on a GPU.
  Traced, the node is a ``torch.cond`` (``passes.nodes.dispatch_path``).
* ``select``: both branches and a branch-free select on the device plan::

      y_hp = op(...)                         # high path: the op as written
      y_lp = low_path(op, ..., recipe=...)   # low path: the config's recipe
      y    = select_path(_gnmr_plan, slot, y_hp, y_lp)

Units with a real low-precision kernel on their device become one
``dual_linear`` / ``dual_matmul`` (``backends.host_dispatch``) whatever
``dispatch`` says. ``_gnmr_plan`` (``passes.state.PLAN``) is a bool buffer
registered on ``gm`` (one entry per slot, on the units' device). The runtime
writes it (and the host copy) in place once per optimizer step, so a new
plan changes no guard and compiles nothing.

Guarantees: the graph lints; no output aliases a new input; with an all-high
plan the result equals the original graph exactly (the high path *is* the
original call; the low path computes nothing under ``host`` and gets an
exactly-zero gradient under ``select``).
"""

from __future__ import annotations

import torch
import torch.fx

from gnmr_fx.backends.host_dispatch import dual_linear, dual_matmul, kernel_for
from gnmr_fx.backends.paths import high_path, low_path
from gnmr_fx.config import GNMRConfig
from gnmr_fx.passes.counters import counters
from gnmr_fx.passes.graph_utils import device_of, get_attr_at_top, slotted_units
from gnmr_fx.passes.nodes import dispatch_path, select_path
from gnmr_fx.passes.state import PLAN, PLAN_HOST


def insert_dual_path(gm: torch.fx.GraphModule, config: GNMRConfig) -> torch.fx.GraphModule:
    """Replace every unit of ``gm`` that has a slot by a dual path (see the module docstring)."""
    nodes, n_slots, device = slotted_units(gm, "insert_dual_path")
    if not nodes:
        return gm
    if not hasattr(gm, PLAN):
        gm.register_buffer(PLAN, torch.zeros(n_slots, dtype=torch.bool, device=device))
    nodes = _insert_host_dispatch(gm, config, nodes, n_slots)
    if nodes and config.dispatch == "host":
        _insert_dispatch_path(gm, config, nodes, n_slots, device)
    elif nodes:
        _insert_select(gm, config, nodes)
    gm.graph.lint()
    gm.recompile()
    return gm


def _insert_select(gm: torch.fx.GraphModule, config: GNMRConfig, nodes: list) -> None:
    """``dispatch="select"``: both branches, then ``select_path`` on the device plan."""
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


def _insert_dispatch_path(gm: torch.fx.GraphModule, config: GNMRConfig, nodes: list, n_slots: int,
                          device: torch.device) -> None:
    """``dispatch="host"``: one ``dispatch_path`` node per emulated unit, on a CPU plan."""
    # CPU units read the plan itself (it is on the host already); GPU units
    # the host copy, which the runtime publishes once per optimizer step.
    plan = get_attr_at_top(gm, PLAN if device.type == "cpu" else _plan_host(gm, config, n_slots))
    for node in nodes:
        site = node.meta["gnmr_unit"]
        kw = {**node.kwargs, "plan": plan, "slot": site.slot, "op": site.spec.name, "recipe": config.recipe,
              "high": config.high_path, "b_is_weight": site.weight is not None}
        with gm.graph.inserting_before(node):
            dual = gm.graph.call_function(dispatch_path, node.args, kw)
        _replace_by_host_node(gm, node, dual, "dispatch_path_nodes")


def _replace_by_host_node(gm: torch.fx.GraphModule, node: torch.fx.Node, dual: torch.fx.Node, counter: str) -> None:
    """Put ``dual`` (one node that picks the branch on the host plan) in the place of unit ``node``."""
    site = node.meta["gnmr_unit"]
    dual.meta.update({k: v for k, v in node.meta.items() if k != "gnmr_unit"})
    dual.meta["gnmr_dual"] = site
    dual.meta["gnmr_branch"] = ("host", site.name)
    node.replace_all_uses_with(dual)
    gm.graph.erase_node(node)
    counters["insert_dual_path"][counter] += 1


def _plan_host(gm: torch.fx.GraphModule, config: GNMRConfig, n_slots: int) -> str:
    """The name of ``gm``'s host plan buffer, registered on first use."""
    if not hasattr(gm, PLAN_HOST):
        # On the CPU whatever the units' device: the dual ops read it on the
        # host. Initial value = the controller's initial plan for the policy.
        gm.register_buffer(PLAN_HOST, torch.full((n_slots,), config.policy == "always_high", dtype=torch.bool))
    return PLAN_HOST


# ---------------------------------------------------------------------------
# Host dispatch of real low-precision kernels: units that have a real kernel
# on their device become one ``dual_linear`` call whose GEMMs read the host
# plan (see gnmr_fx.backends.host_dispatch); the fp8 casts stay traced code.
# The other units are emulated and go through one of the two paths above.
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
    plan_host = get_attr_at_top(gm, _plan_host(gm, config, n_slots))
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
        _replace_by_host_node(gm, node, dual, "host_dispatch_nodes")
    return rest
