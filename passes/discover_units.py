"""discover_units: find the recoverable operators of a captured graph.

Annotates every recoverable node with ``node.meta["gnmr_unit"]`` (a
:class:`UnitSite`) and records what was seen but left alone in
``gm.meta["gnmr_skipped"]`` (kind -> count). It does not change the graph.

What the pass guarantees:

* matching is by target object (``backends.ops.RECOVERABLE_OPS``, and the
  library ops of ``backends.ops.LIBRARY_OPS`` that are registered, such as
  Hugging Face MoE experts' ``transformers::grouped_mm_fallback``);
* a site's ``key`` depends only on the model's module paths, parameter names
  and source locations, never on node names or compile order, so the unit
  table can give the same site the same name after a recompile or a graph
  break;
* operands below rank 2 or of non-floating dtypes are skipped, with reason.

The backend supplies two facts only it knows, through ``gm.meta``:
``gnmr_param_fqns`` (placeholder name -> parameter FQN in the root model)
and ``gnmr_frame_roots`` (the frame variable a module path starts from,
e.g. ``L['self']`` or ``L['args'][0]`` when a decorator wraps ``forward``
-> that object's FQN in the root model; see :func:`frame_roots`).
"""

from __future__ import annotations

import collections
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx

from gnmr_fx.backends.ops import (
    NOT_RECOVERABLE_OPS,
    RECOVERABLE_OPS,
    VIEW_FUNCTIONS,
    VIEW_METHODS,
    OpSpec,
    library_ops,
    op_of,
)
from gnmr_fx.config import GNMRConfig
from gnmr_fx.passes.counters import counters

try:
    from torch.fx.experimental.symbolic_shapes import optimization_hint as _size_hint
except ImportError:  # older torch: the same function under its earlier name
    from torch.fx.experimental.symbolic_shapes import hint_int as _size_hint

# A frame variable (a local or a global) and the subscripts applied to it
# directly: ``L['self']``, ``L['args'][0]``, ``G['model']``, or the object of
# a bound method (``L['forward'].__self__``: a compiled function that calls
# ``module.forward``). What follows is an attribute path below that object.
_FRAME_ROOT = re.compile(r"^[LG]\['[^']*'\](?:\[(?:\d+|'[^']*')\])*(?:\.__self__)?")
_BOUND_SELF = re.compile(r"\.[A-Za-z_]\w*\.__self__(?=\.|\[|$)")
_STACK_FILE = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


@dataclass
class UnitSite:
    """One recoverable operator in one captured graph."""

    key: tuple  # stable identity of the call site (see module docstring)
    base: str  # weight-derived name, or module path for weightless units
    spec: OpSpec
    op: Any  # the op as the user wrote it (target object), for filters
    weight: Optional[str]  # FQN of the weight parameter, None if weightless
    a_shape: tuple
    b_shape: tuple
    out_shape: tuple
    flops: int
    where: str  # "file:line" of the user's code
    # Filled in by the runtime's unit table (naming) and assign_slots (filter, slot):
    name: Optional[str] = None
    unit_id: Optional[int] = None
    included: bool = True
    slot: Optional[int] = None
    extra: dict = field(default_factory=dict)


def discover_units(gm: torch.fx.GraphModule, config: GNMRConfig) -> torch.fx.GraphModule:
    """Annotate recoverable nodes of ``gm`` with a :class:`UnitSite`.

    >>> import torch, torch.nn.functional as F
    >>> def f(x, w):
    ...     return F.linear(x, w) @ w
    >>> from torch.fx.passes.shape_prop import ShapeProp
    >>> gm = torch.fx.symbolic_trace(f)
    >>> _ = ShapeProp(gm).propagate(torch.randn(4, 8), torch.randn(3, 8))
    >>> _ = discover_units(gm, GNMRConfig())
    >>> [s.spec.name for s in sites_of(gm)]
    ['linear', 'matmul']
    """
    param_fqns: dict[str, str] = gm.meta.get("gnmr_param_fqns", {})
    roots: dict[str, str] = gm.meta.get("gnmr_frame_roots", {})
    skipped: collections.Counter = collections.Counter()
    seen_keys: collections.Counter = collections.Counter()
    recoverable = {**RECOVERABLE_OPS, **library_ops()}
    for node in gm.graph.nodes:
        target = op_of(node)
        if target is None:
            continue
        spec = recoverable.get(target) if _hashable(target) else None
        if spec is None:
            if _hashable(target) and target in NOT_RECOVERABLE_OPS:
                skipped[NOT_RECOVERABLE_OPS[target]] += 1
                counters["discover_units"]["not_recoverable"] += 1
            continue
        reason = _unsupported(node, spec)
        if reason:
            skipped[f"{spec.name} ({reason})"] += 1
            counters["discover_units"]["skipped"] += 1
            continue
        a, b = node.args[spec.a_index], node.args[spec.b_index]
        weight = _weight_fqn(b, param_fqns)
        module = _module_path(node, roots)
        file, line, _fn = _user_frame(node)
        if weight is not None:
            owner, _, pname = weight.rpartition(".")
            if module and owner != module and not owner.startswith(module + "."):
                # A weight owned elsewhere (tied embeddings: GPT-2's lm_head
                # uses transformer.wte.weight): name the layer that calls it.
                base = module
            else:
                base = owner if pname == "weight" and owner else weight
        else:
            # Ops written directly in a frame Dynamo resumed after a graph
            # break carry no module stack; the frame prefix still places them.
            base = f"{module}.{spec.name}" if module else spec.name
        raw_key = ("w" if weight else "a", base, spec.name, file, line)
        occurrence = seen_keys[raw_key]
        seen_keys[raw_key] += 1
        a_shape = _sizes(_example(a))
        b_shape = _sizes(_example(b))
        out_shape = _sizes(_example(node))
        flops = 2 * math.prod(out_shape) * a_shape[-1]
        node.meta["gnmr_unit"] = UnitSite(
            key=raw_key + (occurrence,),
            base=base,
            spec=spec,
            op=target,
            weight=weight,
            a_shape=a_shape,
            b_shape=b_shape,
            out_shape=out_shape,
            flops=flops,
            where=f"{file}:{line}",
        )
        counters["discover_units"]["units"] += 1
    gm.meta["gnmr_skipped"] = dict(skipped)
    return gm


def sites_of(gm: torch.fx.GraphModule) -> list[UnitSite]:
    """The unit sites of ``gm`` in graph order."""
    return [n.meta["gnmr_unit"] for n in gm.graph.nodes if "gnmr_unit" in n.meta]


def _hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def _example(node: Any) -> Any:
    """Shape/dtype of a node: a fake tensor under Dynamo, TensorMetadata after ShapeProp."""
    if isinstance(node, torch.fx.Node):
        for k in ("example_value", "val", "tensor_meta"):
            v = node.meta.get(k)
            if v is not None:
                return v
    raise ValueError(f"no shape information on {node}; capture the graph with Dynamo or run ShapeProp first")


def _sizes(example: Any) -> tuple[int, ...]:
    """A node's sizes as ints: the hint of a symbolic size, never a guard on it.

    ``int()`` on a symbolic size (a graph Dynamo made dynamic, e.g. the KV
    cache length in ``generate``) would install a guard that specializes the
    graph to that size: one recompile per new length until the recompile
    limit. Shapes here only name and cost units, so the example's value is enough.
    """
    return tuple(_size_hint(d, fallback=1) if isinstance(d, torch.SymInt) else int(d) for d in example.shape)


def _unsupported(node: torch.fx.Node, spec: OpSpec) -> Optional[str]:
    if len(node.args) <= max(spec.a_index, spec.b_index):
        return "operands passed by keyword"
    for i in (spec.a_index, spec.b_index):
        arg = node.args[i]
        if not isinstance(arg, torch.fx.Node):
            return "constant operand"
        try:
            ex = _example(arg)
        except ValueError:
            return "no shape information"
        if not hasattr(ex, "shape") or not hasattr(ex, "dtype"):
            return "operand is not a tensor"
        if len(ex.shape) < spec.min_rank:
            return "1-D operand"
        if not ex.dtype.is_floating_point:
            return f"{ex.dtype} operand"
    return None


def _weight_fqn(node: Any, param_fqns: dict[str, str]) -> Optional[str]:
    """The parameter behind an operand, looking through norm-preserving views."""
    for _ in range(8):
        if not isinstance(node, torch.fx.Node):
            return None
        if node.op in ("placeholder", "get_attr"):
            return param_fqns.get(node.name if node.op == "placeholder" else node.target)
        is_view = (node.op == "call_function" and node.target in VIEW_FUNCTIONS) or (
            node.op == "call_method" and node.target in VIEW_METHODS
        )
        if not is_view or not node.args:
            return None
        node = node.args[0]
    return None


def split_source_path(path: str) -> tuple[str, list[str]]:
    """A Dynamo source name as (frame root, attribute path below it).

    >>> split_source_path("L['args'][0]._modules['model']._modules['layers']._modules['0']._parameters['weight']")
    ("L['args'][0]", ['model', 'layers', '0', 'weight'])
    >>> split_source_path("L['self'].blocks[1].attn")
    ("L['self']", ['blocks', '1', 'attn'])
    >>> split_source_path("L['forward'].__self__._modules['0']._parameters['weight']")
    ("L['forward'].__self__", ['0', 'weight'])
    >>> split_source_path("L['model'].forward.__self__.head")
    ("L['model']", ['head'])
    """
    m = _FRAME_ROOT.match(path)
    root = m.group(0) if m else ""
    rest = path[len(root):]
    # A bound method's __self__ is the object the method was read from:
    # ``model.forward.__self__.head`` is ``model.head``.
    rest = _BOUND_SELF.sub("", rest)
    rest = re.sub(r"\._(?:modules|parameters|buffers)\['([^']*)'\]", r".\1", rest)
    rest = re.sub(r"\['([^']*)'\]", r".\1", rest)
    rest = re.sub(r"\[(\d+)\]", r".\1", rest)
    return root, [p for p in rest.split(".") if p]


def normalize_source_path(path: str) -> str:
    """A source name as a dotted path below its frame variable.

    A bare input (``L['args'][0]``, ``L['kwargs']['input_ids']``) keeps its
    subscripts, so it still has a name.

    >>> normalize_source_path("L['self']._modules['layers']._modules['0']._parameters['weight']")
    'layers.0.weight'
    >>> normalize_source_path("L['args'][0]._modules['lm_head']._parameters['weight']")
    'lm_head.weight'
    >>> normalize_source_path("L['kwargs']['input_ids']"), normalize_source_path("L['args'][0]")
    ('input_ids', '0')
    """
    root, rel = split_source_path(path)
    if rel:
        return ".".join(rel)
    subs = re.findall(r"\[(?:(\d+)|'([^']*)')\]", root)
    return ".".join(a or b for a, b in subs[1:]) or ".".join(a or b for a, b in subs)


def frame_roots(param_sources: list[tuple[str, str]], default: str = "") -> dict[str, str]:
    """Which object of the root model each frame variable is, from its parameters.

    ``param_sources`` pairs a parameter's Dynamo source name with its FQN in
    the root model (known by identity). The FQN's tail that the source path
    ends with is the parameter's path below the frame variable; the rest is
    the variable's own FQN. Per variable, the parameter explained by the
    longest tail wins (a tied weight read through another module explains
    only ``weight``). ``default`` (key ``""``) is for variables no parameter
    reaches, such as a frame with no parameters.

    >>> frame_roots([("L['args'][0]._modules['lm_head']._parameters['weight']", "lm_head.weight")])
    {"L['args'][0]": '', '': ''}
    >>> frame_roots([("L['self']._modules['fc']._parameters['weight']", "blocks.1.fc.weight")])
    {"L['self']": 'blocks.1', '': ''}
    """
    best: dict[str, tuple[int, str]] = {}
    for source, fqn in param_sources:
        root, rel = split_source_path(source)
        parts = fqn.split(".")
        k = 0
        while k < min(len(rel), len(parts)) and rel[-1 - k] == parts[-1 - k]:
            k += 1
        if k == 0:
            continue
        # The variable is the object at rel[:-k] below the root; its FQN is parts[:-k].
        key = ".".join([root] + rel[: len(rel) - k])
        prefix = ".".join(parts[: len(parts) - k])
        if key not in best or k > best[key][0]:
            best[key] = (k, prefix)
    out = {key: prefix for key, (_k, prefix) in best.items()}
    out.setdefault("", default)
    return out


def _module_path(node: torch.fx.Node, roots: dict[str, str]) -> str:
    """FQN in the root model of the module that called ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        # An op written in the captured frame itself (a frame Dynamo resumed
        # after a graph break inside a module's forward): that module is the
        # frame's ``self``.
        return roots.get("L['self']", roots.get("", ""))
    root, rel = split_source_path(list(stack.values())[-1][0])
    # The longest known variable path that this module path starts with.
    for i in range(len(rel), -1, -1):
        key = ".".join([root] + rel[:i])
        if key in roots:
            return ".".join(p for p in [roots[key]] + rel[i:] if p)
    return ".".join(p for p in [roots.get("", "")] + rel if p)


def _user_frame(node: torch.fx.Node) -> tuple[str, int, str]:
    """(file, line, function) of the innermost user frame in the stack trace."""
    trace = node.meta.get("stack_trace") or ""
    found = _STACK_FILE.findall(trace)
    if not found:
        return ("?", 0, "?")
    file, line, fn = found[-1]
    return (file, int(line), fn)
