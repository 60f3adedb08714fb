"""Profile: which units bend the whole model's gradient when they run low.

GNMR watches each unit's gradient norm against that unit's own history. A
unit whose low path is wrong from the first step, and wrong in *direction*
rather than size, is invisible to it: in the fine-tuning regime of
``benchmarks/RESULTS.md`` the LM head under FP4 output gradients (where every
backward starts) changes its own gradient norm less than other units do
(1.3x on the H200, where others reach 3.1x) while it bends every other unit's
gradient. This tool
finds such units before training, in a few forward/backward passes, so they
can be pinned high (``gnmr_fx.runtime(model).pin(profile.pick(0.05))``; pins
count against ``max_o``, and ``pin`` warns when they leave no room for GNMR).

For a model compiled by ``gnmr_fx.compile``, on the batches given, the
gradient of every trainable parameter is summed once with every unit high
(``g_high``) and once per unit with only that unit low (``g_u``); the unit's
``grad_error`` is ``|g_u - g_high| / |g_high|``. One more pass with every unit
low gives ``all_low_error`` and each unit's gradient norm all low over all
high (``stat_ratio``: what GNMR's statistic sees of the same change).

Memory: one fp32 copy of the all-high gradient besides the model's own
``.grad`` tensors. It leaves the model as it was: the plan, the controller's state (no update
runs while profiling), the parameters' ``.grad`` tensors and the RNG state
(every pass draws the same stochastic-rounding and dropout randomness from a
forked generator). Cost: (units + 2) x len(batches) forward/backward passes.
Tested on one process; under DDP every rank must call it (each backward
all-reduces), and under FSDP2 it has not been tried.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor

from gnmr_fx.arguments import parse_max_o
from gnmr_fx.runtime import runtime_of

LossFn = Callable[[torch.nn.Module, Any], Tensor]


def default_loss(model: torch.nn.Module, batch: Any) -> Tensor:
    """``model(*batch)`` for a tuple or list, ``model(**batch)`` for a dict,
    ``model(batch)`` otherwise; the output's ``.loss`` if it has one (Hugging
    Face models), else the output itself."""
    if isinstance(batch, dict):
        out = model(**batch)
    elif isinstance(batch, (tuple, list)):
        out = model(*batch)
    else:
        out = model(batch)
    return getattr(out, "loss", out)


def pick_by_score(score: Tensor, costs: Tensor, budget: Union[int, float], *,
                  positive_only: bool = False) -> Tensor:
    """The units of largest ``score`` within ``budget`` (bool per unit): an
    int counts units; a float is a fraction of the summed ``costs``, filled
    in order of score with the units that fit. A non-finite score ranks above
    every finite one; with ``positive_only``, units scoring <= 0 are never
    taken. One rule for :meth:`Profile.pick` and the stability benchmark's
    tuned static sets.

    >>> pick_by_score(torch.tensor([0.1, 0.9, 0.3]), torch.tensor([1.0, 8.0, 1.0]), 0.25).tolist()
    [True, False, True]
    """
    key = torch.where(torch.isfinite(score), score, torch.full_like(score, math.inf))
    plan = torch.zeros(score.numel(), dtype=torch.bool)
    cap = budget * float(costs.sum()) * (1 + 1e-6) if isinstance(budget, float) else None
    spent, n = 0.0, 0
    for i in torch.argsort(key, descending=True, stable=True).tolist():
        if (positive_only and bool(score[i] <= 0)) or (cap is None and n >= budget):
            break
        if cap is not None and spent + float(costs[i]) > cap:
            continue
        plan[i] = True
        spent += float(costs[i])
        n += 1
    return plan


@dataclass
class Profile:
    """Per-unit results of :func:`profile`, in the controller's unit order."""

    units: list
    grad_error: Tensor
    """|g_u - g_high| / |g_high| with only unit u low (non-finite if the low path overflowed)."""
    stat_ratio: Tensor
    """Each unit's gradient norm (GNMR's statistic) with every unit low, over its norm all high."""
    costs: Tensor
    """The units' costs (FLOPs) as the controller holds them, for a fractional budget."""
    all_low_error: float
    batches: int

    def order(self) -> list:
        """Unit indices, largest ``grad_error`` first; a non-finite error
        (the low path overflowed the gradient) ranks above every finite one."""
        key = torch.where(torch.isfinite(self.grad_error), self.grad_error,
                          torch.full_like(self.grad_error, math.inf))
        return torch.argsort(key, descending=True, stable=True).tolist()

    def pick(self, max_o: Union[int, float, str]) -> Tensor:
        """The plan (bool per unit, True = high) that keeps the units of
        largest error high within ``max_o`` (:func:`pick_by_score`): an int
        counts units, a float in (0, 1] (or ``"5%"``) is a fraction of the
        units' FLOPs. ``max_o`` is read as ``GNMRConfig.max_o`` is.

        >>> p = Profile(["a", "b", "c"], torch.tensor([0.1, 0.9, 0.3]), torch.ones(3),
        ...             torch.tensor([1.0, 8.0, 1.0]), 1.0, 1)
        >>> p.pick(1).tolist(), p.pick("25%").tolist()
        ([False, True, False], [True, False, True])
        """
        budget = parse_max_o(max_o) if isinstance(max_o, str) else max_o
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0 or (
                isinstance(budget, float) and not 0.0 < budget <= 1.0):
            raise ValueError(f"max_o must be a unit count (int >= 0) or a FLOP fraction in (0, 1] (got {max_o!r})")
        return pick_by_score(self.grad_error, self.costs, budget)

    def rows(self) -> list:
        """One dict per unit, largest error first."""
        total = float(self.costs.sum())
        return [{"unit": self.units[i], "grad_error": float(self.grad_error[i]),
                 "stat_ratio": float(self.stat_ratio[i]), "flops_pct": 100.0 * float(self.costs[i]) / total}
                for i in self.order()]

    def table(self, top: Optional[int] = None) -> str:
        """A plain-text table of :meth:`rows` (the first ``top``)."""
        from tabulate import tabulate

        rows = self.rows()[:top] if top else self.rows()
        body = tabulate([[r["unit"], f"{r['grad_error']:.3f}", f"{r['stat_ratio']:.2f}", f"{r['flops_pct']:.2f}"]
                         for r in rows],
                        headers=["unit", "grad error (only it low)", "norm low/high", "% FLOPs"])
        return f"{body}\nevery unit low: grad error {self.all_low_error:.3f} ({self.batches} batches)"


def rng_devices(module: torch.nn.Module) -> list:
    """The CUDA device indices of ``module``'s parameters, for ``torch.random.fork_rng``."""
    return sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})


def _scalar(loss: Any) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(f"profile: loss_fn must return a scalar tensor (got {type(loss).__name__}"
                         f"{'' if not isinstance(loss, Tensor) else ' of shape ' + str(tuple(loss.shape))})")
    return loss


def profile(model: torch.nn.Module, batches: Iterable, *, loss_fn: Optional[LossFn] = None,
            seed: int = 0) -> Profile:
    """Profile the units of ``model`` (compiled by ``gnmr_fx.compile``) on
    ``batches`` (see the module docstring). ``loss_fn(model, batch)`` returns
    the scalar loss of one batch (default :func:`default_loss`; wrap the
    forward in autocast there if training does). ``seed`` seeds the forked
    RNG every pass draws from. A compiled model that has not run yet runs
    the first batch once first, so that its units exist."""
    rt = runtime_of(model)
    batches = list(batches)
    if not batches:
        raise ValueError("profile: batches is empty; give at least one batch")
    loss_fn = loss_fn or default_loss
    params = [p for p in model.parameters() if p.requires_grad]
    saved_grads = [p.grad for p in params]
    # Probes that exist now keep their pending statistics; any a warm-up adds start empty.
    saved_probe_grads = {id(rec.probe): rec.probe.grad for rec in rt.records if rec.probe is not None}
    saved_plan = None
    stat: dict = {}
    try:
        with rt.paused(), torch.random.fork_rng(devices=rng_devices(model)):
            if rt.controller.num_units == 0:
                # Units join at the first forward: run the first batch once.
                _scalar(loss_fn(model, batches[0])).backward()
            ctl = rt.controller
            n = ctl.num_units
            if n == 0:
                raise ValueError("profile: the model has no units after a forward pass (no recoverable op ran; "
                                 "see gnmr_fx.inspect)")
            device = ctl.plan.device
            saved_plan = ctl.plan.detach().clone()
            probes = [rec for rec in rt.records if rec.plan is not None and rec.probe is not None]

            def grad(plan: Tensor, key: str = "") -> list:
                rt.force_plan(plan)
                torch.manual_seed(seed)  # the same rounding / dropout draws for every plan
                for p in params:
                    p.grad = None
                for rec in probes:
                    rec.probe.grad = None
                for batch in batches:
                    _scalar(loss_fn(model, batch)).backward()
                if key:
                    sumsq = torch.zeros(n, device=device)
                    for rec in probes:  # as GNMRRuntime.step reads them: a probe shared by graphs once
                        if rec.probe.grad is not None:
                            sumsq.index_add_(0, rec.unit_ids, rec.probe.grad.to(device))
                            rec.probe.grad = None
                    stat[key] = sumsq.sqrt().float().cpu()
                return [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in params]

            def distance(grads: list, ref: list) -> Tensor:
                """|grads - ref| over all parameters, one tensor at a time (no flat copy)."""
                total = torch.zeros((), dtype=torch.float64, device=device)
                for g, r in zip(grads, ref):
                    total += (g.float() - r).pow(2).sum().to(device, torch.float64)
                return total.sqrt()

            g_high = [g.float().clone() for g in grad(torch.ones(n, dtype=torch.bool), "high")]
            ref = distance(g_high, [torch.zeros((), device=g.device) for g in g_high])
            if not bool(torch.isfinite(ref)) or float(ref) == 0.0:
                raise RuntimeError(f"profile: the gradient with every unit high has norm {float(ref)}; "
                                   "there is nothing to measure the low paths against")
            err = torch.empty(n)
            for u in range(n):
                plan = torch.ones(n, dtype=torch.bool)
                plan[u] = False
                err[u] = float(distance(grad(plan), g_high) / ref)
            all_low = float(distance(grad(torch.zeros(n, dtype=torch.bool), "low"), g_high) / ref)
    finally:
        for p, g in zip(params, saved_grads):
            p.grad = g
        for rec in rt.records:
            if rec.probe is not None:
                rec.probe.grad = saved_probe_grads.get(id(rec.probe))
        if saved_plan is not None:
            rt.force_plan(saved_plan)
    ratio = stat["low"] / stat["high"].clamp_min(torch.finfo(torch.float32).tiny)
    return Profile(list(ctl.names), err, ratio, ctl.costs.detach().float().cpu().clone(), all_low, len(batches))
