"""The functions that the nodes inserted by the passes call.

They are ordinary traceable torch code: AOTAutograd traces them into the
forward and backward graphs, so they cost no host sync and no recompile.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


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
