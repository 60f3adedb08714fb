"""GNMRRuntime: what ties one model's compiled graphs to its controller.

One runtime per root model. It owns the record of every compiled graph, the
controller, the per-step update and the plan the graphs run: every plan
buffer and host copy is written by :meth:`GNMRRuntime.write_plan`, and code
outside (benchmarks, tests, tools) forces plans through
:meth:`GNMRRuntime.force_plan` and :meth:`GNMRRuntime.pin`. The unit table
(``gnmr_fx.units``), the checkpoint encoding (``gnmr_fx.checkpoint``) and the
telemetry callback (``gnmr_fx.telemetry``) live in their own modules.

Per optimizer step the runtime does, with no host sync:
  gather ``probe.grad`` of every graph (one ``index_add_`` per graph, not
  per unit) -> ``controller.update`` -> write each graph's plan buffer in
  place (one ``copy_`` per graph) -> the step callbacks -> copy the plan to
  the host buffers (``_gnmr_plan_host``: one small transfer for all graphs).
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch

from gnmr_fx.checkpoint import STATE_PREFIX, attach_state, decode_state, encode_state, subset_state
from gnmr_fx.config import GNMRConfig
from gnmr_fx.controller import GNMRController, warn_released
from gnmr_fx.passes.discover_units import UnitSite
from gnmr_fx.passes.state import PLAN, PLAN_HOST, PROBE
from gnmr_fx.telemetry import Telemetry
from gnmr_fx.units import Unit, UnitTable

# Modules whose weights feed lookups or ops that are never units.
_NOT_MATMUL_MODULES = (torch.nn.Embedding, torch.nn.EmbeddingBag, torch.nn.modules.conv._ConvNd)
# GNMRConfig fields the passes bake into the graphs (the rest only steer the controller).
_COMPILED_FIELDS = ("recipe", "high_path", "unit_filter", "emulate", "dispatch")
PlanLike = Union[torch.Tensor, Sequence[bool]]


@dataclass
class GraphRecord:
    """One graph captured by Dynamo and rewritten by the GNMR passes."""

    index: int
    original: torch.fx.GraphModule  # before the passes (for inspect / diff)
    rewritten: torch.fx.GraphModule
    sites: list[UnitSite]
    unit_ids: Optional[torch.Tensor]  # slot -> controller row, on the plan's device
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
    unit_ids_cpu: Optional[torch.Tensor] = None  # unit_ids on the CPU, for the host plan copy
    # unit_ids are 0 .. k-1 in order: with k == the controller's units, this
    # graph's slots are the controller's rows (no gather or scatter per step).
    ids_in_order: bool = False
    # Compiled with an all-low copy (GNMRConfig.low_graph), run on the steps
    # where none of its units is high.
    low_copy: bool = False

    def is_whole_plan(self, num_units: int) -> bool:
        """Whether this graph's slots are exactly the controller's rows, in order."""
        return self.ids_in_order and self.unit_ids is not None and self.unit_ids.numel() == num_units

    @property
    def plan(self) -> Optional[torch.Tensor]:
        return self.state.get(PLAN, getattr(self.rewritten, PLAN, None))

    @property
    def probe(self) -> Optional[torch.nn.Parameter]:
        return self.state.get(PROBE, getattr(self.rewritten, PROBE, None))

    @property
    def plan_host(self) -> Optional[torch.Tensor]:
        return self.state.get(PLAN_HOST, getattr(self.rewritten, PLAN_HOST, None))


class GNMRRuntime:
    """GNMR state of one root model. Get it with ``gnmr_fx.runtime(model)``."""

    def __init__(self, config: GNMRConfig, root: Optional[torch.nn.Module] = None) -> None:
        self.config = config
        self.unit_table = UnitTable(config)
        self.units: list[Unit] = self.unit_table.units
        self.records: list[GraphRecord] = []
        self.controller = GNMRController([], config)
        self._pending_state: Optional[dict] = None
        self._optimizer_hook = None
        self._backward_hooks: list = []
        self._step_queued = False
        self._filter_checked = False
        self.callbacks: list[Callable[["GNMRRuntime"], None]] = []
        self.plan_lag = config.plan_lag  # lag of the units that read the host plan (see GNMRConfig)
        self._plan_pipe: list = []  # plan_lag=1: host copies in flight
        # plan_lag=0 with every forward entering through a CompiledCall
        # (gnmr_fx.compile): the step's host copy is started at the step and
        # finished when the next forward starts (before_forward), so the
        # host never waits for the step's GPU work to drain.
        self.defer_host_copy = False
        self._host_pending: Optional[tuple] = None
        # What step() does (configure_step): the perf benchmark switches parts off to time them.
        self._step_update = True
        self._step_host_copy = True
        self.telemetry: Optional[Telemetry] = None  # created on first use (see _telemetry)
        self._tensorboard: Any = None
        self._root_ref = weakref.ref(root) if root is not None else None
        self.param_fqns: dict[int, str] = {}
        self.module_fqns: dict[int, str] = {}
        # The once-only check that GNMR controls something (check_active).
        self.on_inactive = "raise"
        self._calls = 0  # calls of a GNMR-compiled module (CompiledCall), until checked
        # Graph calls that ran the all-low copy (GNMRConfig.low_graph); also
        # torch._dynamo.utils.counters["gnmr"]["low_graph_calls"], over all runtimes.
        self.low_graph_calls = 0
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
        attach_state(root, rt)
        return rt

    def reindex_root(self) -> None:
        """Read the root's parameter and module names again, dropping the old
        ones (FSDP2 swaps parameters in; Python may reuse a freed one's id)."""
        root = self.root
        if root is not None:
            self.param_fqns.clear()
            self.module_fqns.clear()
            self._index_root(root)

    def _index_root(self, root: torch.nn.Module) -> None:
        for name, p in root.named_parameters(remove_duplicate=False):
            self.param_fqns.setdefault(id(p), name)
        for name, m in root.named_modules(remove_duplicate=False):
            self.module_fqns.setdefault(id(m), name)

    @property
    def root(self) -> Optional[torch.nn.Module]:
        return self._root_ref() if self._root_ref is not None else None

    # ---------------------------------------------------------------- units
    def name_units(self, sites: list[UnitSite]) -> None:
        """Name the sites of a new graph from the unit table (stable across
        graphs); ``passes.assign_slots`` then gives the included ones slots."""
        self.unit_table.name_sites(sites)

    def add_units(self, sites: list[UnitSite]) -> None:
        """Add the included units of ``sites`` that the controller does not
        have yet (in graph order), and apply pending checkpoint state to them."""
        new_names, new_costs = [], []
        for site in sites:
            unit = self.units[site.unit_id]
            if unit.included and unit.name not in self.controller.names and unit.name not in new_names:
                new_names.append(unit.name)
                new_costs.append(float(max(unit.flops, 1)))
        if new_names:
            self.controller.add_units(new_names, new_costs)
            self._apply_pending_state()

    @property
    def unit_names(self) -> list[str]:
        """Names of the units GNMR controls, in controller order."""
        return list(self.controller.names)

    def check_filter(self) -> None:
        """Raise if a unit-filter pattern (or a filter callable) matched nothing."""
        self.unit_table.check_filter()

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
        convolutions (lookups and ops that are never units).
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
        """Register a rewritten graph: map its slots to controller rows and
        give its plan buffers (device and host) the controller's plan."""
        self.records.append(record)
        if record.plan is not None:
            ids = torch.tensor([s.unit_id for s in record.sites if s.slot is not None], dtype=torch.long)
            # Controller order == order of first appearance, but ids index
            # self.units; map them to controller rows by name once, here.
            rows = [self.controller.names.index(self.units[i].name) for i in ids.tolist()]
            record.unit_ids = torch.tensor(rows, dtype=torch.long, device=record.plan.device)
            record.unit_ids_cpu = record.unit_ids.cpu()
            record.ids_in_order = rows == list(range(len(rows)))
            self.controller.to(record.plan.device)
            # Compile time only: the host copy here is not a per-step transfer.
            self.write_plan(records=[record])
            if self._optimizer_hook is None:
                self._backward_hooks.append(
                    record.probe.register_post_accumulate_grad_hook(self._on_probe_grad)
                )

    # ---------------------------------------------------------------- steps
    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Update once per ``optimizer.step()`` instead of once per backward."""
        if self._optimizer_hook is not None:
            for h in self._optimizer_hook:
                h.remove()
        for h in self._backward_hooks:
            h.remove()
        self._backward_hooks.clear()
        # A pre-hook: the gradients the statistics read are final once
        # backward is done, and the controller's few kernels and the plan's
        # host copy then sit ahead of the optimizer's in the stream; the host
        # queues the optimizer step behind them instead of waiting for the
        # whole step (see before_forward). The plan for the next forward is
        # the same as with a post-hook: nothing the optimizer does feeds it.
        # A step given a closure (LBFGS) runs its forward and backward inside
        # step(): there the update waits for the post-hook, after them.
        def has_closure(args: Any, kwargs: Any) -> bool:
            return bool(args and args[0] is not None) or kwargs.get("closure") is not None

        def pre_hook(opt: Any, args: Any, kwargs: Any) -> None:
            if not has_closure(args, kwargs):
                self.step()

        def post_hook(opt: Any, args: Any, kwargs: Any) -> None:
            if has_closure(args, kwargs):
                self.step()

        self._optimizer_hook = (optimizer.register_step_pre_hook(pre_hook),
                                optimizer.register_step_post_hook(post_hook))

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
        """Read this step's grad stats, update the controller and write the new
        plan into every graph. Returns the plan."""
        if not self._step_update:
            return None
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
        whole = live[0].probe.grad if len(live) == 1 and live[0].is_whole_plan(ctl.num_units) else None
        if whole is not None and whole.dtype == torch.float32 and whole.device == dev:
            # One graph holding every unit in controller order (a model Dynamo
            # captures whole): its probe gradient is the statistic vector as
            # it is, and every unit ran; no gather, no per-step kernels.
            sumsq, seen = whole, self._all_seen(ctl.num_units, dev)
            live[0].probe.grad = None
        else:
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
        norms = sumsq.sqrt()
        plan = ctl.update(norms, observed=seen)
        self.write_plan(host="none")
        telemetry = self._telemetry()
        if telemetry is not None:
            telemetry.record(self, norms)
        for cb in self.callbacks:
            cb(self)
        if self._step_host_copy:
            # After the callbacks, so a plan one of them decided is the one copied.
            self._publish_host(lagged=True)
        return plan

    def _all_seen(self, n: int, device: torch.device) -> torch.Tensor:
        """An all-True mask of ``n`` units on ``device``, made once (read-only)."""
        cached = getattr(self, "_all_seen_cache", None)
        if cached is None or cached.numel() != n or cached.device != device:
            cached = torch.ones(n, dtype=torch.bool, device=device)
            self._all_seen_cache = cached
        return cached

    # Data-parallel reduction, set by gnmr_fx.distributed.enable / disable:
    # the group whose ranks' statistics are summed, the factor applied to the
    # sum (1 / grad_divide_factor**2), and an explicit opt-out.
    dp_group: Any = None
    dp_scale: float = 1.0
    dp_local: bool = False

    def set_data_parallel(self, group: Any, scale: float = 1.0, *, local: bool = False) -> None:
        """Reduce the statistics over ``group`` (times ``scale``) every step, or,
        with ``group=None`` and ``local=True``, decide on this rank alone
        (``gnmr_fx.distributed.enable`` / ``disable``)."""
        self.dp_group, self.dp_scale, self.dp_local = group, float(scale), bool(local)

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
        self.unit_table.config = config
        self.set_plan_lag(config.plan_lag)
        self.write_plan()
        return self.controller

    # ----------------------------------------------------------------- plans
    @torch.no_grad()
    def write_plan(self, *, records: Optional[list[GraphRecord]] = None, changed_only: bool = False,
                   host: str = "now") -> None:
        """Write the controller's plan into the graphs' plan buffers and host copies.

        The one place plan buffers are written. ``records`` (default: every
        graph) limits the write to some graphs; ``changed_only`` writes only
        buffers whose values differ (a graph that already ran this forward
        saved its plan for backward). ``host``: ``"now"`` gives the host
        copies this plan at once (and drops copies in flight, ``plan_lag=1``);
        ``"none"`` leaves them to the end of the step.
        """
        ctl = self.controller
        # A copy still pending would overwrite what is written here.
        stale = self._host_pending is not None
        for rec in self.records if records is None else records:
            if rec.plan is None:
                continue
            plan = ctl.plan if rec.is_whole_plan(ctl.num_units) else ctl.plan[rec.unit_ids.to(ctl.plan.device)]
            if not (changed_only and torch.equal(rec.plan, plan)):
                rec.plan.copy_(plan)
            if rec.plan_host is not None and not (changed_only and torch.equal(rec.plan_host, plan.cpu())):
                stale = True
        if host == "now" and stale:
            self._publish_host(records=records)

    def force_plan(self, plan: PlanLike) -> None:
        """Run ``plan`` (bool per unit, controller order; True = high path)
        from the next forward: the controller takes it as its plan and every
        graph and host copy gets it now. The controller's next update decides
        again (see :meth:`pin` to hold units high). For tests, export and
        what-if runs; the stability benchmark's static and random arms.
        """
        self.controller.set_plan(self._mask(plan))
        self.write_plan()

    def set_plan(self, plan: PlanLike) -> None:
        """Same as :meth:`force_plan` (its earlier name)."""
        self.force_plan(plan)

    def pin(self, high: Optional[PlanLike]) -> None:
        """Hold the units marked in ``high`` on the high path through every
        controller update, until pinned otherwise; ``None`` unpins all.

        Pinned units count against the budget (``max_o``) like locked ones,
        and the release rule (``max_lock_steps``) does not apply to them;
        the controller still observes and updates every unit. Under the
        baseline policies (``always_low`` / ``always_high``) the plan stays
        fixed and pins have no effect. The perf benchmark's ``pin@P%`` arms
        pin the largest units that fit in P% of the FLOPs.
        """
        n = self.controller.num_units
        mask = torch.zeros(n, dtype=torch.bool) if high is None else self._mask(high)
        self.controller.pin(mask)
        self.write_plan()

    def _mask(self, plan: PlanLike) -> torch.Tensor:
        plan = torch.as_tensor(plan).to(self.controller.device, torch.bool)
        if plan.shape != (self.controller.num_units,):
            raise ValueError(f"plan must have shape ({self.controller.num_units},), got {tuple(plan.shape)}")
        return plan

    def set_plan_lag(self, lag: int) -> None:
        """Steps by which host-dispatched units follow the plan (0 or 1, see
        ``GNMRConfig.plan_lag``); drops lagged host copies still in flight
        and finishes a deferred one (its plan is current)."""
        if lag not in (0, 1) or isinstance(lag, bool):
            raise ValueError(f"plan_lag must be the int 0 or 1 (got {lag!r})")
        self.before_forward()
        self.plan_lag = lag
        self._plan_pipe.clear()

    def configure_step(self, *, update: bool = True, host_copy: bool = True) -> None:
        """Switch parts of the per-step work off, to measure what they cost
        (the perf benchmark's diagnostic arms); both on by default.

        ``update=False``: :meth:`step` does nothing (no statistics read, no
        controller update, no plan write). ``host_copy=False``: the plan is
        not copied to the host buffers (``_gnmr_plan_host``) after each step
        (they keep the plan they have).
        """
        self._step_update = bool(update)
        self._step_host_copy = bool(host_copy)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No controller update inside the block (backward passes leave the
        history, locks and plan as they are: what-if passes such as
        ``gnmr_fx.profile``); the step settings before it come back after."""
        saved = (self._step_update, self._step_host_copy)
        self._step_update = False
        try:
            yield
        finally:
            self._step_update, self._step_host_copy = saved

    def _publish_host(self, *, records: Optional[list[GraphRecord]] = None, lagged: bool = False) -> None:
        """Copy the controller's plan into the graphs' host plan buffers.

        One device-to-host transfer for all graphs (the controller plan, one
        byte per unit), then host-side indexing per graph. ``lagged`` (the
        end of a step) with ``plan_lag == 1`` on a GPU copies asynchronously
        into pinned memory and gives the host buffers the *previous* step's
        plan, whose copy finished long ago: the host never waits for the
        step's work to drain, and the units that read them follow the plan one
        optimizer step late. Otherwise the host gets this plan now, and a
        write to every graph drops any copy in flight.
        """
        recs = [r for r in (self.records if records is None else records)
                if r.plan is not None and r.plan_host is not None]
        if not recs:
            return
        plan = self.controller.plan
        pipe = self._plan_pipe
        if lagged and self.plan_lag == 0 and self.defer_host_copy:
            # Finished by before_forward (the next forward) or by the next publish.
            cuda = plan.device.type == "cuda"
            staged = torch.empty(plan.shape, dtype=plan.dtype, pin_memory=cuda)
            staged.copy_(plan, non_blocking=cuda)
            done = None
            if cuda:
                done = torch.cuda.Event()
                done.record()
            self._host_pending = (staged, done, recs)
            return
        if records is None:
            self._host_pending = None  # this publish is newer than the copy in flight
        else:
            self.before_forward()  # the other graphs get the pending plan first
        if not lagged or self.plan_lag == 0 or plan.device.type != "cuda":
            if records is None:
                pipe.clear()
            plan_cpu = plan.to("cpu")  # the step's one small D2H transfer (it waits for the step)
        else:
            staged = torch.empty(plan.shape, dtype=plan.dtype, pin_memory=True)
            staged.copy_(plan, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            pipe.append((staged, done))
            if len(pipe) < 2:
                return  # first lagged step: the host keeps the plan it has
            plan_cpu, done = pipe.pop(0)
            done.synchronize()  # recorded a whole step ago: already complete in practice
        for r in recs:
            r.plan_host.copy_(plan_cpu[r.unit_ids_cpu])

    def before_forward(self) -> None:
        """Finish the host copy of the plan the last step started (``defer_host_copy``).

        Called by :class:`gnmr_fx.compiled_call.CompiledCall` before every
        compiled forward: it waits for the copy's event (recorded after the
        controller update, ahead of the optimizer's kernels, so in steady
        state it has long completed) and writes each graph's host plan. No-op
        when no copy is pending.
        """
        pending, self._host_pending = self._host_pending, None
        if pending is None:
            return
        staged, done, recs = pending
        if done is not None:
            done.synchronize()
        for r in recs:
            r.plan_host.copy_(staged[r.unit_ids_cpu])

    # ------------------------------------------------------------ telemetry
    def _telemetry(self) -> Optional[Telemetry]:
        # Created on first use: telemetry is optional (GNMRConfig.log or a
        # TensorBoard writer) and owned by gnmr_fx.telemetry.
        if self.telemetry is None and (self.config.log is not None or self._tensorboard is not None):
            self.telemetry = Telemetry(self.config.log, self.config.log_every, self._tensorboard)
            # Lines still buffered are written when the runtime goes away or
            # the interpreter exits; the writer holds no reference back here.
            weakref.finalize(self, self.telemetry.writer.close)
        return self.telemetry

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
        telemetry = self._telemetry()
        if telemetry is not None:
            telemetry.log_metrics(**scalars)

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
        if self.telemetry is not None:
            self.telemetry.writer.tensorboard = writer

    def flush(self) -> None:
        """Write buffered telemetry lines now (one host transfer for the batch)."""
        if self.telemetry is not None:
            self.telemetry.flush()

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
        return encode_state(self.controller.state_dict())

    def load_state_dict(self, flat: dict[str, torch.Tensor], *, strict: Optional[bool] = None,
                        prefix: str = STATE_PREFIX) -> None:
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
        sd = decode_state(flat, prefix, strict)
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
            self.write_plan(changed_only=True, host="none")
            self._publish_host()

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
            missing = ctl.load_state_dict(sd, key_prefix=STATE_PREFIX, fit_budget=False)
            self._pending_state = subset_state(self._pending_state, missing)
        self.write_plan(changed_only=True)

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
        self._pending_state = subset_state(sd, [n for n in sd["names"] if n not in live])
        if strict:
            problem = ctl.unit_mismatch(sd["names"])
            if problem is not None:
                raise ValueError(f"{problem} (checked at the first step: the model had no units at load time)")


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
