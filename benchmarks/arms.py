"""The arms of the stability benchmark: GNMR and what a practitioner would use instead.

Every arm runs on the *same* compiled model (the low path is the scenario's
recipe), data and seeds; an arm only decides the plan and what happens to the
gradients before ``optimizer.step()``:

===================  =====================================================
arm                  plan / gradient treatment
===================  =====================================================
always_high          every unit on the high path (quality reference, cost ceiling)
always_low           every unit on the low path (instability reference)
low+clip             always_low + global gradient-norm clipping at 1.0
low+zclip            always_low + ZClip: EMA mean/variance of the global
                     gradient norm, clip to mean + 2.5 std when z > 2.5
static@k             the first ceil(k/2) and last floor(k/2) units always high
                     (torchao / Megatron "first/last layers in bf16"); with a
                     FLOP fraction (static@10%), units taken alternately from
                     the front and the back while their FLOPs fit the budget
                     (each end stops at its first unit that does not fit)
static=REGEX         the units whose names match REGEX (``re.search``)
                     always high: the practitioner's named choice, e.g.
                     ``static=attn.matmul`` (the attention matmuls); a
                     pattern that matches no unit is an error
static_tuned@k       the k units (or the FLOP budget) that help most when kept
                     high, measured on the *tune* split (see
                     ``stability.tune_static_set``), always high: the best
                     static choice a practitioner could make by profiling
static_grad@k        the k units (or the FLOP budget) whose low path
                     distorts the whole model's gradient most: on fixed
                     windows of the *tune* split, at the weights the arm
                     starts from, the relative error of the model's
                     gradient with only that unit low against every unit
                     high (``stability.profile_grad_error``); always high.
                     A profile of a few forward/backward passes, no run
high_first@n         every unit high for the first n steps (an int) or that
                     fraction of the run (5%, 0.1), then every unit low
                     ("train the unstable start in high precision")
static_grad@k+high_first@n
                     every unit high for the first n steps, then the
                     static_grad@k set (the profile's units with a high start)
random@k             random units high: every free budget slot gets a
                     random unit locked high for ``lock_steps`` steps; with a
                     FLOP fraction, random idle units are locked high while
                     their FLOPs fit what the held units leave of the budget
gnmr@m               the GNMR controller with ``max_o = m`` (an int counts
                     units, a float is a fraction of the units' FLOPs)
gnmr@m+pin_grad@k    GNMR with the static_grad@k units pinned high
                     (``GNMRRuntime.pin``, as ``GNMRCallback(pin_profile=)``
                     does): the pins hold k of the budget m, GNMR moves
                     other units high in what is left (m > k)
gnmr@m+high_first@n  GNMR with a high start: every unit high for the first
                     n steps (``GNMRConfig.high_start_steps``), then GNMR
                     (after +pin_grad@k too: the profile's pins, a high
                     start and GNMR, the product's full recipe)
gnmr@m+lock@n        GNMR with ``lock_steps = n`` (default 10) and
                     ``max_lock_steps = max(50, 5 n)`` (the default's five
                     locks): units stay high longer once triggered
gnmr@m+lag           (after any of the gnmr forms) ``GNMRConfig.plan_lag=1``:
                     units that read the host plan (real kernels; emulated
                     units on a GPU) follow the plan one step late
===================  =====================================================

static and random fill their budget, so at equal budget they spend at least
as much high-path compute as GNMR (which goes high only when a unit triggers):
a conservative comparison for GNMR. A FLOP-fraction budget is a FLOP cap for
every arm (``BUDGET_RULE``); results written before it (no ``budget_rule`` in
their meta) held ``budget_units`` units, first/last or random, whatever their
FLOPs, and ``regime_table`` labels those runs ``static@K`` / ``random@K`` by
the unit count they held.

The plan drivers run as ``GNMRRuntime.callbacks``, i.e. after the controller's
update in every ``runtime.step()``, and overwrite the plan with
``runtime.set_plan``; the controller still observes (its ``triggered`` is
recorded for every arm).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Optional, Union

import torch

from gnmr_fx.arguments import InputError, parse_max_o
from gnmr_fx.tools.profile import pick_by_score

ARM_KINDS = ("always_high", "always_low", "clip", "zclip", "static", "static_named", "static_tuned", "static_grad",
             "random", "high_first", "gnmr")


@dataclass(frozen=True)
class ArmSpec:
    """One arm. ``budget`` is the ``max_o`` of gnmr / static / random arms."""

    name: str
    kind: str
    budget: Union[int, float] = 0
    high_start: Union[int, float] = 0
    """gnmr and static_grad arms: the high start (steps, or a fraction of the run); 0 none."""
    pins: Union[int, float] = 0
    """gnmr arms: the budget of the gradient-error profile's units pinned
    high (``+pin_grad@K``, read as ``max_o`` is); 0 none."""
    plan_lag: int = 0
    """gnmr arms: ``GNMRConfig.plan_lag``."""
    units: str = ""
    """static_named arms: the regular expression naming the units kept high."""
    lock_steps: int = 0
    """gnmr arms: ``GNMRConfig.lock_steps`` (0: the config's)."""

    def __post_init__(self) -> None:
        if self.kind not in ARM_KINDS:
            raise ValueError(f"ArmSpec.kind must be one of {ARM_KINDS} (got {self.kind!r})")

    @property
    def policy(self) -> str:
        """The GNMRConfig.policy of the arm's controller."""
        if self.kind == "always_high":
            return "always_high"
        if self.kind == "gnmr":
            return "gnmr"
        return "always_low"  # the controller only observes; a driver or nothing sets the plan


def arm_name(kind: str, budget: Union[int, float] = 0) -> str:
    """Canonical arm names: ``gnmr@2``, ``gnmr@5%``, ``static@2``, ``low+clip``...

    >>> arm_name("gnmr", 0.05), arm_name("random", 2), arm_name("zclip")
    ('gnmr@5%', 'random@2', 'low+zclip')
    """
    if kind in ("clip", "zclip"):
        return f"low+{kind}"
    if kind in _BUDGET_KINDS:
        b = f"{budget * 100:g}%" if isinstance(budget, float) else f"{budget}"
        return f"{kind}@{b}"
    return kind


_BUDGET_KINDS = ("static", "static_tuned", "static_grad", "random", "high_first", "gnmr")
BUDGET_RULE = "flops"
"""Recorded in every results file's meta: a FLOP-fraction budget caps the
FLOPs of static and random arms (before it, it only set their unit count)."""
ARM_FORMS = ("always_high, always_low, low+clip, low+zclip, static@K, static=REGEX, static_tuned@K, static_grad@K, "
             "static_grad@K+high_first@N, random@K, high_first@N (steps) or @P%, gnmr@K or gnmr@P%, "
             "gnmr@K+pin_grad@J, gnmr@K+high_first@N, gnmr@K+lock@N, any gnmr form +lag")


def parse_arm(name: str) -> ArmSpec:
    """Inverse of :func:`arm_name`; the budget after ``@`` is read by
    :func:`gnmr_fx.arguments.parse_max_o` (``2`` units, ``5%`` or ``0.05`` of
    the FLOPs), and the arm gets its canonical name. Anything else raises
    :class:`~gnmr_fx.arguments.InputError` naming the valid forms.

    >>> parse_arm("gnmr@10%")
    ArmSpec(name='gnmr@10%', kind='gnmr', budget=0.1, high_start=0, pins=0, plan_lag=0, units='', lock_steps=0)
    >>> parse_arm("gnmr@0.05").name
    'gnmr@5%'
    >>> parse_arm("gnmr@2+high_first@0.05")
    ArmSpec(name='gnmr@2+high_first@5%', kind='gnmr', budget=2, high_start=0.05, pins=0, plan_lag=0, units='', lock_steps=0)
    >>> parse_arm("gnmr@0.2+pin_grad@0.1+high_first@10%").name
    'gnmr@20%+pin_grad@10%+high_first@10%'
    >>> parse_arm("static_grad@10%+high_first@200").high_start
    200
    >>> parse_arm("gnmr@10%+lag").plan_lag
    1
    >>> parse_arm("gnmr@10%+lock@100+lag").lock_steps
    100
    >>> parse_arm("static=attn.matmul").units
    'attn.matmul'
    """
    if name.startswith("static="):
        pattern = name[len("static="):]
        try:
            re.compile(pattern)
        except re.error as e:
            raise InputError(f"arm {name!r}: {pattern!r} is not a regular expression ({e})") from None
        if not pattern:
            raise InputError(f"arm {name!r}: static=REGEX needs a pattern naming the units to keep high")
        return ArmSpec(name, "static_named", units=pattern)
    if name.endswith("+lag"):
        spec = parse_arm(name[: -len("+lag")])
        if spec.kind != "gnmr" or spec.plan_lag:
            raise InputError(f"arm {name!r}: +lag (GNMRConfig.plan_lag=1) goes once, after a gnmr arm; "
                             "the other arms' plans do not change with the controller")
        return dataclasses.replace(spec, name=f"{spec.name}+lag", plan_lag=1)
    base, plus, lock = name.rpartition("+lock@")
    if plus:
        spec = parse_arm(base)
        if spec.kind != "gnmr" or spec.lock_steps or spec.plan_lag:
            raise InputError(f"arm {name!r}: +lock@N (GNMRConfig.lock_steps) goes once, after a gnmr arm "
                             "and before +lag")
        if not lock.isdigit() or not 1 <= int(lock) <= 1_000_000:
            raise InputError(f"arm {name!r}: +lock@N needs N, the lock in steps, an int in [1, 1000000]")
        return dataclasses.replace(spec, name=f"{spec.name}+lock@{int(lock)}", lock_steps=int(lock))
    base, plus, start = name.partition("+high_first@")
    if plus:
        spec = parse_arm(base)
        if spec.kind not in ("gnmr", "static_grad") or spec.high_start:
            raise InputError(f"arm {name!r}: a high start (+high_first@N) goes once, after a gnmr or static_grad "
                             "arm; high_first@N alone is every unit high, then every unit low")
        n = _arm_budget(name, start)
        return dataclasses.replace(spec, name=f"{spec.name}+{arm_name('high_first', n)}", high_start=n)
    base, plus, pins = name.rpartition("+pin_grad@")
    if plus:
        spec = parse_arm(base)
        if spec.kind != "gnmr" or spec.pins:
            raise InputError(f"arm {name!r}: +pin_grad@K (the profile's units pinned) goes once, right after "
                             "gnmr@M (then +high_first@N, +lock@N, +lag)")
        k = _arm_budget(name, pins)
        if k == 0:
            raise InputError(f"arm {name!r}: +pin_grad@K needs K > 0 (gnmr@M alone pins nothing)")
        label = arm_name("gnmr", k).split("@", 1)[1]
        return dataclasses.replace(spec, name=f"{spec.name}+pin_grad@{label}", pins=k)
    kind, at, b = name.partition("@")
    if kind.startswith("low+") and not at and kind[4:] in ("clip", "zclip"):
        return ArmSpec(name, kind[4:])
    if not at and kind in ("always_high", "always_low"):
        return ArmSpec(name, kind)
    if at and kind in _BUDGET_KINDS:
        budget = _arm_budget(name, b)
        return ArmSpec(arm_name(kind, budget), kind, budget)
    raise InputError(f"unknown arm {name!r}; arms are {ARM_FORMS}")


def _arm_budget(name: str, text: str) -> Union[int, float]:
    """A budget inside arm ``name`` (:func:`parse_max_o`), its error naming the arm."""
    try:
        return parse_max_o(text)
    except InputError as e:
        raise InputError(f"arm {name!r}: {e}") from None


def uses_grad_profile(spec: ArmSpec) -> bool:
    """Whether the arm needs the gradient-error profile (static_grad sets, +pin_grad pins)."""
    return spec.kind == "static_grad" or bool(spec.pins)


def arm_argument(name: str) -> str:
    """An ``--arms`` value, checked at parse time: the arm's canonical name."""
    return parse_arm(name).name


def budget_units(budget: Union[int, float], costs: torch.Tensor) -> int:
    """How many units a static / random arm held for a budget before
    ``BUDGET_RULE`` (what ``regime_table`` labels older results by): an int
    is a count; a float is a FLOP fraction, filled with the cheapest units
    that fit (the most units that budget can buy)."""
    if isinstance(budget, int):
        return min(budget, costs.numel())
    cap = budget * float(costs.sum())
    return int((torch.cumsum(costs.sort().values, 0) <= cap * (1 + 1e-6)).sum())


def named_units_plan(pattern: str, names: list) -> torch.Tensor:
    """The plan of a ``static=REGEX`` arm: the units whose names match.
    A pattern matching no unit raises, naming a few of the units there are.

    >>> named_units_plan("attn.matmul", ["b0.attn.qkv", "b0.attn.matmul", "b0.attn.matmul_1"]).tolist()
    [False, True, True]
    """
    plan = torch.tensor([re.search(pattern, n) is not None for n in names], dtype=torch.bool)
    if not plan.any():
        raise InputError(f"arm static={pattern}: the pattern matches none of the {len(names)} units "
                         f"(e.g. {', '.join(names[:4])})")
    return plan


class StaticPlan:
    """A fixed plan: by default the first and last units always high (the
    'first/last layers high' practice), or the given ``plan``."""

    def __init__(self, num_units: int, k: int = 0, plan: Optional[torch.Tensor] = None) -> None:
        if plan is None:
            plan = torch.zeros(num_units, dtype=torch.bool)
            first = math.ceil(k / 2)
            plan[:first] = True
            if k - first:
                plan[num_units - (k - first):] = True
        self.plan = plan.to(torch.bool)

    def __call__(self, runtime) -> None:
        runtime.set_plan(self.plan)


def first_last_plan(costs: torch.Tensor, budget: Union[int, float]) -> torch.Tensor:
    """The static@ plan: ``budget`` units (an int) split between the first
    and the last units; or (a FLOP fraction) units taken alternately from the
    front and the back while their FLOPs fit, each end stopping at its first
    unit that does not fit, so the set stays the outermost layers.

    >>> first_last_plan(torch.ones(5), 3).tolist()
    [True, True, False, False, True]
    >>> first_last_plan(torch.tensor([1.0, 1.0, 4.0, 1.0, 1.0, 2.0]), 0.4).tolist()
    [True, True, False, False, False, True]
    """
    n = costs.numel()
    if isinstance(budget, int):
        return StaticPlan(n, min(budget, n)).plan
    plan = torch.zeros(n, dtype=torch.bool)
    cap = budget * float(costs.sum()) * (1 + 1e-6)
    spent, front, back = 0.0, 0, n - 1
    open_ends = [True, True]
    while front <= back and any(open_ends):
        for end in (0, 1):
            if not open_ends[end] or front > back:
                continue
            i = front if end == 0 else back
            if spent + float(costs[i]) > cap:
                open_ends[end] = False
                continue
            plan[i] = True
            spent += float(costs[i])
            if end == 0:
                front += 1
            else:
                back -= 1
    if not plan.any():
        # An arm named static@P% that holds nothing would be always_low under another name.
        raise InputError(f"static@{budget * 100:g}%: neither the first unit ({100 * float(costs[0] / costs.sum()):.2g}% "
                         f"of the FLOPs) nor the last ({100 * float(costs[-1] / costs.sum()):.2g}%) fits the budget")
    return plan


def pick_by_gain(gain: torch.Tensor, costs: torch.Tensor, budget: Union[int, float]) -> torch.Tensor:
    """The static set a measured per-unit gain buys: the ``budget`` units of
    largest gain (an int), or units in order of gain while their FLOPs fit
    the fraction (a float). Units with no gain (<= 0) are never bought.

    >>> pick_by_gain(torch.tensor([0.1, 0.5, -0.2, 0.3]), torch.ones(4), 2).tolist()
    [False, True, False, True]
    >>> pick_by_gain(torch.tensor([0.1, 0.5, 0.2]), torch.tensor([1.0, 8.0, 1.0]), 0.25).tolist()
    [True, False, True]
    """
    return pick_by_score(gain, costs, budget, positive_only=True)


class HighFirst:
    """Every unit high for the first ``n_steps`` steps, then the plan
    ``then`` (default: every unit low)."""

    def __init__(self, num_units: int, n_steps: int, then: Optional[torch.Tensor] = None) -> None:
        self.num_units, self.n_steps = num_units, n_steps
        self.then = torch.zeros(num_units, dtype=torch.bool) if then is None else then.to(torch.bool)
        self.done = 0  # optimizer steps completed
        self.plan = torch.ones(num_units, dtype=torch.bool) if n_steps > 0 else self.then

    def __call__(self, runtime) -> None:
        # Runs after each update, whose controller (policy always_low) has
        # just written its own plan: set the plan of the next step.
        self.done += 1
        if self.done == self.n_steps:
            self.plan = self.then
        runtime.set_plan(self.plan)


def high_first_steps(budget: Union[int, float], steps: int) -> int:
    """Steps a ``high_first`` arm spends high: an int is a count, a float a fraction of the run."""
    return min(steps, budget if isinstance(budget, int) else round(budget * steps))


class RandomPlan:
    """Random units on the high path at the same budget and lock as GNMR.

    Each step every lock counts down; every free slot (an int budget ``k``)
    or what the held units leave of the FLOP cap (a float ``k``, a fraction
    of ``costs.sum()``) is given to units drawn uniformly from the units not
    held, each locked high for ``lock_steps`` steps.
    """

    def __init__(self, num_units: int, k: Union[int, float], lock_steps: int, seed: int,
                 costs: Optional[torch.Tensor] = None) -> None:
        if isinstance(k, float) and costs is None:
            raise ValueError("RandomPlan: a FLOP-fraction budget needs the units' costs")
        self.k, self.lock_steps = k, lock_steps
        self.costs = costs.detach().double().cpu() if costs is not None else None  # host: no sync per draw
        if isinstance(k, float) and float(self.costs.min()) > k * float(self.costs.sum()) * (1 + 1e-6):
            # An arm named random@P% that holds nothing would be always_low under another name.
            raise InputError(f"random@{k * 100:g}%: no unit fits the budget (the cheapest is "
                             f"{100 * float(self.costs.min() / self.costs.sum()):.2g}% of the FLOPs)")
        self.lock = torch.zeros(num_units, dtype=torch.long)
        self.gen = torch.Generator().manual_seed(10_000 + seed)
        self._draw()

    def _draw(self) -> None:
        self.lock = (self.lock - 1).clamp_min(0)
        idle = torch.nonzero(self.lock == 0).flatten()
        if isinstance(self.k, int):
            # The generator is drawn from only when a slot is free (the draws of results
            # written before FLOP caps existed stay reproducible).
            free = self.k - int((self.lock > 0).sum())
            if free > 0 and idle.numel():
                self.lock[idle[torch.randperm(idle.numel(), generator=self.gen)[:free]]] = self.lock_steps
        else:
            cap = self.k * float(self.costs.sum()) * (1 + 1e-6)
            spent = float(self.costs[self.lock > 0].sum())
            for i in idle[torch.randperm(idle.numel(), generator=self.gen)].tolist():
                if spent + float(self.costs[i]) <= cap:
                    self.lock[i] = self.lock_steps
                    spent += float(self.costs[i])
        self.plan = self.lock > 0

    def __call__(self, runtime) -> None:
        self._draw()
        runtime.set_plan(self.plan)


class GlobalClip:
    """Global gradient-norm clipping (``clip_grad_norm_``)."""

    def __init__(self, max_norm: float = 1.0) -> None:
        self.max_norm = max_norm
        self.n_clipped = 0

    def __call__(self, params) -> float:
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_norm))
        self.n_clipped += int(norm > self.max_norm)
        return norm


class ZClip:
    """ZClip-style adaptive clipping on the global gradient norm.

    EMA mean and variance (decay ``alpha``) of the norm; after ``warmup``
    steps (which only feed the statistics), a step with z = (g - mean) / std
    above ``z_thresh`` is clipped to mean + z_thresh * std, and the clipped
    value is what enters the EMA, so a spike cannot inflate its own baseline.
    """

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, warmup: int = 25) -> None:
        self.alpha, self.z_thresh, self.warmup = alpha, z_thresh, warmup
        self.mean: Optional[float] = None
        self.var = 0.0
        self.seen: list[float] = []
        self.n_clipped = 0

    def __call__(self, params) -> float:
        params = [p for p in params if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
        if not math.isfinite(norm):
            # A non-finite norm cannot be clipped to a finite one; skip the
            # update's gradients instead (what ZClip implementations do).
            for p in params:
                p.grad.zero_()
            self.n_clipped += 1
            return norm
        if len(self.seen) < self.warmup:
            self.seen.append(norm)
            if len(self.seen) == self.warmup:
                t = torch.tensor(self.seen, dtype=torch.float64)
                self.mean, self.var = float(t.mean()), float(t.var(unbiased=False))
            return norm
        std = math.sqrt(max(self.var, 1e-24))
        z = (norm - self.mean) / std
        value = norm
        if z > self.z_thresh:
            value = self.mean + self.z_thresh * std
            torch.nn.utils.clip_grads_with_norm_(params, value, torch.tensor(norm))
            self.n_clipped += 1
        a = self.alpha
        self.mean = a * self.mean + (1 - a) * value
        self.var = a * self.var + (1 - a) * (value - self.mean) ** 2
        return norm
