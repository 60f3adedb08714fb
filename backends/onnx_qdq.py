"""The QDQ round trips of ``export_onnx`` as torch ops with ONNX translations.

``torch.onnx.export(..., dynamo=True)`` (torch.export, then onnxscript)
writes each aten op through onnxscript's torch library. A low unit's rounded
operand must instead become one standard ``QuantizeLinear`` ->
``DequantizeLinear`` pair, which ONNX runtimes recognize as a quantized
matmul; decomposed into ``round`` / ``clamp`` / ``mul`` it would not be. So
each round trip is a custom op, opaque to torch.export, whose PyTorch kernel
computes exactly what the recipe computes and whose translation
(:func:`onnx_translations`, passed as ``custom_translation_table``) writes
the pair:

* ``gnmr::qdq_int8(x2d, scale)``: symmetric int8, one scale per row of a
  2-D tensor, ``axis=0``, zero point 0 (int8). The recipe clamps codes to
  [-127, 127] and ONNX saturates to [-128, 127]; with scale = amax / 127 no
  code exceeds 127 in magnitude, so the two agree. Opset >= 13.
* ``gnmr::qdq_fp8_e4m3(x, scale)``: one scale per tensor, a float8e4m3fn
  zero point; ``QuantizeLinear``'s default ``saturate=1`` matches the
  recipe's clamp to +-448. Opset >= 19.

Scales are inputs (computed in the graph from the same tensor), so dynamic
activation scaling exports as it runs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from gnmr_fx.backends.ops import OPS
from gnmr_fx.backends.recipes import FP8_E4M3_MAX, SCALE_EPS, cast_fp8, get_recipe

# Lowest opset that has each format's QuantizeLinear.
MIN_OPSET = {"int8": 13, "fp8_e4m3": 19}


@torch.library.custom_op("gnmr::qdq_int8", mutates_args=())
def qdq_int8_op(x2d: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-row symmetric int8 round trip of a 2-D float32 tensor (round half to even, saturate)."""
    s = scale.unsqueeze(1)
    return torch.round(x2d / s).clamp(-127.0, 127.0) * s


@qdq_int8_op.register_fake
def _qdq_int8_fake(x2d: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x2d)


@torch.library.custom_op("gnmr::qdq_fp8_e4m3", mutates_args=())
def qdq_fp8_e4m3_op(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-tensor fp8 e4m3 round trip of a float32 tensor (saturating)."""
    return cast_fp8(x / scale, torch.float8_e4m3fn) * scale


@qdq_fp8_e4m3_op.register_fake
def _qdq_fp8_e4m3_fake(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def onnx_translations() -> dict[Any, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``.

    Needs ``onnxscript`` (the ``onnx`` extra).

    >>> import torch
    >>> sorted(str(op) for op in onnx_translations())
    ['gnmr.qdq_fp8_e4m3.default', 'gnmr.qdq_int8.default']
    """
    try:
        import numpy as np
        import onnx_ir as ir
        from onnxscript import opset13, opset19
    except ImportError as e:
        raise ImportError('export_onnx needs onnxscript: pip install "gnmr-fx[onnx]"') from e

    def qdq_int8(x2d: Any, scale: Any) -> Any:
        # Per-axis QDQ takes one zero point per scale.
        zero = opset13.Constant(value=ir.tensor(np.zeros(1, dtype=np.int8)))
        zp = opset13.Expand(zero, opset13.Shape(scale))
        q = opset13.QuantizeLinear(x2d, scale, zp, axis=0)
        return opset13.DequantizeLinear(q, scale, zp, axis=0)

    def qdq_fp8_e4m3(x: Any, scale: Any) -> Any:
        zp = opset19.Constant(value=ir.tensor(np.zeros((), dtype=ir.DataType.FLOAT8E4M3FN.numpy())))
        q = opset19.QuantizeLinear(x, scale, zp)
        return opset19.DequantizeLinear(q, scale, zp)

    return {torch.ops.gnmr.qdq_int8.default: qdq_int8, torch.ops.gnmr.qdq_fp8_e4m3.default: qdq_fp8_e4m3}


# ---------------------------------------------------------------------------
# The recipes as QDQ: what a frozen low branch calls
# ---------------------------------------------------------------------------

ONNX_FORMATS = ("int8", "fp8_e4m3")
_EPS = SCALE_EPS  # the recipes' scale floor: the QDQ scales must equal the recipe's


def qdq_int8(t: torch.Tensor, kdim: int) -> torch.Tensor:
    """int8 fake quantization with one scale per row along ``kdim``, as QDQ.

    >>> import torch
    >>> from gnmr_fx.backends.recipes import fake_quant_int
    >>> x = torch.randn(2, 3, 8)
    >>> torch.equal(qdq_int8(x, -1), fake_quant_int(x, bits=8, kdim=-1))
    True
    """
    kdim, last = kdim % t.dim(), t.dim() - 1
    x = t if t.dtype == torch.float32 else t.float()
    x = x.movedim(kdim, last) if kdim != last else x
    moved_shape = x.shape
    x2d = x.reshape(-1, moved_shape[-1])
    scale = (x2d.detach().abs().amax(dim=1) / 127.0).clamp_min(_EPS)
    y = qdq_int8_op(x2d, scale).reshape(moved_shape)
    y = y.movedim(last, kdim) if kdim != last else y
    return y if y.dtype == t.dtype else y.to(t.dtype)


def qdq_fp8_e4m3(t: torch.Tensor, kdim: int) -> torch.Tensor:
    """fp8 e4m3 fake quantization with one dynamic scale per tensor, as QDQ.

    >>> import torch
    >>> from gnmr_fx.backends.recipes import fake_quant_fp8
    >>> x = torch.randn(4, 8)
    >>> torch.equal(qdq_fp8_e4m3(x, -1), fake_quant_fp8(x, kdim=None))
    True
    """
    x = t if t.dtype == torch.float32 else t.float()
    # max(), not amax(): onnxscript's aten.amax needs a dim (same value, NaN included).
    scale = (x.detach().abs().max() / FP8_E4M3_MAX).clamp_min(_EPS)
    y = qdq_fp8_e4m3_op(x, scale)
    return y if y.dtype == t.dtype else y.to(t.dtype)


# Recipe.onnx -> QDQ writer.
QDQ = {"int8": qdq_int8, "fp8_e4m3": qdq_fp8_e4m3}


def low_path_qdq(
    op: str,
    *args: Any,
    recipe: str,
    a_index: int,
    b_index: int,
    b_kdim: int,
    b_is_weight: bool,
    **kwargs: Any,
) -> torch.Tensor:
    """The low branch of a unit written with QDQ pairs (same signature as
    ``backends.paths.low_path``, so the frozen graph calls it in place)."""
    fmt = get_recipe(recipe).onnx
    if fmt not in QDQ:
        raise ValueError(unsupported_message(recipe))
    q = QDQ[fmt]
    args = list(args)
    args[a_index] = q(args[a_index], -1)
    args[b_index] = q(args[b_index], b_kdim)
    return OPS[op].fn(*args, **kwargs)


def unsupported_message(recipe: str) -> str:
    """Why ``recipe`` cannot be exported, and what to do instead."""
    return (
        f"recipe {recipe!r} cannot be expressed as ONNX QuantizeLinear/DequantizeLinear "
        f"(export supports recipes whose Recipe.onnx is one of {ONNX_FORMATS}: int8 per-token/per-channel, "
        f"fp8 e4m3 per-tensor); export with GNMRConfig(recipe='int8'), or put the low units on the "
        f"high path with plan='high'"
    )
