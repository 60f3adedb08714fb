"""GNMRConfig: the one frozen config every part of gnmr_fx is driven by."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

UnitFilter = Union[Callable[[str, Any], bool], Sequence[str], None]

POLICIES = ("gnmr", "always_low", "always_high")


@dataclass(frozen=True)
class GNMRConfig:
    """Settings of the GNMR pass and controller.

    Every formula these fields feed is this project's interpretation of the
    GNMR abstract (arXiv 2606.00539); see the README.

    >>> cfg = GNMRConfig(recipe="int8", max_o=2)
    >>> cfg.threshold, cfg.lock_steps
    (3.0, 10)
    >>> GNMRConfig(threshold=0.5)
    Traceback (most recent call last):
    ...
    ValueError: GNMRConfig.threshold must be > 1 (got 0.5)
    """

    recipe: str = "fp8_e4m3"
    """Low-path recipe, by registry name (``gnmr_fx.recipes()`` lists them).
    GNMR never changes it; it only decides which units skip it."""

    high_path: str = "native"
    """High path: ``native`` runs the op exactly as written; ``bf16`` / ``fp32``
    run it in that dtype (for models that are low precision end to end)."""

    policy: str = "gnmr"
    """``gnmr`` (the controller decides), or the baselines ``always_low`` /
    ``always_high``, which compile the identical graph and only fix the plan."""

    max_o: Union[int, float] = 0.1
    """Budget: never more than this on the high path at once. An int is a
    count of units; a float in (0, 1) a fraction of the recoverable FLOPs
    (per-unit costs come from shapes at compile time). 0 disables recovery."""

    threshold: float = 3.0
    """Trigger when GNMR = g / mu reaches this. Must be > 1: a ratio of 1 is
    a unit at its own historical mean."""

    delta_threshold: float = 1.5
    """Trigger when Delta-GNMR (GNMR minus its minimum over the previous
    ``delta_window`` steps) reaches this: catches abrupt jumps that start from
    a low ratio and have not yet crossed ``threshold``."""

    delta_window: int = 3
    """Steps of GNMR history that Delta-GNMR compares against."""

    beta: float = 0.98
    """EMA decay of the history mean mu (bias-corrected). 0.98 averages over
    about 50 healthy steps: long enough to ignore noise, short enough to
    follow the normal decline of gradient norms during training."""

    warmup_steps: int = 20
    """Healthy observations a unit needs before it may trigger on ratios.
    Non-finite norms trigger even during warm-up."""

    lock_steps: int = 10
    """Optimizer steps a triggered unit stays on the high path. A re-trigger
    while locked refreshes the lock."""

    max_lock_steps: int = 50
    """Most consecutive steps a unit may stay locked on the high path. A
    unit's *streak* counts consecutive steps on which it triggered or held a
    lock; when it exceeds this cap the unit is *released*: its lock ends and
    its history (mu, Delta-GNMR) restarts in warm-up, so it re-learns its
    current level. Without the cap a unit whose gradient norm moves up for
    good would re-trigger (mu only learns from steps that do not trigger),
    refresh its lock and hold a budget slot forever; a denied unit would
    trigger forever. 50 is five default locks and about the EMA's horizon
    1/(1-beta): a spike lasts a few steps, a run that long is a new level. A
    permanent shift triggers on at most ``max_lock_steps + 1`` consecutive
    steps; after the release the unit learns the new level in warm-up and no
    longer triggers on it."""

    emulate: Optional[bool] = None
    """Low-path kernels. None: real fp8 kernels (``torch._scaled_mm``) where
    the GPU has them (sm_89+ tensorwise, sm_90+ rowwise) and emulation
    elsewhere; True: always emulate; False: demand real kernels, and raise
    naming the alternative where the recipe or device has none."""

    plan_lag: int = 0
    """Steps by which units with real kernels (which read a host copy of the
    plan) follow it. 0: the plan is copied to the host at the end of every
    optimizer step, a transfer that waits for the step's GPU work (2-3% of
    the step measured on an H100). 1: the copy is asynchronous and those
    units switch one step late; the controller's decisions are unchanged."""

    unit_filter: UnitFilter = None
    """Which recoverable ops become units: None (all), a list of fnmatch
    patterns on unit names, or a callable ``(name, op) -> bool``. Every
    pattern must match at least one unit, or compilation raises."""

    log: Optional[str] = None
    """Path of a JSON-lines telemetry file (one line per optimizer step)."""

    log_every: int = 50
    """Telemetry is copied to the host in batches of this many steps, so
    logging adds one transfer per batch rather than one per step."""

    def __post_init__(self) -> None:
        from gnmr_fx.backends.paths import HIGH_PATHS
        from gnmr_fx.backends.recipes import get_recipe

        get_recipe(self.recipe)  # raises ValueError naming the known recipes
        _check(self.high_path in HIGH_PATHS, "high_path", f"one of {HIGH_PATHS}", self.high_path)
        _check(self.policy in POLICIES, "policy", f"one of {POLICIES}", self.policy)
        m = self.max_o
        if isinstance(m, bool) or not isinstance(m, (int, float)):
            raise ValueError(f"GNMRConfig.max_o must be an int >= 0 or a float in (0, 1) (got {m!r})")
        if isinstance(m, int):
            _check(m >= 0, "max_o", "an int >= 0 or a float in (0, 1)", m)
        else:
            _check(0.0 < m < 1.0, "max_o", "an int >= 0 or a float in (0, 1)", m)
        _check(_finite(self.threshold) and self.threshold > 1.0, "threshold", "> 1", self.threshold)
        _check(_finite(self.delta_threshold) and self.delta_threshold > 0.0,
               "delta_threshold", "> 0", self.delta_threshold)
        _check(_is_int(self.delta_window) and self.delta_window >= 1, "delta_window", ">= 1", self.delta_window)
        _check(_finite(self.beta) and 0.0 < self.beta < 1.0, "beta", "in (0, 1)", self.beta)
        _check(_is_int(self.warmup_steps) and self.warmup_steps >= 0, "warmup_steps", ">= 0", self.warmup_steps)
        _check(_is_int(self.lock_steps) and self.lock_steps >= 1, "lock_steps", ">= 1", self.lock_steps)
        _check(_is_int(self.max_lock_steps) and self.max_lock_steps >= 1,
               "max_lock_steps", "an int >= 1", self.max_lock_steps)
        _check(_is_int(self.log_every) and self.log_every >= 1, "log_every", ">= 1", self.log_every)
        _check(self.emulate in (None, True, False), "emulate", "None, True or False", self.emulate)
        _check(self.plan_lag in (0, 1) and not isinstance(self.plan_lag, bool), "plan_lag", "0 or 1", self.plan_lag)
        f = self.unit_filter
        if isinstance(f, str):
            raise ValueError(
                "GNMRConfig.unit_filter must be a list of patterns or a callable, "
                f"not a bare string (got {f!r}; did you mean [{f!r}]?)"
            )
        if f is not None and not callable(f):
            if not all(isinstance(p, str) for p in f):
                raise ValueError(f"GNMRConfig.unit_filter patterns must be strings (got {f!r})")
            if len(f) == 0:
                raise ValueError("GNMRConfig.unit_filter is an empty list: it would match no unit")
            object.__setattr__(self, "unit_filter", tuple(f))

    @property
    def budget_is_fraction(self) -> bool:
        return isinstance(self.max_o, float)

    def replace(self, **changes: Any) -> "GNMRConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_options(cls, options: Optional[dict]) -> "GNMRConfig":
        """Build from a ``torch.compile(..., options={...})`` dict."""
        options = dict(options or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(
                f"unknown GNMR option(s) {unknown}; valid options: {sorted(names)}"
            )
        return cls(**options)

    def includes(self, name: str, op: Any) -> bool:
        """Whether the unit filter admits a unit (no filter admits all)."""
        f = self.unit_filter
        if f is None:
            return True
        if callable(f):
            return bool(f(name, op))
        return any(fnmatch.fnmatchcase(name, p) for p in f)

    def unmatched_patterns(self, names: Sequence[str]) -> list[str]:
        """Patterns of the unit filter that match none of ``names``."""
        f = self.unit_filter
        if f is None or callable(f):
            return []
        return [p for p in f if not any(fnmatch.fnmatchcase(n, p) for n in names)]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(ok: bool, field: str, allowed: str, got: Any) -> None:
    if not ok:
        raise ValueError(f"GNMRConfig.{field} must be {allowed} (got {got!r})")
