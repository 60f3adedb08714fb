"""The ``gnmr`` torch.compile backend: capture -> GNMR passes -> inner compiler.

``torch.compile(model, backend="gnmr", options={...})`` finds this through
the ``torch_dynamo_backends`` entry point; ``options`` are GNMRConfig fields.
``gnmr_fx.compile`` uses :class:`GNMRBackend` directly, with the root model
known up front.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import torch
import torch.fx
from functorch.compile import make_boxed_func

from gnmr_fx.config import GNMRConfig
from gnmr_fx.passes import discover_units, insert_dual_path, insert_grad_stats, sites_of
from gnmr_fx.passes.discover_units import normalize_source_path
from gnmr_fx.passes.insert_dual_path import PLAN
from gnmr_fx.passes.insert_grad_stats import PROBE
from gnmr_fx.runtime import GNMRRuntime, GraphRecord

COMPILERS = ("inductor", "aot_eager", "eager")


class GNMRBackend:
    """A Dynamo backend bound to one model's runtime and an inner compiler.

    Keeps every compiled graph on ``runtime.records`` for inspection.
    """

    def __init__(self, runtime: GNMRRuntime, compiler: str = "inductor") -> None:
        if compiler not in COMPILERS:
            raise ValueError(f"backend must be one of {COMPILERS} (got {compiler!r})")
        self.runtime = runtime
        self.compiler = compiler

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        return compile_graph(self.runtime, gm, example_inputs, self.compiler)


def rewrite_graph(runtime: GNMRRuntime, gm: torch.fx.GraphModule, example_inputs: list) -> GraphRecord:
    """Run the GNMR passes on a Dynamo graph and register it with the runtime."""
    original = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    gm.meta["gnmr_param_fqns"] = _param_fqns(runtime, gm, example_inputs)
    gm.meta["gnmr_frame_prefix"] = _frame_prefix(runtime, gm, example_inputs)
    cfg = runtime.config
    discover_units(gm, cfg)
    sites = sites_of(gm)
    runtime.register_sites(sites)
    insert_grad_stats(gm, cfg)
    insert_dual_path(gm, cfg)
    _register_new_inputs(gm)
    return GraphRecord(
        index=len(runtime.records), original=original, rewritten=gm, sites=sites,
        unit_ids=None, skipped=dict(gm.meta.get("gnmr_skipped", {})), compiler="",
    )


def compile_graph(runtime: GNMRRuntime, gm: torch.fx.GraphModule, example_inputs: list, compiler: str) -> Callable:
    record = rewrite_graph(runtime, gm, example_inputs)
    record.compiler = compiler
    runtime.add_record(record)
    if compiler == "eager":
        return gm.forward
    if compiler == "aot_eager":
        from torch._dynamo.backends.common import aot_autograd

        nop = lambda g, _inputs: make_boxed_func(g)  # noqa: E731
        return aot_autograd(fw_compiler=nop, bw_compiler=nop)(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def gnmr_backend(gm: torch.fx.GraphModule, example_inputs: list, options: Optional[dict] = None) -> Callable:
    """Entry point for ``torch.compile(model, backend="gnmr", options={...})``."""
    config = GNMRConfig.from_options(options)
    runtime = _runtime_for(gm, example_inputs, config)
    return compile_graph(runtime, gm, example_inputs, "inductor")


# --------------------------------------------------------------------------


def _runtime_for(gm: torch.fx.GraphModule, example_inputs: list, config: GNMRConfig) -> GNMRRuntime:
    """Find the runtime of the model these inputs belong to, or start one.

    Parameters identify the model: a graph whose parameters belong to a
    model that already has a runtime joins it (graph breaks, recompiles).
    """
    params = [x for x in example_inputs if isinstance(x, torch.nn.Parameter)]
    for rt in list(_RUNTIMES):
        if any(id(p) in rt.param_fqns for p in params):
            if rt.config != config:
                raise ValueError("torch.compile(backend='gnmr'): options differ from the ones this model was compiled with")
            return rt
    root = _frame_module()
    if root is not None:
        rt = GNMRRuntime.attach(root, config)
    else:
        rt = GNMRRuntime(config)
        for ph, x in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
            if isinstance(x, torch.nn.Parameter):
                rt.param_fqns[id(x)] = _source_path(ph) or ph.name
    _RUNTIMES.append(rt)
    return rt


_RUNTIMES: list[GNMRRuntime] = []


def _frame_module() -> Optional[torch.nn.Module]:
    """The nn.Module whose frame Dynamo is compiling, when it can be seen."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except Exception:  # noqa: BLE001 - private API; absence only costs a nicer root
        return None
    for v in getattr(tx, "f_locals", {}).values():
        if isinstance(v, torch.nn.Module):
            return v
        owner = getattr(v, "__self__", None)
        if isinstance(owner, torch.nn.Module):
            return owner
    return None


def _source_path(ph: torch.fx.Node) -> Optional[str]:
    grapharg = ph.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    return normalize_source_path(source.name) if source is not None else None


def _param_fqns(runtime: GNMRRuntime, gm: torch.fx.GraphModule, example_inputs: list) -> dict[str, str]:
    """placeholder / get_attr name -> FQN of the parameter in the root model."""
    out: dict[str, str] = {}
    for ph, x in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        if isinstance(x, torch.nn.Parameter):
            fqn = runtime.param_fqns.get(id(x)) or _source_path(ph)
            if fqn:
                out[ph.name] = fqn
    for node in gm.graph.find_nodes(op="get_attr"):
        try:
            p = gm.get_parameter(node.target)
        except AttributeError:
            continue
        out[node.target] = runtime.param_fqns.get(id(p), node.target)
    return out


def _frame_prefix(runtime: GNMRRuntime, gm: torch.fx.GraphModule, example_inputs: list) -> str:
    """FQN of the captured frame's module within the root (``""`` for the root).

    After a graph break inside a submodule, Dynamo captures that submodule's
    frame and its module paths are relative to it. A parameter seen both by
    its frame-relative source and its root FQN gives the prefix.
    """
    for ph, x in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        if isinstance(x, torch.nn.Parameter) and id(x) in runtime.param_fqns:
            rel = _source_path(ph)
            fqn = runtime.param_fqns[id(x)]
            if rel and fqn.endswith(rel):
                return fqn[: -len(rel)].rstrip(".")
    mod = _frame_module()
    if mod is not None:
        return runtime.module_fqns.get(id(mod), "")
    return ""


def _register_new_inputs(gm: torch.fx.GraphModule) -> None:
    """Tell AOTAutograd where the probe and plan come from.

    AOTAutograd lifts a Dynamo graph's own parameters and buffers as inputs
    and expects a source for each; the two the passes added get constant
    sources (they are never guarded on: a new plan changes no guard).
    """
    names = getattr(gm, "_param_name_to_source", None)
    if names is None:
        return
    from torch._dynamo.source import ConstantSource

    for attr in (PROBE, PLAN):
        if hasattr(gm, attr):
            names[attr] = ConstantSource(f"gnmr{attr}")
