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
from gnmr_fx.passes.discover_units import frame_roots, normalize_source_path
from gnmr_fx.backends.host_dispatch import PLAN_HOST
from gnmr_fx.passes.insert_dual_path import PLAN
from gnmr_fx.passes.insert_grad_stats import PROBE
from gnmr_fx.runtime import GNMRRuntime, GraphRecord

COMPILERS = ("inductor", "aot_eager", "eager")
GNMR_STATE = (PROBE, PLAN, PLAN_HOST)  # tensors the passes add to a graph


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
    """Run the GNMR passes on a Dynamo graph and register its units with the runtime."""
    original = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    gm.meta["gnmr_param_fqns"] = _param_fqns(runtime, gm, example_inputs)
    gm.meta["gnmr_frame_roots"] = _frame_roots(runtime, gm, example_inputs)
    cfg = runtime.config
    discover_units(gm, cfg)
    sites = sites_of(gm)
    runtime.register_sites(sites)
    insert_grad_stats(gm, cfg)
    insert_dual_path(gm, cfg)
    state = {name: getattr(gm, name) for name in GNMR_STATE if hasattr(gm, name)}
    return GraphRecord(
        index=len(runtime.records), original=original, rewritten=gm, sites=sites,
        unit_ids=None, skipped=dict(gm.meta.get("gnmr_skipped", {})), compiler="", state=state,
    )


def compile_graph(runtime: GNMRRuntime, gm: torch.fx.GraphModule, example_inputs: list, compiler: str) -> Callable:
    """Rewrite ``gm``, compile it with ``compiler`` and return the callable Dynamo runs.

    The compiled graph takes the GNMR tensors (probe, plan) as trailing
    inputs; :class:`InstanceDispatch` supplies those of the module instance
    whose parameters it is called with.
    """
    record = rewrite_graph(runtime, gm, example_inputs)
    record.compiler = compiler
    runtime.add_record(record)
    exec_gm, names = _lift_state(record.rewritten)
    inputs = list(example_inputs) + [record.state[n] for n in names]
    if compiler == "eager":
        compiled: Callable = exec_gm.forward
    elif compiler == "aot_eager":
        from torch._dynamo.backends.common import aot_autograd

        nop = lambda g, _inputs: make_boxed_func(g)  # noqa: E731
        compiled = aot_autograd(fw_compiler=nop, bw_compiler=nop)(exec_gm, inputs)
    else:
        from torch._inductor.compile_fx import compile_fx

        compiled = compile_fx(exec_gm, inputs)
    if not names:
        return compiled
    return InstanceDispatch(runtime, record, compiled, names, example_inputs)


class InstanceDispatch:
    """Calls a compiled graph with the GNMR tensors of the right module instance.

    Dynamo compiles a frame's code once and reuses the graph for every
    module instance that runs the same code (after a graph break inside a
    repeated block, say), passing each instance's parameters as inputs. The
    parameters passed in identify the instance; the first time a new one
    appears, its units are discovered and named from its own parameters and
    get their own probe and plan. Graphs with no parameter inputs cannot tell
    instances apart and keep the units of the first one.
    """

    def __init__(self, runtime: GNMRRuntime, record: GraphRecord, compiled: Callable,
                 names: list[str], example_inputs: list) -> None:
        self.runtime = runtime
        self.template = record
        self.compiled = compiled
        self.names = names
        self.param_pos = [i for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter)]
        self.instances = {self._key(example_inputs): record}

    def _key(self, args: Any) -> tuple:
        return tuple(id(args[i]) for i in self.param_pos)

    def __call__(self, *args: Any) -> Any:
        # Mirror the caller's convention: a single list is a boxed call
        # (graph inputs are tensors and ints, never lists).
        boxed = len(args) == 1 and isinstance(args[0], list)
        if boxed:
            args = args[0]
        record = self.instances.get(self._key(args))
        if record is None:
            record = self._new_instance(args)
        extra = [record.state[n] for n in self.names]
        if boxed:
            inputs = list(args) + extra
            args.clear()  # boxed convention: the callee owns (and frees) the inputs
            return self.compiled(inputs)
        return self.compiled(*args, *extra)

    def _new_instance(self, args: Any) -> GraphRecord:
        rt, tpl = self.runtime, self.template
        gm = torch.fx.GraphModule(tpl.original, copy.deepcopy(tpl.original.graph))
        gm.meta["gnmr_param_fqns"] = _param_fqns(rt, gm, list(args))
        gm.meta["gnmr_frame_roots"] = _frame_roots(rt, gm, list(args))
        discover_units(gm, rt.config)
        sites = sites_of(gm)
        if [s.spec for s in sites] != [s.spec for s in tpl.sites]:
            raise RuntimeError("internal error: a shared graph's units differ between module instances")
        included = [rt.config.includes(s.base, s.op) for s in sites]
        if any(inc != (t.slot is not None) for inc, t in zip(included, tpl.sites)):
            raise ValueError(
                "GNMRConfig.unit_filter includes a unit in one instance of a repeated module and not in "
                f"another ({[s.base for s in sites]} vs {[t.name for t in tpl.sites]}); Dynamo compiled their "
                "code once, so the filter must treat every instance alike"
            )
        rt.register_sites(sites)
        shared = {s.unit_id for s in sites} & {t.unit_id for t in tpl.sites}
        if shared:
            names = sorted(rt.units[i].name for i in shared)
            raise RuntimeError(
                f"Dynamo reuses the graph of units {names[:4]} for another module instance whose parameters "
                "have no name in this model, so its units cannot be told apart. Compile the repeated blocks "
                "one by one (gnmr_fx.distributed.compile_blocks) or remove the graph break inside them"
            )
        state = {}
        for name, t in tpl.state.items():
            fresh = torch.zeros_like(t)
            state[name] = torch.nn.Parameter(fresh) if isinstance(t, torch.nn.Parameter) else fresh
        record = GraphRecord(
            index=len(rt.records), original=tpl.original, rewritten=tpl.rewritten, sites=sites,
            unit_ids=None, skipped=dict(tpl.skipped), compiler=tpl.compiler, state=state,
            instance_of=tpl.index,
        )
        rt.add_record(record)
        self.instances[self._key(args)] = record
        return record


def gnmr_backend(gm: torch.fx.GraphModule, example_inputs: list, options: Optional[dict] = None) -> Callable:
    """Entry point for ``torch.compile(model, backend="gnmr", options={...})``."""
    config = GNMRConfig.from_options(options)
    config.check_log_path()
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


def _frame_roots(runtime: GNMRRuntime, gm: torch.fx.GraphModule, example_inputs: list) -> dict[str, str]:
    """Frame variable -> its FQN in the root model (see ``frame_roots``).

    Module paths in a Dynamo graph start at a variable of the captured frame:
    ``L['self']`` normally, ``L['args'][0]`` when a decorator wraps
    ``forward``, a submodule's ``self`` after a graph break inside it. The
    parameters, known by identity, say which object each variable is.
    """
    pairs = []
    for ph, x in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        source = getattr(ph.meta.get("grapharg"), "source", None)
        if isinstance(x, torch.nn.Parameter) and id(x) in runtime.param_fqns and source is not None:
            pairs.append((source.name, runtime.param_fqns[id(x)]))
    mod = _frame_module()
    default = runtime.module_fqns.get(id(mod), "") if mod is not None else ""
    return frame_roots(pairs, default)


def _lift_state(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, list[str]]:
    """A copy of ``gm`` that takes the GNMR tensors as trailing inputs.

    ``gm`` itself keeps them as attributes (what inspect, diff and export
    read). The copy carries no Dynamo metadata, so AOTAutograd treats its
    inputs as plain inputs.
    """
    exec_gm = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    last = list(exec_gm.graph.find_nodes(op="placeholder"))[-1]
    names = []
    for node in list(exec_gm.graph.find_nodes(op="get_attr")):
        if node.target not in GNMR_STATE:
            continue
        with exec_gm.graph.inserting_after(last):
            ph = exec_gm.graph.placeholder(node.target)
        ph.meta.update(node.meta)
        node.replace_all_uses_with(ph)
        exec_gm.graph.erase_node(node)
        last = ph
        names.append(node.target)
    for name in names:
        delattr(exec_gm, name)
    exec_gm.graph.lint()
    exec_gm.recompile()
    return exec_gm, names
