"""The ``gnmr`` torch.compile backend: capture -> GNMR passes -> inner compiler.

``torch.compile(model, backend="gnmr", options={...})`` finds this through
the ``torch_dynamo_backends`` entry point; ``options`` are GNMRConfig fields,
and the model is found from the captured frame (the module that owns the
graph's parameters). ``gnmr_fx.compile`` uses :class:`GNMRBackend` directly,
with the root model known up front, through :func:`compile_module`.
"""

from __future__ import annotations

import copy
import itertools
import re
import types
import weakref
from typing import Any, Callable, Optional

import torch
import torch.fx
from functorch.compile import make_boxed_func

from gnmr_fx.config import GNMRConfig
from gnmr_fx.passes import discover_units, insert_dual_path, insert_grad_stats, sites_of
from gnmr_fx.passes.discover_units import frame_roots, normalize_source_path, split_source_path
from gnmr_fx.backends.host_dispatch import PLAN_HOST
from gnmr_fx.passes.insert_dual_path import PLAN
from gnmr_fx.passes.insert_grad_stats import PROBE
from gnmr_fx.runtime import GNMRRuntime, GraphRecord

COMPILERS = ("inductor", "aot_eager", "eager")
_FAKE = torch._subclasses.fake_tensor.FakeTensor
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


def compile_module(module: torch.nn.Module, backend: GNMRBackend) -> "CompiledCall":
    """Compile ``module.forward`` with ``backend``, in place and in a cache of its own.

    ``module.forward`` becomes a :class:`CompiledCall`; ``module(...)`` runs
    its hooks as written and then the compiled forward (what
    ``nn.Module.compile`` does for a module with a user-defined forward).
    Three choices make every call reach the GNMR backend:

    * The compiled frame is a function of this file that calls the forward.
      Dynamo never compiles a frame of ``torch.nn`` code (``_call_impl``,
      ``nn.Sequential.forward``, ``nn.Linear.forward``) on its own, only
      inlined into a frame it traces, so a model made only of ``torch.nn``
      modules whose call graph-breaks before its forward (DDP's forward,
      FSDP2's pre-forward hook, both untraceable) would give 0 graphs.
    * The hooks run outside the compiled frame: the graph break they cause
      would, inside it, give up the whole call (Dynamo resumes only in the
      frame it compiles, not in an inlined call).
    * Each compile has a Dynamo cache of its own. Dynamo keeps compiled code
      per code object, and each compile has its own backend object, so
      every compile of a model class would otherwise add an entry to one
      shared cache and the 9th would run uncompiled (``recompile_limit``
      8). The compiled function gets a code object of its own (so other
      compiles never count towards ``accumulated_recompile_limit``, and
      its entries are freed with the module), and ``isolate_recompiles=True``
      gives the frames below it (graph breaks inside ``forward``) a region
      of their own in their code objects' caches.

    A second compile of the same module compiles its original forward again.
    """
    forward = module.forward
    if isinstance(forward, CompiledCall):
        forward = forward.forward

    def gnmr_forward(*args: Any, **kwargs: Any) -> Any:
        return forward(*args, **kwargs)

    code = gnmr_forward.__code__.replace(co_name=f"gnmr_forward_{next(_COMPILES)}")
    fresh = types.FunctionType(code, gnmr_forward.__globals__, code.co_name, None, gnmr_forward.__closure__)
    call = CompiledCall(backend.runtime, torch.compile(fresh, backend=backend, isolate_recompiles=True), forward)
    module.forward = call
    return call


_COMPILES = itertools.count()


class CompiledCall:
    """A compiled module call that never runs uncompiled without an error.

    ``torch._dynamo.config.fail_on_recompile_limit_hit`` is set for the
    duration of the call only, so other compiled code in the process keeps
    Dynamo's default (fall back to eager). After each call, until its check
    ran, the runtime sees the output (``GNMRRuntime.note_call``).
    """

    def __init__(self, runtime: GNMRRuntime, fn: Callable, forward: Callable) -> None:
        self.runtime = runtime
        self.fn = fn
        self.forward = forward  # the module's own forward, as compiled
        # Like the bound method it replaces: module paths that Dynamo reads
        # through it (``model.forward.__self__.head``) name the module
        # (``split_source_path``).
        self.__self__ = getattr(forward, "__self__", None)
        self.__func__ = getattr(forward, "__func__", None)
        # inspect.signature follows __wrapped__: callers that read the
        # forward's parameters (transformers.Trainer keeps only the dataset
        # columns the model accepts) see the model's, not (*args, **kwargs).
        self.__wrapped__ = forward

    def __deepcopy__(self, memo: dict) -> Callable:
        # A copy of a compiled module is an uncompiled module: its forward is
        # the one this module had before compiling, bound to the copy (the
        # copy is in the memo before its attributes are copied).
        return copy.deepcopy(self.forward, memo)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            # Traced by an enclosing torch.compile (gnmr_fx.inspect's capture):
            # the forward is inlined into its graph, as Dynamo does with any
            # nested compiled function.
            if self.__func__ is not None:
                return self.__func__(self.__self__, *args, **kwargs)
            return self.forward(*args, **kwargs)
        cfg = torch._dynamo.config
        prior = cfg.fail_on_recompile_limit_hit
        # suppress_errors (the user's explicit choice of eager fallbacks) and
        # fail_on_recompile_limit_hit cannot both be set.
        cfg.fail_on_recompile_limit_hit = not cfg.suppress_errors
        try:
            out = self.fn(*args, **kwargs)
        except torch._dynamo.exc.FailOnRecompileLimitHit as e:
            raise RuntimeError(
                f"Dynamo hit its recompile limit (torch._dynamo.config.recompile_limit = {cfg.recompile_limit}, "
                f"accumulated_recompile_limit = {cfg.accumulated_recompile_limit}) on this GNMR-compiled model: "
                "it would run this call uncompiled, without GNMR. Find what recompiles with "
                "TORCH_LOGS=recompiles (new input shapes: mark_dynamic or pad; a new model per call: reuse one) "
                "or raise the limit"
            ) from e
        finally:
            cfg.fail_on_recompile_limit_hit = prior
        self.runtime.note_call(out)
        return out


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
        params=frozenset(gm.meta["gnmr_param_fqns"].values()),
    )


def compile_graph(runtime: GNMRRuntime, gm: torch.fx.GraphModule, example_inputs: list, compiler: str) -> Callable:
    """Rewrite ``gm``, compile it with ``compiler`` and return the callable Dynamo runs.

    The compiled graph takes the GNMR tensors (probe, plan) as trailing
    inputs; :class:`InstanceDispatch` supplies those of the module instance
    whose parameters it is called with.
    """
    real = _real_inputs(gm, example_inputs)
    record = rewrite_graph(runtime, gm, real)
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
    return InstanceDispatch(runtime, record, compiled, names, real)


def _real_inputs(gm: torch.fx.GraphModule, example_inputs: list) -> list:
    """The example inputs, each fake tensor replaced by the real one Dynamo took it from, where known.

    DDPOptimizer (``torch._dynamo.config.optimize_ddp``) splits a graph at
    DDP's gradient-bucket boundaries and compiles each piece with fake
    inputs. Parameters are known by identity (names, module instances), so
    they must be the real ones; the pieces' placeholders keep Dynamo's
    ``grapharg``, which holds them.
    """
    out = []
    for ph, x in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        if isinstance(x, _FAKE):
            grapharg = ph.meta.get("grapharg")
            real = getattr(grapharg, "_example", None)  # a weak reference; None once Dynamo erased it
            real = real() if callable(real) else real
            if isinstance(real, torch.Tensor) and not isinstance(real, _FAKE):
                x = real
        out.append(x)
    return out


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
            instance_of=tpl.index, params=frozenset(gm.meta["gnmr_param_fqns"].values()),
        )
        rt.add_record(record)
        self.instances[self._key(args)] = record
        return record


def gnmr_backend(gm: torch.fx.GraphModule, example_inputs: list, options: Optional[dict] = None) -> Callable:
    """Entry point for ``torch.compile(model, backend="gnmr", options={...})``."""
    config = GNMRConfig.from_options(options)
    config.check_log_path()
    runtime = _runtime_for(gm, _real_inputs(gm, example_inputs), config)
    return compile_graph(runtime, gm, example_inputs, "inductor")


# --------------------------------------------------------------------------


def _runtime_for(gm: torch.fx.GraphModule, example_inputs: list, config: GNMRConfig) -> GNMRRuntime:
    """Find the runtime of the model these inputs belong to, or attach one to it.

    A graph whose parameters (or frame module) belong to a model that
    already has a runtime joins it (graph breaks, recompiles). Otherwise the
    model is the module of the captured frame that owns all the graph's
    parameters (:func:`_frame_root`), and the runtime is attached to it, so
    ``gnmr_fx.runtime(model)`` and ``model.state_dict()`` see it. A graph
    whose model cannot be found raises: a runtime nobody can reach would
    train and checkpoint nothing.
    """
    params = [x for x in example_inputs if isinstance(x, torch.nn.Parameter)]
    live = list(_RUNTIMES)
    # By parameters; a graph without any (after a graph break) by its frame's module.
    found = ([rt for rt in live if any(_owns(rt, p, rt.param_fqns) for p in params)] if params else
             [rt for rt in live if any(_owns(rt, m, rt.module_fqns) for m in _frame_modules())])
    if found:
        rt = found[0]
        if rt.config != config:
            raise ValueError("torch.compile(backend='gnmr'): options differ from the ones this model was compiled with")
        return rt
    root = _frame_root(gm, example_inputs)
    if root is None:
        raise ValueError(
            "torch.compile(backend='gnmr') could not find the model of this graph: no nn.Module in the compiled "
            "frame owns its parameters. GNMR keeps its state (units, controller, checkpoint keys) on the model: "
            "compile an nn.Module (torch.compile(model, backend='gnmr') or gnmr_fx.compile(model))"
        )
    rt = GNMRRuntime.attach(root, config)
    _RUNTIMES.add(rt)
    return rt


# Runtimes created by the ``gnmr`` entry point, while their model lives (the
# model holds its runtime; Dynamo's cache may keep one whose model is gone).
_RUNTIMES: "weakref.WeakSet[GNMRRuntime]" = weakref.WeakSet()


def _owns(rt: GNMRRuntime, obj: Any, index: dict[int, str]) -> bool:
    """Whether ``obj`` (a parameter or module) is in ``rt``'s live model: by
    identity, since a dead model's ids may be reused."""
    root, fqn = rt.root, index.get(id(obj))
    if root is None or fqn is None:
        return False
    try:
        found = root.get_submodule(fqn) if isinstance(obj, torch.nn.Module) else root.get_parameter(fqn)
    except AttributeError:
        return False
    return found is obj


def _current_tx() -> Any:
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return InstructionTranslator.current_tx()
    except Exception:  # noqa: BLE001 - private API; without it the frame is unknown (callers raise)
        return None


def _frame_modules() -> list[torch.nn.Module]:
    """The nn.Modules among the compiled frame's variables (``self`` first;
    also inside ``args`` / ``kwargs`` of a decorator that wraps forward)."""
    tx = _current_tx()
    out: list[torch.nn.Module] = []
    for v in getattr(tx, "f_locals", {}).values():
        items = list(v) if isinstance(v, (tuple, list)) else list(v.values()) if isinstance(v, dict) else [v]
        for x in items:
            owner = getattr(x, "__self__", None)
            for m in (x, owner):
                if isinstance(m, torch.nn.Module) and all(m is not o for o in out):
                    out.append(m)
    return out


def _frame_module() -> Optional[torch.nn.Module]:
    """The nn.Module whose frame Dynamo is compiling, when it can be seen."""
    modules = _frame_modules()
    return modules[0] if modules else None


_SUBSCRIPT = re.compile(r"\[(?:(\d+)|'([^']*)')\]")


def _frame_variable(tx: Any, root: str) -> Any:
    """The object a frame-root source (``L['self']``, ``L['args'][0]``,
    ``L['forward'].__self__``) names."""
    scope = {"L": getattr(tx, "f_locals", {}), "G": getattr(tx, "f_globals", {})}.get(root[:1])
    subs = _SUBSCRIPT.findall(root[1:])
    if scope is None or not subs:
        return None
    obj: Any = scope
    try:
        for i, key in subs:
            obj = obj[int(i)] if i else obj[key]
    except (KeyError, IndexError, TypeError):
        return None
    return getattr(obj, "__self__", None) if root.endswith(".__self__") else obj


def _frame_root(gm: torch.fx.GraphModule, example_inputs: list) -> Optional[torch.nn.Module]:
    """The model of a graph: the outermost module of the frame that owns all its parameters.

    Candidates are the frame variables the parameters' sources start from
    (``L['self']``, or ``L['args'][0]`` when a decorator wraps ``forward`` as
    ``wrapper(*args, **kwargs)``, as transformers does) and the modules among
    the frame's variables. A module owns a parameter by identity or, for
    parameters swapped in by FSDP2 (the unsharded ones), by the path its
    source names below the module. A DDP wrapper's model is the module it
    wraps.
    """
    tx = _current_tx()
    if tx is None:
        return None
    params, paths = [], []
    candidates = _frame_modules()
    for ph, x in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        source = getattr(ph.meta.get("grapharg"), "source", None)
        if not isinstance(x, torch.nn.Parameter):
            continue
        params.append(x)
        if source is not None:
            root, rel = split_source_path(source.name)
            obj = _frame_variable(tx, root)
            if isinstance(obj, torch.nn.Module):
                paths.append((obj, ".".join(rel)))
                if all(obj is not c for c in candidates):
                    candidates.append(obj)
    owners = []
    for m in candidates:
        names = dict(m.named_parameters(remove_duplicate=False))
        ids = {id(p) for p in names.values()}
        by_path = len(paths) == len(params) and all(o is m and rel in names for o, rel in paths)
        if by_path or all(id(p) in ids for p in params):
            owners.append((len(ids), len(names), m))
    if not owners:
        return None
    root = max(owners, key=lambda t: t[:2])[2]
    return root.module if isinstance(root, torch.nn.parallel.DistributedDataParallel) else root


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
    if mod is not None:
        return frame_roots(pairs, runtime.module_fqns.get(id(mod), ""))
    # Called outside Dynamo (a graph reused for another module instance):
    # ops with no module stack belong to the frame's own object, L['self'].
    roots = frame_roots(pairs)
    roots[""] = roots.get("L['self']", "")
    return roots


def _lift_state(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, list[str]]:
    """A copy of ``gm`` that takes the GNMR tensors as trailing inputs.

    ``gm`` itself keeps them as attributes (what inspect, diff and export
    read). The copy carries no Dynamo metadata, so AOTAutograd treats its
    inputs as plain inputs.
    """
    exec_gm = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    # A graph may take no input at all (a resumed frame of constants).
    last = next(reversed(exec_gm.graph.find_nodes(op="placeholder")), None)
    names = []
    for node in list(exec_gm.graph.find_nodes(op="get_attr")):
        if node.target not in GNMR_STATE:
            continue
        if last is None:
            with exec_gm.graph.inserting_before(next(iter(exec_gm.graph.nodes))):
                ph = exec_gm.graph.placeholder(node.target)
        else:
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
