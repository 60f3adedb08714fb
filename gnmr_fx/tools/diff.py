"""``gnmr_fx.diff`` and ``gnmr-fx diff``: structural diff of two FX graphs.

The diff has two parts:

* a *structural* diff: nodes added, removed and replaced. Each dual-path
  unit the GNMR pass wrote (high branch, low branch, select, statistics
  node) is one entry, so "before vs after the pass" reads as one replaced
  entry per unit;
* a unified diff of the graphs' readable code, in which nodes that the
  structural diff matched carry the same name on both sides, so renaming
  alone never shows up as a change.

Matching does not trust node names (Dynamo, the passes and FX all rename).
Nodes are matched in topological order by what they compute: their op and
target plus the nodes they read, already matched. Placeholders match by
position. A statistics node is an identity in forward, so it is matched as
the value it wraps.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
import torch.fx
from torch.fx.node import map_aggregate

from gnmr_fx.backends.ops import RECOVERABLE_OPS, op_of
from gnmr_fx.passes.discover_units import _hashable
from gnmr_fx.passes.nodes import dispatch_path, grad_stats, select_path
from gnmr_fx.passes.state import GNMR_STATE

# Keyword arguments the pass adds to the low branch; the rest are the op's own.
_LOW_KWARGS = ("recipe", "a_index", "b_index", "b_kdim", "b_is_weight")
# ... and the ones it gives a node that reads the host plan (dispatch_path,
# backends.host_dispatch).
_HOST_KWARGS = ("plan", "slot", "recipe", "high", "op", "b_is_weight")

GraphLike = Union[torch.fx.GraphModule, torch.fx.Graph]


@dataclass(frozen=True)
class _Ref:
    """A reference to another item (map_aggregate leaves it whole, unlike a tuple)."""

    index: Any  # an item index, or ("new", index) for an unmatched B item


@dataclass
class _Item:
    """A node of the graph as the diff sees it: a plain node, or a whole unit."""

    index: int
    node: torch.fx.Node  # for a dual-path unit: its select node
    sig: tuple  # what it computes, independent of names
    args: Any  # args/kwargs with nodes replaced by _Ref(item index)
    form: tuple  # ("plain",) or (kind, recipe, high_path) for units, () otherwise; kind: dual, dispatch, host
    unit: Optional[str] = None
    members: dict = field(default_factory=dict)  # role -> node ("high", "low", "stats")


@dataclass
class DiffEntry:
    """One change: ``kind`` is "added", "removed" or "replaced"."""

    kind: str
    name: str  # unit name for units, node name otherwise
    before: Optional[str]
    after: Optional[str]
    unit: Optional[str] = None
    detail: dict = field(default_factory=dict)


@dataclass
class GraphDiff:
    """The result of :func:`diff`; empty (falsy) when the graphs are the same."""

    entries: list[DiffEntry]
    unified: list[str]
    label_a: str = "a"
    label_b: str = "b"

    def __bool__(self) -> bool:
        return bool(self.entries or self.unified)

    @property
    def empty(self) -> bool:
        return not self

    def of_kind(self, kind: str) -> list[DiffEntry]:
        return [e for e in self.entries if e.kind == kind]

    @property
    def added(self) -> list[DiffEntry]:
        return self.of_kind("added")

    @property
    def removed(self) -> list[DiffEntry]:
        return self.of_kind("removed")

    @property
    def replaced(self) -> list[DiffEntry]:
        return self.of_kind("replaced")

    def to_dict(self) -> dict:
        return {"label_a": self.label_a, "label_b": self.label_b,
                "entries": [asdict(e) for e in self.entries], "unified": list(self.unified)}

    def table(self) -> str:
        """The structural diff as a tabulate table (one row per entry)."""
        from tabulate import tabulate

        if not self.entries:
            return "no structural change"
        rows = []
        for e in self.entries:
            what = f"unit {e.unit}" if e.unit else e.name
            rows.append([e.kind, what, _clip(e.before), _clip(e.after)])
        counts = ", ".join(f"{len(self.of_kind(k))} {k}" for k in ("replaced", "added", "removed"))
        return f"{counts}\n" + tabulate(rows, headers=["change", "unit / node", self.label_a, self.label_b],
                                        disable_numparse=True)

    def format(self, color: bool = False) -> str:
        """Structural table, then the unified diff of the readable code."""
        parts = [self.table()]
        if self.unified:
            parts.append("")
            parts.extend(_colorize(line) if color else line for line in self.unified)
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.format(color=False)


def _clip(s: Optional[str], width: int = 90) -> str:
    if s is None:
        return "-"
    return s if len(s) <= width else s[: width - 3] + "..."


def _colorize(line: str) -> str:
    if line.startswith(("+++", "---")):
        return f"\x1b[1m{line}\x1b[0m"
    if line.startswith("+"):
        return f"\x1b[32m{line}\x1b[0m"
    if line.startswith("-"):
        return f"\x1b[31m{line}\x1b[0m"
    if line.startswith("@@"):
        return f"\x1b[36m{line}\x1b[0m"
    return line


# --------------------------------------------------------------------------
# Abstraction: FX nodes -> items
# --------------------------------------------------------------------------


def _graph(g: GraphLike) -> torch.fx.Graph:
    if isinstance(g, torch.fx.GraphModule):
        return g.graph
    if isinstance(g, torch.fx.Graph):
        return g
    raise TypeError(f"diff expects torch.fx.GraphModule or Graph, got {type(g).__name__}")


def _is_select(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is select_path and "gnmr_dual" in node.meta


def _is_stats(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and (node.target is grad_stats or "gnmr_grad_stats" in node.meta)


def _items(graph: torch.fx.Graph) -> tuple[list[_Item], dict[torch.fx.Node, int]]:
    """Items in topological order, and node -> item index (aliases resolved)."""
    items: list[_Item] = []
    of: dict[torch.fx.Node, int] = {}
    member: dict[torch.fx.Node, tuple[str, torch.fx.Node]] = {}
    # Branch nodes belong to the select that consumes them.
    for sel in graph.nodes:
        if _is_select(sel):
            _plan, _slot, hp, lp = sel.args
            member[hp] = ("high", sel)
            member[lp] = ("low", sel)
    stats_of: dict[torch.fx.Node, list] = {}
    n_ph = 0

    def ref(x: Any) -> Any:
        return _Ref(of[x]) if isinstance(x, torch.fx.Node) else x

    pending_stats: list[torch.fx.Node] = []
    for node in graph.nodes:
        if node in member:
            continue
        if _is_stats(node):
            # Identity in forward: readers of the stats node read its input.
            of[node] = of[node.args[0]]
            pending_stats.append(node)
            stats_of.setdefault(node.args[0], []).append(node)
            continue
        if node.op == "placeholder":
            sig: tuple = ("placeholder", n_ph)
            n_ph += 1
            args, form = (), ()
        elif node.op == "output":
            sig, args, form = ("output",), map_aggregate(node.args, ref), ()
        elif _is_select(node):
            site = node.meta["gnmr_dual"]
            hp, lp = node.args[2], node.args[3]
            op_args = lp.args[1:]
            kwargs = {k: v for k, v in lp.kwargs.items() if k not in _LOW_KWARGS}
            sig = ("unit", site.spec.name)
            args = map_aggregate((op_args, kwargs), ref)
            high = "native" if hp.target is site.spec.fn else hp.kwargs.get("high", "?")
            form = ("dual", lp.kwargs.get("recipe"), high)
        elif "gnmr_dual" in node.meta:
            # One node that reads a host-resident plan and runs one branch
            # (dispatch_path; real kernels: dual_linear); its args are the op's.
            site = node.meta["gnmr_dual"]
            kwargs = {k: v for k, v in node.kwargs.items() if k not in _HOST_KWARGS}
            sig = ("unit", site.spec.name)
            args = map_aggregate((node.args, kwargs), ref)
            kind = "dispatch" if node.target is dispatch_path else "host"
            form = (kind, node.kwargs.get("recipe"), node.kwargs.get("high", "native"))
        else:
            target = op_of(node)
            spec = RECOVERABLE_OPS.get(target) if node.op in ("call_function", "call_method") and _hashable(target) else None
            if spec is not None:
                sig, form = ("unit", spec.name), ("plain",)
            else:
                sig, form = (node.op, _target_key(node)), ()
            args = map_aggregate((node.args, dict(node.kwargs)), ref)
        it = _Item(len(items), node, sig, args, form)
        if "gnmr_dual" in node.meta:
            it.unit = node.meta["gnmr_dual"].name
            if _is_select(node):
                it.members = {"high": node.args[2], "low": node.args[3]}
        items.append(it)
        of[node] = it.index
    # Stats nodes: attach each to the unit it measures (by the name the pass recorded).
    by_unit = {it.unit: it for it in items if it.unit}
    for s in pending_stats:
        owner = by_unit.get(s.meta.get("gnmr_grad_stats"))
        if owner is not None:
            owner.members.setdefault("stats", s)
    return items, of


def _target_key(node: torch.fx.Node) -> Any:
    t = node.target
    if node.op == "call_function":
        return t if _hashable(t) else repr(t)
    return str(t)


def _key(item: _Item, to_a: Optional[dict[int, int]], tier: str) -> str:
    """A name-free key of ``item`` at one matching tier.

    Refs become the matched A-side item (or "new"). Tiers, strictest first:
    ``exact`` (op, form, args); ``loose`` (op and the values read: a unit
    whose form changed, a changed constant); ``kind`` (any target of the
    same node kind with the same argument layout: relu -> tanh); ``wild``
    (op and constants, whatever it reads: a node whose input was replaced).
    """

    def conv(x: Any) -> Any:
        if isinstance(x, _Ref) and to_a is not None:
            return _Ref(to_a.get(x.index, ("new", x.index)))
        return x

    args = map_aggregate(item.args, conv) if item.args != () else ()
    if tier == "exact":
        return repr((item.sig, item.form, args))
    refs: list = []
    map_aggregate(args, lambda x: refs.append(x) if isinstance(x, _Ref) else None)
    if tier == "loose":
        return repr((item.sig, refs))
    if tier == "kind":
        layout = map_aggregate(args, lambda x: "ref" if isinstance(x, _Ref) else type(x).__name__)
        return repr((item.node.op, item.sig[0] == "unit", refs, layout))
    consts = map_aggregate(args, lambda x: "ref" if isinstance(x, _Ref) else x)
    return repr((item.sig, item.form, consts))


_TIERS = ("exact", "loose", "kind")


def _match(items_a: list[_Item], items_b: list[_Item]) -> dict[int, int]:
    """B item -> A item, by what the items compute, in topological order.

    A first pass matches by ``exact`` / ``loose`` / ``kind`` keys; a second
    pass over what is left may also match ``wild`` (same op and constants,
    different inputs), which pairs the readers of an inserted node.
    """
    tiers = (*_TIERS, "wild")
    index_a: dict[str, dict[str, list[int]]] = {t: {} for t in tiers}
    for it in items_a:
        for t in tiers:
            index_a[t].setdefault(_key(it, None, t), []).append(it.index)
    to_a: dict[int, int] = {}
    used: set[int] = set()
    out_a = [it.index for it in items_a if it.sig == ("output",)]

    def take(cands: list[int]) -> Optional[int]:
        for c in cands:
            if c not in used:
                return c
        return None

    for allowed in (_TIERS, tiers):
        for it in items_b:
            if it.index in to_a:
                continue
            if it.sig == ("output",):
                # A graph has one output: always the counterpart of the other's.
                a = take(out_a)
            else:
                a = None
                for t in allowed:
                    a = take(index_a[t].get(_key(it, to_a, t), []))
                    if a is not None:
                        break
            if a is not None:
                used.add(a)
                to_a[it.index] = a
    return to_a


# --------------------------------------------------------------------------
# Readable code
# --------------------------------------------------------------------------


def _fn_name(fn: Any) -> str:
    mod = getattr(fn, "__module__", "") or ""
    if mod.startswith("gnmr_fx"):
        return getattr(fn, "__name__", repr(fn))
    try:
        return torch.fx.node._get_qualified_name(fn)
    except Exception:  # noqa: BLE001 - display only: any callable still gets a name
        return getattr(fn, "__name__", repr(fn))


def _render(node: torch.fx.Node, names: dict[torch.fx.Node, str]) -> str:
    def arg(x: Any) -> str:
        if isinstance(x, torch.fx.Node):
            return names[x]
        if isinstance(x, (list, tuple)):
            inner = ", ".join(arg(y) for y in x)
            return f"({inner}{',' if len(x) == 1 and isinstance(x, tuple) else ''})" if isinstance(x, tuple) else f"[{inner}]"
        if isinstance(x, dict):
            return "{" + ", ".join(f"{k!r}: {arg(v)}" for k, v in x.items()) + "}"
        return repr(x)

    def call_args() -> str:
        parts = [arg(a) for a in node.args] + [f"{k}={arg(v)}" for k, v in node.kwargs.items()]
        return ", ".join(parts)

    name = names[node]
    if node.op == "placeholder":
        return f"{name} = input"
    if node.op == "output":
        return f"return {arg(node.args[0])}"
    if node.op == "get_attr":
        return f"{name} = self.{node.target}"
    if node.op == "call_method":
        first, rest = node.args[0], node.args[1:]
        parts = [arg(a) for a in rest] + [f"{k}={arg(v)}" for k, v in node.kwargs.items()]
        return f"{name} = {arg(first)}.{node.target}({', '.join(parts)})"
    if node.op == "call_module":
        return f"{name} = self.{node.target}({call_args()})"
    return f"{name} = {_fn_name(node.target)}({call_args()})"


def _display_names(items_a: list[_Item], items_b: list[_Item], graph_a: torch.fx.Graph,
                   graph_b: torch.fx.Graph, to_a: dict[int, int]) -> tuple[dict, dict]:
    # A unit's value is named after the unit on both sides (blocks_0_fc), so
    # the code reads in the names inspect and the controller use.
    raw = {n.name for n in graph_a.nodes} | {n.name for n in graph_b.nodes}
    names_a: dict[torch.fx.Node, str] = _placeholder_names(graph_a)
    for it in items_a:
        if it.unit:
            names_a[it.node] = _unit_var(it.unit, raw)
    for it in items_b:
        if it.unit and it.index in to_a:
            names_a[items_a[to_a[it.index]].node] = _unit_var(it.unit, raw)
    _name_members(items_a, names_a)
    for n in graph_a.nodes:
        names_a.setdefault(n, n.name)
    taken = set(names_a.values())
    names_b: dict[torch.fx.Node, str] = {}
    ph_b = _placeholder_names(graph_b)
    for it in items_b:
        if it.node in ph_b and it.index not in to_a:
            names_b[it.node] = ph_b[it.node]
        if it.index in to_a:
            names_b[it.node] = names_a[items_a[to_a[it.index]].node]
        elif it.unit:
            names_b[it.node] = _unit_var(it.unit, raw)
    _name_members(items_b, names_b)
    for n in graph_b.nodes:
        if n not in names_b:
            nm = n.name
            while nm in taken and not (nm == n.name and _same_node_name_ok(n, graph_a)):
                nm += "_b"
            names_b[n] = nm
    return names_a, names_b


def _placeholder_names(graph: torch.fx.Graph) -> dict[torch.fx.Node, str]:
    """Dynamo placeholders by the model path they were read from
    (``blocks.0.fc.weight`` rather than ``l_self_modules_blocks_..._weight_``)."""
    from gnmr_fx.passes.discover_units import normalize_source_path

    out: dict[torch.fx.Node, str] = {}
    used: set[str] = set()
    for ph in graph.find_nodes(op="placeholder"):
        name = ph.meta.get("gnmr_source", "")
        source = getattr(ph.meta.get("grapharg"), "source", None)
        if not name and source is not None:
            name = normalize_source_path(source.name)
        if name.isdigit():  # a positional input (args[0]) reads better as input_0
            name = f"input_{name}"
        if not name or name in used:
            continue
        used.add(name)
        out[ph] = name
    return out


def _unit_var(unit: str, raw_names: set[str]) -> str:
    name = "".join(c if c.isalnum() else "_" for c in unit)
    return name + "_unit" if name in raw_names else name


def _name_members(items: list[_Item], names: dict[torch.fx.Node, str]) -> None:
    """Branch and statistics nodes are named after their unit's value
    (``linear_hp``, ``linear_lp``, ``linear_stats``), the project's suffixes."""
    for it in items:
        base = names.get(it.node, it.node.name)
        names.setdefault(it.node, base)
        for role, suffix in (("high", "_hp"), ("low", "_lp"), ("stats", "_stats")):
            m = it.members.get(role)
            if m is not None and m not in names:
                names[m] = base + suffix


def _same_node_name_ok(node: torch.fx.Node, graph_a: torch.fx.Graph) -> bool:
    # The GNMR state attributes (plan, probe) have no counterpart, and their
    # names cannot be confused with anything in the other graph.
    return node.op == "get_attr" and node.target in GNMR_STATE


# --------------------------------------------------------------------------
# diff()
# --------------------------------------------------------------------------


def diff(a: GraphLike, b: GraphLike, *, label_a: str = "a", label_b: str = "b", context: int = 3) -> GraphDiff:
    """Structural and textual diff of two FX graphs.

    >>> import torch
    >>> class M(torch.nn.Module):
    ...     def forward(self, x, w):
    ...         return torch.relu(x @ w)
    >>> gm = torch.fx.symbolic_trace(M())
    >>> d = diff(gm, gm)
    >>> bool(d), d.entries
    (False, [])
    >>> gm2 = torch.fx.symbolic_trace(M())
    >>> relu = next(n for n in gm2.graph.nodes if n.target is torch.relu)
    >>> relu.target = torch.sigmoid
    >>> [(e.kind, e.name, e.before, e.after) for e in diff(gm, gm2).entries]
    [('replaced', 'relu', 'relu = torch.relu(matmul)', 'relu = torch.sigmoid(matmul)')]
    """
    ga, gb = _graph(a), _graph(b)
    items_a, _ = _items(ga)
    items_b, _ = _items(gb)
    to_a = _match(items_a, items_b)
    # A matched pair is unchanged iff it computes the same thing from the
    # same (matched) inputs; decided once the whole matching is known.
    loose = {b for b, a in to_a.items() if _key(items_b[b], to_a, "exact") != _key(items_a[a], None, "exact")}
    names_a, names_b = _display_names(items_a, items_b, ga, gb, to_a)

    entries: list[DiffEntry] = []
    matched_a = set(to_a.values())
    for it in items_a:
        if it.index not in matched_a:
            entries.append(DiffEntry("removed", it.unit or it.node.name, _render(it.node, names_a), None,
                                     unit=it.unit, detail=_unit_detail(it, names_a)))
    for it in items_b:
        if it.index not in to_a:
            entries.append(DiffEntry("added", it.unit or names_b[it.node], None, _render(it.node, names_b),
                                     unit=it.unit, detail=_unit_detail(it, names_b)))
        elif it.index in loose:
            old = items_a[to_a[it.index]]
            unit = it.unit or old.unit
            entries.append(DiffEntry(
                "replaced", unit or names_b[it.node], _describe(old, names_a), _describe(it, names_b),
                unit=unit, detail={"before": _unit_detail(old, names_a), "after": _unit_detail(it, names_b)},
            ))
    lines_a = [_render(n, names_a) for n in ga.nodes]
    lines_b = [_render(n, names_b) for n in gb.nodes]
    unified = list(difflib.unified_diff(lines_a, lines_b, fromfile=label_a, tofile=label_b, lineterm="", n=context))
    return GraphDiff(entries, unified, label_a, label_b)


def _describe(it: _Item, names: dict) -> str:
    if it.form and it.form[0] == "host":
        return f"host-dispatch {it.sig[1]} ({_fn_name(it.node.target)}): high [{it.form[2]}] | low [{it.form[1]}]"
    if it.form and it.form[0] in ("dual", "dispatch"):
        # Node names are in the detail and the unified diff; the table says what the unit became.
        stats = it.members.get("stats")
        on = "-" if stats is None else ("output" if stats.args[0] is it.node else "weight")
        how = "select_path" if it.form[0] == "dual" else "dispatch_path"
        return f"dual path {it.sig[1]}: high [{it.form[2]}] | low [{it.form[1]}] -> {how}; stats on {on}"
    return _render(it.node, names)


def _unit_detail(it: _Item, names: dict) -> dict:
    if it.form and it.form[0] in ("host", "dispatch"):
        d = {"node": names[it.node], "recipe": it.form[1], "high_path": it.form[2], "code": _render(it.node, names)}
        if "stats" in it.members:
            d["stats"] = names[it.members["stats"]]
        return d
    if not it.members:
        return {}
    d = {"select": names[it.node], "recipe": it.form[1], "high_path": it.form[2]}
    for role in ("high", "low", "stats"):
        if role in it.members:
            d[role] = names[it.members[role]]
            d[role + "_code"] = _render(it.members[role], names)
    return d


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def parse_config_items(pairs: Sequence[str]) -> dict[str, Any]:
    """``["recipe=int8", "max_o=2", "unit_filter=blocks.*,head"]`` -> GNMRConfig fields.

    >>> parse_config_items(["recipe=int8", "max_o=2", "threshold=2.5", "unit_filter=blocks.*,head"])
    {'recipe': 'int8', 'max_o': 2, 'threshold': 2.5, 'unit_filter': ['blocks.*', 'head']}
    """
    from gnmr_fx.arguments import InputError, parse_max_o

    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise InputError(f"config item {pair!r} must look like key=value (e.g. recipe=int8)")
        k, v = pair.split("=", 1)
        k = k.strip().replace("-", "_")
        if k == "unit_filter":
            out[k] = [p for p in v.split(",") if p]
            continue
        if k == "max_o":  # the one max_o spelling: "2" units, "0.05" or "5%" of FLOPs
            out[k] = parse_max_o(v)
            continue
        for conv in (int, float):
            try:
                out[k] = conv(v)
                break
            except ValueError:
                continue
        else:
            out[k] = None if v in ("None", "none", "null") else v
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="SPEC", help="built-in example (tiny_gpt, hf_gpt2, ...) or package.module:factory")
    parser.add_argument("--config", dest="config", action="extend", nargs="+", default=[], metavar="K=V",
                        help="GNMRConfig field for the before/after diff (repeatable)")
    parser.add_argument("--config-a", dest="config_a", action="extend", nargs="+", default=None, metavar="K=V",
                        help="diff the rewritten graphs under two configs: fields of config A (repeatable)")
    parser.add_argument("--config-b", dest="config_b", action="extend", nargs="+", default=None, metavar="K=V",
                        help="fields of config B (repeatable)")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("-U", "--context", type=int, default=3, help="lines of context in the unified diff")
    parser.add_argument("--device", type=_device, default=None, help="move the model and inputs here first (e.g. cuda)")


def _device(text: str) -> str:
    from gnmr_fx.arguments import parse_device

    return parse_device(text)


def _config(items: Sequence[str], flag: str) -> Any:
    """A GNMRConfig from ``K=V`` items; a bad item or value is the user's (InputError)."""
    from gnmr_fx.arguments import user_input
    from gnmr_fx.config import GNMRConfig

    with user_input(flag):
        return GNMRConfig(**parse_config_items(items))


def run(args: argparse.Namespace) -> int:
    from gnmr_fx.tools.capture import capture
    from gnmr_fx.tools.examples import load_spec
    from gnmr_fx.tools.inspect import print_or_quit

    # User-input errors (spec, --config values) raise InputError: the CLI
    # prints one line and exits 2. Anything else is a bug and keeps its traceback.
    model, inputs = load_spec(args.spec, args.device)
    two = args.config_a is not None or args.config_b is not None
    if two:
        cfg_a = _config(args.config_a or [], "--config-a")
        cfg_b = _config(args.config_b or [], "--config-b")
        rec_a = capture(model, inputs, cfg_a).records
        rec_b = capture(model, inputs, cfg_b).records
        pairs = [(ra.rewritten, rb.rewritten) for ra, rb in zip(rec_a, rec_b)]
        labels = ("config A: " + " ".join(args.config_a or ["defaults"]),
                  "config B: " + " ".join(args.config_b or ["defaults"]))
        mismatch = len(rec_a) != len(rec_b)
        counts = (len(rec_a), len(rec_b))
    else:
        cfg = _config(args.config, "--config")
        recs = capture(model, inputs, cfg).records
        pairs = [(r.original, r.rewritten) for r in recs]
        labels = ("before GNMR pass", f"after GNMR pass (recipe {cfg.recipe})")
        mismatch, counts = False, (len(recs), len(recs))
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and "NO_COLOR" not in os.environ)
    diffs = [diff(a, b, label_a=f"{labels[0]} [graph {i}]", label_b=f"{labels[1]} [graph {i}]", context=args.context)
             for i, (a, b) in enumerate(pairs)]
    if args.format == "json":
        text = json.dumps({"graphs": list(counts), "diffs": [d.to_dict() for d in diffs]}, indent=2)
    else:
        parts = []
        if mismatch:
            parts.append(f"graph count differs: {counts[0]} vs {counts[1]} (only the first {len(pairs)} are compared)")
        for i, d in enumerate(diffs):
            parts.append(f"=== graph {i}: {labels[0]} vs {labels[1]}")
            parts.append(d.format(color=color) if d else "identical")
        text = "\n".join(parts)
    print_or_quit(text)
    return 1 if (mismatch or any(diffs)) else 0
