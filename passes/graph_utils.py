"""Small graph helpers shared by the passes."""

from __future__ import annotations

import torch
import torch.fx


def slotted_units(gm: torch.fx.GraphModule) -> tuple[list[torch.fx.Node], int, torch.device]:
    """The unit nodes that have a slot, the number of slots, and the units' device."""
    nodes = [n for n in gm.graph.nodes if n.meta.get("gnmr_unit") is not None and n.meta["gnmr_unit"].slot is not None]
    if not nodes:
        return [], 0, torch.device("cpu")
    n_slots = 1 + max(n.meta["gnmr_unit"].slot for n in nodes)
    return nodes, n_slots, device_of(nodes[0])


def device_of(node: torch.fx.Node) -> torch.device:
    val = node.meta.get("example_value", node.meta.get("val"))
    return val.device if val is not None and hasattr(val, "device") else torch.device("cpu")


def get_attr_at_top(gm: torch.fx.GraphModule, name: str) -> torch.fx.Node:
    """A ``get_attr`` node for ``name`` right after the first placeholder, so every use follows it."""
    first = next(iter(gm.graph.find_nodes(op="placeholder")), None) or next(iter(gm.graph.nodes))
    with gm.graph.inserting_after(first):
        return gm.graph.get_attr(name)
