"""What the captured frame tells about a graph: its model, its parameters' names.

Dynamo hands the backend a graph and its example inputs; unit names and the
runtime to join come from the model those belong to. This module finds it
(by parameter identity, then from the frame's variables) and maps the
graph's placeholders to the parameters' FQNs in the root model, which
``passes.discover_units`` reads from ``gm.meta``.
"""

from __future__ import annotations

import re
import weakref
from typing import Any, Optional

import torch
import torch.fx

from gnmr_fx.config import GNMRConfig
from gnmr_fx.passes.discover_units import frame_roots, normalize_source_path, split_source_path
from gnmr_fx.runtime import GNMRRuntime

_FAKE = torch._subclasses.fake_tensor.FakeTensor


def real_inputs(gm: torch.fx.GraphModule, example_inputs: list) -> list:
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




def runtime_for(gm: torch.fx.GraphModule, example_inputs: list, config: GNMRConfig) -> GNMRRuntime:
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


def graph_param_fqns(runtime: GNMRRuntime, gm: torch.fx.GraphModule, example_inputs: list) -> dict[str, str]:
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


def graph_frame_roots(runtime: GNMRRuntime, gm: torch.fx.GraphModule, example_inputs: list) -> dict[str, str]:
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
