"""Real FP8 GEMMs through ``torch._scaled_mm``, with dynamic scaling.

The real recipes have the same names as the emulated ones in ``recipes.py``:

* ``fp8_e4m3`` -> **tensorwise**: one scale per tensor; e4m3 operands in
  forward, the output gradient in e5m2 (sm_89+).
* ``fp8_rowwise`` -> **rowwise**: one scale per row along each GEMM's
  reduction dim; e4m3 operands and e4m3 gradients, as torchao's rowwise
  recipe does (sm_90+).

Scaling is dynamic (amax of the current tensor, no history), so switching a
unit between the low and the high path never corrupts a scale: there is no
amax history to skip or pollute (the reason Megatron forbids per-layer FP8
toggling under delayed scaling).

All three GEMMs of a linear run in fp8: output ``y = x w^T``, grad-input
``dx = dy w`` and grad-weight ``dw = dy^T x``. ``_scaled_mm(a, b)`` wants
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
only the GEMM is an extern kernel. :func:`fp8_linear` is the plain FP8 linear
(no GNMR: the low-precision floor of the benchmark); the GNMR host dispatch in
``host_dispatch.py`` runs the same casts and the same GEMMs, and chooses per
unit, on the host, whether a GEMM runs in fp8 or as written.

>>> import torch
>>> from gnmr_fx.backends.recipes import sqnr
>>> x, w = torch.randn(32, 64), torch.randn(48, 64)
>>> y = fp8_linear(x, w, None, "fp8_e4m3")
>>> y.shape, round(sqnr(x @ w.t(), y)) > 20
(torch.Size([32, 48]), True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from gnmr_fx.backends.recipes import SCALE_EPS

# _scaled_mm (cuBLASLt / CUTLASS) needs every matrix dim divisible by 16.
ALIGN = 16


@dataclass(frozen=True)
class Fp8Spec:
    """How a real fp8 recipe casts operands and gradients."""

    name: str  # the recipe name it implements (same as the emulated recipe)
    scaling: str  # "tensorwise" or "rowwise"
    grad_dtype: torch.dtype  # dtype of the output gradient in both backward GEMMs
    min_capability: tuple  # CUDA compute capability the kernel needs
    # torchao's defaults: fast accumulation for the output GEMM only; the
    # gradient GEMMs accumulate exactly (their K can be the token count).
    fast_accum_output: bool = True

    @property
    def rowwise(self) -> bool:
        return self.scaling == "rowwise"


REAL_RECIPES: dict[str, Fp8Spec] = {
    "fp8_e4m3": Fp8Spec("fp8_e4m3", "tensorwise", torch.float8_e5m2, (8, 9)),
    # The sm_90 rowwise kernel takes e4m3 operands only, so gradients are e4m3
    # here (the emulated fp8_rowwise rounds them to e5m2).
    "fp8_rowwise": Fp8Spec("fp8_rowwise", "rowwise", torch.float8_e4m3fn, (9, 0)),
}


def _torch_at_least(major: int, minor: int) -> bool:
    parts = torch.__version__.split("+")[0].split(".")
    return (int(parts[0]), int(parts[1])) >= (major, minor)


_CPU_ROWWISE = _torch_at_least(2, 13)


def real_kernel_problem(recipe: str, device: torch.device) -> Optional[str]:
    """Why ``recipe`` cannot run as real kernels on ``device`` (None if it can).

    The message names the alternative, so callers can raise it as is.

    >>> real_kernel_problem("int8", torch.device("cpu"))
    "recipe 'int8' has no real low-precision kernel here (real kernels: fp8_e4m3, fp8_rowwise); use emulate=True"
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
            alt = "recipe='fp8_e4m3' (tensorwise, sm_89+) or emulate=True" if spec.rowwise and cap >= (8, 9) \
                else "emulate=True, or recipe='int8' (emulated)"
            return (f"{spec.scaling} fp8 kernels need {need}+, this GPU is sm_{cap[0]}{cap[1]}; use {alt}")
        return None
    if device.type == "cpu":
        # torch has CPU _scaled_mm kernels (oneDNN); they are correct but not
        # faster than fp32, so automatic selection never picks them. Before
        # torch 2.13 they are per-tensor only (rowwise scales trip an internal
        # assert), so rowwise is refused there rather than crashing.
        if spec.rowwise and not _CPU_ROWWISE:
            return (f"rowwise fp8 _scaled_mm needs torch 2.13+ on the CPU (this is {torch.__version__}); "
                    "use recipe='fp8_e4m3' (tensorwise) or emulate=True")
        return None
    return f"real fp8 kernels run on CUDA (sm_89+) or CPU, not {device.type}; use emulate=True"


# ---------------------------------------------------------------------------
# Casts (traced into the compiled graph)
# ---------------------------------------------------------------------------


def to_fp8(t: Tensor, dtype: torch.dtype, dim: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Dynamic-scaled cast: ``(t_lp, scale)`` with ``t ~= t_lp.float() * scale``.

    ``dim`` None scales per tensor (a 0-d scale); otherwise amax is taken
    along ``dim`` (kept for broadcasting): one scale per row along that dim.
    The formula is the emulated recipes' (``recipes.fake_quant_fp8``), so the
    real low path sees the same grid values.
    """
    fmax = float(torch.finfo(dtype).max)
    a = t.detach().abs()
    amax = a.amax() if dim is None else a.amax(dim=dim, keepdim=True)
    scale = (amax.float() / fmax).clamp_min(SCALE_EPS)
    t_lp = (t.detach().float() / scale).clamp(-fmax, fmax).to(dtype)
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
    """The fp8 operands and scales of one ``_scaled_mm`` call."""

    a_lp: Tensor
    b_lp: Tensor
    scale_a: Tensor
    scale_b: Tensor
    fast_accum: bool


def output_operands(x2: Tensor, w: Tensor, spec: Fp8Spec) -> GemmOperands:
    """``y = x2 @ w^T``: x2 [M, K], w [N, K]; scales along K."""
    dim = -1 if spec.rowwise else None
    x_lp, sx = to_fp8(x2, torch.float8_e4m3fn, dim)
    w_lp, sw = to_fp8(w, torch.float8_e4m3fn, dim)
    return GemmOperands(row_major(x_lp), col_major(w_lp.t()), sx, sw.t() if spec.rowwise else sw,
                        spec.fast_accum_output)


def grad_operands(g2: Tensor, x2: Tensor, w: Tensor, spec: Fp8Spec) -> tuple[GemmOperands, GemmOperands]:
    """Operands of ``dx = g2 @ w`` and ``dw = g2^T @ x2`` (g2 [M, N])."""
    if spec.rowwise:
        # Each GEMM scales along its own K: N for dx, M (tokens) for dw.
        g_lp, sg = to_fp8(g2, spec.grad_dtype, -1)  # [M, 1]
        w_lp, sw = to_fp8(w, torch.float8_e4m3fn, 0)  # [1, K]
        dx = GemmOperands(row_major(g_lp), col_major(w_lp), sg, sw, False)
        gt_lp, sgt = to_fp8(g2, spec.grad_dtype, 0)  # [1, N]
        x_lp, sx = to_fp8(x2, torch.float8_e4m3fn, 0)  # [1, K]
        dw = GemmOperands(row_major(gt_lp.t()), col_major(x_lp), sgt.t(), sx, False)
        return dx, dw
    # Tensorwise: one cast per tensor serves both GEMMs (scales have no axis).
    g_lp, sg = to_fp8(g2, spec.grad_dtype)
    w_lp, sw = to_fp8(w, torch.float8_e4m3fn)
    x_lp, sx = to_fp8(x2, torch.float8_e4m3fn)
    dx = GemmOperands(row_major(g_lp), col_major(w_lp), sg, sw, False)
    dw = GemmOperands(row_major(g_lp.t()), col_major(x_lp), sg, sx, False)
    return dx, dw


# ---------------------------------------------------------------------------
# The GEMM
# ---------------------------------------------------------------------------


def scaled_mm(ops: GemmOperands, out_dtype: torch.dtype) -> Tensor:
    """``(a_lp * scale_a) @ (b_lp * scale_b)`` through ``torch._scaled_mm``.

    Dims that are not multiples of 16 are zero-padded (zeros add nothing to
    a dot product) and the result is sliced back.
    """
    padded, (m, n) = pad_operands(ops)
    y = torch._scaled_mm(padded.a_lp, padded.b_lp, scale_a=padded.scale_a, scale_b=padded.scale_b,
                         out_dtype=out_dtype, use_fast_accum=ops.fast_accum)
    return y if y.shape == (m, n) else y[:m, :n]


def padding(m: int, k: int, n: int) -> tuple[int, int, int]:
    """Zero rows / cols to add to M, K, N so that ``_scaled_mm`` accepts them."""
    return (-m) % ALIGN, (-k) % ALIGN, (-n) % ALIGN


def pad_operands(ops: GemmOperands) -> tuple[GemmOperands, tuple[int, int]]:
    """The operands in ``_scaled_mm``'s layouts, padded to multiples of 16,
    and the unpadded output shape."""
    a, b, sa, sb = ops.a_lp, ops.b_lp, ops.scale_a, ops.scale_b
    m, k = a.shape
    n = b.shape[1]
    pm, pk, pn = padding(m, k, n)
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
    # fp8 has no pad kernel on every device: pad the raw bytes.
    raw = t.view(torch.uint8) if t.is_contiguous() else t.contiguous().view(torch.uint8)
    return torch.nn.functional.pad(raw, (0, p1, 0, p0)).view(t.dtype)


# ---------------------------------------------------------------------------
# Plain FP8 linear (no GNMR): the benchmark's low-precision floor
# ---------------------------------------------------------------------------


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, bias: Optional[Tensor], recipe: str) -> Tensor:
        spec = REAL_RECIPES[recipe]
        x2 = x.reshape(-1, x.shape[-1])
        y = scaled_mm(output_operands(x2, w, spec), x.dtype)
        if bias is not None:
            y = y + bias
        # High-precision operands are saved and re-cast in backward (as
        # torchao does); the partitioner may keep the fp8 copies instead.
        ctx.save_for_backward(x2, w)
        ctx.spec, ctx.has_bias, ctx.x_shape = spec, bias is not None, x.shape
        return y.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple:
        x2, w = ctx.saved_tensors
        g2 = gy.reshape(-1, gy.shape[-1])
        dx_ops, dw_ops = grad_operands(g2, x2, w, ctx.spec)
        dx = scaled_mm(dx_ops, gy.dtype).reshape(ctx.x_shape)
        dw = scaled_mm(dw_ops, w.dtype)
        db = g2.sum(0) if ctx.has_bias else None
        return dx, dw, db, None


def fp8_linear(x: Tensor, w: Tensor, bias: Optional[Tensor], recipe: str) -> Tensor:
    """``F.linear(x, w, bias)`` with all three GEMMs in real fp8 (no GNMR)."""
    if recipe not in REAL_RECIPES:
        raise ValueError(f"fp8_linear: recipe must be one of {list(REAL_RECIPES)} (got {recipe!r})")
    return _Fp8Linear.apply(x, w, bias, recipe)


class Float8Linear(torch.nn.Linear):
    """An ``nn.Linear`` whose three GEMMs run in real fp8 (plain FP8, no GNMR)."""

    recipe: str = "fp8_e4m3"

    def forward(self, x: Tensor) -> Tensor:
        return fp8_linear(x, self.weight, self.bias, self.recipe)


def convert_to_fp8(model: torch.nn.Module, recipe: str = "fp8_e4m3",
                   module_filter: Optional[Callable[[str, torch.nn.Module], bool]] = None) -> torch.nn.Module:
    """Swap every ``nn.Linear`` (that ``module_filter`` admits) to :class:`Float8Linear`, in place.

    Parameters are kept (same objects), so an optimizer built before still works.

    >>> m = convert_to_fp8(torch.nn.Sequential(torch.nn.Linear(32, 16)))
    >>> type(m[0]).__name__, m[0].recipe
    ('Float8Linear', 'fp8_e4m3')
    """
    if recipe not in REAL_RECIPES:
        raise ValueError(f"convert_to_fp8: recipe must be one of {list(REAL_RECIPES)} (got {recipe!r})")
    for name, mod in list(model.named_modules()):
        if type(mod) is torch.nn.Linear and (module_filter is None or module_filter(name, mod)):
            mod.__class__ = Float8Linear
            mod.recipe = recipe
    return model
