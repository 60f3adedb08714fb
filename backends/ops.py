"""The op table: every op that can be a unit, and what the passes match around it.

One table, :data:`OPS`, names each recoverable op once: the function both
branches call (``OpSpec.fn``) and where its two matmul operands sit. The
passes look ops up by their target objects (:data:`RECOVERABLE_OPS`, built
from the same specs); the branches (``backends.paths``) and the FX code the
passes write look them up by name, since FX code generation cannot print a
builtin function object as an argument. FX ``call_method`` nodes carry the
method name as their target by construction, so those are mapped once, here
(:data:`METHOD_OPS`), to the same function objects.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def transformers_grouped_mm(input: Tensor, weight: Tensor, offs: Tensor) -> Tensor:
    """Hugging Face's grouped matmul for the dtypes ``torch._grouped_mm`` cannot
    compile or differentiate (fp32: no CPU backward). transformers registers
    the op when its MoE integration is imported; units that use it exist only
    then, so looking it up at call time never imports transformers here."""
    return torch.ops.transformers.grouped_mm_fallback(input, weight, offs=offs)


@dataclass(frozen=True)
class OpSpec:
    """A recoverable op: the function the branches call and where its two
    matmul operands sit in its args."""

    name: str  # short name used in unit names and by the branches ("matmul", ...)
    fn: Callable[..., Tensor]  # the canonical function the high path calls
    a_index: int
    b_index: int
    b_kdim: int  # reduction dim of operand b
    min_rank: int = 2  # operands of lower rank are not recoverable


LINEAR = OpSpec("linear", F.linear, 0, 1, -1)
MATMUL = OpSpec("matmul", torch.matmul, 0, 1, -2)
MM = OpSpec("mm", torch.mm, 0, 1, -2)
BMM = OpSpec("bmm", torch.bmm, 0, 1, -2)
ADDMM = OpSpec("addmm", torch.addmm, 1, 2, -2)
BADDBMM = OpSpec("baddbmm", torch.baddbmm, 1, 2, -2)
# Hugging Face MoE experts call ``transformers::grouped_mm_fallback`` (a
# per-expert ``torch.mm`` loop behind one opaque op) instead of
# ``torch._grouped_mm`` when the weights are not bf16: fp32 models' experts.
GROUPED_MM_FALLBACK = OpSpec("grouped_mm_fallback", transformers_grouped_mm, 0, 1, -2)

OPS: dict[str, OpSpec] = {s.name: s for s in (LINEAR, MATMUL, MM, BMM, ADDMM, BADDBMM, GROUPED_MM_FALLBACK)}
"""Every recoverable op by name: the one op table."""

RECOVERABLE_OPS: dict[Any, OpSpec] = {
    F.linear: LINEAR,
    torch.matmul: MATMUL,
    operator.matmul: MATMUL,
    torch.mm: MM,
    torch.bmm: BMM,
    torch.addmm: ADDMM,
    torch.baddbmm: BADDBMM,
}
# Grouped matmul (the kernel behind Hugging Face MoE experts), where this
# torch has it: operands a [tokens, K] and b [groups, K, N].
if hasattr(torch, "_grouped_mm"):
    GROUPED_MM = OpSpec("grouped_mm", torch._grouped_mm, 0, 1, -2)
    OPS[GROUPED_MM.name] = GROUPED_MM
    RECOVERABLE_OPS[torch._grouped_mm] = GROUPED_MM

# Recoverable ops that another library registers with torch.library when it
# is imported, as (namespace, name, spec). They are looked up by object when a
# graph is rewritten (``library_ops``), so gnmr_fx never imports the library.
LIBRARY_OPS: tuple[tuple[str, str, OpSpec], ...] = (("transformers", "grouped_mm_fallback", GROUPED_MM_FALLBACK),)

METHOD_OPS: dict[str, Any] = {
    "matmul": torch.matmul,
    "__matmul__": torch.matmul,
    "mm": torch.mm,
    "bmm": torch.bmm,
    "addmm": torch.addmm,
    "baddbmm": torch.baddbmm,
}

# Matmul-family or weight-bearing ops that are seen but not (yet) units;
# inspect reports them by kind so a user knows what stayed as written.
NOT_RECOVERABLE_OPS: dict[Any, str] = {
    F.conv1d: "conv1d",
    F.conv2d: "conv2d",
    F.conv3d: "conv3d",
    F.embedding: "embedding",
    torch.einsum: "einsum",
    F.scaled_dot_product_attention: "scaled_dot_product_attention",
    torch.mv: "mv",
    torch.dot: "dot",
    torch.addmv: "addmv",
    torch.tensordot: "tensordot",
}

# View-like ops a weight may pass through before the matmul (e.g. ``x @ w.t()``);
# all preserve the Frobenius norm, so statistics recorded on the view measure ||dL/dW||.
VIEW_FUNCTIONS = (torch.t, torch.transpose, torch.permute, torch.reshape, torch.squeeze, torch.unsqueeze)
VIEW_METHODS = ("t", "transpose", "permute", "view", "reshape", "contiguous", "to", "squeeze", "unsqueeze", "float", "half", "bfloat16")


def library_ops() -> dict[Any, OpSpec]:
    """The ``LIBRARY_OPS`` registered in this process, by op object (packet and overload).

    >>> all(spec is GROUPED_MM_FALLBACK for spec in library_ops().values())
    True
    """
    out: dict[Any, OpSpec] = {}
    for namespace, name, spec in LIBRARY_OPS:
        try:
            packet = getattr(getattr(torch.ops, namespace), name)
        except AttributeError:  # the library is not imported: its op cannot be in a graph
            continue
        out[packet] = spec
        out[packet.default] = spec
    return out


def op_of(node: torch.fx.Node) -> Optional[Any]:
    """The canonical target of a call node, or None for other nodes."""
    if node.op == "call_function":
        return node.target
    if node.op == "call_method":
        return METHOD_OPS.get(node.target, node.target)
    return None
