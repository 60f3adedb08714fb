"""freeze_plan: rewrite a GNMR graph for inference under a fixed plan.

Used by ``gnmr_fx.export_onnx``: every unit keeps exactly one branch (the op
as written, or its low branch written with QDQ pairs,
``backends.onnx_qdq.low_path_qdq``); statistics nodes, selects and the GNMR
state attributes go. The graph lints afterwards and computes, unit by unit,
what the compiled model computes under that plan (tests/test_onnx_export.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.fx

from gnmr_fx.backends.onnx_qdq import low_path_qdq
from gnmr_fx.backends.paths import high_path as high_path_fn
from gnmr_fx.passes.counters import counters
from gnmr_fx.passes.nodes import grad_stats, select_path
from gnmr_fx.passes.state import PLAN, PLAN_HOST, PROBE


def freeze_plan(gm: torch.fx.GraphModule, high: Mapping[str, bool]) -> torch.fx.GraphModule:
    """Rewrite a GNMR graph for inference under a fixed plan (in place).

    ``high`` maps unit name -> True for the high path. Statistics nodes and
    selects are removed; each unit keeps exactly one branch.
    """
    g = gm.graph
    for node in list(g.nodes):
        if node.op == "call_function" and node.target is grad_stats:
            node.replace_all_uses_with(node.args[0])
            g.erase_node(node)
    for sel in list(g.nodes):
        site = sel.meta.get("gnmr_dual")
        if site is None:
            continue
        if sel.target is not select_path:
            _freeze_host_dispatch(g, sel, site, high[site.name])
            counters["freeze_plan"]["units"] += 1
            continue
        _plan, _slot, hp, lp = sel.args
        if high[site.name]:
            keep = hp
        else:
            with g.inserting_before(sel):
                keep = g.call_function(low_path_qdq, lp.args, dict(lp.kwargs))
            keep.meta.update(lp.meta)
        sel.replace_all_uses_with(keep)
        g.erase_node(sel)
        counters["freeze_plan"]["units"] += 1
        for branch in (hp, lp):
            if branch is not keep and not branch.users:
                g.erase_node(branch)
    for node in list(g.nodes):
        if node.op == "get_attr" and node.target in (PLAN, PROBE, PLAN_HOST) and not node.users:
            g.erase_node(node)
    g.lint()
    gm.recompile()
    return gm


def _freeze_host_dispatch(g: torch.fx.Graph, node: torch.fx.Node, site: Any, high: bool) -> None:
    """A unit that reads the host plan (``dispatch_path``, ``dual_linear`` /
    ``dual_matmul``: the op's own args plus plan kwargs) becomes the plain op
    or its QDQ low branch."""
    kw = dict(node.kwargs)
    recipe, high_path = kw.pop("recipe"), kw.pop("high", "native")
    for k in ("plan", "slot", "op", "b_is_weight"):
        kw.pop(k, None)
    spec = site.spec
    with g.inserting_before(node):
        if high and high_path == "native":
            new = g.call_function(spec.fn, tuple(node.args), kw)
        elif high:
            new = g.call_function(high_path_fn, (spec.name, *node.args), {**kw, "high": high_path})
        else:
            new = g.call_function(low_path_qdq, (spec.name, *node.args), {
                **kw, "recipe": recipe, "a_index": spec.a_index, "b_index": spec.b_index,
                "b_kdim": spec.b_kdim, "b_is_weight": site.weight is not None,
            })
    new.meta.update({k: v for k, v in node.meta.items() if k != "gnmr_dual"})
    node.replace_all_uses_with(new)
    g.erase_node(node)
