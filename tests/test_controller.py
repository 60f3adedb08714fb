"""GNMRController: triggers, locks, budget, non-finite norms, warm-up, checkpoints."""

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from gnmr_fx import GNMRConfig, GNMRController


def _steady(ctl, n_steps, base=1.0, seed=0, noise=0.05):
    g = torch.Generator().manual_seed(seed)
    plans = []
    for _ in range(n_steps):
        norms = base * torch.exp(noise * torch.randn(ctl.num_units, generator=g))
        plans.append(ctl.update(norms).clone())
    return plans


class TestTriggers:
    def test_spike_triggers_only_that_unit(self):
        ctl = GNMRController(4, GNMRConfig(warmup_steps=5, max_o=2))
        _steady(ctl, 10)
        plan = ctl.update(torch.tensor([1.0, 1.0, 8.0, 1.0]))
        assert plan.tolist() == [False, False, True, False]
        assert ctl.triggered.tolist() == [False, False, True, False]
        assert ctl.gnmr[2].item() == pytest.approx(8.0, rel=0.1)

    def test_steady_noise_never_triggers(self):
        # 500 steps of 10% log-normal noise on 50 units: 25,000 unit-steps.
        ctl = GNMRController(50, GNMRConfig(warmup_steps=20, max_o=50))
        plans = _steady(ctl, 500, noise=0.10)
        assert int(ctl.n_triggers.sum()) == 0
        assert not any(p.any() for p in plans)

    def test_delta_trigger_below_ratio_threshold(self):
        # GNMR goes 0.5 -> 2.2: under threshold=3, but Delta-GNMR = 1.7 >= 1.5.
        ctl = GNMRController(1, GNMRConfig(warmup_steps=5, max_o=1))
        for _ in range(30):
            ctl.update(torch.tensor([1.0]))
        for _ in range(3):
            ctl.update(torch.tensor([0.5]))
        plan = ctl.update(torch.tensor([2.2 * float(ctl.mu[0])]))
        assert float(ctl.gnmr[0]) < 3.0
        assert float(ctl.delta_gnmr[0]) >= 1.5
        assert plan.tolist() == [True]

    def test_warmup_suppresses_ratio_triggers(self):
        ctl = GNMRController(2, GNMRConfig(warmup_steps=20, max_o=2))
        _steady(ctl, 5)
        plan = ctl.update(torch.tensor([50.0, 1.0]))
        assert plan.tolist() == [False, False]
        assert int(ctl.n_triggers.sum()) == 0

    def test_spike_does_not_inflate_its_baseline(self):
        ctl = GNMRController(1, GNMRConfig(warmup_steps=5, max_o=1))
        _steady(ctl, 20, noise=0.0)
        mu_before = float(ctl.mu[0])
        ctl.update(torch.tensor([100.0]))
        assert float(ctl.mu[0]) == mu_before


class TestLock:
    def test_lock_holds_then_expires(self):
        cfg = GNMRConfig(warmup_steps=5, max_o=1, lock_steps=4)
        ctl = GNMRController(1, cfg)
        _steady(ctl, 10, noise=0.0)
        seq = [ctl.update(torch.tensor([9.0]))[0].item()]
        seq += [ctl.update(torch.tensor([1.0]))[0].item() for _ in range(6)]
        # Triggered: high for exactly lock_steps optimizer steps, then low.
        assert seq == [True, True, True, True, False, False, False]

    def test_retrigger_refreshes_lock(self):
        ctl = GNMRController(1, GNMRConfig(warmup_steps=5, max_o=1, lock_steps=3))
        _steady(ctl, 10, noise=0.0)
        ctl.update(torch.tensor([9.0]))
        ctl.update(torch.tensor([1.0]))
        assert int(ctl.lock[0]) == 2
        ctl.update(torch.tensor([9.0]))  # re-trigger while locked
        assert int(ctl.lock[0]) == 3


class TestBudget:
    def test_highest_risk_wins(self):
        ctl = GNMRController(5, GNMRConfig(warmup_steps=5, max_o=2))
        _steady(ctl, 10, noise=0.0)
        plan = ctl.update(torch.tensor([4.0, 1.0, 12.0, 6.0, 1.0]))
        assert plan.tolist() == [False, False, True, True, False]
        assert ctl.denied.tolist() == [True, False, False, False, False]
        assert int(ctl.n_denied.sum()) == 1

    def test_locked_units_keep_their_slots(self):
        ctl = GNMRController(3, GNMRConfig(warmup_steps=5, max_o=1, lock_steps=5))
        _steady(ctl, 10, noise=0.0)
        ctl.update(torch.tensor([5.0, 1.0, 1.0]))
        plan = ctl.update(torch.tensor([1.0, 50.0, 1.0]))  # higher risk, but no free slot
        assert plan.tolist() == [True, False, False]
        assert ctl.denied.tolist() == [False, True, False]

    def test_fractional_budget_uses_costs(self):
        costs = [10.0, 80.0, 10.0]  # 20% budget: unit 1 can never fit
        ctl = GNMRController(3, GNMRConfig(warmup_steps=5, max_o=0.2), costs=costs)
        _steady(ctl, 10, noise=0.0)
        plan = ctl.update(torch.tensor([9.0, 9.0, 9.0]))
        assert float(ctl.budget_used()) <= 0.2 * sum(costs)
        assert not plan[1]
        assert ctl.budget == pytest.approx(20.0)

    def test_zero_budget_never_goes_high(self):
        ctl = GNMRController(3, GNMRConfig(warmup_steps=2, max_o=0))
        _steady(ctl, 5)
        assert not ctl.update(torch.tensor([float("nan"), 99.0, 1.0])).any()
        assert ctl.denied.tolist() == [True, True, False]

    @settings(max_examples=40, deadline=None)
    @given(
        n=st.integers(1, 24),
        max_o=st.one_of(st.integers(0, 6), st.floats(0.01, 0.99)),
        seed=st.integers(0, 2**31 - 1),
        lock=st.integers(1, 8),
    )
    def test_budget_never_exceeded(self, n, max_o, seed, lock):
        g = torch.Generator().manual_seed(seed)
        costs = torch.rand(n, generator=g) * 100 + 1
        cfg = GNMRConfig(warmup_steps=3, max_o=max_o, lock_steps=lock, threshold=2.0)
        ctl = GNMRController(n, cfg, costs=costs)
        cap = max_o * float(costs.sum()) if isinstance(max_o, float) else max_o
        for _ in range(60):
            # Heavy tails: Pareto(alpha=1.2) norms, with occasional NaN / inf.
            u = torch.rand(n, generator=g).clamp_min(1e-6)
            norms = u.pow(-1 / 1.2)
            norms[torch.rand(n, generator=g) < 0.02] = float("nan")
            norms[torch.rand(n, generator=g) < 0.02] = float("inf")
            plan = ctl.update(norms)
            used = float((costs * plan).sum()) if isinstance(max_o, float) else int(plan.sum())
            assert used <= cap * (1 + 1e-5) + 1e-6, f"budget {used} > cap {cap}"
            assert torch.isfinite(ctl.ema).all() and torch.isfinite(ctl.mu.nan_to_num(0)).all()


class TestNonFinite:
    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
    def test_nonfinite_triggers_without_poisoning(self, bad):
        ctl = GNMRController(2, GNMRConfig(warmup_steps=20, max_o=2))
        _steady(ctl, 3, noise=0.0)  # still in warm-up
        ema, n_obs = ctl.ema.clone(), ctl.n_obs.clone()
        plan = ctl.update(torch.tensor([bad, 1.0]))
        assert plan.tolist() == [True, False]  # non-finite triggers even in warm-up
        assert math.isinf(float(ctl.risk[0]))
        assert float(ctl.ema[0]) == float(ema[0]) and int(ctl.n_obs[0]) == int(n_obs[0])
        assert torch.isfinite(ctl.hist[torch.isfinite(ctl.hist)]).all()
        # Later healthy steps see the same baseline as if the bad step never happened.
        ctl.update(torch.tensor([1.0, 1.0]))
        assert float(ctl.mu[0]) == pytest.approx(1.0)


class TestNoUsableHistory:
    def test_zero_norms_in_warmup_do_not_make_a_huge_ratio(self):
        # Unit 0 is frozen (norm 0) for 10 steps, then trains at 1.0. Zero
        # norms are no history: it never gets mu=0 and GNMR ~1e30, so it never
        # takes the only budget slot, and unit 1's x10 spike is admitted.
        ctl = GNMRController(2, GNMRConfig(warmup_steps=5, max_o=1, lock_steps=3))
        for s in range(40):
            ctl.update(torch.tensor([0.0 if s < 10 else 1.0, 1.0]))
            assert float(ctl.gnmr[0]) <= 1.0 + 1e-5
        assert int(ctl.n_triggers[0]) == 0 and int(ctl.n_high_steps[0]) == 0
        assert int(ctl.n_obs[0]) == 30 and float(ctl.mu[0]) == pytest.approx(1.0, rel=1e-5)
        plan = ctl.update(torch.tensor([1.0, 10.0]))
        assert plan.tolist() == [False, True]
        assert int(ctl.n_denied.sum()) == 0

    def test_always_zero_is_not_ready(self):
        ctl = GNMRController(1, GNMRConfig(warmup_steps=0, max_o=1))
        for _ in range(5):
            ctl.update(torch.tensor([0.0]))
        assert int(ctl.n_obs[0]) == 0 and math.isnan(float(ctl.mu[0]))
        # First non-zero norm: no history yet, so no ratio trigger (warm-up 0).
        assert ctl.update(torch.tensor([5.0])).tolist() == [False]
        assert float(ctl.gnmr[0]) == 1.0 and int(ctl.n_triggers[0]) == 0

    def test_gated_unit_keeps_its_active_baseline(self):
        # Used every other step (an MoE expert, a gated branch): zero steps
        # neither drag mu down nor enter the Delta-GNMR history.
        ctl = GNMRController(1, GNMRConfig(warmup_steps=5, max_o=1))
        for s in range(60):
            ctl.update(torch.tensor([1.0 if s % 2 else 0.0]))
        assert int(ctl.n_triggers[0]) == 0
        assert float(ctl.mu[0]) == pytest.approx(1.0, rel=1e-5)
        assert int(ctl.n_obs[0]) == 30

    def test_nonfinite_still_triggers_without_history(self):
        ctl = GNMRController(1, GNMRConfig(warmup_steps=5, max_o=1))
        ctl.update(torch.tensor([0.0]))
        assert ctl.update(torch.tensor([float("nan")])).tolist() == [True]
        assert int(ctl.n_obs[0]) == 0 and float(ctl.ema[0]) == 0.0


class TestMaxLockSteps:
    def test_permanent_shift_is_released_and_relearned(self):
        cfg = GNMRConfig(warmup_steps=5, max_o=1, lock_steps=4, max_lock_steps=12)
        ctl = GNMRController(1, cfg)
        _steady(ctl, 10, noise=0.0)
        plans = [bool(ctl.update(torch.tensor([4.0]))[0]) for _ in range(60)]  # x4 for good
        # High for exactly max_lock_steps steps, then released for good.
        assert plans == [True] * 12 + [False] * 48
        assert int(ctl.n_high_steps[0]) == 12
        assert int(ctl.n_released[0]) == 1
        # 12 locked steps + the step that triggered; after the release mu
        # re-learns the new level in warm-up and the unit stops triggering.
        assert int(ctl.n_triggers[0]) == 13
        assert float(ctl.mu[0]) == pytest.approx(4.0)
        assert int(ctl.streak[0]) == 0

    def test_release_frees_the_budget(self):
        cfg = GNMRConfig(warmup_steps=5, max_o=1, lock_steps=4, max_lock_steps=10)
        ctl = GNMRController(2, cfg)
        _steady(ctl, 10, noise=0.0)
        for _ in range(20):  # unit 0 shifts x4 for good
            ctl.update(torch.tensor([4.0, 1.0]))
        plan = ctl.update(torch.tensor([4.0, 10.0]))  # unit 1 spikes x10
        assert plan.tolist() == [False, True]
        assert int(ctl.n_denied[1]) == 0

    def test_denied_unit_relearns_too(self):
        # max_o=0: never admitted, but triggering for good ends the same way.
        cfg = GNMRConfig(warmup_steps=5, max_o=0, lock_steps=4, max_lock_steps=8)
        ctl = GNMRController(1, cfg)
        _steady(ctl, 10, noise=0.0)
        for _ in range(40):
            ctl.update(torch.tensor([4.0]))
        assert int(ctl.n_triggers[0]) == 9 and int(ctl.n_denied[0]) == 8  # the 9th releases it
        assert int(ctl.n_released[0]) == 1

    def test_transient_spikes_are_not_capped(self):
        # Re-triggers with gaps longer than the lock end the run: never released.
        cfg = GNMRConfig(warmup_steps=5, max_o=1, lock_steps=3, max_lock_steps=5)
        ctl = GNMRController(1, cfg)
        _steady(ctl, 10, noise=0.0)
        for s in range(40):
            ctl.update(torch.tensor([9.0 if s % 8 == 0 else 1.0]))
        assert int(ctl.n_released[0]) == 0 and int(ctl.n_high_steps[0]) == 15


class TestPolicies:
    @pytest.mark.parametrize("policy,expected", [("always_high", True), ("always_low", False)])
    def test_baselines_fix_the_plan(self, policy, expected):
        ctl = GNMRController(3, GNMRConfig(policy=policy, warmup_steps=2, max_o=1))
        assert ctl.plan.tolist() == [expected] * 3
        _steady(ctl, 5)
        plan = ctl.update(torch.tensor([float("nan"), 50.0, 1.0]))
        assert plan.tolist() == [expected] * 3
        # Statistics are still kept, for telemetry and comparison.
        assert ctl.triggered.tolist() == [True, True, False]


class TestHighStart:
    @pytest.mark.parametrize("policy", ["gnmr", "always_low"])
    def test_every_unit_high_for_the_first_steps_then_the_policy(self, policy):
        ctl = GNMRController(4, GNMRConfig(policy=policy, high_start_steps=3, warmup_steps=2, max_o=1))
        plans = [ctl.plan.clone()] + _steady(ctl, 6)
        # Steps 0, 1, 2 run high (the initial plan and the plans of two updates), outside max_o=1.
        assert [bool(p.all()) for p in plans[:3]] == [True] * 3
        assert not any(bool(p.any()) for p in plans[3:])
        assert int(ctl.n_high_steps.sum()) == 4 * 2  # the two plans the updates set
        # The controller learned its history during the start: a spike after it triggers.
        plan = ctl.update(torch.tensor([1.0, 30.0, 1.0, 1.0]))
        assert ctl.triggered.tolist() == [False, True, False, False]
        assert plan.tolist() == ([False, True, False, False] if policy == "gnmr" else [False] * 4)

    def test_units_added_during_the_start_join_it_and_resume_keeps_it(self):
        cfg = GNMRConfig(high_start_steps=4, max_o=1)
        a = GNMRController(["x"], cfg)
        _steady(a, 1)
        a.add_units(["y"])
        assert a.plan.tolist() == [True, True]
        _steady(a, 1)
        b = GNMRController(["x", "y"], cfg)
        b.load_state_dict(a.state_dict())  # step 2 < 4: still high
        assert b.plan.tolist() == [True, True] and b.step == 2
        c = GNMRController(["x", "y"], cfg.replace(high_start_steps=2))
        c.load_state_dict(a.state_dict())  # the live config: the start is over
        assert c.plan.tolist() == [False, False]

    def test_off_by_default(self):
        assert GNMRConfig().high_start_steps == 0
        assert GNMRController(3, GNMRConfig()).plan.tolist() == [False] * 3


class TestCheckpoint:
    def test_state_dict_round_trip_gives_identical_decisions(self):
        cfg = GNMRConfig(warmup_steps=5, max_o=2, lock_steps=3)
        g = torch.Generator().manual_seed(1)
        seq = [torch.rand(6, generator=g).pow(-1.0) for _ in range(80)]  # heavy-tailed
        a = GNMRController(6, cfg)
        for s in seq[:40]:
            a.update(s)
        buf = io.BytesIO()
        torch.save(a.state_dict(), buf)
        plans_a = [a.update(s).clone() for s in seq[40:]]
        b = GNMRController(6, cfg)
        buf.seek(0)
        b.load_state_dict(torch.load(buf, weights_only=True))
        plans_b = [b.update(s).clone() for s in seq[40:]]
        assert all(torch.equal(x, y) for x, y in zip(plans_a, plans_b))
        assert any(p.any() for p in plans_a)  # the sequence really put units on the high path
        assert b.step == a.step == 80

    def test_load_by_name_ignores_order(self):
        cfg = GNMRConfig(warmup_steps=1, max_o=1)
        a = GNMRController(["x", "y"], cfg)
        for _ in range(5):
            a.update(torch.tensor([1.0, 2.0]))
        b = GNMRController(["y", "x", "z"], cfg)
        missing = b.load_state_dict(a.state_dict())
        assert missing == []
        assert float(b.mu[0]) == pytest.approx(2.0) and float(b.mu[1]) == pytest.approx(1.0)
        assert int(b.n_obs[2]) == 0


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


class TestVectorised:
    def test_update_has_no_host_sync_and_constant_op_count(self):
        counts = {}
        for n in (10, 1000):
            ctl = GNMRController(n, GNMRConfig(warmup_steps=2, max_o=0.1))
            _steady(ctl, 5)
            norms = torch.ones(n)
            norms[::7] = 9.0
            with _OpCounter() as mode:
                ctl.update(norms)
            counts[n] = len(mode.ops)
            # _local_scalar_dense is what .item()/bool() on a tensor dispatch to:
            # on a GPU it is a device-to-host sync.
            assert torch.ops.aten._local_scalar_dense.default not in mode.ops
        assert counts[10] == counts[1000], counts


class TestCompiledRule:
    """GNMRConfig(compile_controller=True): the decision rule through Inductor."""

    @staticmethod
    def _sequence(n, steps, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(steps, n, generator=g) + 0.5
        spikes = torch.rand(steps, n, generator=g) < 0.05
        x = torch.where(spikes, x * (2 + 10 * torch.rand(steps, n, generator=g)), x)
        x[torch.rand(steps, n, generator=g) < 0.02] = float("nan")
        x[torch.rand(steps, n, generator=g) < 0.02] = 0.0
        x[torch.rand(steps, n, generator=g) < 0.01] = float("inf")
        return x, torch.rand(steps, n, generator=g) > 0.05

    @pytest.mark.parametrize("kw", [dict(max_o=0.3, warmup_steps=3, lock_steps=4, max_lock_steps=7),
                                    dict(policy="always_low", high_start_steps=3)], ids=["gnmr-fraction", "always_low"])
    def test_same_decisions_as_the_eager_rule_and_no_recompile(self, kw):
        from torch._dynamo.utils import counters

        n, steps = 9, 60
        costs = torch.linspace(1.0, 3.0, n)
        x, obs = self._sequence(n, steps, seed=1)
        eager = GNMRController(n, GNMRConfig(**kw), costs=costs)
        comp = GNMRController(n, GNMRConfig(**kw, compile_controller=True), costs=costs)
        pins = torch.zeros(n, dtype=torch.bool)
        pins[[2, 5]] = True
        graphs = None
        for t in range(steps):
            if t == 20:
                eager.pin(pins)
                comp.pin(pins)
            assert torch.equal(eager.update(x[t], observed=obs[t]), comp.update(x[t], observed=obs[t])), t
            if t == 0:
                graphs = counters["stats"]["unique_graphs"]
        assert counters["stats"]["unique_graphs"] == graphs, "the compiled rule recompiled as the plan changed"
        a, b = eager.state_dict(), comp.state_dict()
        assert a["step"] == b["step"] == steps
        for key in a:
            if key in ("names", "step"):
                continue
            if a[key].is_floating_point():  # Inductor may round a quotient's last bit differently
                torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=0.0, equal_nan=True, msg=key)
            else:
                assert torch.equal(a[key], b[key]), key
        if kw.get("policy", "gnmr") == "gnmr":
            assert int(a["n_triggers"].sum()) > 10 and bool(a["plan"].any()) and int(a["n_denied"].sum()) > 0

    def test_recompile_limit_falls_back_to_the_eager_rule_loudly(self, monkeypatch):
        import importlib

        ctl_mod = importlib.import_module("gnmr_fx.controller")
        monkeypatch.setattr(ctl_mod, "_compiled_rule_failed", False)
        torch._dynamo.reset()
        norms = torch.tensor([1.0, 1.0, 9.0, 1.0])
        with torch._dynamo.config.patch(recompile_limit=1):
            first = GNMRController(4, GNMRConfig(warmup_steps=0, max_o=1, compile_controller=True))
            first.update(torch.ones(4))  # compiles the one variant allowed
            other = GNMRController(4, GNMRConfig(warmup_steps=0, max_o=0.5, compile_controller=True))
            eager = GNMRController(4, GNMRConfig(warmup_steps=0, max_o=0.5))
            with pytest.warns(UserWarning, match="compile_controller=True, but torch._dynamo refused"):
                other.update(torch.ones(4))  # a second variant (a FLOP budget): refused
            assert ctl_mod._compiled_rule_failed
            eager.update(torch.ones(4))
            plan = other.update(norms)
            assert torch.equal(plan, eager.update(norms)) and plan.tolist() == [False, False, True, False]
        torch._dynamo.reset()

    def test_compiled_rule_is_few_ops(self):
        # What the flag is for: the rule's ~80 dispatched ops become one
        # compiled call (its kernels are not ATen dispatches).
        counts = {}
        for compiled in (False, True):
            ctl = GNMRController(6, GNMRConfig(warmup_steps=2, max_o=2, compile_controller=compiled))
            _steady(ctl, 3)
            ctl.update(torch.ones(6))  # compiled before the count
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                ctl.update(torch.ones(6))
            counts[compiled] = sum(e.name.startswith("aten::") for e in prof.events())
        assert counts[False] > 60 and counts[True] < counts[False] / 3, counts


class TestConfig:
    @pytest.mark.parametrize(
        "field,value",
        [
            ("threshold", 1.0),
            ("threshold", float("nan")),
            ("delta_threshold", 0.0),
            ("delta_window", 0),
            ("beta", 1.0),
            ("beta", 0.0),
            ("warmup_steps", -1),
            ("lock_steps", 0),
            ("max_o", -1),
            ("max_o", 1.5),
            ("max_o", True),
            ("policy", "sometimes"),
            ("high_path", "fp16"),
            ("log_every", 0),
            ("max_lock_steps", 0),
            ("max_lock_steps", 2.5),
            ("max_lock_steps", True),
        ],
    )
    def test_bad_values_name_the_field(self, field, value):
        with pytest.raises(ValueError, match=f"GNMRConfig.{field}"):
            GNMRConfig(**{field: value})

    def test_unknown_recipe_lists_known(self):
        with pytest.raises(ValueError, match=r"unknown recipe 'fp7'.*fp8_e4m3"):
            GNMRConfig(recipe="fp7")

    def test_bare_string_filter_rejected(self):
        with pytest.raises(ValueError, match="not a bare string"):
            GNMRConfig(unit_filter="blocks.*")

    def test_unknown_option(self):
        with pytest.raises(ValueError, match="unknown GNMR option"):
            GNMRConfig.from_options({"treshold": 2.0})


def test_infinities_stay_infinite():
    ctl = GNMRController(2, GNMRConfig(warmup_steps=1, max_o=2))
    ctl.update(torch.tensor([1.0, 1.0]))
    assert float(ctl.delta_gnmr[0]) == float("-inf")  # first step: no history, no jump
    ctl.update(torch.tensor([float("inf"), 1.0]))
    assert float(ctl.gnmr[0]) == float("inf") and float(ctl.delta_gnmr[0]) == float("inf")


def test_runtime_reset_controller_keeps_graphs():
    import gnmr_fx
    from gnmr_fx.models import GPTConfig, TinyGPT

    model = TinyGPT(GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=16))
    idx = torch.randint(0, 256, (2, 8))
    m = gnmr_fx.compile(model, GNMRConfig(recipe="int8"), backend="eager", example_inputs=(idx,))
    rt = gnmr_fx.runtime(m)
    ctl = rt.reset_controller(GNMRConfig(recipe="int8", policy="always_high"))
    assert ctl is gnmr_fx.controller(m) and ctl.names == rt.unit_names
    assert all(bool(r.plan.all()) for r in rt.records)  # the new policy's plan reached the graphs
    with pytest.raises(ValueError, match=r"cannot change \['recipe'\]"):
        rt.reset_controller(GNMRConfig(recipe="int4"))


def _tiny_runtime(config, seed=0):
    import gnmr_fx
    from gnmr_fx.models import GPTConfig, TinyGPT

    torch.manual_seed(seed)
    model = TinyGPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cm = gnmr_fx.compile(model, config, backend="eager", optimizer=opt)
    return cm, opt, gnmr_fx.runtime(cm)


def _train_steps(cm, opt, rt, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    seen = []
    for i in range(n):
        idx = torch.randint(0, 256, (2, 16), generator=g)
        loss = cm(idx, idx) * (20.0 if i == 6 else 1.0)  # a spike: some units trigger
        loss.backward()
        opt.step()
        opt.zero_grad()
        ctl = rt.controller
        seen.append((ctl.plan.clone(), ctl.norm.clone(), ctl.n_triggers.clone(), ctl.n_denied.clone(),
                     ctl.n_high_steps.clone(), [r.plan.clone() for r in rt.records]))
    return seen


def test_runtime_step_whole_graph_fast_path_same_as_gather(monkeypatch):
    # A model captured as one graph holding every unit in controller order:
    # the step takes its probe gradient as the statistic vector (no gather)
    # and writes the plan without indexing. Same norms, plans and counters
    # as the general gather / scatter path over steps with triggers.
    from gnmr_fx.runtime import GraphRecord

    cfg = GNMRConfig(recipe="int8", warmup_steps=3, max_o=2)
    cm, opt, rt = _tiny_runtime(cfg)
    fast = _train_steps(cm, opt, rt, 12)
    assert len(rt.records) == 1 and rt.records[0].is_whole_plan(rt.controller.num_units)
    assert int(rt.controller.n_triggers.sum()) > 0
    monkeypatch.setattr(GraphRecord, "is_whole_plan", lambda self, n: False)
    cm, opt, rt = _tiny_runtime(cfg)
    slow = _train_steps(cm, opt, rt, 12)
    for a, b in zip(fast, slow):
        for x, y in zip(a[:5], b[:5]):
            assert torch.equal(x, y)
        assert all(torch.equal(p, q) for p, q in zip(a[5], b[5]))


def test_runtime_step_with_the_compiled_rule_is_few_ops():
    # What a GPU step launches besides the model: with the rule compiled, the
    # runtime's own step (statistics, update, plan write) is about ten ATen
    # ops whatever the unit count, against ~140 with the eager rule
    # (python -m benchmarks.step_ops prints these counts).
    from benchmarks.step_ops import runtime_step_ops

    counts = {compiled: runtime_step_ops(compiled)[1] for compiled in (False, True)}
    assert counts[False] > 100 and counts[True] <= 14, counts
    torch._dynamo.reset()
