"""The ``gnmr`` torch.compile backend: capture -> GNMR passes -> inner compiler.

For every graph Dynamo captures, :func:`compile_graph` names the units in the
runtime's unit table, runs the passes (``gnmr_fx.passes``), registers the
graph with the runtime (``GNMRRuntime.add_record``) and compiles a copy that
takes the graph's GNMR tensors as trailing inputs. From then on the runtime's
``step`` (once per optimizer step) updates the controller and writes the plan.

``torch.compile(model, backend="gnmr", options={...})`` finds
:func:`gnmr_backend` through the ``torch_dynamo_backends`` entry point;
``options`` are GNMRConfig fields, and the model is found from the captured
frame (``gnmr_fx.frames``). ``gnmr_fx.compile`` uses :class:`GNMRBackend`
directly, with the root model known up front (``gnmr_fx.compiled_call``).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Optional

import torch
import torch.fx
from functorch.compile import make_boxed_func
from torch._dynamo.utils import counters

from gnmr_fx.config import GNMRConfig
from gnmr_fx.frames import graph_frame_roots, graph_param_fqns, real_inputs, runtime_for
from gnmr_fx.passes import assign_slots, discover_units, insert_dual_path, insert_grad_stats, sites_of
from gnmr_fx.passes.state import GNMR_STATE
from gnmr_fx.runtime import GNMRRuntime, GraphRecord

COMPILERS = ("inductor", "aot_eager", "eager")
_FAKE = torch._subclasses.fake_tensor.FakeTensor


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
    """Run the GNMR passes on a Dynamo graph, with unit names from the runtime's unit table."""
    original = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    gm.meta["gnmr_param_fqns"] = graph_param_fqns(runtime, gm, example_inputs)
    gm.meta["gnmr_frame_roots"] = graph_frame_roots(runtime, gm, example_inputs)
    cfg = runtime.config
    discover_units(gm, cfg)
    sites = sites_of(gm)
    runtime.name_units(sites)  # names stable across graphs, before the filter reads them
    assign_slots(gm, cfg)
    runtime.add_units(sites)
    insert_grad_stats(gm, cfg)
    insert_dual_path(gm, cfg)
    state = {name: getattr(gm, name) for name in GNMR_STATE if hasattr(gm, name)}
    return GraphRecord(
        index=len(runtime.records), original=original, rewritten=gm, sites=sites,
        unit_ids=None, skipped=dict(gm.meta.get("gnmr_skipped", {})), compiler="", state=state,
        params=frozenset(gm.meta["gnmr_param_fqns"].values()),
    )


def compile_graph(runtime: GNMRRuntime, gm: torch.fx.GraphModule, example_inputs: list, compiler: str) -> Callable:
    """Rewrite ``gm``, compile it with ``compiler`` and return the callable Dynamo runs.

    The compiled graph takes the GNMR tensors (probe, plan) as trailing
    inputs; :class:`InstanceDispatch` supplies those of the module instance
    whose parameters it is called with.
    """
    real = real_inputs(gm, example_inputs)
    record = rewrite_graph(runtime, gm, real)
    record.compiler = compiler
    runtime.add_record(record)
    exec_gm, names = _lift_state(record.rewritten)
    inputs = list(example_inputs) + [record.state[n] for n in names]
    compiled = _compile(exec_gm, inputs, compiler)
    if not names:
        return compiled
    low_graph = runtime.config.low_graph
    if low_graph is None:  # the default: a copy where it buys speed (see GNMRConfig.low_graph)
        low_graph = compiler == "inductor"
    low_gm = _all_low_copy(exec_gm) if low_graph else None
    if runtime.config.low_graph and low_gm is None and any("gnmr_dual" in n.meta for n in exec_gm.graph.nodes):
        warnings.warn(f"GNMRConfig.low_graph: graph {record.index} has units that pick their path on the device "
                      "(dispatch='select'), so it has no all-low copy and runs its dual-path graph on every step",
                      UserWarning, stacklevel=2)
    compiled_low = _compile(low_gm, inputs, compiler) if low_gm is not None else None
    record.low_copy = compiled_low is not None
    return InstanceDispatch(runtime, record, compiled, names, real, compiled_low=compiled_low)


def _compile(gm: torch.fx.GraphModule, inputs: list, compiler: str) -> Callable:
    if compiler == "eager":
        return gm.forward
    _check_dynamo_metadata(gm)
    if compiler == "aot_eager":
        from torch._dynamo.backends.common import aot_autograd

        nop = lambda g, _inputs: make_boxed_func(g)  # noqa: E731
        return aot_autograd(fw_compiler=nop, bw_compiler=nop)(gm, inputs)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, inputs)


def _all_low_copy(gm: torch.fx.GraphModule) -> Optional[torch.fx.GraphModule]:
    """A copy of ``gm`` with every unit's low path inlined (``GNMRConfig.low_graph``):
    emulated ``dispatch_path`` units become ``low_only_path``, real-kernel
    units (``dual_linear`` / ``dual_matmul``) ``low_linear`` / ``low_matmul``;
    the statistics stay (a ``low_linear``'s weight statistic computed inside
    the unit, see ``host_dispatch._LowLinear``). None where a unit picks its
    path on the device (``dispatch="select"``) or there is no unit."""
    from gnmr_fx.backends.host_dispatch import dual_linear, dual_matmul, low_linear, low_matmul
    from gnmr_fx.passes.nodes import dispatch_path, grad_stats, low_only_path

    inline = {dispatch_path: low_only_path, dual_linear: low_linear, dual_matmul: low_matmul}
    low = _graph_copy(gm)
    units = 0
    for node in list(low.graph.nodes):
        if node.op != "call_function" or "gnmr_dual" not in node.meta:
            continue
        if node.target not in inline:
            return None
        node.target = inline[node.target]
        units += 1
        stats = node.args[1] if node.target is low_linear else None
        if isinstance(stats, torch.fx.Node) and stats.target is grad_stats and len(stats.users) == 1:
            w, probe, slot = stats.args
            if slot == node.kwargs["slot"]:
                node.args = (node.args[0], w, *node.args[2:])
                node.kwargs = {**node.kwargs, "probe": probe}
                low.graph.erase_node(stats)
    if not units:
        return None
    low.graph.lint()
    low.recompile()
    return low


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
                 names: list[str], example_inputs: list, compiled_low: Optional[Callable] = None) -> None:
        self.runtime = runtime
        self.template = record
        self.compiled = compiled
        self.compiled_low = compiled_low  # the all-low copy (GNMRConfig.low_graph), or None
        self.names = names
        self.param_pos = [i for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter)]
        fake = any(isinstance(example_inputs[i], _FAKE) for i in self.param_pos)
        # Compiled from fake parameters (a DDPOptimizer piece whose real ones
        # were not recoverable): the first real call is the instance it names.
        self.instances = {} if fake else {self._key(example_inputs): record}

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
            # DDPOptimizer runs the compiled pieces on fake tensors at compile
            # time, to propagate shapes: no module instance is involved.
            if any(isinstance(args[i], _FAKE) for i in self.param_pos):
                record = self.template
            elif not self.instances:
                record = self.instances[self._key(args)] = self.template
            else:
                record = self._new_instance(args)
        extra = [record.state[n] for n in self.names]
        compiled = self.compiled
        if self.compiled_low is not None:
            # The plan the units read on the host (the plan itself on a CPU, the
            # runtime's host copy on a GPU): reading it never waits for a device.
            plan = record.plan_host if record.plan_host is not None else record.plan
            if plan.device.type == "cpu" and not bool(plan.any()):
                compiled = self.compiled_low
                counters["gnmr"]["low_graph_calls"] += 1
                self.runtime.low_graph_calls += 1
        if boxed:
            inputs = list(args) + extra
            args.clear()  # boxed convention: the callee owns (and frees) the inputs
            return compiled(inputs)
        return compiled(*args, *extra)

    def _new_instance(self, args: Any) -> GraphRecord:
        rt, tpl = self.runtime, self.template
        gm = torch.fx.GraphModule(tpl.original, copy.deepcopy(tpl.original.graph))
        gm.meta["gnmr_param_fqns"] = graph_param_fqns(rt, gm, list(args))
        gm.meta["gnmr_frame_roots"] = graph_frame_roots(rt, gm, list(args))
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
        rt.name_units(sites)
        assign_slots(gm, rt.config)
        rt.add_units(sites)
        shared = {s.unit_id for s in sites} & {t.unit_id for t in tpl.sites}
        if shared:
            names = sorted(rt.units[i].name for i in shared)
            raise RuntimeError(
                f"Dynamo reuses the graph of units {names[:4]} for another module instance whose parameters "
                "have no name in this model, so its units cannot be told apart. If it is another model of the "
                "same class compiled with torch.compile(backend='gnmr'), compile each model in its own cache: "
                "gnmr_fx.compile(model, config), or torch.compile(..., isolate_recompiles=True). If it is a "
                "repeated block (FSDP2's swapped-in parameters), compile the blocks one by one "
                "(gnmr_fx.distributed.compile_blocks) or remove the graph break inside them"
            )
        state = {}
        for name, t in tpl.state.items():
            fresh = torch.zeros_like(t)
            state[name] = torch.nn.Parameter(fresh) if isinstance(t, torch.nn.Parameter) else fresh
        record = GraphRecord(
            index=len(rt.records), original=tpl.original, rewritten=tpl.rewritten, sites=sites,
            unit_ids=None, skipped=dict(tpl.skipped), compiler=tpl.compiler, state=state,
            instance_of=tpl.index, params=frozenset(gm.meta["gnmr_param_fqns"].values()), low_copy=tpl.low_copy,
        )
        rt.add_record(record)
        self.instances[self._key(args)] = record
        return record


def gnmr_backend(gm: torch.fx.GraphModule, example_inputs: list, options: Optional[dict] = None) -> Callable:
    """Entry point for ``torch.compile(model, backend="gnmr", options={...})``."""
    config = GNMRConfig.from_options(options)
    config.check_log_path()
    runtime = runtime_for(gm, real_inputs(gm, example_inputs), config)
    return compile_graph(runtime, gm, example_inputs, "inductor")


def _graph_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` with a copy of its graph, keeping what AOTAutograd reads of
    Dynamo's metadata (the compile id, each input's source): from it
    AOTAutograd knows which inputs are parameters ("static" inputs), and
    Inductor's partitioner then treats keeping one for the backward as free,
    as it does for ``torch.compile(model)``. Without it, a unit whose backward
    reads a weight only through its fp8 cast saved the cast weight instead of
    recomputing it from the parameter (tests/test_saved_memory.py). A graph
    not from Dynamo, or with an input of unknown source, is copied without it."""
    new = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    old_inputs, new_inputs = gm.graph.find_nodes(op="placeholder"), new.graph.find_nodes(op="placeholder")
    if "dynamo_compile_id" in gm.meta and hasattr(gm, "_param_name_to_source") \
            and all(hasattr(n, "_dynamo_source") for n in old_inputs):
        for old, copied in zip(old_inputs, new_inputs):
            copied._dynamo_source = old._dynamo_source  # noqa: SLF001
        new.meta["dynamo_compile_id"] = gm.meta["dynamo_compile_id"]
        new._param_name_to_source = gm._param_name_to_source  # noqa: SLF001
    return new


def _check_dynamo_metadata(gm: torch.fx.GraphModule) -> None:
    """Drop the Dynamo metadata :func:`_graph_copy` kept where AOTAutograd
    could not use it (it asserts that every parameter and buffer still on
    the module has a source): the graph then compiles as before, its inputs
    all plain."""
    if "dynamo_compile_id" not in gm.meta:
        return
    sources = getattr(gm, "_param_name_to_source", None)
    names = [n for n, _ in gm.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    if sources is None or any(n not in sources for n in names) \
            or not all(hasattr(n, "_dynamo_source") for n in gm.graph.find_nodes(op="placeholder")):
        del gm.meta["dynamo_compile_id"]


def _lift_state(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, list[str]]:
    """A copy of ``gm`` that takes the GNMR tensors as trailing inputs.

    ``gm`` itself keeps them as attributes (what inspect, diff and export
    read). The copy keeps what AOTAutograd reads of Dynamo's metadata
    (:func:`_graph_copy`); the lifted inputs have no source.
    """
    exec_gm = _graph_copy(gm)
    # A graph may take no input at all (a resumed frame of constants).
    last = next(reversed(exec_gm.graph.find_nodes(op="placeholder")), None)
    names = []
    lifted: dict = {}
    for node in list(exec_gm.graph.find_nodes(op="get_attr")):
        if node.target not in GNMR_STATE:
            continue
        if node.target in lifted:  # one input per tensor, however many nodes read it
            node.replace_all_uses_with(lifted[node.target])
            exec_gm.graph.erase_node(node)
            continue
        if last is None:
            with exec_gm.graph.inserting_before(next(iter(exec_gm.graph.nodes))):
                ph = exec_gm.graph.placeholder(node.target)
        else:
            with exec_gm.graph.inserting_after(last):
                ph = exec_gm.graph.placeholder(node.target)
        ph.meta.update(node.meta)
        ph._dynamo_source = None  # noqa: SLF001  (what AOTAutograd reads; see _graph_copy)
        node.replace_all_uses_with(ph)
        exec_gm.graph.erase_node(node)
        last = ph
        lifted[node.target] = ph
        names.append(node.target)
    for name in names:
        delattr(exec_gm, name)
    exec_gm.graph.lint()
    exec_gm.recompile()
    return exec_gm, names
