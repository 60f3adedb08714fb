"""Precision recipes: the low path of every recoverable unit.

A *recipe* says how the two matmul operands of a unit, and the gradient of
its output, are rounded on the low path. GNMR never changes a recipe: it only
chooses, per unit and per step, whether the unit runs its recipe (low path)
or the op as written (high path).

The protocol is deliberately small so users can plug in their own format::

    >>> import torch
    >>> from gnmr_fx.backends.recipes import Recipe, register_recipe, get_recipe, fake_quant_int
    >>> def q_int6(t, kdim):
    ...     return fake_quant_int(t, bits=6, kdim=None)
    >>> r = register_recipe(Recipe("int6_demo", "6-bit per-tensor", q_int6, q_int6))
    >>> get_recipe("int6_demo") is r
    True
    >>> x = torch.linspace(-1, 1, 9)
    >>> torch.equal(r.quantize_input(x, -1), fake_quant_int(x, bits=6, kdim=None))
    True

A *quantizer* is ``(tensor, kdim) -> tensor``: it returns the tensor rounded
to the format's grid, in the input's dtype ("fake quantization"). ``kdim`` is
the reduction (K) dimension of the matmul that consumes the tensor, so that
per-token / per-channel / blockwise scales are taken along the right axis.
All recipes here are emulated in pure torch so they run on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

Quantizer = Callable[[Tensor, int], Tensor]

# Scales are clamped away from zero so an all-zero tensor quantizes to zeros
# instead of 0/0 = NaN (a NaN on the unused branch would leak into gradients
# through the select's zero-gradient product).
SCALE_EPS = 1e-12

FP8_E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
FP8_E5M2_MAX = float(torch.finfo(torch.float8_e5m2).max)  # 57344


@dataclass(frozen=True)
class Recipe:
    """A named low-precision recipe.

    Attributes:
        name: registry key, used in configs, logs and the CLI.
        description: one line shown by ``gnmr-fx inspect`` and the README.
        quantize_input: quantizer for activation operands (and for both
            operands of a weightless matmul).
        quantize_weight: quantizer for the weight operand of a unit.
        quantize_grad: quantizer for the gradient of the unit's output in
            backward, or None to keep gradients in the compute dtype.
    """

    name: str
    description: str
    quantize_input: Quantizer
    quantize_weight: Quantizer
    quantize_grad: Optional[Quantizer] = None
    onnx: Optional[str] = field(default=None, compare=False)
    """How ``export_onnx`` can express the recipe (``"int8"``), or None."""


_REGISTRY: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe, *, overwrite: bool = False) -> Recipe:
    """Add ``recipe`` to the registry so configs can name it."""
    if not isinstance(recipe, Recipe):
        raise TypeError(f"register_recipe expects a Recipe, got {type(recipe).__name__}")
    if recipe.name in _REGISTRY and not overwrite:
        raise ValueError(
            f"recipe {recipe.name!r} is already registered; pass overwrite=True to replace it"
        )
    _REGISTRY[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    """Look up a registered recipe by name; unknown names list the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown recipe {name!r}; registered recipes: {', '.join(sorted(_REGISTRY))}"
        ) from None


def recipe_names() -> list[str]:
    return sorted(_REGISTRY)


# ---------------------------------------------------------------------------
# Quantization primitives (fake quantization: round to grid, return float)
# ---------------------------------------------------------------------------
#
# Non-finite inputs. An inf or NaN in a tensor must come out of every
# quantizer non-finite, or the low path would hand the matmul a finite value
# for a broken input and GNMR (which watches gradient norms) could never see
# it. Each format does what its reference implementation does, with no host
# sync (masks and IEEE arithmetic only):
#
# * scaled by amax (fp8 per-tensor / rowwise, int8 / int4, DeepSeek-V3 1x128
#   and 128x128 fp8 blocks): an inf or NaN makes the scale's amax non-finite,
#   so every element sharing that scale comes back NaN (finite / inf * inf and
#   inf / inf are NaN). This is torchao float8's dynamic scaling, whose
#   amax-to-scale and dequantize give the same NaNs; other rows / blocks keep
#   their own scales and are untouched.
# * OCP MX (mxfp8, mxfp4): the block's E8M0 scale takes its NaN code (0xFF)
#   and the whole block is NaN. This follows the microxcaling reference
#   (``_quantize_mx`` sets the shared exponent to NaN when it overflows the
#   scale range, which an inf amax does, and a NaN amax stays NaN), and
#   torchao's ``to_mx`` NaN scale for a NaN block. E4M3 has no inf and E2M1
#   neither inf nor NaN, so the scale is the only place the format can say so.
# * NVFP4: the same rule on its e4m3 block scale (which has a NaN code); the
#   fp32 tensor scale is taken over the finite elements only, so one broken
#   block neither turns the others into zeros nor changes their rounding.


def _amax(t: Tensor, kdim: Optional[int]) -> Tensor:
    """Per-tensor amax (kdim None) or amax along kdim, kept for broadcasting."""
    a = t.detach().abs().float()
    if kdim is None:
        return a.amax()
    return a.amax(dim=kdim, keepdim=True)


def cast_fp8(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Round ``t`` (already scaled) onto the fp8 grid with saturation.

    The explicit clamp matters: e4m3fn has no inf, so an unclamped cast of an
    out-of-range value is NaN on some backends instead of saturating. The
    clamp also saturates an inf; callers whose scale comes from amax never
    pass one (a non-finite amax already made the block NaN, see above).
    """
    fmax = float(torch.finfo(dtype).max)
    return t.float().clamp(-fmax, fmax).to(dtype).float()


def fake_quant_fp8(
    t: Tensor, *, dtype: torch.dtype = torch.float8_e4m3fn, kdim: Optional[int] = None
) -> Tensor:
    """Dynamic-scaled fp8 fake quantization, per tensor (kdim None) or rowwise.

    The scale maps amax onto the format's largest finite value, as in
    torchao float8 training's dynamic scaling.
    """
    fmax = float(torch.finfo(dtype).max)
    scale = (_amax(t, kdim) / fmax).clamp_min(SCALE_EPS)
    return (cast_fp8(t.float() / scale, dtype) * scale).to(t.dtype)


def fake_quant_int(t: Tensor, *, bits: int, kdim: Optional[int] = None) -> Tensor:
    """Symmetric integer fake quantization (round-to-nearest-even, saturating).

    Levels are -(2^(b-1)-1) .. 2^(b-1)-1; the most negative code is unused so
    the grid is symmetric, as in common int8 per-channel schemes.
    """
    qmax = float(2 ** (bits - 1) - 1)
    scale = (_amax(t, kdim) / qmax).clamp_min(SCALE_EPS)
    q = torch.round(t.float() / scale).clamp(-qmax, qmax)
    return (q * scale).to(t.dtype)


def _blocked(t: Tensor, kdim: int, block: int) -> tuple[Tensor, int, int]:
    """Move kdim last and pad it to a multiple of ``block``."""
    x = t.movedim(kdim, -1)
    k = x.shape[-1]
    pad = (-k) % block
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x, k, pad


def _unblocked(x: Tensor, k: int, kdim: int) -> Tensor:
    return x[..., :k].movedim(-1, kdim)


def fake_quant_fp8_blockwise(t: Tensor, kdim: int, *, block: int = 128) -> Tensor:
    """DeepSeek-V3 activation tiles: one e4m3 scale per 1 x ``block`` along K."""
    x, k, _ = _blocked(t.float(), kdim, block)
    xb = x.reshape(*x.shape[:-1], -1, block)
    scale = (xb.abs().amax(-1, keepdim=True) / FP8_E4M3_MAX).clamp_min(SCALE_EPS)
    q = cast_fp8(xb / scale, torch.float8_e4m3fn) * scale
    return _unblocked(q.reshape(x.shape), k, kdim).to(t.dtype)


def fake_quant_fp8_block2d(t: Tensor, kdim: int, *, block: int = 128) -> Tensor:
    """DeepSeek-V3 weight blocks: one e4m3 scale per ``block`` x ``block``."""
    if t.dim() < 2:
        return fake_quant_fp8_blockwise(t, kdim, block=block)
    x, k, _ = _blocked(t.float(), kdim, block)
    # After moving K last, the other matrix dim is the second-to-last.
    n = x.shape[-2]
    padn = (-n) % block
    if padn:
        x = torch.nn.functional.pad(x, (0, 0, 0, padn))
    lead = x.shape[:-2]
    xb = x.reshape(*lead, x.shape[-2] // block, block, x.shape[-1] // block, block)
    scale = (xb.abs().amax(dim=(-3, -1), keepdim=True) / FP8_E4M3_MAX).clamp_min(SCALE_EPS)
    q = (cast_fp8(xb / scale, torch.float8_e4m3fn) * scale).reshape(x.shape)
    q = q[..., :n, :]
    return _unblocked(q, k, kdim).to(t.dtype)


def _e8m0_scale(amax: Tensor, elem_max_pow2: int) -> Tensor:
    """OCP MX shared scale: 2^(floor(log2(amax)) - emax_elem), an E8M0 value.

    ``frexp`` gives floor(log2(amax)) exactly (amax = m * 2^e, m in [0.5, 1)
    means floor(log2) = e - 1); ``floor(log2(x))`` in float can land one off
    just below a power of two. An all-zero block gets the smallest E8M0
    scale (2^-126 here, see below), and stays zero. A non-finite amax (the
    block holds an inf or a NaN) gets the NaN code, as in the microxcaling
    reference, so the whole block dequantizes to NaN.

    >>> _e8m0_scale(torch.tensor([448.0, 0.0, float("inf"), float("nan")]), 8).tolist()
    [1.0, 1.1754943508222875e-38, nan, nan]
    """
    _, e = torch.frexp(amax.float())
    exp = torch.where(amax > 0, e - 1 - elem_max_pow2, torch.full_like(e, -126))
    # E8M0 reaches 2^-127, but 2^-127 is an fp32 subnormal: GPU kernels that
    # flush subnormals to zero (Triton's fp32 division does) turn it into 0
    # and an all-zero block into 0/0 = NaN. That NaN then reaches the
    # gradients even from the branch the plan did not select (0 * NaN), so
    # the smallest scale used here is 2^-126, the smallest normal.
    scale = torch.exp2(exp.clamp(-126, 127).float())
    return torch.where(torch.isfinite(amax), scale, torch.full_like(scale, math.nan))


_FP4_E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def cast_fp4_e2m1(t: Tensor, *, stochastic: bool = False) -> Tensor:
    """Round onto the FP4 E2M1 grid {0, .5, 1, 1.5, 2, 3, 4, 6} with saturation.

    Ties go to the grid point with the even mantissa, as in IEEE rounding.
    E2M1 has one mantissa bit, so the grid spacing in the binade
    [2^E, 2^(E+1)) is 2^(E-1), and 0.5 below 1 (subnormals). Dividing by the
    spacing makes the grid the integers, where ``torch.round`` is exactly
    round-half-to-even, and an even integer is an even mantissa. This is
    elementwise (no table lookup), which matters on the CPU benchmark.

    With ``stochastic``, a value rounds down or up to its neighbouring grid
    points with the probabilities that make it unbiased in expectation
    (floor(a / spacing + U), U uniform in [0, 1)), as FP4 training recipes
    round gradients.

    >>> cast_fp4_e2m1(torch.tensor([0.25, 0.75, 2.5, 3.5, -5.0, 7.0, 100.0])).tolist()
    [0.0, 1.0, 2.0, 4.0, -4.0, 6.0, 6.0]
    >>> _ = torch.manual_seed(0); q = cast_fp4_e2m1(torch.full((20000,), 2.5), stochastic=True)
    >>> sorted(set(q.tolist())), round(float(q.mean()), 1)
    ([2.0, 3.0], 2.5)
    """
    a = t.float().abs().clamp(max=6.0)
    _, e = torch.frexp(a)  # a = m * 2^e, m in [0.5, 1): binade exponent e - 1
    spacing = torch.exp2((e - 1).clamp_min(0).float() - 1.0)
    # NaN stays NaN (round / floor of NaN is NaN) so a broken input is not
    # hidden. 6 is on the grid, so neither rounding passes it.
    steps = torch.floor(a / spacing + torch.rand_like(a)) if stochastic else torch.round(a / spacing)
    return torch.copysign(steps * spacing, t.float())


def fake_quant_mx(t: Tensor, kdim: int, *, elem: str, block: int = 32, stochastic: bool = False) -> Tensor:
    """OCP microscaling (MXFP8 e4m3 / MXFP4 e2m1): ``block``-element blocks
    along K, one E8M0 (power-of-two) shared scale per block.

    Per the OCP MX v1.0 spec the scale is 2^(floor(log2(amax)) - emax) with
    emax the largest exponent of the element format (8 for e4m3, 2 for
    e2m1); the block's largest element may then exceed the element max and
    saturates. A block holding an inf or a NaN is NaN (its scale is the
    E8M0 NaN code); the other blocks are untouched. ``stochastic`` rounds
    fp4 elements stochastically (see :func:`cast_fp4_e2m1`).

    >>> x = torch.tensor([[1.0, 3.0, 7.0, 0.1]])
    >>> fake_quant_mx(x, -1, elem="fp4", block=4).tolist()
    [[1.0, 3.0, 6.0, 0.0]]
    >>> fake_quant_mx(torch.tensor([[1.0, float("inf"), 3.0, 7.0]]), -1, elem="fp4", block=2).tolist()
    [[nan, nan, 3.0, 6.0]]
    """
    if elem not in ("fp8", "fp4"):
        raise ValueError(f"fake_quant_mx: elem must be 'fp8' or 'fp4', got {elem!r}")
    x, k, _ = _blocked(t.float(), kdim, block)
    xb = x.reshape(*x.shape[:-1], -1, block)
    amax = xb.abs().amax(-1, keepdim=True)
    if elem == "fp8":
        scale = _e8m0_scale(amax, 8)  # e4m3: largest normal is 1.75 * 2^8
        q = cast_fp8(xb / scale, torch.float8_e4m3fn) * scale
    else:
        scale = _e8m0_scale(amax, 2)  # e2m1: largest normal is 1.5 * 2^2
        q = cast_fp4_e2m1(xb / scale, stochastic=stochastic) * scale
    return _unblocked(q.reshape(x.shape), k, kdim).to(t.dtype)


def fake_quant_nvfp4(t: Tensor, kdim: int, *, block: int = 16, stochastic: bool = False) -> Tensor:
    """NVFP4: ``block``-element blocks of e2m1 along K, one e4m3 scale per
    block, and an fp32 per-tensor scale that maps the tensor amax onto
    6 * 448 so the e4m3 block scales use their full range. A block holding
    an inf or a NaN is NaN (its e4m3 scale is NaN); the tensor scale is
    taken over the finite elements, so the other blocks are untouched.
    ``stochastic`` rounds the elements stochastically (see :func:`cast_fp4_e2m1`).

    >>> x = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    >>> fake_quant_nvfp4(x, -1, block=4).tolist()
    [[1.0, 2.0, 3.0, 6.0]]
    >>> fake_quant_nvfp4(torch.tensor([[1.0, 6.0, float("nan"), 2.0]]), -1, block=2).tolist()
    [[1.0, 6.0, nan, nan]]
    """
    x, k, _ = _blocked(t.float(), kdim, block)
    xb = x.reshape(*x.shape[:-1], -1, block)
    a = xb.abs()
    finite_amax = torch.nan_to_num(a, nan=0.0, posinf=0.0).amax()
    tensor_scale = (finite_amax / (6.0 * FP8_E4M3_MAX)).clamp_min(SCALE_EPS)
    block_amax = a.amax(-1, keepdim=True)  # inf / NaN when the block holds one
    block_scale = cast_fp8(block_amax / 6.0 / tensor_scale, torch.float8_e4m3fn)
    block_scale = torch.where(torch.isfinite(block_amax), block_scale, torch.full_like(block_scale, math.nan))
    scale = block_scale * tensor_scale
    # A block whose scale underflows e4m3 (amax below ~2^-10 of the tensor's)
    # is zero in the format; dividing by a clamped scale instead would turn
    # it into +-6 * eps garbage. A NaN scale is not "dead" (NaN == 0 is
    # False): its block stays NaN.
    dead = scale == 0
    q = cast_fp4_e2m1(xb / torch.where(dead, torch.ones_like(scale), scale), stochastic=stochastic) * scale
    q = torch.where(dead, torch.zeros_like(q), q)
    return _unblocked(q.reshape(x.shape), k, kdim).to(t.dtype)


# ---------------------------------------------------------------------------
# Built-in recipes
# ---------------------------------------------------------------------------


def _fp8_tensorwise(t: Tensor, kdim: int) -> Tensor:
    return fake_quant_fp8(t, dtype=torch.float8_e4m3fn, kdim=None)


def _e5m2_tensorwise(t: Tensor, kdim: int) -> Tensor:
    return fake_quant_fp8(t, dtype=torch.float8_e5m2, kdim=None)


def _fp8_rowwise(t: Tensor, kdim: int) -> Tensor:
    return fake_quant_fp8(t, dtype=torch.float8_e4m3fn, kdim=kdim)


def _grad_rowwise(t: Tensor, kdim: int) -> Tensor:
    # Output gradients are consumed along both dims by the two backward
    # GEMMs; one scale per row (last dim) is the rowwise compromise.
    return fake_quant_fp8(t, dtype=torch.float8_e5m2, kdim=-1)


def _int8_rowwise(t: Tensor, kdim: int) -> Tensor:
    return fake_quant_int(t, bits=8, kdim=kdim)


def _int8_grad_rowwise(t: Tensor, kdim: int) -> Tensor:
    # As _grad_rowwise: one scale per row (last dim) of the output gradient;
    # the real kernels scale each backward GEMM along its own K instead.
    return fake_quant_int(t, bits=8, kdim=-1)


def _int8_tensorwise(t: Tensor, kdim: int) -> Tensor:
    return fake_quant_int(t, bits=8, kdim=None)


def _int4_tensorwise(t: Tensor, kdim: int) -> Tensor:
    return fake_quant_int(t, bits=4, kdim=None)


register_recipe(Recipe(
    "fp8_e4m3",
    "fp8 e4m3 per-tensor dynamic scaling; gradients e5m2 per-tensor",
    _fp8_tensorwise, _fp8_tensorwise, _e5m2_tensorwise, onnx="fp8_e4m3",
))
register_recipe(Recipe(
    "fp8_rowwise",
    "fp8 e4m3 rowwise (one scale per row along K); gradients e5m2 rowwise",
    _fp8_rowwise, _fp8_rowwise, _grad_rowwise,
))
register_recipe(Recipe(
    "int8",
    "int8 symmetric, per-token activations and per-channel weights",
    _int8_rowwise, _int8_rowwise, None, onnx="int8",
))
register_recipe(Recipe(
    "int8_rowwise",
    "int8 symmetric, per-token activations and per-channel weights; gradients int8 per row "
    "(real kernels: torch._int_mm in all three GEMMs)",
    _int8_rowwise, _int8_rowwise, _int8_grad_rowwise, onnx="int8",
))
register_recipe(Recipe(
    "int8_tensorwise",
    "int8 symmetric, per-tensor activations (one scale for the whole tensor: an outlier feature "
    "coarsens every other value) and per-channel weights",
    _int8_tensorwise, _int8_rowwise, None,
))
register_recipe(Recipe(
    "int4",
    "activation-quantization stress: int4 per-tensor activations, int8 per-channel weights",
    _int4_tensorwise, _int8_rowwise, None,
))


def sqnr(ref: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``approx`` against ``ref``, in dB
    (higher is better; ``inf`` when they are equal). The one SQNR helper: recipe
    tests, real-kernel tests and the ONNX check all report it.

    >>> x = torch.linspace(-1, 1, 101)
    >>> sqnr(x, x), round(sqnr(x, fake_quant_int(x, bits=8, kdim=None)))
    (inf, 48)
    """
    ref = ref.detach().double()
    err = (approx.detach().double() - ref).pow(2).mean()
    sig = ref.pow(2).mean()
    if err == 0:
        return math.inf
    return float(10.0 * torch.log10(sig / err))


# ---------------------------------------------------------------------------
# Fine-grained recipes (DeepSeek-V3 blockwise fp8, OCP MX, NVFP4)
# ---------------------------------------------------------------------------
# The fp4 recipes quantize the forward operands only: they are activation-
# and weight-quantization stress recipes, and round-to-nearest fp4 gradients
# without stochastic rounding would add a bias no production recipe has.


def _fp8_tile_1x128(t: Tensor, kdim: int) -> Tensor:
    return fake_quant_fp8_blockwise(t, kdim, block=128)


def _fp8_block_128x128(t: Tensor, kdim: int) -> Tensor:
    return fake_quant_fp8_block2d(t, kdim, block=128)


def _fp8_grad_1x128(t: Tensor, kdim: int) -> Tensor:
    # DeepSeek-V3 keeps e4m3 for gradients too (the fine scales give it the
    # range that per-tensor scaling needed e5m2 for).
    return fake_quant_fp8_blockwise(t, -1, block=128)


def _mxfp8(t: Tensor, kdim: int) -> Tensor:
    return fake_quant_mx(t, kdim, elem="fp8", block=32)


def _mxfp8_grad(t: Tensor, kdim: int) -> Tensor:
    return fake_quant_mx(t, -1, elem="fp8", block=32)


def _mxfp4(t: Tensor, kdim: int) -> Tensor:
    return fake_quant_mx(t, kdim, elem="fp4", block=32)


def _nvfp4(t: Tensor, kdim: int) -> Tensor:
    return fake_quant_nvfp4(t, kdim, block=16)


register_recipe(Recipe(
    "fp8_blockwise",
    "DeepSeek-V3 fine-grained fp8 e4m3: 1x128 activation tiles, 128x128 weight blocks, 1x128 gradient tiles",
    _fp8_tile_1x128, _fp8_block_128x128, _fp8_grad_1x128,
))
register_recipe(Recipe(
    "mxfp8",
    "OCP MXFP8: e4m3 elements, 32-element blocks along K with E8M0 scales; gradients MXFP8",
    _mxfp8, _mxfp8, _mxfp8_grad,
))
register_recipe(Recipe(
    "mxfp4",
    "OCP MXFP4: e2m1 elements, 32-element blocks along K with E8M0 scales (forward only)",
    _mxfp4, _mxfp4, None,
))
register_recipe(Recipe(
    "nvfp4",
    "NVFP4: e2m1 elements, 16-element blocks with e4m3 scales and an fp32 tensor scale (forward only)",
    _nvfp4, _nvfp4, None,
))


# ---------------------------------------------------------------------------
# FP4 forward *and* backward (the NVFP4 / MXFP4 pretraining recipes)
# ---------------------------------------------------------------------------
# The forward operands round to nearest as above; the gradient of each unit's
# output is rounded to FP4 with *stochastic* rounding, as the NVFP4
# pretraining recipe (arXiv 2509.25149) and MXFP4 training (arXiv 2502.20586)
# do for gradients: round-to-nearest FP4 gradients are biased, stochastic
# rounding is unbiased in expectation. Because the saved forward operands are
# the rounded ones, both backward GEMMs (dgrad, wgrad) then run on FP4 data.
# Not emulated: the random Hadamard transform those recipes apply to the
# wgrad operands, and NVFP4's 2-D 16x16 weight blocks.


def _nvfp4_grad_sr(t: Tensor, kdim: int) -> Tensor:
    return fake_quant_nvfp4(t, -1, block=16, stochastic=True)


def _mxfp4_grad_sr(t: Tensor, kdim: int) -> Tensor:
    return fake_quant_mx(t, -1, elem="fp4", block=32, stochastic=True)


register_recipe(Recipe(
    "nvfp4_sr",
    "NVFP4 forward operands (round to nearest) and output gradients (stochastic rounding): FP4 in all three GEMMs",
    _nvfp4, _nvfp4, _nvfp4_grad_sr,
))
register_recipe(Recipe(
    "mxfp4_sr",
    "MXFP4 forward operands (round to nearest) and output gradients (stochastic rounding): FP4 in all three GEMMs",
    _mxfp4, _mxfp4, _mxfp4_grad_sr,
))
