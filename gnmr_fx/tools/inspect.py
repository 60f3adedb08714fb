"""``gnmr_fx.inspect`` and ``gnmr-fx inspect``: what GNMR sees in a model.

Inspection captures the model (``gnmr_fx.tools.capture``: a fresh runtime
and the real GNMR backend), runs one forward pass with the example inputs
(positional and keyword, as the training loop calls the model), and reports every
recoverable unit with its shapes, FLOPs, recipe, high path, plan and filter
state, plus the graph breaks Dynamo took and the matmul-family ops it saw
but that are not recoverable. For a model already compiled with GNMR the plan is
the live one: what its compiled graphs run next.

It leaves the user's model as it was (see ``gnmr_fx.tools.capture``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from gnmr_fx.arguments import parse_device, parse_max_o, user_input
from gnmr_fx.config import POLICIES, GNMRConfig
from gnmr_fx.runtime import GNMRRuntime, runtime_of
from gnmr_fx.tools.capture import capture, unwrap

# --------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------


@dataclass
class UnitInfo:
    """One recoverable unit, as ``inspect`` reports it."""

    name: str
    op: str
    input_shape: tuple
    weight_shape: Optional[tuple]  # None for a weightless unit (e.g. q @ k^T)
    b_shape: tuple  # the second operand (the weight as passed, or an activation)
    flops: int
    flops_share: float
    recipe: Optional[str]  # None when the filter excluded the unit
    high_path: Optional[str]
    plan: str  # "high", "low", or "excluded"
    included: bool
    weight: Optional[str]
    where: str
    graph: int


@dataclass
class GraphBreak:
    graph: int
    reason: str


@dataclass
class InspectResult:
    """What :func:`inspect` found: ``.units``, totals, ``.table()``, ``.to_json()``."""

    units: list[UnitInfo]
    graphs: int
    graph_breaks: list[GraphBreak]
    not_recoverable: dict[str, int]
    recipe: str
    high_path: str
    policy: str
    max_o: Any
    unit_filter: Any
    plan_source: str
    total_flops: int = 0
    extra: dict = field(default_factory=dict)
    # Of a compiled model (None otherwise): its graphs that have an all-low
    # copy (GNMRConfig.low_graph), of how many, and the calls that ran one.
    low_copies: Optional[list] = None
    compiled_graphs: Optional[int] = None
    low_graph_calls: Optional[int] = None

    @property
    def names(self) -> list[str]:
        return [u.name for u in self.units]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["units"] = [asdict(u) for u in self.units]
        d["unit_filter"] = list(self.unit_filter) if isinstance(self.unit_filter, tuple) else (
            None if self.unit_filter is None else repr(self.unit_filter))
        d["totals"] = {
            "graphs": self.graphs,
            "graph_breaks": len(self.graph_breaks),
            "units": len(self.units),
            "included": sum(u.included for u in self.units),
            "flops": self.total_flops,
            "not_recoverable": dict(self.not_recoverable),
            "low_copies": None if self.low_copies is None else len(self.low_copies),
        }
        return d

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self) -> str:
        from tabulate import tabulate

        rows = [
            [u.name, u.op, _shape(u.input_shape), _shape(u.weight_shape) if u.weight_shape else f"act {_shape(u.b_shape)}",
             _si(u.flops), f"{100 * u.flops_share:.1f}%", u.recipe or "-", u.high_path or "-", u.plan,
             "yes" if u.included else "no"]
            for u in self.units
        ]
        head = ["unit", "op", "input", "weight", "FLOPs", "share", "low recipe", "high path", "plan", "filter"]
        out = [tabulate(rows, headers=head, disable_numparse=True)]
        n_inc = sum(u.included for u in self.units)
        out.append("")
        out.append(f"graphs captured: {self.graphs}    graph breaks: {len(self.graph_breaks)}")
        for b in self.graph_breaks:
            out.append(f"  break after graph {b.graph}: {b.reason}")
        out.append(f"units: {len(self.units)} ({n_inc} included by the filter)    "
                   f"forward FLOPs in units: {_si(self.total_flops)}")
        if self.not_recoverable:
            kinds = ", ".join(f"{k} x{v}" for k, v in sorted(self.not_recoverable.items()))
            out.append(f"seen but not recoverable: {kinds}")
        else:
            out.append("seen but not recoverable: none")
        out.append(f"policy {self.policy}, budget max_o={self.max_o}, plan: {self.plan_source}")
        if self.low_copies is not None:
            which = ", ".join(map(str, self.low_copies)) if self.low_copies else "none"
            out.append(f"all-low copies (GNMRConfig.low_graph) in the compiled model: graphs {which} of "
                       f"{self.compiled_graphs}; calls that ran one: {self.low_graph_calls}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def _shape(s: Optional[tuple]) -> str:
    return "-" if s is None else "x".join(str(int(d)) for d in s)


def _si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))


def inspect(
    model: torch.nn.Module,
    example_inputs: Any,
    config: Optional[GNMRConfig] = None,
    *,
    example_kwargs: Optional[dict] = None,
) -> InspectResult:
    """List the recoverable units of ``model`` and how GNMR would treat them.

    The model runs once as ``model(*example_inputs, **example_kwargs)``: call
    it as the training loop does (e.g. a Hugging Face model with ``labels=``),
    or Dynamo may capture other graphs and breaks than training takes.
    ``example_inputs`` may also be a dict of keyword inputs.

    ``config`` defaults to the config the model was compiled with (if it was)
    or ``GNMRConfig()``. When the model already has a GNMR runtime (also
    through a ``torch.compile`` or DDP wrapper), each unit's plan is the live
    one: what its compiled graphs run next, after ``set_plan`` or controller
    steps. Otherwise it is the initial plan. A unit-filter pattern that
    matches no unit raises ``ValueError``.

    >>> import torch, gnmr_fx
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> res = gnmr_fx.inspect(model, (torch.randn(4, 8),), gnmr_fx.GNMRConfig(recipe="int8"))
    >>> [(u.name, u.op, u.plan) for u in res.units]
    [('0', 'linear', 'low'), ('2', 'linear', 'low')]
    >>> res.graphs, len(res.graph_breaks)
    (1, 0)
    """
    live = _live_runtime(model)
    # The module the runtime belongs to (inside a DDP or torch.compile
    # wrapper), so that units get the names the runtime gave them.
    root = live.root if live is not None else unwrap(model)
    if config is None:
        config = live.config if live is not None else GNMRConfig()
    if not isinstance(config, GNMRConfig):
        raise TypeError(f"config must be a GNMRConfig, got {type(config).__name__}")
    rt = capture(root, example_inputs, config, example_kwargs=example_kwargs)
    with user_input():  # a filter pattern that matches no unit
        rt.check_filter()

    plan = dict(zip(rt.controller.names, rt.controller.plan.detach().cpu().tolist()))
    if live is not None and live.controller.num_units:
        # Units the compiled model has not run yet keep the initial plan.
        plan.update(_live_plan(live))
        plan_source = f"controller of the compiled model at step {live.controller.step} (its graphs' live plan)"
    else:
        plan_source = "initial (the model has no GNMR runtime yet)"

    graph_of = {}
    for rec in rt.records:
        for s in rec.sites:
            graph_of.setdefault(s.unit_id, rec.index)
    total = sum(u.flops for u in rt.units) or 1
    units = []
    for u in rt.units:
        state = ("high" if plan.get(u.name, False) else "low") if u.included else "excluded"
        units.append(UnitInfo(
            name=u.name, op=u.op_name, input_shape=tuple(u.a_shape),
            weight_shape=tuple(u.b_shape) if u.weight is not None else None, b_shape=tuple(u.b_shape),
            flops=int(u.flops), flops_share=u.flops / total,
            recipe=config.recipe if u.included else None,
            high_path=config.high_path if u.included else None,
            plan=state, included=u.included, weight=u.weight, where=u.where, graph=graph_of.get(u.id, 0),
        ))
    skipped: dict[str, int] = {}
    for rec in rt.records:
        for k, v in rec.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    breaks = [GraphBreak(r.index, r.graph_break_reason) for r in rt.records if r.graph_break_reason]
    return InspectResult(
        units=units, graphs=len(rt.records), graph_breaks=breaks, not_recoverable=skipped,
        recipe=config.recipe, high_path=config.high_path, policy=config.policy, max_o=config.max_o,
        unit_filter=config.unit_filter, plan_source=plan_source, total_flops=sum(u.flops for u in rt.units),
        **_low_copies(live),
    )


def _low_copies(live: Optional[GNMRRuntime]) -> dict:
    """What the compiled model's graphs run on all-low steps (``GNMRConfig.low_graph``)."""
    if live is None or not live.records:
        return {}
    return {"low_copies": [r.index for r in live.records if r.low_copy], "compiled_graphs": len(live.records),
            "low_graph_calls": live.low_graph_calls}


def _live_runtime(model: torch.nn.Module) -> Optional[GNMRRuntime]:
    """The GNMR runtime the model was compiled with, if any (as ``gnmr_fx.runtime``)."""
    try:
        rt = runtime_of(model)
    except ValueError:
        return None
    return rt if rt.root is not None else None


def _live_plan(rt: GNMRRuntime) -> dict[str, bool]:
    """Unit name -> high, read from the plan buffers the compiled graphs run
    (the ones ``set_plan`` and every controller step write)."""
    names = rt.controller.names
    plan: dict[str, bool] = {}
    for rec in rt.records:
        if rec.plan is None or rec.unit_ids is None:
            continue
        for row, high in zip(rec.unit_ids.tolist(), rec.plan.detach().cpu().tolist()):
            plan[names[row]] = bool(high)
    return plan


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="SPEC",
                        help="built-in example (tiny_gpt, tiny_gpt_graph_break, hf_gpt2) or package.module:factory; "
                             "factory() returns (model, args) or (model, args, kwargs), the call training makes")
    parser.add_argument("--recipe", default=None, help="low-path recipe (default: the GNMRConfig default)")
    parser.add_argument("--max-o", type=parse_max_o, default=None,
                        help="budget: an integer is a count of units (0: every unit low), "
                             "a decimal or percentage a fraction of the FLOPs (0.05 or 5%%)")
    parser.add_argument("--policy", default=None, choices=POLICIES)
    parser.add_argument("--filter", dest="filters", action="extend", nargs="+", default=None, metavar="PATTERN",
                        help="unit filter: fnmatch patterns on unit names (each must match a unit)")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument("--device", type=parse_device, default=None,
                        help="move the model and inputs here first (e.g. cuda)")


def config_from_args(args: argparse.Namespace) -> GNMRConfig:
    changes: dict[str, Any] = {}
    if getattr(args, "recipe", None) is not None:
        changes["recipe"] = args.recipe
    if getattr(args, "max_o", None) is not None:
        changes["max_o"] = args.max_o
    if getattr(args, "policy", None) is not None:
        changes["policy"] = args.policy
    if getattr(args, "filters", None):
        changes["unit_filter"] = list(args.filters)
    return GNMRConfig(**changes)


def run(args: argparse.Namespace) -> int:
    from gnmr_fx.tools.examples import load_example

    # The SPEC first: its module may register the recipe --recipe names.
    model, inputs, kwargs = load_example(args.spec, args.device)
    with user_input():
        config = config_from_args(args)
    result = inspect(model, inputs, config, example_kwargs=kwargs)
    print_or_quit(result.to_json() if args.format == "json" else result.table())
    return 0


def print_or_quit(text: str) -> None:
    """Print; a closed pipe (``| head``) ends output quietly, like coreutils."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Point stdout at devnull so the interpreter's final flush cannot raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
