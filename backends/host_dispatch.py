"""Host dispatch: real low-precision kernels with a host-resident plan.

Units that have a real kernel are rewritten into :func:`dual_linear`, whose
GEMMs are the custom op ``gnmr::select_mm`` (emulated units read the same
host plan through a ``torch.cond``, ``passes.nodes.dispatch_path``, or,
with ``GNMRConfig.dispatch="select"``, compute both branches). The op reads
the unit's plan entry from a **CPU** bool buffer (``_gnmr_plan_host`` on the rewritten graph) and runs
exactly one branch: the real recipe's GEMM on the low-precision operands
(``torch._scaled_mm`` for fp8, ``torch._int_mm`` for int8: the low path) or
the GEMM as written (high path). Reading a CPU tensor never waits for the
GPU, and the branch is chosen at run time inside an opaque op, so a new plan
changes no guard and compiles nothing.

The forward GEMM and the two backward GEMMs (grad-input, grad-weight) are
each a ``select_mm`` call reading the same plan entry, so a unit's backward
runs on the path its forward ran on (the runtime changes plans only between
optimizer steps). The low-precision casts stay outside the op, as traced
torch code that Inductor fuses; for a unit on the high path they are computed and
unused (those units are at most ``max_o`` of the FLOPs).

**The one transfer per step.** The controller decides on the device; at the
end of ``GNMRRuntime.step`` the runtime copies the new plan towards every
graph's host buffer: one small device-to-host copy (a few bytes per unit) per
optimizer step, outside forward and backward. With
``gnmr_fx.compile(..., optimizer=opt)`` the step runs at the start of
``opt.step()`` (without an optimizer, at the end of backward), and the copy
is finished by the next forward (``GNMRRuntime.before_forward``), so the host
does not wait for the step's GPU work. This module only runs kernels: it
holds no runtime state.

>>> import torch
>>> plan = torch.tensor([False, True])
>>> x, w = torch.randn(32, 64), torch.randn(48, 64)
>>> y_lp = dual_linear(x, w, None, plan=plan, slot=0, recipe="fp8_e4m3")
>>> y_hp = dual_linear(x, w, None, plan=plan, slot=1, recipe="fp8_e4m3")
>>> torch.equal(y_hp, x @ w.t()), torch.equal(y_lp, x @ w.t())
(True, False)
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from gnmr_fx.backends import real_kernels
from gnmr_fx.backends.real_kernels import REAL_RECIPES, GemmOperands, grad_operands, output_operands
from gnmr_fx.backends.paths import HIGH_DTYPES


# A plain library op rather than ``torch.library.custom_op``: it is called
# three times per unit per step, and the dispatcher's direct Python kernel
# costs less host time than custom_op's wrappers (the forward of a small
# model is host-bound, and host time is what a GNMR step adds).
_LIB = torch.library.Library("gnmr", "FRAGMENT")
# Defined once per process even if this file is imported under a second name
# (doctest collection).
_DEFINE = not hasattr(torch.ops.gnmr, "select_mm")
if _DEFINE:
    _LIB.define(
        "select_mm(Tensor plan, int slot, Tensor a_hp, Tensor b_hp, Tensor a_lp, Tensor b_lp, "
        "Tensor scale_a, Tensor scale_b, bool fast_accum) -> Tensor",
        tags=(torch.Tag.needs_fixed_stride_order,),
    )


def select_mm(plan: Tensor, slot: int, a_hp: Tensor, b_hp: Tensor, a_lp: Tensor, b_lp: Tensor,
              scale_a: Tensor, scale_b: Tensor, fast_accum: bool) -> Tensor:
    """One GEMM of a unit (the kernel of ``gnmr::select_mm``): ``a_hp @ b_hp``
    if ``plan[slot]`` (high path), else the real GEMM of the low-precision
    operands (low path, already in the kernel's layouts: ``_scaled_mm`` for
    fp8, ``_int_mm`` for int8). ``plan`` is on the CPU, so reading it never
    waits for the GPU."""
    if plan[slot]:
        return torch.mm(a_hp, b_hp)
    return real_kernels.gemm(a_lp, b_lp, scale_a, scale_b, a_hp.dtype, fast_accum, eager=True)


def _select_mm_fake(plan, slot, a_hp, b_hp, a_lp, b_lp, scale_a, scale_b, fast_accum):
    return a_hp.new_empty(a_hp.shape[0], b_hp.shape[1])


if _DEFINE:
    _LIB.impl("select_mm", select_mm, "CPU")
    _LIB.impl("select_mm", select_mm, "CUDA")
    torch.library.register_fake("gnmr::select_mm", _select_mm_fake, lib=_LIB)


def _select(plan: Tensor, slot: int, a_hp: Tensor, b_hp: Tensor, ops: GemmOperands) -> Tensor:
    # Layouts and padding are decided here, in traced code (shapes are
    # static), so the op itself only picks a kernel.
    lp, (m, n) = real_kernels.pad_operands(ops)
    pm, pk, pn = real_kernels.padding(m, a_hp.shape[1], n, ops.a_lp.dtype == torch.int8)
    if pm or pk or pn:
        a_hp = torch.nn.functional.pad(a_hp, (0, pk, 0, pm))
        b_hp = torch.nn.functional.pad(b_hp, (0, pn, 0, pk))
    y = torch.ops.gnmr.select_mm(plan, slot, a_hp, b_hp, lp.a_lp, lp.b_lp, lp.scale_a, lp.scale_b, lp.fast_accum)
    return y if (pm or pn) == 0 else y[:m, :n]


class _DualLinear(torch.autograd.Function):
    """``F.linear`` whose three GEMMs each run one branch, chosen on the host."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, bias: Optional[Tensor], plan: Tensor, slot: int,
                recipe: str, high: str) -> Tensor:
        spec = REAL_RECIPES[recipe]
        x2 = x.reshape(-1, x.shape[-1])
        x_hp, w_hp = _high(x2, high), _high(w, high)
        y = _select(plan, slot, x_hp, w_hp.t(), output_operands(x2, w, spec)).to(x.dtype)
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(x2, w, plan)
        ctx.spec, ctx.slot, ctx.high, ctx.has_bias, ctx.x_shape = spec, slot, high, bias is not None, x.shape
        return y.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple:
        x2, w, plan = ctx.saved_tensors
        g2 = gy.reshape(-1, gy.shape[-1])
        dx_ops, dw_ops = grad_operands(g2, x2, w, ctx.spec)
        g_hp, x_hp, w_hp = _high(g2, ctx.high), _high(x2, ctx.high), _high(w, ctx.high)
        if x_hp is x2 and _tracing():
            x_hp = _recomputable(x2)
        dx = _select(plan, ctx.slot, g_hp, w_hp, dx_ops).to(gy.dtype).reshape(ctx.x_shape)
        dw = _select(plan, ctx.slot, g_hp.t(), x_hp, dw_ops).to(w.dtype)
        db = g2.sum(0) if ctx.has_bias else None
        return dx, dw, db, None, None, None, None


def _high(t: Tensor, high: str) -> Tensor:
    return t if high == "native" else t.to(HIGH_DTYPES[high])


def _high_dtype(dtype: torch.dtype, high: str) -> torch.dtype:
    return dtype if high == "native" else HIGH_DTYPES[high]


class _LowLinear(torch.autograd.Function):
    """:class:`_DualLinear` with its plan saying "low": the same casts and the
    same GEMMs in the same output dtypes (bitwise the same values), but no
    high-path operand and no opaque op, so nothing is kept or written for a
    high path that does not run, and Inductor fuses each operand's producer
    into its cast, as in the plain low-precision model. What a real-kernel
    unit runs in the all-low copy of a graph (``GNMRConfig.low_graph``).

    ``probe_slot`` (a 0-d slice of the probe, or None) takes the unit's
    statistic, ||dL/dW||^2, as its gradient: what the ``grad_stats`` node
    around the weight computes, folded into the unit so that the weight
    reaches the backward as the graph input it is (read through a view,
    Inductor's partitioner saved its fp8 copy instead of recomputing it)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, bias: Optional[Tensor], probe_slot: Optional[Tensor],
                recipe: str, high: str) -> Tensor:
        spec = REAL_RECIPES[recipe]
        y, x2 = real_kernels.linear_forward(x, w, bias, spec, _high_dtype(x.dtype, high))
        ctx.save_for_backward(x2, w)
        ctx.spec, ctx.high, ctx.has_bias, ctx.x_shape = spec, high, bias is not None, x.shape
        ctx.stats = probe_slot is not None
        return y

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple:
        x2, w = ctx.saved_tensors
        # dual_linear's GEMMs write the high path's dtype (a_hp's), then cast.
        dx, dw, db = real_kernels.linear_backward(gy, x2, w, ctx.spec, ctx.x_shape, ctx.has_bias,
                                                  _high_dtype(gy.dtype, ctx.high))
        # The same expression as grad_stats' backward (passes.nodes), on the same tensor.
        stat = dw.detach().float().pow(2).sum() if ctx.stats else None
        return dx, dw, db, stat, None, None


# Saved-for-backward memory (issue 13). Inductor's min-cut partitioner never
# recomputes a forward tensor that an opaque op reads in the backward (it is
# "materialized in backward") and saves it instead. ``select_mm`` reads the
# high-path operand ``x2`` in the grad-weight GEMM, so, read directly, the
# activation-sized input of every unit (its bf16 [tokens, in]) was saved,
# where the plain fp8 model (``real_kernels._LowpLinear``) saves none: its
# backward reads ``x2`` only through the fusible fp8 cast, so the partitioner
# recomputes ``x2`` from what the producer's own backward keeps anyway (the
# RMSNorm input and its rsqrt, the gate and up outputs, the attention output).
# Read through an exact, fusible identity, ``x2`` may be recomputed too, and
# GNMR saves what the plain model saves (tests/test_saved_memory.py). The
# cost: the backward writes the recomputed bf16 operand once per distinct
# unit input (the low path does not read it). Only traced graphs get the
# identity: in eager it would be a copy that saves nothing.


def _recomputable(t: Tensor) -> Tensor:
    """``t`` through a fusible identity that Inductor's graph passes keep:
    ``-(-t)`` is bitwise ``t`` (NaN, infinities and signed zeros included),
    whereas ``clone``, ``* 1`` and ``+ 0`` are removed before partitioning."""
    return torch.neg(torch.neg(t))


def _tracing() -> bool:
    # Dynamo tracing an autograd.Function's backward, or AOTAutograd (make_fx)
    # tracing the joint graph of a rewritten GNMR graph.
    if torch.compiler.is_compiling():
        return True
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return get_proxy_mode() is not None


def dual_linear(x: Tensor, w: Tensor, bias: Optional[Tensor] = None, *, plan: Tensor, slot: int,
                recipe: str, high: str = "native") -> Tensor:
    """``F.linear(x, w, bias)`` as a dual-path unit with a host-resident plan.

    ``plan`` is a CPU bool tensor; ``plan[slot]`` True runs the high path
    (the GEMMs as written, or in ``high``'s dtype), False the real recipe
    (fp8 or int8, :data:`~gnmr_fx.backends.real_kernels.REAL_RECIPES`).
    """
    if recipe not in REAL_RECIPES:
        raise ValueError(f"dual_linear: recipe must be one of {list(REAL_RECIPES)} (got {recipe!r})")
    return _DualLinear.apply(x, w, bias, plan, slot, recipe, high)


def dual_matmul(a: Tensor, b: Tensor, *, plan: Tensor, slot: int, recipe: str, high: str = "native") -> Tensor:
    """``a @ b`` for a 2-D ``b`` [K, N] (``torch.mm`` / ``matmul``) as a dual-path unit."""
    return dual_linear(a, b.t(), None, plan=plan, slot=slot, recipe=recipe, high=high)


def low_linear(x: Tensor, w: Tensor, bias: Optional[Tensor] = None, *, plan: Tensor, slot: int,
               recipe: str, high: str = "native", probe: Optional[Tensor] = None) -> Tensor:
    """:func:`dual_linear` while ``plan[slot]`` is False, with no ``gnmr::select_mm``:
    the unit of the all-low copy of a graph (``GNMRConfig.low_graph``). Same
    arguments (``plan`` is not read) and bitwise the same values and
    gradients. With ``probe``, backward adds ||dL/dW||^2 to
    ``probe.grad[slot]``, as a ``grad_stats`` node around ``w`` would.

    >>> import torch
    >>> x, w = torch.randn(32, 64), torch.randn(48, 64, requires_grad=True)
    >>> kw = dict(plan=torch.tensor([False]), slot=0, recipe="fp8_e4m3")
    >>> torch.equal(low_linear(x, w, **kw), dual_linear(x, w, **kw))
    True
    >>> probe = torch.zeros(1, requires_grad=True)
    >>> low_linear(x, w, probe=probe, **kw).sum().backward()
    >>> torch.equal(probe.grad[0], w.grad.float().pow(2).sum())
    True
    """
    if recipe not in REAL_RECIPES:
        raise ValueError(f"low_linear: recipe must be one of {list(REAL_RECIPES)} (got {recipe!r})")
    return _LowLinear.apply(x, w, bias, None if probe is None else probe[slot], recipe, high)


def low_matmul(a: Tensor, b: Tensor, *, plan: Tensor, slot: int, recipe: str, high: str = "native") -> Tensor:
    """:func:`dual_matmul` while ``plan[slot]`` is False (see :func:`low_linear`)."""
    return low_linear(a, b.t(), None, plan=plan, slot=slot, recipe=recipe, high=high)


# ---------------------------------------------------------------------------
# Which units get real kernels
# ---------------------------------------------------------------------------


def kernel_for(op_name: str, a_shape: tuple, b_shape: tuple, recipe: str, device: torch.device,
               emulate: Optional[bool]) -> Optional[str]:
    """The real kernel a unit runs on its low path, or None for the emulated path.

    ``emulate`` None chooses real kernels where the GPU has them (fp8:
    sm_89+ tensorwise, sm_90+ rowwise; int8 rowwise: sm_80+) and emulation
    elsewhere; True always emulates; False demands real kernels and raises,
    naming the alternative, where the recipe or the device cannot run them
    (on the CPU it selects torch's CPU ``_scaled_mm`` / ``_int_mm``: correct,
    not fast, used by the CPU tests).
    Only GEMMs with a 2-D second operand (``linear``, ``mm``, ``matmul`` by
    a matrix) have real kernels; batched products (attention's ``q @ k^T``)
    stay on the emulated ``torch.where`` path, in every mode, and inspect
    shows it (``site.extra["kernel"]``).

    >>> kernel_for("linear", (4, 32), (16, 32), "fp8_e4m3", torch.device("cpu"), None) is None
    True
    >>> kernel_for("linear", (4, 32), (16, 32), "fp8_e4m3", torch.device("cpu"), False)
    'fp8_e4m3:tensorwise'
    >>> kernel_for("linear", (4, 32), (16, 32), "int8", torch.device("cpu"), False)
    Traceback (most recent call last):
    ...
    ValueError: GNMRConfig.emulate=False: recipe 'int8' has no real low-precision kernel here (real kernels: fp8_e4m3, fp8_rowwise, int8_rowwise); use emulate=True
    """
    if emulate is True:
        return None
    device = torch.device(device)
    if emulate is None and device.type != "cuda":
        return None
    problem = real_kernels.real_kernel_problem(recipe, device)
    if problem is not None:
        if emulate is False:
            raise ValueError(f"GNMRConfig.emulate=False: {problem}")
        return None
    if not _has_real_gemm(op_name, b_shape):
        return None
    return f"{recipe}:{REAL_RECIPES[recipe].scaling}"


def _has_real_gemm(op_name: str, b_shape: tuple) -> bool:
    return op_name in ("linear", "mm", "matmul") and len(b_shape) == 2
