"""GNMRController: per-unit gradient-norm history, triggers, locks and budget.

Everything in :meth:`GNMRController.update` is a fixed sequence of tensor ops
over the unit vector, on the device of the norms: no host sync, no Python
loop over units, and a cost that grows linearly with the number of units
(one sort is the only O(n log n) step).

The formulas are this project's interpretation of the GNMR abstract
(arXiv 2606.00539), not the paper's published algorithm:

* mu_i: bias-corrected EMA (decay ``beta``) of the unit's gradient norm g_i,
  updated only on healthy steps that did not trigger.
* GNMR_i = g_i / mu_i; Delta-GNMR_i = GNMR_i - min(GNMR_i over the previous
  ``delta_window`` steps).
* trigger: GNMR_i >= threshold or Delta-GNMR_i >= delta_threshold (after the
  unit's warm-up), or g_i not finite (at any time).
* risk = max(GNMR/threshold, Delta-GNMR/delta_threshold), +inf if not finite.
* a triggered unit is locked on the high path for ``lock_steps`` steps; a
  re-trigger refreshes its lock. Locked units keep their budget slots, new
  triggers take free slots by descending risk, the rest are *denied*.
* a zero norm (a frozen, unused or gated unit) is no history: it never enters
  mu or the Delta-GNMR history, and a unit with no history yet has GNMR 1 and
  cannot trigger on ratios (it is in warm-up).
* a unit's *streak* counts consecutive steps it triggered or held a lock;
  past ``max_lock_steps`` the unit is *released*: lock ended, history reset
  (warm-up again), so a lasting level shift stops holding the high path.
* a *pinned* unit (:meth:`GNMRController.pin`) stays on the high path
  through every update until unpinned: it holds budget like a lock, and the
  release rule does not apply to it. Pins are not controller state to
  resume: they are set by the code that runs the model (the perf benchmark).
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from gnmr_fx.config import GNMRConfig

_TINY = 1e-30

# Per-unit state, all of length n (hist is [delta_window, n]).
_FLOAT_STATE = ("ema", "norm", "gnmr", "delta_gnmr", "risk", "costs")
_LONG_STATE = ("n_obs", "lock", "n_triggers", "n_denied", "n_high_steps", "streak", "n_released")
_BOOL_STATE = ("plan", "triggered", "denied", "released", "pinned")
STATE_KEYS = (*_FLOAT_STATE, *_LONG_STATE, *_BOOL_STATE, "hist")
"""Tensor entries of :meth:`GNMRController.state_dict` (besides ``names`` and ``step``)."""
OPTIONAL_STATE_KEYS = ("pinned",)
"""Entries a state dict may lack: saved since pins resume (a checkpoint without
them leaves the live pins as they are)."""
_COUNTERS = ("n_obs", "n_triggers", "n_denied", "n_high_steps", "n_released")


def warn_released(config: GNMRConfig, released: list[str], stacklevel: int = 3) -> None:
    """Warn that resuming released ``released`` units' locks to fit the budget."""
    if released:
        warnings.warn(f"GNMR resume: the checkpoint's locks exceed the budget max_o={config.max_o}; "
                      f"released {released} (the highest-risk locks that fit are kept)",
                      UserWarning, stacklevel=stacklevel)


class GNMRController:
    """The GNMR decision rule over a set of units, usable on its own.

    Args:
        units: unit names, or a number of units (named ``unit0``, ``unit1``...).
        config: a :class:`GNMRConfig` (defaults if None).
        costs: optional per-unit costs (e.g. FLOPs) for a fractional ``max_o``;
            equal costs by default. An integer ``max_o`` always counts units.

    >>> import torch
    >>> c = GNMRController(3, GNMRConfig(warmup_steps=2, max_o=1))
    >>> for _ in range(3):
    ...     plan = c.update(torch.tensor([1.0, 1.0, 1.0]))
    >>> c.update(torch.tensor([1.0, 10.0, 1.0])).tolist()
    [False, True, False]
    >>> c.update(torch.tensor([float("nan"), 1.0, 1.0])).tolist()  # budget full
    [False, True, False]
    >>> c.denied.tolist()
    [True, False, False]
    """

    def __init__(
        self,
        units: Union[Sequence[str], int],
        config: Optional[GNMRConfig] = None,
        *,
        costs: Optional[Union[Sequence[float], Tensor]] = None,
        device: Union[str, torch.device, None] = None,
    ) -> None:
        self.config = config if config is not None else GNMRConfig()
        if isinstance(units, int):
            if units < 0:
                raise ValueError(f"units must be >= 0 (got {units})")
            units = [f"unit{i}" for i in range(units)]
        self.names: list[str] = []
        self.step = 0  # optimizer steps seen; a host int so reading it never syncs
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._alloc(0)
        self.add_units(list(units), costs)

    # ------------------------------------------------------------------ state
    def _alloc(self, n: int) -> None:
        d = self._device
        for k in _FLOAT_STATE:
            setattr(self, k, torch.zeros(n, device=d))
        for k in _LONG_STATE:
            setattr(self, k, torch.zeros(n, dtype=torch.long, device=d))
        for k in _BOOL_STATE:
            setattr(self, k, torch.zeros(n, dtype=torch.bool, device=d))
        self.hist = torch.full((self.config.delta_window, n), float("inf"), device=d)

    def add_units(self, names: Sequence[str], costs: Optional[Union[Sequence[float], Tensor]] = None) -> list[int]:
        """Append units (fresh state, in warm-up); returns their indices.

        Units discovered in a later graph (after a graph break or a new code
        path) join this way without disturbing the others.
        """
        names = list(names)
        dup = set(names) & set(self.names) or (len(set(names)) != len(names))
        if dup:
            raise ValueError(f"duplicate unit names: {sorted(dup) if isinstance(dup, set) else names}")
        k = len(names)
        if costs is None:
            c = torch.ones(k)
        else:
            c = torch.as_tensor(costs, dtype=torch.float32).flatten()
            if c.numel() != k:
                raise ValueError(f"costs has {c.numel()} entries for {k} units")
            if not bool(torch.isfinite(c).all()) or bool((c <= 0).any()):
                raise ValueError("costs must be finite and > 0")
        start = len(self.names)
        self.names.extend(names)
        d = self._device
        pad = lambda t, v: torch.cat([t, torch.full((k,), v, dtype=t.dtype, device=d)])  # noqa: E731
        for key in _FLOAT_STATE:
            setattr(self, key, pad(getattr(self, key), 0.0))
        self.costs[start:] = c.to(d)
        self.norm[start:] = float("nan")
        self.gnmr[start:] = float("nan")
        self.delta_gnmr[start:] = float("nan")
        for key in _LONG_STATE:
            setattr(self, key, pad(getattr(self, key), 0))
        for key in _BOOL_STATE:
            setattr(self, key, pad(getattr(self, key), False))
        self.hist = torch.cat(
            [self.hist, torch.full((self.config.delta_window, k), float("inf"), device=d)], dim=1
        )
        if self.config.policy == "always_high" or self.in_high_start(self.step):
            self.plan[start:] = True
        return list(range(start, start + k))

    def to(self, device: Union[str, torch.device]) -> "GNMRController":
        device = torch.device(device)
        if device != self._device:
            for key in STATE_KEYS:
                setattr(self, key, getattr(self, key).to(device))
            self._device = device
        return self

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def num_units(self) -> int:
        return len(self.names)

    @property
    def mu(self) -> Tensor:
        """Bias-corrected history mean per unit (NaN before the first healthy step)."""
        return _history_mean(self.ema, self.n_obs, self.config.beta)

    @property
    def budget(self) -> float:
        """The cap in cost units: a unit count, or a fraction of total cost."""
        cfg = self.config
        if cfg.budget_is_fraction:
            return float(cfg.max_o) * float(self.costs.sum())
        return float(cfg.max_o)

    def budget_used(self) -> Tensor:
        """Cost on the high path under the current plan (a device scalar)."""
        if self.config.budget_is_fraction:
            return (self.costs * self.plan).sum()
        return self.plan.sum().float()

    # ----------------------------------------------------------------- update
    def update(self, norms: Tensor, observed: Optional[Tensor] = None) -> Tensor:
        """Take one optimizer step's per-unit gradient norms; return the next plan.

        Args:
            norms: ``[num_units]`` gradient norms (any float dtype, any device).
            observed: optional bool mask of units that ran this step; the
                others keep their state untouched (their locks still count down).

        Returns:
            the plan for the next step, a bool tensor (True = high path).
        """
        cfg = self.config
        n = self.num_units
        if norms.shape != (n,):
            raise ValueError(f"norms must have shape ({n},), got {tuple(norms.shape)}")
        self.to(norms.device)
        g = norms.detach().float()
        obs = torch.ones_like(g, dtype=torch.bool) if observed is None else observed.to(g.device, torch.bool)
        decide = _decide_compiled_or_eager if cfg.compile_controller else _decide
        # The history row this step overwrites, as a mask (the host int goes
        # in as a kernel argument: no copy, no sync), so the compiled rule
        # takes no int that changes every step.
        row = self._row_ids() == self.step % cfg.delta_window
        (self.ema, self.n_obs, self.hist, lock, self.streak, trig, denied, risk, self.gnmr, self.delta_gnmr,
         self.norm, release, (self.n_triggers, self.n_denied, self.n_released)) = decide(
            g, obs, self.ema, self.n_obs, self.hist, row, self.lock, self.streak, self.pinned, self.costs,
            self._consts(), (self.n_triggers, self.n_denied, self.n_released),
            gnmr_policy=cfg.policy == "gnmr", fraction=cfg.budget_is_fraction)
        plan = self._derived_plan(lock, self.step + 1)  # the plan is for the next step

        self.lock = lock
        self.plan = plan
        self.triggered = trig
        self.denied = denied
        self.risk = risk
        self.n_high_steps = self.n_high_steps + plan.long()
        self.released = release
        self.step += 1
        return plan

    def _consts(self) -> tuple[Tensor, Tensor]:
        """The config's numbers the rule reads, as a float32 and an int64
        vector on the state's device, made once per device (tensors, so a
        compiled rule serves every config without recompiling, and no step
        copies a number to the device)."""
        cached = getattr(self, "_consts_cache", None)
        if cached is None or cached[0].device != self._device:
            cfg = self.config
            # Each rounded from double to float32 as the Python scalars were (1 - beta in double).
            floats = torch.tensor([cfg.beta, 1.0 - cfg.beta, cfg.threshold, cfg.delta_threshold, float(cfg.max_o)],
                                  dtype=torch.float64).float()
            ints = torch.tensor([cfg.warmup_steps, cfg.max_lock_steps, cfg.lock_steps], dtype=torch.long)
            cached = (floats.to(self._device), ints.to(self._device))
            self._consts_cache = cached
        return cached

    def _row_ids(self) -> Tensor:
        """``0 .. delta_window - 1`` on the state's device, made once per device."""
        cached = getattr(self, "_row_ids_cache", None)
        if cached is None or cached.device != self._device:
            cached = torch.arange(self.config.delta_window).to(self._device)
            self._row_ids_cache = cached
        return cached

    def set_plan(self, plan: Tensor) -> None:
        """Take ``plan`` (bool per unit) as the current plan; the next
        :meth:`update` decides again from the locks and pins."""
        plan = torch.as_tensor(plan, dtype=torch.bool, device=self._device)
        if plan.shape != (self.num_units,):
            raise ValueError(f"plan must have shape ({self.num_units},), got {tuple(plan.shape)}")
        self.plan = plan.clone()

    def pin(self, mask: Tensor) -> None:
        """Hold the units where ``mask`` is True on the high path through every
        update (``policy="gnmr"``), until pinned again; all False unpins.

        >>> c = GNMRController(3, GNMRConfig(max_o=2))
        >>> c.pin(torch.tensor([False, True, False]))
        >>> c.update(torch.ones(3)).tolist(), c.budget_used().item()
        ([False, True, False], 1.0)
        """
        mask = torch.as_tensor(mask, dtype=torch.bool, device=self._device)
        if mask.shape != (self.num_units,):
            raise ValueError(f"pin mask must have shape ({self.num_units},), got {tuple(mask.shape)}")
        self.pinned = mask.clone()
        if self.config.policy == "gnmr":
            self.plan = self._derived_plan(self.lock, self.step)
            self._warn_if_pins_fill_budget()

    def _warn_if_pins_fill_budget(self) -> None:
        """Pins hold budget like locks: pins that leave no room for any other
        unit turn GNMR's own control off, which must not happen silently."""
        free_units = ~self.pinned
        if not bool(self.pinned.any()) or not bool(free_units.any()):
            return
        costs = self.costs if self.config.budget_is_fraction else torch.ones_like(self.costs)
        left = self.budget - float((costs * self.pinned).sum())
        if left < float(costs[free_units].min()) * (1.0 - 1e-6):
            warnings.warn(f"GNMR: the {int(self.pinned.sum())} pinned unit(s) hold {self.budget - left:g} of the "
                          f"budget max_o={self.config.max_o} ({self.budget:g}); no other unit fits in what is left, "
                          "so GNMR cannot move any unit high: raise max_o above the pins' share",
                          UserWarning, stacklevel=3)

    def _derived_plan(self, lock: Tensor, step: int) -> Tensor:
        """The plan of optimizer step ``step`` given the locks: every unit in
        the high start; else, under ``policy="gnmr"``, the locked and pinned
        units; else the baseline's fixed plan. The one place the plan is
        derived (update, pin, resume, budget release)."""
        if self.in_high_start(step):
            return torch.ones_like(self.pinned)
        if self.config.policy == "gnmr":
            return (lock > 0) | self.pinned
        return torch.full_like(self.pinned, self.config.policy == "always_high")

    def in_high_start(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) runs every unit high:
        ``GNMRConfig.high_start_steps`` (a host int test, no device read).

        >>> c = GNMRController(2, GNMRConfig(high_start_steps=2, policy="always_low"))
        >>> [c.plan.tolist()] + [c.update(torch.ones(2)).tolist() for _ in range(2)]
        [[True, True], [True, True], [False, False]]
        """
        return step < self.config.high_start_steps

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything needed to resume with identical decisions."""
        sd = {"names": list(self.names), "step": int(self.step)}
        for key in STATE_KEYS:
            sd[key] = getattr(self, key).detach().clone()
        return sd

    def load_state_dict(self, sd: dict, *, strict: bool = False, key_prefix: str = "",
                        fit_budget: bool = True) -> list[str]:
        """Restore state by unit name, checked against this config; returns
        saved names not present here.

        Nothing is applied unless the whole of ``sd`` passes
        :meth:`check_state_dict`. Units present here but not in ``sd`` keep
        their current state (with ``strict``, any difference in the unit
        sets raises, listing both sides). Per-unit costs stay this
        controller's (they come from the live units' shapes). The live
        config is re-applied: the plan is ``lock > 0`` under
        ``policy="gnmr"`` and fixed, with no locks, under the baselines; and,
        unless ``fit_budget=False`` (for state already fitted, see
        :meth:`fit_to_budget`), :meth:`release_over_budget` runs and a
        warning names the units it released.

        >>> a = GNMRController(["x", "y"], GNMRConfig(warmup_steps=0, max_o=2))
        >>> _ = [a.update(torch.tensor([1.0, 1.0])) for _ in range(3)]
        >>> a.update(torch.tensor([9.0, 5.0])).tolist()
        [True, True]
        >>> b = GNMRController(["x", "y"], GNMRConfig(warmup_steps=0, max_o=1))
        >>> import warnings; warnings.simplefilter("ignore")
        >>> b.load_state_dict(a.state_dict())
        []
        >>> b.plan.tolist()
        [True, False]
        """
        self.check_state_dict(sd, key_prefix=key_prefix)
        names = list(sd["names"])
        if strict:
            problem = self.unit_mismatch(names)
            if problem is not None:
                raise ValueError(problem)
        index = {n: i for i, n in enumerate(self.names)}
        src = [i for i, n in enumerate(names) if n in index]
        dst = [index[names[i]] for i in src]
        missing = [n for n in names if n not in index]
        self.step = int(sd["step"])
        if src:
            s = torch.tensor(src, dtype=torch.long)
            d = torch.tensor(dst, dtype=torch.long, device=self._device)
            for key in STATE_KEYS:
                if key not in sd:  # an optional key an older checkpoint lacks: the live state stays
                    continue
                if key == "hist":
                    self.hist[:, d] = sd[key][:, s].to(self._device)
                elif key != "costs":
                    getattr(self, key)[d] = sd[key][s].to(self._device)
        if self.config.policy != "gnmr":
            self.lock = torch.zeros_like(self.lock)
        self.plan = self._derived_plan(self.lock, self.step)
        if fit_budget:
            warn_released(self.config, self.release_over_budget())
        return missing

    def release_over_budget(self) -> list[str]:
        """Release locks, lowest risk first, until the plan fits ``max_o``;
        returns the released units' names.

        For state that did not come from :meth:`update` (which never exceeds
        the budget): a checkpoint loaded under a smaller ``max_o``. Locks are
        kept by descending risk (then most steps left) while their
        cumulative cost fits: the prefix rule of admission.
        """
        cfg = self.config
        if cfg.policy != "gnmr":
            return []
        # Pinned units hold their budget first (as in update); locks fit in what is left.
        held = (self.lock > 0) & ~self.pinned
        costs = self.costs if cfg.budget_is_fraction else torch.ones_like(self.costs)
        cap = cfg.max_o * costs.sum() if cfg.budget_is_fraction else float(cfg.max_o)
        cap = cap - (costs * self.pinned).sum()
        by_lock = torch.argsort(self.lock, descending=True, stable=True)
        key = torch.where(held, self.risk, torch.full_like(self.risk, float("-inf")))[by_lock]
        order = by_lock[torch.argsort(key, descending=True, stable=True)]
        fits = torch.cumsum(torch.where(held, costs, torch.zeros_like(costs))[order], 0) <= cap * (1.0 + 1e-6)
        keep = torch.zeros_like(held).scatter(0, order, held[order] & fits)
        drop = held & ~keep
        self.lock = self.lock.masked_fill(drop, 0)
        self.streak = self.streak.masked_fill(drop, 0)
        self.plan = self._derived_plan(self.lock, self.step)
        dropped = drop.cpu()
        return [self.names[i] for i in order.tolist() if dropped[i]]

    def fit_to_budget(self, sd: dict) -> tuple[dict, list[str]]:
        """``sd`` (checked) with its locks fitted to this config, by the
        checkpoint's own units and costs; and the released units' names.

        For a model that has not discovered its units yet: their graphs join
        one at a time, and a budget computed over the units seen so far would
        be wrong for a FLOP fraction.
        """
        self.check_state_dict(sd)
        own = GNMRController(list(sd["names"]), self.config, costs=sd["costs"])
        own.load_state_dict(sd, fit_budget=False)
        released = own.release_over_budget()
        return own.state_dict(), released

    def unit_mismatch(self, names: Sequence[str]) -> Optional[str]:
        """Why saved unit ``names`` differ from this controller's, or None."""
        saved, live = set(names), set(self.names)
        unknown = [n for n in names if n not in live]
        absent = [n for n in self.names if n not in saved]
        if not unknown and not absent:
            return None
        return (
            f"GNMR checkpoint units differ from the model's: in the checkpoint but not in this model: {unknown}; "
            f"in this model but not in the checkpoint: {absent}. To restore the units both have, load with "
            "strict=False (gnmr_fx.runtime(model).set_strict_load(False) for model.load_state_dict)"
        )

    def check_state_dict(self, sd: dict, *, key_prefix: str = "") -> None:
        """Raise ``ValueError`` naming the key unless ``sd`` is a state this
        config could have produced: every key of :meth:`state_dict`, the right
        dtypes and shapes, finite non-negative history and counters, locks
        within ``lock_steps`` and streaks within ``max_lock_steps``. Runs on
        the host; meant for load time only.
        """
        cfg = self.config
        if not isinstance(sd, dict):
            raise ValueError(f"GNMR state must be a dict (got {type(sd).__name__})")
        absent = [k for k in ("names", "step", *STATE_KEYS) if k not in sd and k not in OPTIONAL_STATE_KEYS]
        if absent:
            raise ValueError(
                f"GNMR checkpoint: missing {', '.join(key_prefix + k for k in absent)} "
                "(not a GNMR state dict, or saved by an older gnmr_fx)"
            )
        names = sd["names"]
        if (not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names)
                or len(set(names)) != len(names)):
            raise ValueError(f"{key_prefix}names must be a list of distinct str unit names (got {names!r:.200})")
        step = sd["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"{key_prefix}step must be an int >= 0 (got {step!r})")
        n, dw = len(names), cfg.delta_window
        t = {}
        for key in STATE_KEYS:
            if key not in sd:  # optional (checked above)
                continue
            v = sd[key]
            dtype = torch.long if key in _LONG_STATE else torch.bool if key in _BOOL_STATE else torch.float32
            shape = (dw, n) if key == "hist" else (n,)
            if not isinstance(v, Tensor) or v.dtype != dtype or tuple(v.shape) != shape:
                got = f"{v.dtype} {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
                msg = f"{key_prefix}{key} must be a {dtype} tensor of shape {shape} (got {got})"
                if key == "hist" and isinstance(v, Tensor) and v.dim() == 2 and v.shape[1] == n:
                    msg += f": the checkpoint has delta_window={v.shape[0]}, the config has {dw}"
                raise ValueError(msg)
            t[key] = v.detach().cpu()

        def reject(key: str, bad: Tensor, rule: str) -> None:
            if bool(bad.any()):
                rows = bad.any(dim=0) if bad.dim() == 2 else bad
                which = [names[i] for i in rows.nonzero().flatten().tolist()]
                shown = f"{which[:8]}{' ...' if len(which) > 8 else ''}"
                raise ValueError(f"{key_prefix}{key} must be {rule} (bad for {len(which)} unit(s): {shown})")

        ema, hist = t["ema"], t["hist"]
        reject("ema", ~torch.isfinite(ema) | (ema < 0), "finite and >= 0")
        reject("ema", (t["n_obs"] == 0) & (ema != 0), "0 for units with no observations (n_obs == 0)")
        reject("hist", torch.isnan(hist) | (hist < 0), ">= 0 or +inf (a GNMR ratio, or none)")
        reject("risk", torch.isnan(t["risk"]) | (t["risk"] < 0), ">= 0")
        reject("norm", t["norm"] < 0, ">= 0, +inf or NaN")
        reject("gnmr", t["gnmr"] < 0, ">= 0, +inf or NaN")
        reject("costs", ~torch.isfinite(t["costs"]) | (t["costs"] <= 0), "finite and > 0")
        # Counters are not bounded by ``step``: a load with strict=False keeps
        # the counts of units the checkpoint lacks while ``step`` rewinds.
        for key in _COUNTERS:
            reject(key, t[key] < 0, ">= 0")
        reject("n_denied", t["n_denied"] > t["n_triggers"], "<= n_triggers (a denial is a trigger)")
        reject("lock", (t["lock"] < 0) | (t["lock"] > cfg.lock_steps),
               f"in [0, {cfg.lock_steps}] (GNMRConfig.lock_steps: a lock counts down from it)")
        reject("streak", (t["streak"] < 0) | (t["streak"] > cfg.max_lock_steps),
               f"in [0, {cfg.max_lock_steps}] (GNMRConfig.max_lock_steps)")

    # ---------------------------------------------------------------- report
    def report(self, top: Optional[int] = None) -> str:
        """A tabulate table of every unit (or the ``top`` most-triggered)."""
        from tabulate import tabulate

        cols = {k: getattr(self, k).detach().cpu() for k in
                ("plan", "lock", "gnmr", "delta_gnmr", "n_triggers", "n_denied", "n_high_steps")}
        mu = self.mu.detach().cpu()
        order = list(range(self.num_units))
        if top is not None:
            order = sorted(order, key=lambda i: (-int(cols["n_triggers"][i]), i))[:top]
        rows = [
            [self.names[i], "high" if cols["plan"][i] else "low", int(cols["lock"][i]),
             float(cols["gnmr"][i]), float(cols["delta_gnmr"][i]), float(mu[i]),
             int(cols["n_triggers"][i]), int(cols["n_denied"][i]), int(cols["n_high_steps"][i])]
            for i in order
        ]
        head = ["unit", "plan", "lock", "gnmr", "delta_gnmr", "mu", "triggers", "denied", "high_steps"]
        used = float(self.budget_used())
        title = (f"GNMR step {self.step}: {int(self.plan.sum())}/{self.num_units} units high, "
                 f"budget {used:g}/{self.budget:g} ({self.config.policy}, recipe {self.config.recipe})")
        return title + "\n" + tabulate(rows, headers=head, floatfmt=".3g")


def _history_mean(ema: Tensor, n_obs: Tensor, beta: Union[float, Tensor]) -> Tensor:
    """mu: the bias-corrected EMA of each unit's gradient norm (NaN before
    its first healthy step)."""
    corr = 1.0 - torch.pow(beta, n_obs.float())
    return torch.where(n_obs > 0, ema / corr.clamp_min(_TINY), torch.full_like(ema, float("nan")))


def _decide(g: Tensor, obs: Tensor, ema: Tensor, n_obs: Tensor, hist: Tensor, row: Tensor, lock: Tensor,
            streak: Tensor, pinned: Tensor, costs: Tensor, consts: tuple[Tensor, Tensor],
            counts: tuple[Tensor, Tensor, Tensor], *, gnmr_policy: bool, fraction: bool) -> tuple:
    """One step of the decision rule as a pure function of the state: the
    new history, locks and streaks, what the step saw, and the counters
    ``counts`` = (n_triggers, n_denied, n_released) with this step added
    (inside the rule, so a compiled rule launches nothing more for them).
    The same tensor ops eager or compiled (``GNMRConfig.compile_controller``)."""
    beta, one_minus_beta, threshold, delta_threshold, max_o = consts[0].unbind()
    warmup, max_lock_steps, lock_steps = consts[1].unbind()
    finite = torch.isfinite(g)
    bad = obs & ~finite
    healthy = obs & finite
    # A zero norm (frozen, unused or gated unit) carries no scale: it is
    # no history, like a step the unit did not run. Counted, it would give
    # mu=0 and, at the first non-zero norm, GNMR ~1e30 for good.
    usable = healthy & (g > 0)
    has_hist = (n_obs > 0) & (ema > 0)
    mu = _history_mean(ema, n_obs, beta)
    ratio = torch.where(has_hist, g / mu.nan_to_num(0.0).clamp_min(_TINY), torch.ones_like(g))
    ratio = torch.where(healthy, ratio, torch.full_like(g, float("inf")))
    delta = ratio - hist.min(dim=0).values
    delta = torch.where(healthy, delta, torch.full_like(g, float("inf")))
    # inf - inf (no history yet) is NaN: no history means no jump. (Not
    # nan_to_num: it would also clamp the +/-inf entries to finite values.)
    delta = torch.where(torch.isnan(delta), torch.full_like(delta, float("-inf")), delta)

    warm = (n_obs < warmup) | ~has_hist
    trig = healthy & ~warm & ((ratio >= threshold) | (delta >= delta_threshold))
    trig = trig | bad
    risk = torch.maximum(ratio / threshold, delta / delta_threshold)
    risk = torch.where(trig, risk, torch.zeros_like(risk))

    # Streak of steps triggered or locked; past max_lock_steps the unit
    # is released. A pinned unit is held on purpose: no streak.
    in_run = (trig | (lock > 0)) & ~pinned
    streak = torch.where(in_run, streak + 1, torch.zeros_like(streak))
    release = streak > max_lock_steps
    streak = streak.masked_fill(release, 0)

    # History mean: usable, non-triggering steps only, so a spike never
    # inflates its own baseline and a NaN never enters it.
    upd = usable & ~trig
    ema = torch.where(upd, beta * ema + one_minus_beta * g.nan_to_num(0.0), ema)
    n_obs = n_obs + upd.long()
    # Delta-GNMR history (a ring: this step's row); +inf marks "no usable
    # ratio" and never wins a min.
    new_row = torch.where(usable & has_hist, ratio, torch.full_like(g, float("inf")))
    hist = torch.where(row.unsqueeze(1), new_row.unsqueeze(0), hist)
    # A released unit forgets its baseline and re-learns in warm-up: the
    # level it held the high path for is its new normal.
    ema = ema.masked_fill(release, 0.0)
    n_obs = n_obs.masked_fill(release, 0)
    hist = hist.masked_fill(release.unsqueeze(0), float("inf"))

    # Locks: the step just taken consumed one step of every lock.
    lock = (lock - 1).clamp_min(0)
    lock = lock.masked_fill(release, 0)
    held = (lock > 0) | pinned
    lock = torch.where(trig & (lock > 0), lock_steps, lock)
    cand = trig & ~held & ~release
    if gnmr_policy:
        admit = _admit(cand, held, risk, costs, max_o, fraction)
        lock = torch.where(admit, lock_steps, lock)
    else:
        admit = torch.zeros_like(cand)
        lock = torch.zeros_like(lock)
    gnmr = torch.where(obs, torch.where(finite, ratio, torch.full_like(g, float("inf"))),
                       torch.full_like(g, float("nan")))
    delta_gnmr = torch.where(obs, delta, torch.full_like(g, float("nan")))
    norm = torch.where(obs, g, torch.full_like(g, float("nan")))
    denied = cand & ~admit
    n_trig, n_denied, n_released = counts
    counts = (n_trig + trig.long(), n_denied + denied.long(), n_released + release.long())
    return ema, n_obs, hist, lock, streak, trig, denied, risk, gnmr, delta_gnmr, norm, release, counts


def _admit(cand: Tensor, held: Tensor, risk: Tensor, costs: Tensor, max_o: Tensor, fraction: bool) -> Tensor:
    """New triggers by descending risk while their cumulative cost fits.

    Admission stops at the first candidate that does not fit (a prefix of
    the risk order), which keeps this a sort + cumsum with no loop.
    """
    costs = costs if fraction else torch.ones_like(costs)
    cap = max_o * costs.sum() if fraction else max_o
    free = cap - (costs * held).sum()
    key = torch.where(cand, risk, torch.full_like(risk, float("-inf")))
    order = torch.argsort(key, descending=True, stable=True)
    c_sorted = torch.where(cand, costs, torch.zeros_like(costs))[order]
    fits = torch.cumsum(c_sorted, 0) <= free * (1.0 + 1e-6)
    admit_sorted = cand[order] & fits
    return torch.zeros_like(cand).scatter(0, order, admit_sorted)


# The rule compiled (GNMRConfig.compile_controller), made at its first use
# (torch._dynamo is not imported before): sizes symbolic, the config's
# numbers tensor inputs, so a process compiles it once per device and (policy,
# budget kind), a few times more for special sizes (one unit, as many units
# as history rows).
_compiled_rule: Optional[Callable[..., tuple]] = None
_compiled_rule_failed = False


def _decide_compiled_or_eager(*args: Tensor, **kwargs: bool) -> tuple:
    """The compiled rule; the eager one, with a warning, once torch._dynamo
    refuses to compile another variant (its recompile limit) in this process."""
    global _compiled_rule, _compiled_rule_failed
    if not _compiled_rule_failed:
        import torch._dynamo.exc as dynamo_exc

        if _compiled_rule is None:
            _compiled_rule = torch.compile(_decide, fullgraph=True, dynamic=True)
        limit_hit = getattr(dynamo_exc, "FailOnRecompileLimitHit", None) or getattr(dynamo_exc, "FailOnCacheLimitHit", ())
        try:
            return _compiled_rule(*args, **kwargs)
        except limit_hit as e:
            _compiled_rule_failed = True
            warnings.warn("GNMR: compile_controller=True, but torch._dynamo refused to compile another variant "
                          f"of the controller's rule in this process ({type(e).__name__}); every controller of "
                          "this process now runs the eager rule (the same decisions, more kernel launches)",
                          UserWarning, stacklevel=3)
    return _decide(*args, **kwargs)
