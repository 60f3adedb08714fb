"""The functions that the nodes inserted by the passes call.

They are ordinary traceable torch code: AOTAutograd traces them into the
forward and backward graphs, so they cost no host sync and no recompile.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.multiprocessing.reductions import StorageWeakRef

from gnmr_fx.backends.ops import OPS
from gnmr_fx.backends.paths import high_path, low_path


class _GradSquaredNorm(torch.autograd.Function):
    """Identity in forward; in backward, the squared norm of the incoming
    gradient becomes the gradient of a probe slot.

    Routing the statistic through autograd (instead of writing a buffer in
    backward) means micro-batch accumulation is ordinary ``.grad``
    accumulation, and no graph mutates an input in its backward.
    """

    @staticmethod
    def forward(ctx: Any, t: Tensor, probe_slot: Tensor) -> Tensor:
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        return grad, grad.detach().float().pow(2).sum()


def grad_stats(t: Tensor, probe: Tensor, slot: int) -> Tensor:
    """Grad-stats node: pass ``t`` through; add ||dL/dt||^2 to ``probe.grad[slot]``.

    >>> import torch
    >>> probe = torch.zeros(2, requires_grad=True)
    >>> w = torch.ones(3, requires_grad=True)
    >>> (grad_stats(w, probe, 1) * 2).sum().backward()
    >>> probe.grad.tolist()
    [0.0, 12.0]
    """
    return _GradSquaredNorm.apply(t, probe[slot])


def select_path(plan: Tensor, slot: int, y_hp: Tensor, y_lp: Tensor) -> Tensor:
    """Branch-free on-device select of one unit's path (``plan[slot]`` True = high).

    A ``torch.where`` on a device predicate: unlike ``torch.cond`` with a CUDA
    predicate it never reads the predicate on the host. The unselected
    branch receives an exactly-zero gradient.
    """
    return torch.where(plan[slot], y_hp, y_lp)


def dispatch_path(*args: Any, plan: Tensor, slot: int, op: str, recipe: str, high: str, b_is_weight: bool,
                  **kwargs: Any) -> Tensor:
    """One emulated unit that runs only the branch ``plan[slot]`` picks (True = high).

    ``args`` / ``kwargs`` are the op's own; ``plan`` is a bool tensor on the
    CPU (the plan itself for CPU units, the runtime's host copy for GPU
    units), so reading it never waits for a device. Traced (AOTAutograd, for
    ``aot_eager`` and Inductor) it is a ``torch.cond`` whose two branches are
    compiled and whose predicate is read on the host at run time: a new plan
    changes no guard and compiles nothing, and backward runs the branch
    forward ran. Run eagerly it is the same choice as a Python ``if``: what
    cond's own eager kernel does, without the joint graph its autograd
    re-traces at every backward. The unselected branch computes nothing and
    gets no gradient.

    >>> import torch, torch.nn.functional as F
    >>> x, w = torch.randn(4, 8), torch.randn(3, 8)
    >>> plan = torch.tensor([True, False])
    >>> kw = dict(op="linear", recipe="int8", high="native", b_is_weight=True)
    >>> torch.equal(dispatch_path(x, w, plan=plan, slot=0, **kw), F.linear(x, w))
    True
    >>> torch.equal(dispatch_path(x, w, plan=plan, slot=1, **kw), F.linear(x, w))
    False
    """
    spec = OPS[op]
    high_fn = _branch(high_path, args, kwargs, op, high=high)
    low_fn = _branch(low_path, args, kwargs, op, recipe=recipe, a_index=spec.a_index, b_index=spec.b_index,
                     b_kdim=spec.b_kdim, b_is_weight=b_is_weight)
    pred = plan[slot]
    operands = tuple(t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor))
    if is_fake(pred):  # traced: both branches go into the graph, the choice stays a run-time one
        return torch.ops.higher_order.cond(pred, high_fn, low_fn, _unaliased(operands))[0]
    return (high_fn if pred else low_fn)(*operands)[0]


def low_only_path(*args: Any, plan: Tensor, slot: int, op: str, recipe: str, high: str, b_is_weight: bool,
                  **kwargs: Any) -> Tensor:
    """A ``dispatch_path`` unit with its low branch inlined: what the unit
    computes while the plan holds it low, with no ``cond`` around it (the
    all-low copy of a graph, ``GNMRConfig.low_graph``). Same arguments as
    :func:`dispatch_path`; the plan is not read.

    >>> import torch
    >>> x, w = torch.randn(4, 8), torch.randn(3, 8)
    >>> kw = dict(plan=torch.tensor([False]), slot=0, op="linear", recipe="int8", high="native", b_is_weight=True)
    >>> torch.equal(low_only_path(x, w, **kw), dispatch_path(x, w, **kw))
    True
    """
    spec = OPS[op]
    return low_path(op, *args, **kwargs, recipe=recipe, a_index=spec.a_index, b_index=spec.b_index,
                    b_kdim=spec.b_kdim, b_is_weight=b_is_weight)


def _unaliased(operands: tuple) -> tuple:
    """``operands`` with a copy of each one that shares storage with an earlier
    one: ``torch.cond`` refuses operands that alias each other, and the q
    and k of an attention matmul are views of one qkv output. The copy (k of
    ``q @ k^T``) is activation-sized, small next to the product."""
    seen, out = set(), []
    for t in operands:
        key = StorageWeakRef(t.untyped_storage())
        out.append(t.clone() if key in seen else t)
        seen.add(key)
    return tuple(out)


def _branch(fn: Callable[..., Tensor], args: tuple, kwargs: dict, op: str, **fixed: Any) -> Callable:
    """``fn(op, *args, **kwargs, **fixed)`` as a function of the tensors in args/kwargs
    (what ``torch.cond`` passes its branches), returning a 1-tuple."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    where = [i for i, t in enumerate(leaves) if isinstance(t, Tensor)]

    def branch(*tensors: Tensor) -> tuple[Tensor]:
        filled = list(leaves)
        for i, t in zip(where, tensors):
            filled[i] = t
        a, kw = pytree.tree_unflatten(filled, spec)
        return (fn(op, *a, **kw, **fixed),)

    return branch
