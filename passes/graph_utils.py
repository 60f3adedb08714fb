"""Small graph helpers shared by the passes."""

from __future__ import annotations

import torch
import torch.fx

from gnmr_fx.passes.state import SLOTS


def slotted_units(gm: torch.fx.GraphModule, pass_name: str) -> tuple[list[torch.fx.Node], int, torch.device]:
    """The unit nodes that have a slot, the number of slots, and the units' device.

    Raises ``ValueError`` naming ``pass_name`` for a graph whose units never
    got slots: an insert pass on it would silently rewrite nothing.
    """
    if SLOTS not in gm.meta:
        raise ValueError(f"{pass_name}: run discover_units and assign_slots on this graph first "
                         "(gnmr_fx.passes.run_passes runs every pass in order)")
    nodes = [n for n in gm.graph.nodes if n.meta.get("gnmr_unit") is not None and n.meta["gnmr_unit"].slot is not None]
    if not nodes:
        return [], 0, torch.device("cpu")
    return nodes, gm.meta[SLOTS], device_of(nodes[0])


def device_of(node: torch.fx.Node) -> torch.device:
    val = node.meta.get("example_value", node.meta.get("val"))
    return val.device if val is not None and hasattr(val, "device") else torch.device("cpu")


def get_attr_at_top(gm: torch.fx.GraphModule, name: str) -> torch.fx.Node:
    """The ``get_attr`` node for ``name``: the graph's existing one, else a new
    one right after the first placeholder, so every use follows it. One node
    per attribute, so lifting the GNMR tensors to inputs gives one input each
    (a graph with real-kernel and emulated GPU units reads the host plan from
    both passes)."""
    existing = [n for n in gm.graph.find_nodes(op="get_attr") if n.target == name]
    if existing:
        return existing[0]
    first = next(iter(gm.graph.find_nodes(op="placeholder")), None) or next(iter(gm.graph.nodes))
    with gm.graph.inserting_after(first):
        return gm.graph.get_attr(name)
