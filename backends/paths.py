"""The two branches of a dual-path unit: the low path (a recipe) and the high path.

These functions are what the nodes inserted by ``passes.insert_dual_path``
call. They are traced by AOTAutograd like any other torch code, so Inductor
fuses the fake-quantization arithmetic into its kernels.

Gradients on the low path are straight-through: the rounding in forward is
treated as identity in backward, and the recipe's ``quantize_grad`` (if any)
rounds the gradient that flows into the unit's output.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gnmr_fx.backends.ops import OPS
from gnmr_fx.backends.recipes import Quantizer, get_recipe

HIGH_PATHS = ("native", "bf16", "fp32")
HIGH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
"""The dtype of each named high path (``native`` runs the op as written)."""


class _RoundSTE(torch.autograd.Function):
    """Forward: round to the recipe's grid. Backward: identity (straight-through).

    An autograd.Function rather than ``t + (q - t).detach()`` so the forward
    value is exactly the grid value (the add/subtract trick can be off by one
    ulp), which the grid tests check bitwise.
    """

    @staticmethod
    def forward(ctx: Any, t: Tensor, quantizer: Quantizer, kdim: int) -> Tensor:
        return quantizer(t, kdim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad, None, None


class _RoundGrad(torch.autograd.Function):
    """Forward: identity. Backward: round the incoming gradient to the grid."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, quantizer: Quantizer) -> Tensor:
        ctx.quantizer = quantizer
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return ctx.quantizer(grad, -1), None


def low_path(
    op: str,
    *args: Any,
    recipe: str,
    a_index: int,
    b_index: int,
    b_kdim: int,
    b_is_weight: bool,
    **kwargs: Any,
) -> Tensor:
    """Run ``OPS[op].fn`` with its two matmul operands rounded by ``recipe``.

    ``a_index`` / ``b_index`` locate the operands in ``args``; ``b_kdim`` is
    the reduction dim of operand b (``-1`` for an ``F.linear`` weight stored
    as [out, in], ``-2`` for a [.., K, N] matmul operand).

    >>> import torch, torch.nn.functional as F
    >>> x, w = torch.randn(4, 8), torch.randn(3, 8)
    >>> y = low_path("linear", x, w, None, recipe="int8", a_index=0, b_index=1,
    ...              b_kdim=-1, b_is_weight=True)
    >>> y.shape
    torch.Size([4, 3])
    """
    r = get_recipe(recipe)
    args = list(args)
    args[a_index] = _RoundSTE.apply(args[a_index], r.quantize_input, -1)
    qb = r.quantize_weight if b_is_weight else r.quantize_input
    args[b_index] = _RoundSTE.apply(args[b_index], qb, b_kdim)
    out = OPS[op].fn(*args, **kwargs)
    if r.quantize_grad is not None:
        out = _RoundGrad.apply(out, r.quantize_grad)
    return out


def high_path(op: str, *args: Any, high: str, **kwargs: Any) -> Tensor:
    """Run ``op`` on the high path: as written (``native``) or in a named dtype.

    With a named dtype, floating-point tensor arguments are cast to it and the
    result is cast back, so the unit's output dtype never changes.
    """
    fn = OPS[op].fn
    if high == "native":
        return fn(*args, **kwargs)
    dtype = HIGH_DTYPES[high]
    out_dtype = next(a.dtype for a in args if isinstance(a, Tensor) and a.is_floating_point())
    cast = [a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]
    return fn(*cast, **kwargs).to(out_dtype)
