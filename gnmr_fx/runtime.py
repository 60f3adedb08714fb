"""GNMRRuntime: what ties one model's compiled graphs to its controller.

One runtime per root model. It owns the unit table (stable names across
graphs and recompiles), the record of every compiled graph, the controller,
the per-step update, telemetry, and the model-state-dict glue.

Per optimizer step the runtime does, with no host sync:
  gather ``probe.grad`` of every graph (one ``index_add_`` per graph, not
  per unit) -> ``controller.update`` -> write each graph's plan buffer in
  place (one ``copy_`` per graph).
"""

from __future__ import annotations

import json
import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from gnmr_fx.config import GNMRConfig
from gnmr_fx.controller import STATE_KEYS, GNMRController, warn_released
from gnmr_fx.passes.discover_units import UnitSite

_STATE_PREFIX = "_gnmr."
# Modules whose weights feed lookups or ops that are never units.
_NOT_MATMUL_MODULES = (torch.nn.Embedding, torch.nn.EmbeddingBag, torch.nn.modules.conv._ConvNd)
# GNMRConfig fields the passes bake into the graphs (the rest only steer the controller).
_COMPILED_FIELDS = ("recipe", "high_path", "unit_filter", "emulate")


@dataclass
class Unit:
    """A recoverable unit of the model (one call site of a matmul-family op)."""

    id: int
    name: str
    op: Any
    op_name: str
    weight: Optional[str]
    flops: int
    where: str
    included: bool
    a_shape: tuple
    b_shape: tuple


@dataclass
class GraphRecord:
    """One graph captured by Dynamo and rewritten by the GNMR passes."""

    index: int
    original: torch.fx.GraphModule  # before the passes (for inspect / diff)
    rewritten: torch.fx.GraphModule
    sites: list[UnitSite]
    unit_ids: Optional[torch.Tensor]  # slot -> unit id, on the plan's device
    skipped: dict
    compiler: str
    graph_break_reason: Optional[str] = None
    extra: dict = field(default_factory=dict)
    # GNMR tensors this record's units use, by attribute name (_gnmr_probe,
    # _gnmr_plan, _gnmr_plan_host). The compiled graph takes them as inputs,
    # so a graph Dynamo reuses for another module instance gets its own.
    state: dict = field(default_factory=dict)
    instance_of: Optional[int] = None  # index of the record whose graph this one shares
    # FQNs of the model's parameters this graph takes: a weight in no graph
    # runs outside GNMR (see GNMRRuntime.uncovered_weights).
    params: frozenset = frozenset()

    @property
    def plan(self) -> Optional[torch.Tensor]:
        return self.state.get("_gnmr_plan", getattr(self.rewritten, "_gnmr_plan", None))

    @property
    def probe(self) -> Optional[torch.nn.Parameter]:
        return self.state.get("_gnmr_probe", getattr(self.rewritten, "_gnmr_probe", None))

    @property
    def plan_host(self) -> Optional[torch.Tensor]:
        return self.state.get("_gnmr_plan_host", getattr(self.rewritten, "_gnmr_plan_host", None))


class GNMRRuntime:
    """GNMR state of one root model. Get it with ``gnmr_fx.runtime(model)``."""

    def __init__(self, config: GNMRConfig, root: Optional[torch.nn.Module] = None) -> None:
        self.config = config
        self.units: list[Unit] = []
        self._by_key: dict[tuple, int] = {}
        self._by_name: dict[str, int] = {}
        self.records: list[GraphRecord] = []
        self.controller = GNMRController([], config)
        self._pending_state: Optional[dict] = None
        self._optimizer_hook = None
        self._backward_hooks: list = []
        self._step_queued = False
        self._filter_checked = False
        self.callbacks: list[Callable[["GNMRRuntime"], None]] = []
        self.plan_lag = config.plan_lag  # host-plan lag of real-kernel units (see GNMRConfig)
        self._root_ref = weakref.ref(root) if root is not None else None
        self.param_fqns: dict[int, str] = {}
        self.module_fqns: dict[int, str] = {}
        # The once-only check that GNMR controls something (check_active).
        self.on_inactive = "raise"
        self._calls = 0  # calls of a GNMR-compiled module (CompiledCall), until checked
        self._active_checked = False
        self._inactive_hook: Any = None
        self._scopes: Optional[list[str]] = None  # FQNs of the compiled submodules; None: the whole root
        if root is not None:
            self._index_root(root)

    # ------------------------------------------------------------- attaching
    @classmethod
    def attach(cls, root: torch.nn.Module, config: GNMRConfig) -> "GNMRRuntime":
        """The runtime of ``root``, created on first use; configs must agree."""
        rt = root.__dict__.get("_gnmr_runtime")
        if rt is not None:
            if rt.config != config:
                raise ValueError(
                    "this model is already compiled with a different GNMRConfig; "
                    "compile a fresh model instance, or pass the same config"
                )
            return rt
        rt = cls(config, root)
        # A plain attribute, not a submodule: the model's parameters, buffers
        # and module tree stay exactly the user's.
        root.__dict__["_gnmr_runtime"] = rt
        # ``root._gnmr.<key>`` resolves the state-dict keys by attribute, as
        # torch.distributed.checkpoint's get/set_model_state_dict require.
        root.__dict__[_STATE_PREFIX.rstrip(".")] = StateView(rt)
        root.register_state_dict_post_hook(_state_dict_hook)
        root.register_load_state_dict_pre_hook(_load_state_dict_hook)
        _skip_state_on_save(root)
        return rt

    def _index_root(self, root: torch.nn.Module) -> None:
        for name, p in root.named_parameters(remove_duplicate=False):
            self.param_fqns.setdefault(id(p), name)
        for name, m in root.named_modules(remove_duplicate=False):
            self.module_fqns.setdefault(id(m), name)

    @property
    def root(self) -> Optional[torch.nn.Module]:
        return self._root_ref() if self._root_ref is not None else None

    # ---------------------------------------------------------------- units
    def register_sites(self, sites: list[UnitSite]) -> None:
        """Name the sites of a new graph (stable across graphs) and give the
        included ones graph-local slots."""
        new_names, new_costs = [], []
        slot = 0
        for site in sites:
            uid = self._by_key.get(site.key)
            if uid is None:
                name = self._unique_name(site)
                uid = len(self.units)
                included = self.config.includes(name, site.op)
                unit = Unit(uid, name, site.op, site.spec.name, site.weight, site.flops, site.where,
                            included, site.a_shape, site.b_shape)
                self.units.append(unit)
                self._by_key[site.key] = uid
                self._by_name[name] = uid
            unit = self.units[uid]
            site.name, site.unit_id, site.included = unit.name, uid, unit.included
            if unit.included:
                site.slot = slot
                slot += 1
                if unit.name not in self.controller.names:
                    new_names.append(unit.name)
                    new_costs.append(float(max(unit.flops, 1)))
        if new_names:
            self.controller.add_units(new_names, new_costs)
            self._apply_pending_state()

    def _unique_name(self, site: UnitSite) -> str:
        # Weightless units are numbered within their module and op
        # (attn.matmul, attn.matmul_1, ...); a weight used by several call
        # sites gets the same suffixes.
        name, k = site.base, 0
        while name in self._by_name:
            k += 1
            name = f"{site.base}_{k}"
        return name

    @property
    def unit_names(self) -> list[str]:
        """Names of the units GNMR controls, in controller order."""
        return list(self.controller.names)

    def check_filter(self) -> None:
        """Raise if a unit-filter pattern (or a filter callable) matched nothing."""
        cfg = self.config
        names = [u.name for u in self.units]
        if cfg.unit_filter is None or not names:
            return
        missing = cfg.unmatched_patterns(names)
        if missing:
            raise ValueError(
                f"GNMRConfig.unit_filter pattern(s) {missing} match no unit; "
                f"units are: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}"
            )
        if not any(u.included for u in self.units):
            raise ValueError(
                f"GNMRConfig.unit_filter {cfg.unit_filter!r} excludes every unit; units are: {', '.join(names[:20])}"
            )

    # ------------------------------------------------- never silently off
    def set_on_inactive(self, policy: str) -> None:
        """What :meth:`check_active` does when GNMR controls no unit: ``"raise"`` or ``"warn"``."""
        if policy not in ("raise", "warn"):
            raise ValueError(f"on_inactive must be 'raise' or 'warn' (got {policy!r})")
        self.on_inactive = policy

    def set_compiled_scope(self, fqns: list[str]) -> None:
        """Only these submodules are compiled (``compile_blocks``): weights
        elsewhere run as written by design, not reported as uncovered."""
        self._scopes = list(fqns)

    def note_call(self, output: Any) -> None:
        """Called after each forward of a GNMR-compiled module, until :meth:`check_active` ran.

        Without an optimizer the check runs at the end of the first backward,
        from the probes' gradient hooks; a model with no unit has no probe,
        so the first output that requires grad gets a one-shot hook instead.
        """
        if self._active_checked:
            return
        self._calls += 1
        if self._optimizer_hook is not None or self._backward_hooks or self._inactive_hook is not None:
            return
        leaves = [t for t in torch.utils._pytree.tree_leaves(output)
                  if isinstance(t, torch.Tensor) and t.requires_grad]
        if leaves:
            self._inactive_hook = torch.autograd.graph.register_multi_grad_hook(
                leaves, lambda _grads: self.check_active(), mode="any"
            )

    def check_active(self) -> None:
        """Raise if GNMR controls no unit of this model; warn about weights it never sees.

        Runs once: at the first optimizer step, or at the end of the first
        backward without an optimizer. No graph through the GNMR backend, or
        graphs without a unit, would otherwise train the model exactly as
        uncompiled (no low path, no controller) with nothing saying so.
        ``on_inactive="warn"`` (``gnmr_fx.compile``) turns the error into one
        warning. Weights that no captured graph takes (the code that uses them
        ran outside Dynamo's graphs) are reported in a warning with their
        estimated share of the forward matmul FLOPs.
        """
        if self._active_checked:
            return
        self._active_checked = True
        if self._inactive_hook is not None:
            self._inactive_hook.remove()
            self._inactive_hook = None
        self.check_filter()
        problem = self._inactive_problem()
        if problem is not None:
            if self.on_inactive == "warn":
                warnings.warn(problem, RuntimeWarning, stacklevel=2)
            else:
                raise RuntimeError(problem)
            return
        uncovered = self.uncovered_weights()
        if uncovered:
            warnings.warn(self._uncovered_message(uncovered), RuntimeWarning, stacklevel=2)

    def _inactive_problem(self) -> Optional[str]:
        head = "GNMR controls no unit of this model, so it trains exactly as uncompiled: "
        tail = " (gnmr_fx.compile(..., on_inactive='warn') makes this a warning)"
        if not self.records:
            if self._calls == 0 and self.root is not None:
                return head + (
                    "no graph went through the GNMR backend because the compiled module was never called. Call the "
                    "module gnmr_fx.compile returned (for DDP: the DDP wrapper), not the original model" + tail
                )
            return head + (
                "Dynamo captured no graph from the model's forward, so no graph went through the GNMR backend. "
                "It skips frames under torch.compiler.disable / torch._dynamo.disable and code it does not trace; "
                "`gnmr-fx inspect` shows what it captures" + tail
            )
        if not self.units:
            seen: dict[str, int] = {}
            for r in self.records:
                for k, v in r.skipped.items():
                    seen[k] = seen.get(k, 0) + v
            listed = ", ".join(f"{k} x{v}" for k, v in sorted(seen.items())) or "no matmul-family op"
            return head + (
                f"its {len(self.records)} captured graph(s) have no recoverable op (seen: {listed}). GNMR rewrites "
                "F.linear / nn.Linear, matmul / @, mm, bmm, addmm, baddbmm and grouped_mm" + tail
            )
        return None

    def uncovered_weights(self) -> list[tuple[str, tuple]]:
        """Matmul weights of the model that no captured graph takes.

        The code that uses them ran outside Dynamo's graphs (a frame Dynamo
        skipped, e.g. after a graph break inside a loop), so their matmuls
        are not units. Matmul weights: floating-point 2-D (``[N, K]``) and
        3-D (a stack of experts) parameters, except those of embeddings and
        convolutions (lookups and ops GNMR does not recover anyway).
        """
        root = self.root
        if root is None or not self.records:
            return []
        seen = set().union(*(r.params for r in self.records))
        scopes = self._scopes
        skip = {f"{m_name}.{p_name}" if m_name else p_name
                for m_name, m in root.named_modules() if isinstance(m, _NOT_MATMUL_MODULES)
                for p_name, _ in m.named_parameters(recurse=False)}
        return [(name, tuple(p.shape)) for name, p in root.named_parameters()
                if p.dim() in (2, 3) and p.is_floating_point() and name not in seen and name not in skip
                and (scopes is None or any(name.startswith(f + ".") for f in scopes))]

    def _uncovered_message(self, uncovered: list[tuple[str, tuple]]) -> str:
        # FLOPs per forward, estimated: a weight [N, K] runs on every token
        # (2*T*N*K), an expert stack [E, N, K] on top_k of E experts per token
        # (top_k from a Hugging Face config, else 1: then a lower bound). T is
        # the token count of the largest linear unit's input.
        tokens = max((math.prod(u.a_shape[:-1]) for u in self.units if u.weight is not None), default=0)
        top_k = int(getattr(getattr(self.root, "config", None), "num_experts_per_tok", 1) or 1)
        outside = 0.0
        for _name, shape in uncovered:
            per_token = math.prod(shape)
            if len(shape) == 3:
                per_token = per_token / shape[0] * top_k
            outside += 2.0 * tokens * per_token
        inside = float(sum(u.flops for u in self.units))
        share = 100.0 * outside / (outside + inside) if outside + inside > 0 else 0.0
        names = ", ".join(f"{n} {list(s)}" for n, s in uncovered[:6]) + (" ..." if len(uncovered) > 6 else "")
        fix = ("Make Dynamo capture that code: remove the graph break (a loop over data-dependent values skips "
               "the whole frame); `gnmr-fx inspect` shows what it captures.")
        experts = [getattr(getattr(m, "config", None), "_experts_implementation", None)
                   for n, m in self.root.named_modules() if any(u[0].startswith(n + ".") for u in uncovered)]
        if "eager" in experts:
            fix = ("These are Hugging Face MoE experts with experts_implementation='eager': its per-expert loop "
                   "over data-dependent indices cannot be captured. Build the model with "
                   "experts_implementation='grouped_mm' (the default; one unit per expert weight stack) or "
                   "'batched_mm'.")
        return (
            f"{len(uncovered)} weight(s) of this model never entered a GNMR graph, so their matmuls run outside "
            f"GNMR (about {share:.0f}% of the forward matmul FLOPs, estimated): {names}. {fix}"
        )

    # ------------------------------------------------------------- records
    def add_record(self, record: GraphRecord) -> None:
        self.records.append(record)
        if record.plan is not None:
            ids = torch.tensor([s.unit_id for s in record.sites if s.slot is not None], dtype=torch.long)
            # Controller order == order of first appearance, but ids index
            # self.units; map them to controller rows by name once, here.
            rows = [self.controller.names.index(self.units[i].name) for i in ids.tolist()]
            record.unit_ids = torch.tensor(rows, dtype=torch.long, device=record.plan.device)
            self.controller.to(record.plan.device)
            with torch.no_grad():
                record.plan.copy_(self.controller.plan[record.unit_ids])
                if record.plan_host is not None:  # compile time only: not a per-step transfer
                    record.plan_host.copy_(self.controller.plan[record.unit_ids].cpu())
            if record.plan_host is not None:
                # Real-kernel units read a host copy of the plan: publish it
                # once per step (the one small device-to-host transfer).
                from gnmr_fx.backends.host_dispatch import install

                install(self)
            if self._optimizer_hook is None:
                self._backward_hooks.append(
                    record.probe.register_post_accumulate_grad_hook(self._on_probe_grad)
                )

    # ---------------------------------------------------------------- steps
    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Update once per ``optimizer.step()`` instead of once per backward."""
        if self._optimizer_hook is not None:
            self._optimizer_hook.remove()
        for h in self._backward_hooks:
            h.remove()
        self._backward_hooks.clear()
        self._optimizer_hook = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step())

    def _on_probe_grad(self, _param: torch.Tensor) -> None:
        # One update per backward even with several graphs: queue it once.
        if not self._step_queued:
            self._step_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        self._step_queued = False
        self.step()

    @torch.no_grad()
    def step(self) -> Optional[torch.Tensor]:
        """Read this step's gradient statistics, update the controller and
        write the new plan into every graph. Returns the plan."""
        if not self._filter_checked:
            self.check_filter()
            self._filter_checked = True
        if not self._active_checked:
            self.check_active()
        ctl = self.controller
        live = [r for r in self.records if r.plan is not None]
        if not live or ctl.num_units == 0:
            return None
        if self._resume_check is not None:
            self._check_resumed_units()
        dev = live[0].plan.device
        sumsq = torch.zeros(ctl.num_units, device=dev)
        seen = torch.zeros(ctl.num_units, dtype=torch.bool, device=dev)
        for rec in live:  # one iteration per compiled graph, not per unit
            g = rec.probe.grad
            if g is None:
                continue
            sumsq.index_add_(0, rec.unit_ids, g.to(dev))
            seen.index_fill_(0, rec.unit_ids, True)
            rec.probe.grad = None
        sumsq, seen = self._reduce(sumsq, seen)
        plan = ctl.update(sumsq.sqrt(), observed=seen)
        for rec in live:
            rec.plan.copy_(plan[rec.unit_ids.to(plan.device)])
        self._record_telemetry(sumsq)
        for cb in self.callbacks:
            cb(self)
        return plan

    # Data-parallel reduction, set by gnmr_fx.distributed.enable / disable:
    # the group whose ranks' statistics are summed, the factor applied to the
    # sum (1 / grad_divide_factor**2), and an explicit opt-out.
    dp_group: Any = None
    dp_scale: float = 1.0
    dp_local: bool = False

    def _reduce(self, sumsq: torch.Tensor, seen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Combine every rank's statistics so that all ranks compute the same plan.

        One ``all_reduce`` (SUM) of one vector ``[sumsq | seen]`` per step over
        ``dp_group``: a unit is observed if any rank ran it, and its statistic
        is ``dp_scale`` times the sum over ranks (see ``gnmr_fx.distributed``
        for which quantity that is). No collective per unit.
        """
        dist = torch.distributed
        if self.dp_group is None:
            if (not self.dp_local and dist.is_available() and dist.is_initialized()
                    and dist.get_world_size() > 1):
                # Without the reduction each rank would decide from its own
                # batch and the ranks would train different numerics.
                raise RuntimeError(
                    "torch.distributed is initialized with several ranks but GNMR decides per rank: "
                    "call gnmr_fx.distributed.enable(model) after compiling, or "
                    "gnmr_fx.distributed.disable(model) if rank-local plans are intended"
                )
            return sumsq, seen
        n = sumsq.numel()
        buf = torch.cat([sumsq, seen.to(sumsq.dtype)])
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.dp_group)
        return buf[:n] * self.dp_scale, buf[n:] > 0

    def reset_controller(self, config: GNMRConfig) -> GNMRController:
        """A fresh controller with new decision settings, on the same compiled graphs.

        For comparing policies or budgets without recompiling (the stability
        benchmark's arms). Fields compiled into the graphs cannot change.
        """
        fixed = [f for f in _COMPILED_FIELDS if getattr(config, f) != getattr(self.config, f)]
        if fixed:
            raise ValueError(
                f"reset_controller cannot change {fixed}: they are compiled into the graphs; compile a fresh model"
            )
        ctl = self.controller
        self.controller = GNMRController(ctl.names, config, costs=ctl.costs.cpu(), device=ctl.device)
        self.config = config
        self.plan_lag = config.plan_lag
        self.set_plan(self.controller.plan)
        return self.controller

    def set_plan(self, plan: torch.Tensor) -> None:
        """Force a plan (tests, export, what-if runs); the controller keeps it."""
        plan = plan.to(self.controller.device, torch.bool)
        if plan.shape != (self.controller.num_units,):
            raise ValueError(f"plan must have shape ({self.controller.num_units},), got {tuple(plan.shape)}")
        self.controller.plan = plan.clone()
        for rec in self.records:
            if rec.plan is not None:
                rec.plan.copy_(plan[rec.unit_ids.to(plan.device)])
        self._publish_host_plans()

    def _publish_host_plans(self) -> None:
        if any(r.plan_host is not None for r in self.records):
            from gnmr_fx.backends.host_dispatch import publish_plan

            publish_plan(self, immediate=True)

    # ------------------------------------------------------------ telemetry
    def _record_telemetry(self, sumsq: torch.Tensor) -> None:
        """Buffer this step's telemetry as device tensors (no host sync).

        The buffer reaches the host in one transfer per ``log_every`` steps
        (see :class:`gnmr_fx.telemetry.TelemetryWriter`); it is also written
        by :meth:`flush`, when the runtime is garbage-collected, and at exit.
        """
        writer = self._telemetry_writer()
        if writer is None:
            return
        ctl = self.controller
        if writer.n_units != ctl.num_units:
            # Units joined (a new graph): a new header line. Rare, so the one
            # sync reading the costs here is not a per-step cost.
            writer.set_header(self._telemetry_header())
        metrics, self._pending_metrics = getattr(self, "_pending_metrics", {}), {}
        writer.append(ctl.step, {
            "norm": sumsq.sqrt(),
            "gnmr": ctl.gnmr,
            "delta_gnmr": ctl.delta_gnmr,
            "plan": ctl.plan,
            "triggered": ctl.triggered,
            "denied": ctl.denied,
            "lock": ctl.lock,
            "budget_used": ctl.budget_used(),
        }, metrics)

    def _telemetry_writer(self) -> Any:
        # Created on first use (attributes, not __init__ state: telemetry
        # is optional and owned by gnmr_fx.telemetry).
        writer = getattr(self, "_telemetry_w", None)
        tensorboard = getattr(self, "_tensorboard", None)
        if writer is None and (self.config.log is not None or tensorboard is not None):
            from gnmr_fx.telemetry import TelemetryWriter

            writer = TelemetryWriter(self.config.log, self.config.log_every, tensorboard)
            self._telemetry_w = writer
            # Lines still buffered are written when the runtime goes away or
            # the interpreter exits; the writer holds no reference back here.
            weakref.finalize(self, writer.close)
        return writer

    def _telemetry_header(self) -> dict:
        cfg, ctl = self.config, self.controller
        return {
            "header": True, "units": list(ctl.names), "recipe": cfg.recipe, "policy": cfg.policy,
            "high_path": cfg.high_path, "max_o": cfg.max_o, "budget": ctl.budget,
            "costs": ctl.costs.cpu().tolist(), "threshold": cfg.threshold,
            "delta_threshold": cfg.delta_threshold, "warmup_steps": cfg.warmup_steps,
            "lock_steps": cfg.lock_steps, "log_every": cfg.log_every,
        }

    def log_metrics(self, **scalars: Any) -> None:
        """Log scalars (e.g. ``loss=loss``) with this step's telemetry line.

        Tensors stay on the device until the batch is written, so logging a
        CUDA loss every step adds no sync. Call it before ``optimizer.step()``
        (or before ``backward()`` without an optimizer): the values join the
        line of the step that consumes this loss's gradients.

        >>> import torch, gnmr_fx
        >>> m = gnmr_fx.compile(torch.nn.Linear(4, 4), backend="eager")
        >>> gnmr_fx.runtime(m).log_metrics(loss=torch.tensor(0.5))  # no-op without a log
        """
        if self.config.log is None and getattr(self, "_tensorboard", None) is None:
            return
        if not hasattr(self, "_pending_metrics"):
            self._pending_metrics = {}
        pending = self._pending_metrics
        for k, v in scalars.items():
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    raise ValueError(f"log_metrics: {k} must be a scalar, got shape {tuple(v.shape)}")
                pending[k] = v.detach().reshape(()).float()
            else:
                pending[k] = float(v)

    def attach_tensorboard(self, writer: Any) -> None:
        """Also write telemetry as TensorBoard scalars, at each flush.

        ``writer`` is a ``torch.utils.tensorboard.SummaryWriter`` or a log
        directory (needs the optional ``tensorboard`` package).
        """
        if isinstance(writer, str):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError("attach_tensorboard(logdir) needs `pip install tensorboard`; "
                                 "or pass any object with add_scalar()") from e
            writer = SummaryWriter(writer)
        if not hasattr(writer, "add_scalar"):
            raise ValueError(f"attach_tensorboard expects a SummaryWriter or a log dir, got {type(writer).__name__}")
        self._tensorboard = writer
        w = getattr(self, "_telemetry_w", None)
        if w is not None:
            w.tensorboard = writer

    def flush(self) -> None:
        """Write buffered telemetry lines now (one host transfer for the batch)."""
        writer = getattr(self, "_telemetry_w", None)
        if writer is not None:
            writer.flush()

    # ----------------------------------------------------------- checkpoint
    # (strict, key prefix) of the last load, until the first step after it.
    _resume_check: Optional[tuple[bool, str]] = None
    _strict_load: bool = True

    def set_strict_load(self, strict: bool) -> None:
        """Whether a checkpoint's GNMR units (and ``_gnmr.*`` keys) must match
        the model's exactly (default True).

        ``model.load_state_dict`` gives its hooks no ``strict`` flag, so this
        is GNMR's own. With False, the units both sides have are restored,
        units only the model has keep their state (fresh, in warm-up, if the
        model had not run yet), and units only the checkpoint has wait until
        the model discovers them.
        """
        self._strict_load = bool(strict)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Controller state as flat tensors (safe for ``weights_only=True``)."""
        sd = self.controller.state_dict()
        names = sd.pop("names")
        out = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        out["names"] = torch.tensor(list(json.dumps(names).encode("utf-8")), dtype=torch.uint8)
        out["step"] = torch.tensor(sd["step"], dtype=torch.long)
        return out

    def load_state_dict(self, flat: dict[str, torch.Tensor], *, strict: Optional[bool] = None,
                        prefix: str = _STATE_PREFIX) -> None:
        """Restore the controller from :meth:`state_dict`'s tensors.

        Everything is checked now, before anything is applied: missing (and,
        with ``strict``, unexpected) keys, dtypes, shapes, the names' encoding
        and every value against the live config (``ValueError`` naming the
        key, e.g. ``_gnmr.ema``). Units the model has already discovered are
        matched at once; if it has none yet (loaded before the first forward)
        they are restored as their graphs compile, and the unit sets are
        compared at the first step. With ``strict`` (default: the setting of
        :meth:`set_strict_load`) a difference raises, listing both sides. The
        budget and the policy of the live config are re-applied (see
        :meth:`GNMRController.load_state_dict`), and the plan reaches every
        graph and host copy before the next forward.
        """
        strict = self._strict_load if strict is None else bool(strict)
        sd = _decode_state(flat, prefix, strict)
        ctl = self.controller
        ctl.check_state_dict(sd, key_prefix=prefix)
        if strict and ctl.num_units:
            problem = ctl.unit_mismatch(sd["names"])
            if problem is not None:
                raise ValueError(problem)
        # The budget is fitted here, over the checkpoint's units and costs:
        # the model's graphs may join one at a time below, and their plans
        # must not change once a graph has run. The first step checks it
        # again with the live units' costs.
        sd, released = ctl.fit_to_budget(sd)
        warn_released(self.config, released)
        self._pending_state = sd
        self._resume_check = (strict, prefix)
        ctl.step = sd["step"]
        self._apply_pending_state()
        if ctl.num_units:
            # Units the checkpoint lacks may hold locks too (strict=False).
            warn_released(self.config, ctl.release_over_budget())
            # Between steps: also drops host copies still in flight (plan_lag=1).
            self._write_plans(publish=True)

    def _apply_pending_state(self) -> None:
        if self._pending_state is None or self.controller.num_units == 0:
            return
        ctl = self.controller
        if self._resume_check is not None:
            # Until the first step after the load every registration applies
            # the whole (fitted) checkpoint: no unit's lock depends on the
            # order in which the graphs compile.
            ctl.load_state_dict(self._pending_state, key_prefix=self._resume_check[1], fit_budget=False)
        else:
            # A unit that joins later resumes its history, not its lock (that
            # was for the steps after the checkpoint), and the step count
            # does not rewind.
            sd = dict(self._pending_state, step=ctl.step, lock=torch.zeros_like(self._pending_state["lock"]),
                      streak=torch.zeros_like(self._pending_state["streak"]))
            missing = ctl.load_state_dict(sd, key_prefix=_STATE_PREFIX, fit_budget=False)
            self._pending_state = _subset_state(self._pending_state, missing)
        self._write_plans()

    def _write_plans(self, *, publish: bool = False) -> None:
        """The controller's plan into every graph and host copy, now.

        Only where a value changes (unless ``publish``): graphs join during a
        forward, and one that already ran saved its plan for backward.
        """
        ctl = self.controller
        for rec in self.records:
            if rec.plan is not None:
                plan = ctl.plan[rec.unit_ids.to(ctl.plan.device)]
                if not torch.equal(rec.plan, plan):
                    rec.plan.copy_(plan)
                if rec.plan_host is not None and not torch.equal(rec.plan_host, plan.cpu()):
                    publish = True
        if publish:
            self._publish_host_plans()

    def _check_resumed_units(self) -> None:
        """First step after a load: every unit is known; compare the sets and
        fit the budget with the live costs (between steps, when no graph
        holds the plan)."""
        strict, _ = self._resume_check
        self._resume_check = None
        sd, ctl = self._pending_state, self.controller
        warn_released(self.config, ctl.release_over_budget())
        if sd is None:
            return
        live = set(ctl.names)
        self._pending_state = _subset_state(sd, [n for n in sd["names"] if n not in live])
        if strict:
            problem = ctl.unit_mismatch(sd["names"])
            if problem is not None:
                raise ValueError(f"{problem} (checked at the first step: the model had no units at load time)")


def _decode_state(flat: dict, prefix: str, strict: bool) -> dict:
    """The controller state dict from its flat tensors, or ``ValueError`` naming the key."""
    known = {"names", "step", *STATE_KEYS}
    absent = [k for k in ("names", "step", *STATE_KEYS) if k not in flat]
    if absent:
        raise ValueError(f"GNMR checkpoint: missing {', '.join(prefix + k for k in absent)} "
                         "(not a GNMR state dict, or saved by an older gnmr_fx)")
    unexpected = sorted(k for k in flat if k not in known)
    if unexpected and strict:
        raise ValueError(f"GNMR checkpoint: unexpected {', '.join(prefix + k for k in unexpected)} "
                         "(gnmr_fx.runtime(model).set_strict_load(False) ignores them)")
    t = flat["names"]
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{prefix}names must be a 1-D torch.uint8 tensor of UTF-8 JSON (got {got})")
    try:
        text = bytes(t.tolist()).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{prefix}names is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        names = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{prefix}names is not JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise ValueError(f"{prefix}names must be a JSON list of distinct unit names (got {text[:120]!r})")
    t = flat["step"]
    if (not isinstance(t, torch.Tensor) or t.dim() != 0 or t.dtype.is_floating_point or t.dtype.is_complex
            or t.dtype == torch.bool):
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{prefix}step must be a 0-d integer tensor (got {got})")
    sd = {k: v for k, v in flat.items() if k in known}
    sd["names"], sd["step"] = names, int(t)
    return sd


def _subset_state(sd: dict, names: list[str]) -> Optional[dict]:
    """The part of a decoded state dict for ``names`` (None if empty)."""
    if not names:
        return None
    keep = set(names)
    idx = torch.tensor([i for i, n in enumerate(sd["names"]) if n in keep], dtype=torch.long)
    out = {"names": [n for n in sd["names"] if n in keep], "step": sd["step"]}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            out[k] = v[:, idx] if k == "hist" else v[idx]
    return out


class StateView:
    """``root._gnmr.<key>``: the controller state under its state-dict key.

    ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` (and
    ``set_model_state_dict``, which torchtitan's checkpointer uses) resolve
    every state-dict key by ``getattr`` along its dotted path; without this
    attribute the ``_gnmr.*`` keys raise ``AttributeError: ... no attribute
    '_gnmr'``. A plain attribute, not a submodule: the module tree, the
    parameters and ``state_dict()`` itself are unchanged.
    """

    def __init__(self, runtime: GNMRRuntime) -> None:
        self._runtime = runtime

    def __getattr__(self, name: str) -> torch.Tensor:
        # copy.deepcopy / pickle build the object without __init__ and probe
        # dunders: never recurse through a missing _runtime.
        if name == "_runtime" or name.startswith("__"):
            raise AttributeError(name)
        state = self._runtime.state_dict()
        if name not in state:
            raise AttributeError(f"the GNMR controller state has no entry {name!r}")
        return state[name]


def _skip_state_on_save(root: torch.nn.Module) -> None:
    """Keep the controller state out of weights saved for inference.

    The controller state is training state: it belongs in a training
    checkpoint (``model.state_dict()``), not in a folder of weights that a
    fresh, uncompiled model loads. Hugging Face ``save_pretrained`` (and so
    ``Trainer.save_model``) drops the keys a model lists in
    ``_keys_to_ignore_on_save``; listing the ``_gnmr.*`` keys there makes the
    saved folder load with ``from_pretrained`` with no unexpected key.
    """
    if not hasattr(root, "save_pretrained") or not hasattr(root, "_keys_to_ignore_on_save"):
        return
    keys = {_STATE_PREFIX + k for k in ("names", "step", *STATE_KEYS)}
    # An instance attribute: the class's value (shared by every instance) stays as it was.
    root._keys_to_ignore_on_save = set(root._keys_to_ignore_on_save or ()) | keys


def _state_dict_hook(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    rt = module.__dict__.get("_gnmr_runtime")
    if rt is None:
        return
    for k, v in rt.state_dict().items():
        state_dict[prefix + _STATE_PREFIX + k] = v


def _load_state_dict_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    rt = module.__dict__.get("_gnmr_runtime")
    head = prefix + _STATE_PREFIX
    keys = [k for k in state_dict if k.startswith(head)]
    if not keys:
        return  # a weights-only checkpoint: the controller starts fresh
    # Raised here, before any parameter is loaded, rather than appended to
    # error_msgs: a bad GNMR state is a ValueError naming its key.
    flat = {k[len(head):]: state_dict.pop(k) for k in keys}
    if rt is not None:
        rt.load_state_dict(flat, prefix=head)  # `strict` here is always True: see set_strict_load


def runtime_of(model: torch.nn.Module) -> GNMRRuntime:
    """The runtime attached to ``model`` (or to the model a compiled wrapper holds)."""
    for m in (model, getattr(model, "_orig_mod", None), getattr(model, "module", None)):
        if isinstance(m, torch.nn.Module):
            rt = m.__dict__.get("_gnmr_runtime")
            if rt is not None:
                return rt
            inner = getattr(m, "_orig_mod", None)
            if isinstance(inner, torch.nn.Module) and "_gnmr_runtime" in inner.__dict__:
                return inner.__dict__["_gnmr_runtime"]
    raise ValueError(
        "this model has no GNMR runtime: compile it with gnmr_fx.compile(model) "
        "or torch.compile(model, backend='gnmr') and run one forward pass"
    )
