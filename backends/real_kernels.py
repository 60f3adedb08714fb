"""Real low-precision GEMMs: fp8 through ``torch._scaled_mm``, int8 through
``torch._int_mm``, with dynamic scaling.

The real recipes have the same names as the emulated ones in ``recipes.py``
(the same scales and grids; only accumulation differs):

* ``fp8_e4m3`` -> **tensorwise**: one scale per tensor; e4m3 operands in
  forward, the output gradient in e5m2 (sm_89+).
* ``fp8_rowwise`` -> **rowwise**: one scale per row along each GEMM's
  reduction dim; e4m3 operands and e4m3 gradients, as torchao's rowwise
  recipe does (sm_90+).
* ``int8_rowwise`` -> **rowwise int8**: symmetric int8 (levels -127..127)
  with one scale per row along each GEMM's reduction dim, for the operands
  and the output gradient; int32 accumulation, the scales applied to the
  int32 result (sm_80+; ``torch._int_mm``).

Scaling is dynamic (amax of the current tensor, no history), so switching a
unit between the low and the high path never corrupts a scale: there is no
amax history to skip or pollute (the reason Megatron forbids per-layer FP8
toggling under delayed scaling).

All three GEMMs of a linear run in low precision: output ``y = x w^T``,
grad-input ``dx = dy w`` and grad-weight ``dw = dy^T x``. Both kernels want
``a`` row-major and ``b`` column-major, each scaled along the GEMM's K, so
every GEMM gets its own operand layouts (and, rowwise, its own scales):

==========  ================  ======================  ======================
GEMM        a (row-major)     b (column-major)        K
==========  ================  ======================  ======================
output      x   [M, K]        w^T  [K, N]             in-features
grad-input  dy  [M, N]        w    [N, K]             out-features
grad-weight dy^T [N, M]       x    [M, K]             tokens
==========  ================  ======================  ======================

The casts are plain torch code traced into the compiled graph, so Inductor
fuses amax, scale and cast (and the transposed copies) into a few kernels;
only the GEMM is an extern kernel. :func:`lowp_linear` is the plain
low-precision linear (no GNMR: the low-precision floor of the benchmark);
the GNMR host dispatch in ``host_dispatch.py`` runs the same casts and the
same GEMMs, and chooses per unit, on the host, whether a GEMM runs in low
precision or as written.

>>> import torch
>>> from gnmr_fx.backends.recipes import sqnr
>>> x, w = torch.randn(32, 64), torch.randn(48, 64)
>>> y = lowp_linear(x, w, None, "fp8_e4m3")
>>> y.shape, round(sqnr(x @ w.t(), y)) > 20
(torch.Size([32, 48]), True)
>>> round(sqnr(x @ w.t(), lowp_linear(x, w, None, "int8_rowwise"))) > 35
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from gnmr_fx.backends.recipes import SCALE_EPS

# _scaled_mm (cuBLASLt / CUTLASS) needs every matrix dim divisible by 16;
# _int_mm needs K and N divisible by 8 and M > 16 (checked: 16 | dims, M >= 32).
ALIGN = 16
INT8_MIN_M = 32
INT8_MAX = 127.0


@dataclass(frozen=True)
class KernelSpec:
    """How a real recipe casts operands and gradients, and which GEMM it runs."""

    name: str  # the recipe name it implements (same as the emulated recipe)
    scaling: str  # "tensorwise" or "rowwise"
    operand_dtype: torch.dtype  # dtype of x and w in every GEMM
    grad_dtype: torch.dtype  # dtype of the output gradient in both backward GEMMs
    min_capability: tuple  # CUDA compute capability the kernel needs
    # torchao's defaults: fast accumulation for the output GEMM only; the
    # gradient GEMMs accumulate exactly (their K can be the token count).
    fast_accum_output: bool = True

    @property
    def rowwise(self) -> bool:
        return self.scaling == "rowwise"

    @property
    def kernel(self) -> str:
        """``_scaled_mm`` (fp8) or ``_int_mm`` (int8)."""
        return "_int_mm" if self.operand_dtype == torch.int8 else "_scaled_mm"


REAL_RECIPES: dict[str, KernelSpec] = {
    "fp8_e4m3": KernelSpec("fp8_e4m3", "tensorwise", torch.float8_e4m3fn, torch.float8_e5m2, (8, 9)),
    # The sm_90 rowwise kernel takes e4m3 operands only, so gradients are e4m3
    # here (the emulated fp8_rowwise rounds them to e5m2).
    "fp8_rowwise": KernelSpec("fp8_rowwise", "rowwise", torch.float8_e4m3fn, torch.float8_e4m3fn, (9, 0)),
    # int32 accumulation is exact: no fast-accumulation choice.
    "int8_rowwise": KernelSpec("int8_rowwise", "rowwise", torch.int8, torch.int8, (8, 0), fast_accum_output=False),
}


def _torch_at_least(major: int, minor: int) -> bool:
    parts = torch.__version__.split("+")[0].split(".")
    return (int(parts[0]), int(parts[1])) >= (major, minor)


_CPU_ROWWISE = _torch_at_least(2, 13)


def real_kernel_problem(recipe: str, device: torch.device) -> Optional[str]:
    """Why ``recipe`` cannot run as real kernels on ``device`` (None if it can).

    The message names the alternative, so callers can raise it as is.

    >>> real_kernel_problem("int8", torch.device("cpu"))
    "recipe 'int8' has no real low-precision kernel here (real kernels: fp8_e4m3, fp8_rowwise, int8_rowwise); use emulate=True"
    """
    spec = REAL_RECIPES.get(recipe)
    if spec is None:
        return (f"recipe {recipe!r} has no real low-precision kernel here "
                f"(real kernels: {', '.join(REAL_RECIPES)}); use emulate=True")
    device = torch.device(device)
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < spec.min_capability:
            need = "sm_%d%d" % spec.min_capability
            if spec.kernel == "_int_mm":
                alt = "emulate=True"
            elif spec.rowwise and cap >= (8, 9):
                alt = "recipe='fp8_e4m3' (tensorwise, sm_89+) or emulate=True"
            elif cap >= (8, 0):
                alt = "recipe='int8_rowwise' (real int8, sm_80+) or emulate=True"
            else:
                alt = "emulate=True, or recipe='int8' (emulated)"
            kind = "int8" if spec.kernel == "_int_mm" else f"{spec.scaling} fp8"
            return f"{kind} kernels need {need}+, this GPU is sm_{cap[0]}{cap[1]}; use {alt}"
        return None
    if device.type == "cpu":
        # torch has CPU _scaled_mm (oneDNN) and _int_mm kernels; they are
        # correct but not faster than fp32, so automatic selection never
        # picks them. Before torch 2.13 CPU _scaled_mm is per-tensor only
        # (rowwise scales trip an internal assert), so rowwise fp8 is refused
        # there rather than crashing.
        if spec.kernel == "_scaled_mm" and spec.rowwise and not _CPU_ROWWISE:
            return (f"rowwise fp8 _scaled_mm needs torch 2.13+ on the CPU (this is {torch.__version__}); "
                    "use recipe='fp8_e4m3' (tensorwise) or emulate=True")
        return None
    return f"real low-precision kernels run on CUDA or CPU, not {device.type}; use emulate=True"


# ---------------------------------------------------------------------------
# Casts (traced into the compiled graph)
# ---------------------------------------------------------------------------


def to_lowp(t: Tensor, dtype: torch.dtype, dim: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Dynamic-scaled cast: ``(t_lp, scale)`` with ``t ~= t_lp.float() * scale``.

    ``dim`` None scales per tensor (a 0-d scale); otherwise amax is taken
    along ``dim`` (kept for broadcasting): one scale per row along that dim.
    fp8 saturates to the format's max; int8 rounds half to even onto the
    symmetric levels -127..127. The formulas are the emulated recipes'
    (``recipes.fake_quant_fp8`` / ``fake_quant_int``), so the real low path
    sees the same grid values.
    """
    fmax = INT8_MAX if dtype == torch.int8 else float(torch.finfo(dtype).max)
    a = t.detach().abs()
    amax = a.amax() if dim is None else a.amax(dim=dim, keepdim=True)
    scale = (amax.float() / fmax).clamp_min(SCALE_EPS)
    q = t.detach().float() / scale
    if dtype == torch.int8:
        q = torch.round(q)
    t_lp = q.clamp(-fmax, fmax).to(dtype)
    return t_lp, scale


def col_major(t: Tensor) -> Tensor:
    """``t`` (2-D) laid out column-major, copying only if it is not already."""
    if t.stride(0) == 1 and t.stride(1) == max(t.shape[0], 1):
        return t
    return t.t().contiguous().t()


def row_major(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


@dataclass
class GemmOperands:
    """The low-precision operands and scales of one GEMM (``_scaled_mm`` for
    fp8 operands, ``_int_mm`` for int8 ones)."""

    a_lp: Tensor
    b_lp: Tensor
    scale_a: Tensor
    scale_b: Tensor
    fast_accum: bool


def output_operands(x2: Tensor, w: Tensor, spec: KernelSpec) -> GemmOperands:
    """``y = x2 @ w^T``: x2 [M, K], w [N, K]; scales along K."""
    dim = -1 if spec.rowwise else None
    x_lp, sx = to_lowp(x2, spec.operand_dtype, dim)
    w_lp, sw = to_lowp(w, spec.operand_dtype, dim)
    return GemmOperands(row_major(x_lp), col_major(w_lp.t()), sx, sw.t() if spec.rowwise else sw,
                        spec.fast_accum_output)


def grad_operands(g2: Tensor, x2: Tensor, w: Tensor, spec: KernelSpec) -> tuple[GemmOperands, GemmOperands]:
    """Operands of ``dx = g2 @ w`` and ``dw = g2^T @ x2`` (g2 [M, N])."""
    if spec.rowwise:
        # Each GEMM scales along its own K: N for dx, M (tokens) for dw.
        g_lp, sg = to_lowp(g2, spec.grad_dtype, -1)  # [M, 1]
        w_lp, sw = to_lowp(w, spec.operand_dtype, 0)  # [1, K]
        dx = GemmOperands(row_major(g_lp), col_major(w_lp), sg, sw, False)
        gt_lp, sgt = to_lowp(g2, spec.grad_dtype, 0)  # [1, N]
        x_lp, sx = to_lowp(x2, spec.operand_dtype, 0)  # [1, K]
        dw = GemmOperands(row_major(gt_lp.t()), col_major(x_lp), sgt.t(), sx, False)
        return dx, dw
    # Tensorwise: one cast per tensor serves both GEMMs (scales have no axis).
    g_lp, sg = to_lowp(g2, spec.grad_dtype)
    w_lp, sw = to_lowp(w, spec.operand_dtype)
    x_lp, sx = to_lowp(x2, spec.operand_dtype)
    dx = GemmOperands(row_major(g_lp), col_major(w_lp), sg, sw, False)
    dw = GemmOperands(row_major(g_lp.t()), col_major(x_lp), sg, sx, False)
    return dx, dw


# ---------------------------------------------------------------------------
# The GEMM
# ---------------------------------------------------------------------------


def lowp_mm(ops: GemmOperands, out_dtype: torch.dtype) -> Tensor:
    """``(a_lp * scale_a) @ (b_lp * scale_b)`` through the operands' kernel.

    Dims the kernel does not accept are zero-padded (zeros add nothing to a
    dot product) and the result is sliced back.
    """
    padded, (m, n) = pad_operands(ops)
    y = gemm(padded.a_lp, padded.b_lp, padded.scale_a, padded.scale_b, out_dtype, ops.fast_accum)
    return y if y.shape == (m, n) else y[:m, :n]


# ``_int_mm`` behind an op of its own, whose layouts Inductor must keep.
# ``_scaled_mm`` rejects operands that are not row-major @ column-major, so
# Inductor lays them out as traced; ``_int_mm`` accepts any layout, and
# Inductor, free to choose, wrote the dw GEMM's first operand column-major
# (the transposed gradient's cast fused with its transpose), where cuBLAS
# runs a WMMA kernel 5.6x slower than its IMMA one (H200, 8b geometry:
# 4.0 ms against 0.72 ms a call; plain int8 then trained at 0.54x bf16,
# benchmarks/results/perf_s27/s27e/i8p.out). The tag makes Inductor pass
# the operands in the traced stride order; the kernel still lays out what
# it gets wrong (a copy, never a wrong answer).
_LIB = torch.library.Library("gnmr", "FRAGMENT")
if not hasattr(torch.ops.gnmr, "int_mm"):  # once per process (doctest imports this file twice)
    _LIB.define("int_mm(Tensor a, Tensor b) -> Tensor", tags=(torch.Tag.needs_fixed_stride_order,))

    def _int_mm_kernel(a: Tensor, b: Tensor) -> Tensor:
        return torch._int_mm(row_major(a), col_major(b))

    def _int_mm_fake(a: Tensor, b: Tensor) -> Tensor:
        return a.new_empty(a.shape[0], b.shape[1], dtype=torch.int32)

    _LIB.impl("int_mm", _int_mm_kernel, "CPU")
    _LIB.impl("int_mm", _int_mm_kernel, "CUDA")
    torch.library.register_fake("gnmr::int_mm", _int_mm_fake, lib=_LIB)


def gemm(a_lp: Tensor, b_lp: Tensor, scale_a: Tensor, scale_b: Tensor, out_dtype: torch.dtype,
         fast_accum: bool, eager: bool = False) -> Tensor:
    """The GEMM alone, on operands already in the kernel's layouts and sizes:
    ``_scaled_mm`` for fp8, ``_int_mm`` (``gnmr::int_mm``: int32
    accumulation, then the two scales in fp32) for int8.

    ``eager``: the caller runs outside any compiled graph (``gnmr::select_mm``'s
    kernel), where nothing fuses the int8 epilogue: it is then two passes over
    the [M, N] result instead of four (the int32 -> fp32 conversion inside the
    first multiply, the cast to ``out_dtype`` inside the second), with bitwise
    the same result (tests/test_host_dispatch.py)."""
    if a_lp.dtype == torch.int8:
        acc = torch.ops.gnmr.int_mm(a_lp, b_lp)
        if eager:
            return torch.mul(torch.mul(acc, scale_a), scale_b, out=acc.new_empty(acc.shape, dtype=out_dtype))
        return (acc.float() * scale_a * scale_b).to(out_dtype)
    return torch._scaled_mm(a_lp, b_lp, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype,
                            use_fast_accum=fast_accum)


def padding(m: int, k: int, n: int, int8: bool = False) -> tuple[int, int, int]:
    """Zero rows / cols to add to M, K, N so that the kernel accepts them
    (``int8``: ``_int_mm`` also wants M > 16)."""
    pm = (-m) % ALIGN
    if int8 and m + pm < INT8_MIN_M:
        pm = INT8_MIN_M - m
    return pm, (-k) % ALIGN, (-n) % ALIGN


def pad_operands(ops: GemmOperands) -> tuple[GemmOperands, tuple[int, int]]:
    """The operands in the kernel's layouts, padded (:func:`padding`), and
    the unpadded output shape."""
    a, b, sa, sb = ops.a_lp, ops.b_lp, ops.scale_a, ops.scale_b
    m, k = a.shape
    n = b.shape[1]
    pm, pk, pn = padding(m, k, n, a.dtype == torch.int8)
    if pm or pk or pn:
        a = _pad2(a, pm, pk)
        b = col_major(_pad2(b, pk, pn))
        if sa.dim() == 2 and pm:
            sa = torch.nn.functional.pad(sa, (0, 0, 0, pm), value=1.0)
        if sb.dim() == 2 and pn:
            sb = torch.nn.functional.pad(sb, (0, pn), value=1.0)
    else:
        a, b = row_major(a), col_major(b)
    if sa.dim() == 2:
        # [M, 1] / [1, N] scales with unit strides: a transposed [1, M] is
        # "contiguous" yet has stride(1) = M, which _scaled_mm rejects.
        sa, sb = sa.flatten().view(sa.shape), sb.flatten().view(sb.shape)
    return GemmOperands(a, b, sa, sb, ops.fast_accum), (m, n)


def _pad2(t: Tensor, p0: int, p1: int) -> Tensor:
    if not (p0 or p1):
        return t
    # fp8 has no pad kernel on every device: pad the raw bytes (int8 too).
    raw = t.view(torch.uint8) if t.is_contiguous() else t.contiguous().view(torch.uint8)
    return torch.nn.functional.pad(raw, (0, p1, 0, p0)).view(t.dtype)


# ---------------------------------------------------------------------------
# Plain low-precision linear (no GNMR): the benchmark's low-precision floor
# ---------------------------------------------------------------------------


def linear_forward(x: Tensor, w: Tensor, bias: Optional[Tensor], spec: KernelSpec,
                   gemm_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """``F.linear(x, w, bias)`` through the real recipe: ``(y, x2)``, ``x2`` being
    ``x`` as [tokens, in] (what the backward needs). The GEMM writes
    ``gemm_dtype`` (default ``x``'s), then ``y`` is cast to ``x``'s dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    y = lowp_mm(output_operands(x2, w, spec), gemm_dtype or x.dtype).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], w.shape[0]), x2


def linear_backward(gy: Tensor, x2: Tensor, w: Tensor, spec: KernelSpec, x_shape: torch.Size, has_bias: bool,
                    gemm_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """The backward of :func:`linear_forward`: ``(dx, dw, db)``, both GEMMs in the
    real recipe. They write ``gemm_dtype`` (default: ``gy``'s for dx, ``w``'s
    for dw), then each is cast to its input's dtype."""
    g2 = gy.reshape(-1, gy.shape[-1])
    dx_ops, dw_ops = grad_operands(g2, x2, w, spec)
    dx = lowp_mm(dx_ops, gemm_dtype or gy.dtype).to(gy.dtype).reshape(x_shape)
    dw = lowp_mm(dw_ops, gemm_dtype or w.dtype).to(w.dtype)
    db = g2.sum(0) if has_bias else None
    return dx, dw, db


class _LowpLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, bias: Optional[Tensor], recipe: str) -> Tensor:
        spec = REAL_RECIPES[recipe]
        y, x2 = linear_forward(x, w, bias, spec)
        # High-precision operands are saved and re-cast in backward (as
        # torchao does); the partitioner may keep the low-precision copies instead.
        ctx.save_for_backward(x2, w)
        ctx.spec, ctx.has_bias, ctx.x_shape = spec, bias is not None, x.shape
        return y

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple:
        x2, w = ctx.saved_tensors
        return (*linear_backward(gy, x2, w, ctx.spec, ctx.x_shape, ctx.has_bias), None)


def lowp_linear(x: Tensor, w: Tensor, bias: Optional[Tensor], recipe: str) -> Tensor:
    """``F.linear(x, w, bias)`` with all three GEMMs in the real recipe (no GNMR)."""
    if recipe not in REAL_RECIPES:
        raise ValueError(f"lowp_linear: recipe must be one of {list(REAL_RECIPES)} (got {recipe!r})")
    return _LowpLinear.apply(x, w, bias, recipe)


class LowpLinear(torch.nn.Linear):
    """An ``nn.Linear`` whose three GEMMs run in a real recipe (plain low precision, no GNMR)."""

    recipe: str = "fp8_e4m3"

    def forward(self, x: Tensor) -> Tensor:
        return lowp_linear(x, self.weight, self.bias, self.recipe)


def convert_to_lowp(model: torch.nn.Module, recipe: str = "fp8_e4m3",
                    module_filter: Optional[Callable[[str, torch.nn.Module], bool]] = None) -> torch.nn.Module:
    """Swap every ``nn.Linear`` (that ``module_filter`` admits) to :class:`LowpLinear`, in place.

    Parameters are kept (same objects), so an optimizer built before still works.

    >>> m = convert_to_lowp(torch.nn.Sequential(torch.nn.Linear(32, 16)), "int8_rowwise")
    >>> type(m[0]).__name__, m[0].recipe
    ('LowpLinear', 'int8_rowwise')
    """
    if recipe not in REAL_RECIPES:
        raise ValueError(f"convert_to_lowp: recipe must be one of {list(REAL_RECIPES)} (got {recipe!r})")
    for name, mod in list(model.named_modules()):
        if type(mod) is torch.nn.Linear and (module_filter is None or module_filter(name, mod)):
            mod.__class__ = LowpLinear
            mod.recipe = recipe
    return model
