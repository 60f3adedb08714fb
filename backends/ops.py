"""Op tables shared by the passes: what counts as a recoverable unit.

Ops are matched by their target objects. FX ``call_method`` nodes carry the
method name as their target by construction, so those are mapped once, here,
to the same function objects.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from gnmr_fx.backends.paths import BRANCH_OPS


@dataclass(frozen=True)
class OpSpec:
    """Where the two matmul operands of a recoverable op sit in its args."""

    name: str  # short name used in unit names and by the branches ("matmul", ...)
    a_index: int
    b_index: int
    b_kdim: int  # reduction dim of operand b
    min_rank: int = 2  # operands of lower rank are not recoverable

    @property
    def fn(self) -> Callable[..., Any]:
        """The canonical function the high path calls."""
        return BRANCH_OPS[self.name]


LINEAR = OpSpec("linear", 0, 1, -1)
MATMUL = OpSpec("matmul", 0, 1, -2)
MM = OpSpec("mm", 0, 1, -2)
BMM = OpSpec("bmm", 0, 1, -2)
ADDMM = OpSpec("addmm", 1, 2, -2)
BADDBMM = OpSpec("baddbmm", 1, 2, -2)

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
    GROUPED_MM = OpSpec("grouped_mm", 0, 1, -2)
    RECOVERABLE_OPS[torch._grouped_mm] = GROUPED_MM

# Recoverable ops that another library registers with torch.library when it
# is imported, as (namespace, name, spec). They are looked up by object when a
# graph is rewritten (``library_ops``), so gnmr_fx never imports the library.
# Hugging Face MoE experts call ``transformers::grouped_mm_fallback`` (a
# per-expert ``torch.mm`` loop behind one opaque op) instead of
# ``torch._grouped_mm`` when the weights are not bf16: fp32 models' experts.
GROUPED_MM_FALLBACK = OpSpec("grouped_mm_fallback", 0, 1, -2)
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
# all preserve the Frobenius norm, so tapping the view measures ||dL/dW||.
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
