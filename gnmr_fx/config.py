"""GNMRConfig: the one frozen config every part of gnmr_fx is driven by."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

UnitFilter = Union[Callable[[str, Any], bool], Sequence[str], None]

POLICIES = ("gnmr", "always_low", "always_high")
DISPATCHES = ("host", "select")

# Upper bounds of the integer fields. Their job is to turn a typo (2**40, a
# step count pasted into the wrong field) into a ValueError naming the field
# here, instead of a raw torch error or a huge allocation at the first step.
#
# max_o as a count of units: no model has a million recoverable matmul units
# (a 1000-layer transformer has about 10^4).
MAX_UNITS = 10**6
# warmup_steps and lock_steps: a warm-up or a lock of more than a million
# optimizer steps outlasts the training run (large pretraining runs take
# 10^5-10^6 steps); policy="always_high" / "always_low" fix the plan openly.
MAX_STEPS = 10**6
# delta_window: the controller keeps a [delta_window, units] history on the
# device and takes its min every step. 10^4 x 1000 units is already 40 MB and
# a 10^7-element reduction per step, and a window that long no longer catches
# *abrupt* jumps (the default is 3).
MAX_DELTA_WINDOW = 10**4
# log_every: steps whose telemetry waits on the device for one transfer. At
# 10^4 steps the transfer is already negligible; a bigger batch only grows the
# device buffer (8 small tensors per step) and the lines at risk in a crash.
MAX_LOG_EVERY = 10**4


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
    ValueError: GNMRConfig.threshold must be a finite number > 1 (got 0.5)
    >>> GNMRConfig(lock_steps=True)
    Traceback (most recent call last):
    ...
    ValueError: GNMRConfig.lock_steps must be an int in [1, 1000000] (got True)
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
    (per-unit costs come from shapes at compile time). 0 keeps every unit on the low path."""

    threshold: float = 3.0
    """Trigger when GNMR = g / mu reaches this. Must be > 1: a ratio of 1 is
    a unit at its own historical mean."""

    delta_threshold: float = 1.5
    """Trigger when Delta-GNMR (GNMR minus its minimum over the previous
    ``delta_window`` steps) reaches this: catches abrupt jumps that start from
    a low ratio and have not yet crossed ``threshold``."""

    delta_window: int = 3
    """Steps of GNMR history that Delta-GNMR compares against (at most
    ``MAX_DELTA_WINDOW`` = 10^4)."""

    beta: float = 0.98
    """EMA decay of the history mean mu (bias-corrected). 0.98 averages over
    about 50 healthy steps: long enough to ignore noise, short enough to
    follow the normal decline of gradient norms during training."""

    warmup_steps: int = 20
    """Healthy observations a unit needs before it may trigger on ratios.
    Non-finite norms trigger even during warm-up. At most ``MAX_STEPS`` = 10^6."""

    lock_steps: int = 10
    """Optimizer steps a triggered unit stays on the high path. A re-trigger
    while locked refreshes the lock. At most ``MAX_STEPS`` = 10^6."""

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

    high_start_steps: int = 0
    """The first optimizer steps during which every unit runs on the high
    path, whatever the policy and *outside* the ``max_o`` budget (0: off).
    The controller observes those steps (its history starts from high-path
    gradients); from step ``high_start_steps`` on, the policy alone sets the
    plan. The H200 runs of the evidence issue found regimes (int4 activations,
    MXFP4 with stochastic-rounding gradients) whose damage is done in the
    first steps, where no gradient-norm statistic can see it yet
    (benchmarks/RESULTS.md): there, 10% of the steps high closes 85-86% of the
    gap, and GNMR after it adds nothing. Off by default: where low precision is
    harmless it only costs high-path FLOPs. ``GNMRCallback(high_start=0.1)``
    sets it from the Trainer's ``max_steps``. At most ``MAX_STEPS``."""

    emulate: Optional[bool] = None
    """Low-path kernels. None: real fp8 kernels (``torch._scaled_mm``) where
    the GPU has them (sm_89+ tensorwise, sm_90+ rowwise) and emulation
    elsewhere; True: always emulate; False: demand real kernels, and raise
    naming the alternative where the recipe or device has none."""

    dispatch: str = "host"
    """How an emulated unit picks its path. ``host`` (default): the unit's
    plan entry is read on the host (the plan itself on a CPU; on a GPU the
    host copy the runtime publishes once per optimizer step, as for real
    kernels) and only the chosen branch runs: a ``torch.cond``, so the
    always-high model costs about what the plain model costs (1.03x on the
    CPU instead of 2.00x, benchmarks/PERF.md). ``select``: both branches run and
    a branch-free ``torch.where`` on the device plan picks one: twice the
    matmul work, but no host copy of the plan and no host control flow in
    the graph (what CUDA graphs need). Units with real kernels always read
    the host plan."""

    plan_lag: int = 0
    """Steps by which the units that read the host copy of the plan (real
    kernels; emulated units under ``dispatch="host"`` on a GPU) follow it. 0: every
    optimizer step's plan reaches them at the next forward. Under
    ``gnmr_fx.compile`` the copy starts at the step, ahead of the
    optimizer's kernels, and the next forward waits for it (the host never
    waits for the step's GPU work); under ``torch.compile(backend="gnmr")``
    the step waits for the copy, which drains the GPU queue (2-3% of the
    step measured on an H100). 1: the copy is asynchronous and those units
    switch one step late; the controller's decisions are unchanged."""

    compile_controller: bool = False
    """Run the controller's per-step decision rule through ``torch.compile``
    (Inductor): a few fused kernels instead of ~130 small ops, each a kernel
    launch on a GPU. The same rule and state (plans, locks and counters
    equal to the eager rule's; tests/test_controller.py); the first step
    compiles it (seconds), with symbolic sizes: once per device and
    (policy, budget kind) in a process. Should torch._dynamo refuse another
    variant (its recompile limit), the eager rule runs from then on, with a
    warning. Off by default until the H200 measures what it saves."""

    low_graph: Optional[bool] = None
    """Also compile, for each graph, a copy with every unit's low path
    inlined, and run it on the steps where none of the graph's units is high
    (read from the host plan the units already use: no sync). Emulated units
    lose their ``torch.cond``; real-kernel units become the plain recipe's
    GEMMs with no bf16 operand kept for a high path (under Inductor, on the
    CPU, the all-low step is then bitwise the plain fp8 model's, saved
    tensors included; tests/test_saved_memory.py). The statistics are kept.
    ``gnmr_fx.runtime(model).low_graph_calls`` counts the calls that ran a copy.

    None (the default): a copy for every graph compiled with Inductor whose
    units all pick their path on the host; none under ``aot_eager`` /
    ``eager`` (debugging compilers: the copy would double their compile for
    no speed) or for graphs with ``dispatch="select"`` units. True: a copy
    under every compiler, and a warning for each graph that cannot have one.
    False: never (every step runs the dual-path graph).

    Why it is on by default, and what it costs (a second compile of every
    graph, forward and backward, at the first step; H200 measurements):
    benchmarks/PERF.md, sections "Session 27" and "Session 28". Switching
    between the graphs compiles nothing."""

    unit_filter: UnitFilter = None
    """Which recoverable ops become units: None (all), a list of fnmatch
    patterns on unit names, or a callable ``(name, op) -> bool``. Every
    pattern must match at least one unit, or compilation raises."""

    log: Optional[str] = None
    """Path (a str or ``os.PathLike``, stored as a str) of a JSON-lines
    telemetry file (one line per optimizer step). Compiling checks that its
    directory exists and is writable, so a bad path fails before training."""

    log_every: int = 50
    """Telemetry is copied to the host in batches of this many steps, so
    logging adds one transfer per batch rather than one per step (at most
    ``MAX_LOG_EVERY`` = 10^4)."""

    def __post_init__(self) -> None:
        from gnmr_fx.backends.paths import HIGH_PATHS
        from gnmr_fx.backends.recipes import get_recipe

        # One line per field, in field order; a new field adds one line.
        _check(isinstance(self.recipe, str), "recipe", "a recipe name (a str)", self.recipe)
        get_recipe(self.recipe)  # raises ValueError naming the known recipes
        _check_choice(self.high_path, "high_path", HIGH_PATHS)
        _check_choice(self.policy, "policy", POLICIES)
        _check_max_o(self.max_o)
        _check_real(self.threshold, "threshold", gt=1.0)
        _check_real(self.delta_threshold, "delta_threshold", gt=0.0)
        _check_int(self.delta_window, "delta_window", 1, MAX_DELTA_WINDOW)
        _check_real(self.beta, "beta", gt=0.0, lt=1.0)
        _check_int(self.warmup_steps, "warmup_steps", 0, MAX_STEPS)
        _check_int(self.lock_steps, "lock_steps", 1, MAX_STEPS)
        _check_int(self.max_lock_steps, "max_lock_steps", 1, MAX_STEPS)
        _check_int(self.high_start_steps, "high_start_steps", 0, MAX_STEPS)
        # Not a membership test: 1 == True in Python, and kernel_for tests
        # `is True` / `is False`, so emulate=1 would select real kernels.
        _check(self.emulate is None or isinstance(self.emulate, bool), "emulate", "None, True or False", self.emulate)
        _check_choice(self.dispatch, "dispatch", DISPATCHES)
        _check(_is_int(self.plan_lag) and self.plan_lag in (0, 1), "plan_lag", "the int 0 or 1", self.plan_lag)
        _check(isinstance(self.compile_controller, bool), "compile_controller", "True or False",
               self.compile_controller)
        _check(self.low_graph is None or isinstance(self.low_graph, bool), "low_graph", "None, True or False",
               self.low_graph)
        object.__setattr__(self, "unit_filter", _checked_unit_filter(self.unit_filter))
        object.__setattr__(self, "log", _checked_log(self.log))
        _check_int(self.log_every, "log_every", 1, MAX_LOG_EVERY)

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

    def check_log_path(self) -> None:
        """Raise ValueError unless telemetry can be written to ``log``.

        Called at compile time (``gnmr_fx.compile``, the ``gnmr`` backend),
        so an unwritable path fails before training instead of at the first
        telemetry write, ``log_every`` steps in. Creates nothing.

        >>> GNMRConfig(log="/nonexistent-dir/run.jsonl").check_log_path()
        Traceback (most recent call last):
        ...
        ValueError: GNMRConfig.log must be a file in an existing, writable directory: /nonexistent-dir does not exist (got '/nonexistent-dir/run.jsonl')
        """
        if self.log is None:
            return
        path = os.path.abspath(self.log)
        parent = os.path.dirname(path)
        problem = None
        if os.path.isdir(path):
            problem = f"{path} is a directory (a file name in it, e.g. {os.path.join(self.log, 'run.jsonl')!r}?)"
        elif not os.path.exists(parent):
            problem = f"{parent} does not exist"
        elif not os.path.isdir(parent):
            problem = f"{parent} is not a directory"
        elif os.path.exists(path) and not os.access(path, os.W_OK):
            problem = f"{path} is not writable"
        elif not os.path.exists(path) and not os.access(parent, os.W_OK | os.X_OK):
            problem = f"{parent} is not writable"
        if problem is not None:
            raise ValueError(
                f"GNMRConfig.log must be a file in an existing, writable directory: {problem} (got {self.log!r})"
            )

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


def _is_real(x: Any) -> bool:
    """A finite int or float, not a bool (True is an int in Python)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check(ok: bool, field: str, allowed: str, got: Any) -> None:
    if not ok:
        raise ValueError(f"GNMRConfig.{field} must be {allowed} (got {got!r})")


def _check_choice(value: Any, field: str, choices: tuple) -> None:
    # isinstance first: a list is unhashable, and == on other types is not a type check.
    _check(isinstance(value, str) and value in choices, field, f"one of {choices}", value)


def _check_int(value: Any, field: str, lo: int, hi: int) -> None:
    _check(_is_int(value) and lo <= value <= hi, field, f"an int in [{lo}, {hi}]", value)


def _check_real(value: Any, field: str, *, gt: float, lt: float = math.inf) -> None:
    """An int or float in (gt, lt); ints are fine where a float is meant (threshold=3)."""
    allowed = f"> {gt:g}" if lt == math.inf else f"in ({gt:g}, {lt:g})"
    _check(_is_real(value) and gt < value < lt, field, f"a finite number {allowed}", value)


def _check_max_o(m: Any) -> None:
    allowed = f"an int in [0, {MAX_UNITS}] (units) or a float in (0, 1) (a FLOPs fraction)"
    if _is_int(m):
        _check(0 <= m <= MAX_UNITS, "max_o", allowed, m)
    else:
        _check(isinstance(m, float) and 0.0 < m < 1.0, "max_o", allowed, m)


def _checked_unit_filter(f: Any) -> Any:
    """None, a callable, or a tuple of pattern strings (from a list or tuple)."""
    if f is None or callable(f):
        return f
    if isinstance(f, str):
        raise ValueError(
            "GNMRConfig.unit_filter must be a list of patterns or a callable, "
            f"not a bare string (got {f!r}; did you mean [{f!r}]?)"
        )
    # Only ordered sequences: a dict would filter on its keys, a set has no
    # order, and an iterator would be used up by this very check.
    _check(isinstance(f, (list, tuple)), "unit_filter",
           "None, a list of fnmatch patterns or a callable (name, op) -> bool", f)
    if not all(isinstance(p, str) for p in f):
        raise ValueError(f"GNMRConfig.unit_filter patterns must be strings (got {f!r})")
    if len(f) == 0:
        raise ValueError(f"GNMRConfig.unit_filter must not be empty: it would match no unit (got {f!r})")
    return tuple(f)


def _checked_log(log: Any) -> Optional[str]:
    """None, or the path as a str. Not a bool or an int: ``open(True)`` and
    ``open(3)`` would write telemetry into file descriptors 1 (stdout) and 3."""
    if log is None:
        return None
    path = os.fspath(log) if isinstance(log, (str, os.PathLike)) else None
    _check(isinstance(path, str) and path != "", "log", "a file path (a str or os.PathLike)", log)
    return path
