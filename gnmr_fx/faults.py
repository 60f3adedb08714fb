"""Fault injection with ground truth: outlier bursts and corrupted backward passes.

A :class:`FaultInjector` acts on chosen units (by unit name, which for a
unit with a weight is its module path, e.g. ``blocks.0.fc``) at chosen
optimizer steps. Two kinds of fault:

``outlier``
    A few *input channels* of the unit's input are multiplied by a large
    factor, the way activation outliers appear in LLMs. Only some channels:
    a uniform scale of the whole tensor is invisible under dynamic scaling and
    normalization.
``grad_blowup``
    The unit's backward is corrupted: the gradient flowing into the unit's
    output is multiplied by a large factor (what an overflowed or mis-scaled
    low-precision gradient does). Forward values are untouched.
``weight_grad_blowup``
    Only the unit's weight gradient dL/dW is multiplied (its output gradient
    by the factor, its input gradient back by 1 / factor): a fault confined
    to one unit, which no other unit's gradient sees.

How it works, and why it survives ``torch.compile``: the injector registers
ordinary module hooks on the *eager* model, which must happen **before** the
model is compiled so Dynamo traces them into the graph. The hooks multiply by
small tensors the injector owns (ones when idle); :meth:`FaultInjector.set_step`
rewrites those tensors in place. Dynamo guards tensors on shape and dtype,
not values, so arming a fault compiles nothing and costs no host sync, and an
idle injector is exactly the identity (``x * 1.0 == x``;
``y + (g - 1) * (y - y.detach()) == y`` with ``g = 1``).

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
>>> inj = FaultInjector(model, [Fault("0", "outlier", steps=(3,), channels=(1,), factor=10.0)])
>>> x = torch.ones(1, 4)
>>> inj.set_step(2)
[]
>>> y_clean = model(x)
>>> [f.unit for f in inj.set_step(3)]
['0']
>>> torch.equal(model(x), y_clean)
False
>>> inj.clear(); torch.equal(model(x), y_clean)
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

FAULT_KINDS = ("outlier", "grad_blowup", "weight_grad_blowup")


@dataclass(frozen=True)
class Fault:
    """One ground-truth fault: ``kind`` on ``unit`` at each of ``steps``.

    Steps count optimizer steps from 0, as the training loop passes them to
    :meth:`FaultInjector.set_step`.
    """

    unit: str
    """Unit name = module path of the layer whose input/backward is hit."""
    kind: str
    """``outlier``, ``grad_blowup`` or ``weight_grad_blowup``."""
    steps: tuple
    """Optimizer steps (0-based) at which the fault is active."""
    factor: float = 30.0
    """Multiplier of the chosen input channels (outlier), of the output
    gradient (grad_blowup) or of the weight gradient (weight_grad_blowup).
    30x is the order of LLM activation outliers."""
    channels: tuple = (0, 1, 2, 3)
    """Input channels (last dim of the unit's input) an outlier hits."""

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"Fault.kind must be one of {FAULT_KINDS} (got {self.kind!r})")
        object.__setattr__(self, "steps", tuple(int(s) for s in self.steps))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if not self.steps or min(self.steps) < 0:
            raise ValueError(f"Fault.steps must be a non-empty list of steps >= 0 (got {self.steps!r})")
        if not (self.factor > 0):
            raise ValueError(f"Fault.factor must be > 0 (got {self.factor!r})")
        if self.kind == "outlier" and not self.channels:
            raise ValueError("Fault.channels must name at least one input channel for an outlier")


class FaultInjector:
    """Inject :class:`Fault` s into an eager model; create it before compiling.

    Args:
        model: the eager ``nn.Module`` (not the compiled wrapper).
        faults: the faults; several may target the same unit.
    """

    def __init__(self, model: torch.nn.Module, faults: Iterable[Fault]) -> None:
        if hasattr(model, "_orig_mod"):
            raise ValueError(
                "FaultInjector needs the eager model: create it before gnmr_fx.compile / torch.compile "
                "so Dynamo traces its hooks (pass model, not the compiled wrapper)"
            )
        self.faults: list[Fault] = list(faults)
        self._handles = []
        self._scales: list[Tensor] = []
        self.step: Optional[int] = None
        for f in self.faults:
            module = _linear_like(model, f.unit)
            w = module.weight
            if f.kind == "outlier":
                k = w.shape[-1]
                bad = [c for c in f.channels if not 0 <= c < k]
                if bad:
                    raise ValueError(f"Fault.channels {bad} out of range for {f.unit!r} with {k} input channels")
                scale = torch.ones(k, device=w.device, dtype=w.dtype)
                self._handles.append(module.register_forward_pre_hook(_outlier_hook(scale)))
            elif f.kind == "grad_blowup":
                scale = torch.ones((), device=w.device, dtype=w.dtype)
                self._handles.append(module.register_forward_hook(_grad_blowup_hook(scale)))
            else:
                scale = torch.ones(())
                pre, post = _weight_grad_hooks(scale)
                self._handles.append(module.register_forward_pre_hook(pre))
                self._handles.append(module.register_forward_hook(post))
            self._scales.append(scale)

    @torch.no_grad()
    def set_step(self, step: int) -> list[Fault]:
        """Arm the faults scheduled at ``step`` (and disarm the rest); returns them."""
        self.step = int(step)
        active = []
        for f, scale in zip(self.faults, self._scales):
            scale.fill_(1.0)
            if self.step in f.steps:
                if f.kind == "outlier":
                    scale[list(f.channels)] = f.factor
                else:
                    scale.fill_(f.factor)
                active.append(f)
        return active

    @torch.no_grad()
    def clear(self) -> None:
        """Disarm every fault (e.g. before evaluation)."""
        self.step = None
        for scale in self._scales:
            scale.fill_(1.0)

    def events(self) -> list[tuple[int, str, str]]:
        """Ground truth: ``(step, unit, kind)`` for every scheduled fault, sorted."""
        return sorted((s, f.unit, f.kind) for f in self.faults for s in f.steps)

    def check_units(self, unit_names: Sequence[str]) -> None:
        """Raise if a fault targets a unit GNMR does not control (e.g. excluded
        by ``unit_filter``): its detection could not be scored."""
        missing = sorted({f.unit for f in self.faults} - set(unit_names))
        if missing:
            raise ValueError(f"faults target {missing}, which are not GNMR units; units are {list(unit_names)}")

    def remove(self) -> None:
        """Remove the hooks (a compiled model keeps the traced ones until recompiled)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _linear_like(model: torch.nn.Module, unit: str) -> torch.nn.Module:
    try:
        module = model.get_submodule(unit)
    except AttributeError:
        raise ValueError(
            f"no module {unit!r} in the model; a fault targets a unit with a weight by its module path "
            f"(e.g. {next((n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)), 'fc')!r})"
        ) from None
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(
            f"module {unit!r} ({type(module).__name__}) has no 2-D weight; faults act on linear-like units"
        )
    return module


class _GradScale(torch.autograd.Function):
    """Identity in forward; multiplies the gradient by ``k`` in backward."""

    @staticmethod
    def forward(ctx, t: Tensor, k: Tensor) -> Tensor:
        ctx.save_for_backward(k)
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (k,) = ctx.saved_tensors
        return grad * k, None


def _outlier_hook(scale: Tensor):
    def hook(module: torch.nn.Module, args: tuple) -> tuple:
        return (args[0] * scale, *args[1:])

    return hook


def _grad_blowup_hook(gain: Tensor):
    def hook(module: torch.nn.Module, args: tuple, out: Tensor) -> Tensor:
        # Forward value: out + (gain - 1) * 0 == out exactly; backward: d/d(out) = gain.
        return out + (gain - 1.0) * (out - out.detach())

    return hook


def _weight_grad_hooks(k: Tensor):
    def pre(module: torch.nn.Module, args: tuple) -> tuple:
        return (_GradScale.apply(args[0], 1.0 / k), *args[1:])  # input gradient / k: upstream unchanged

    def post(module: torch.nn.Module, args: tuple, out: Tensor) -> Tensor:
        return _GradScale.apply(out, k)  # output gradient x k: dL/dW x k

    return pre, post
