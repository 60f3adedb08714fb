"""Resume: GNMR state is checked against the live config and units at load time."""

import io
import json
import re
import warnings

import pytest
import torch
import torch.nn as nn

import gnmr_fx
from gnmr_fx import GNMRConfig, GNMRController

UNITS = ["0", "2", "4", "6"]


def _round_trip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ------------------------------------------------------------- controller
def _spiked(costs=None, max_o=3):
    """5 units after a spike on units 0, 1, 2, 4 (risk order 1, 4, 2, 0)."""
    ctl = GNMRController(5, GNMRConfig(warmup_steps=5, max_o=max_o, lock_steps=5), costs=costs)
    for _ in range(10):
        ctl.update(torch.ones(5))
    ctl.update(torch.tensor([4.0, 12.0, 6.0, 1.0, 9.0]))
    return ctl


class TestControllerResume:
    def test_locks_trimmed_by_risk_to_an_int_budget(self):
        a = _spiked(max_o=3)
        assert a.plan.tolist() == [False, True, True, False, True]
        b = GNMRController(5, GNMRConfig(warmup_steps=5, max_o=1, lock_steps=5))
        with pytest.warns(UserWarning, match=r"released \['unit4', 'unit2'\]"):
            b.load_state_dict(_round_trip(a.state_dict()))
        assert b.plan.tolist() == [False, True, False, False, False]
        assert b.lock.tolist() == [0, 5, 0, 0, 0]
        assert b.streak.tolist() == [1, 1, 0, 0, 0]  # unit 0 triggered (denied): its streak stays
        plans = [b.update(torch.ones(5)).tolist() for _ in range(5)]
        assert plans == [[False, True, False, False, False]] * 4 + [[False] * 5]

    def test_locks_trimmed_to_a_flop_fraction(self):
        costs = [10.0, 30.0, 20.0, 20.0, 20.0]
        a = _spiked(costs=costs, max_o=0.7)
        assert a.plan.tolist() == [False, True, True, False, True]  # 70 of 100
        b = GNMRController(5, GNMRConfig(warmup_steps=5, max_o=0.5, lock_steps=5), costs=costs)
        with pytest.warns(UserWarning, match=r"released \['unit2'\]"):
            b.load_state_dict(a.state_dict())
        assert b.plan.tolist() == [False, True, False, False, True]
        assert float(b.budget_used()) == 50.0

    @pytest.mark.parametrize("policy,expected", [("always_low", False), ("always_high", True)])
    def test_baseline_policy_plan_from_the_load_on(self, policy, expected):
        a = _spiked()
        b = GNMRController(5, GNMRConfig(warmup_steps=5, max_o=3, lock_steps=5, policy=policy))
        b.load_state_dict(a.state_dict())
        assert b.plan.tolist() == [expected] * 5
        assert b.lock.tolist() == [0] * 5

    def test_strict_lists_unknown_and_missing_units(self):
        a = GNMRController(["x", "y"], GNMRConfig())
        b = GNMRController(["y", "z"], GNMRConfig())
        with pytest.raises(ValueError, match=r"not in this model: \['x'\].*not in the checkpoint: \['z'\]"):
            b.load_state_dict(a.state_dict(), strict=True)
        assert b.load_state_dict(a.state_dict()) == ["x"]  # lenient by default

    @pytest.mark.parametrize(
        "key,value,match",
        [
            ("ema", float("nan"), r"ema must be finite and >= 0"),
            ("ema", -1.0, r"ema must be finite and >= 0"),
            ("lock", 1_000_000, r"lock must be in \[0, 5\] \(GNMRConfig.lock_steps"),
            ("lock", -1, r"lock must be in \[0, 5\]"),
            ("n_obs", -1, r"n_obs must be >= 0"),
            ("n_denied", 10**6, r"n_denied must be <= n_triggers"),
            ("streak", 10**6, r"streak must be in \[0, 50\] \(GNMRConfig.max_lock_steps\)"),
            ("hist", float("nan"), r"hist must be >= 0 or \+inf"),
            ("risk", float("nan"), r"risk must be >= 0"),
            ("costs", 0.0, r"costs must be finite and > 0"),
            ("n_triggers", -3, r"n_triggers must be >= 0"),
        ],
    )
    def test_bad_values_are_rejected_naming_the_key(self, key, value, match):
        sd = _spiked().state_dict()
        sd[key][..., 0] = value
        b = GNMRController(5, GNMRConfig(warmup_steps=5, max_o=3, lock_steps=5))
        before = b.state_dict()
        with pytest.raises(ValueError, match=match):
            b.load_state_dict(sd)
        after = b.state_dict()
        for k in before:
            if isinstance(before[k], torch.Tensor):
                torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, equal_nan=True)
        assert b.step == 0  # nothing was applied

    @pytest.mark.parametrize(
        "mutate,match",
        [
            (lambda sd: sd.update(ema=sd["ema"].double()), r"ema must be a torch.float32 tensor of shape \(5,\)"),
            (lambda sd: sd.update(lock=sd["lock"][:3]), r"lock must be a torch.int64 tensor of shape \(5,\).*\(3,\)"),
            (lambda sd: sd.update(plan=sd["plan"].float()), r"plan must be a torch.bool tensor"),
            (lambda sd: sd.update(hist=sd["hist"][:2]), r"hist must be a torch.float32 tensor of shape \(3, 5\)"),
            (lambda sd: sd.update(ema=[0.0] * 5), r"ema must be a torch.float32 tensor.*got list"),
            (lambda sd: sd.pop("lock"), r"missing lock"),
            (lambda sd: sd.update(step=-1), r"step must be an int >= 0"),
            (lambda sd: sd.update(names=["a", "a", "b", "c", "d"]), r"names must be a list of distinct str"),
        ],
    )
    def test_malformed_entries_are_rejected(self, mutate, match):
        sd = _spiked().state_dict()
        mutate(sd)
        with pytest.raises(ValueError, match=match):
            GNMRController(5, GNMRConfig(warmup_steps=5, max_o=3, lock_steps=5)).load_state_dict(sd)


# ---------------------------------------------------------------- runtime
def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))


def _batch(s):
    g = torch.Generator().manual_seed(s)
    return torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)


def _compiled(cfg, seed=0):
    model = _mlp(seed)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    return model, opt, gnmr_fx.compile(model, cfg, backend="eager", optimizer=opt)


def _step(m, opt, s, scale=1.0):
    x, y = _batch(s)
    (nn.functional.mse_loss(m(x), y) * scale).backward()
    opt.step()
    opt.zero_grad()


CFG = GNMRConfig(recipe="int8", warmup_steps=2, max_o=3, lock_steps=5)


@pytest.fixture(scope="module")
def saved():
    """A checkpoint taken right after a loss spike: 3 units locked (max_o=3)."""
    torch._dynamo.reset()
    model, opt, m = _compiled(CFG)
    for s in range(4):
        _step(m, opt, s)
    _step(m, opt, 4, scale=30.0)  # every unit triggers; 3 fit the budget
    ctl = gnmr_fx.controller(m)
    assert ctl.names == UNITS and int(ctl.plan.sum()) == 3 and int(ctl.n_denied.sum()) == 1
    top = max(range(4), key=lambda i: float(ctl.risk[i]) if ctl.plan[i] else -1.0)
    sd = _round_trip(m.state_dict())
    torch._dynamo.reset()
    return sd, top, ctl.plan.tolist()


def _graph_plans(rt):
    return [rec.plan.tolist() for rec in rt.records if rec.plan is not None]


class TestRuntimeResume:
    @pytest.mark.parametrize("run_first", [False, True], ids=["load_then_run", "run_then_load"])
    def test_smaller_budget_trims_locks_in_the_graphs(self, saved, run_first):
        sd, top, _ = saved
        model, opt, m = _compiled(CFG.replace(max_o=1), seed=1)
        rt = gnmr_fx.runtime(m)
        if run_first:
            m(_batch(0)[0])
        released = [UNITS[i] for i in range(4) if saved[2][i] and i != top]
        with pytest.warns(UserWarning, match=re.escape(f"released {released}")):
            m.load_state_dict(sd)
        x, y = _batch(5)
        loss = nn.functional.mse_loss(m(x), y)  # the first step after load
        expected = [i == top for i in range(4)]
        assert rt.controller.plan.tolist() == expected
        assert _graph_plans(rt) == [expected]  # what that first step ran
        assert float(rt.controller.budget_used()) == 1.0
        loss.backward()
        opt.step()
        assert int(rt.controller.plan.sum()) <= 1

    @pytest.mark.parametrize("policy,expected", [("always_low", False), ("always_high", True)])
    @pytest.mark.parametrize("run_first", [False, True], ids=["load_then_run", "run_then_load"])
    def test_baseline_policy_plan_reaches_the_graphs(self, saved, policy, expected, run_first):
        sd, _, saved_plan = saved
        assert saved_plan.count(True) == 3
        model, opt, m = _compiled(CFG.replace(policy=policy), seed=1)
        rt = gnmr_fx.runtime(m)
        if run_first:
            m(_batch(0)[0])
        m.load_state_dict(sd)
        x, y = _batch(5)
        loss = nn.functional.mse_loss(m(x), y)
        assert _graph_plans(rt) == [[expected] * 4]  # the first forward after load
        loss.backward()
        opt.step()
        assert _graph_plans(rt) == [[expected] * 4]

    def test_host_plan_copies_follow_the_live_policy(self, saved):
        sd, _, _ = saved
        cfg = CFG.replace(recipe="fp8_e4m3", emulate=False, policy="always_low")  # CPU _scaled_mm
        model, opt, m = _compiled(cfg, seed=1)
        rt = gnmr_fx.runtime(m)
        m(_batch(0)[0])
        rec = rt.records[0]
        assert rec.plan_host is not None
        m.load_state_dict(sd)
        assert rec.plan_host.tolist() == [False] * 4 and rec.plan.tolist() == [False] * 4

    def test_exact_resume_is_bit_for_bit(self, saved):
        sd, _, saved_plan = saved
        model, opt, m = _compiled(CFG, seed=1)
        m.load_state_dict(sd)
        m(_batch(5)[0])
        assert gnmr_fx.controller(m).plan.tolist() == saved_plan
        assert _graph_plans(gnmr_fx.runtime(m)) == [saved_plan]

    @pytest.mark.parametrize(
        "key,mutate,match",
        [
            ("ema", lambda t: t.fill_(float("nan")), r"_gnmr\.ema must be finite"),
            ("ema", lambda t: t.fill_(-2.0), r"_gnmr\.ema must be finite and >= 0"),
            ("lock", lambda t: t.fill_(1_000_000), r"_gnmr\.lock must be in \[0, 5\]"),
            ("n_obs", lambda t: t.fill_(-1), r"_gnmr\.n_obs must be >= 0"),
            ("hist", lambda t: t.fill_(-1.0), r"_gnmr\.hist must be >= 0"),
            ("ema", lambda t: t.double(), r"_gnmr\.ema must be a torch\.float32 tensor of shape \(4,\)"),
            ("ema", lambda t: t[:2].clone(), r"_gnmr\.ema must be a torch\.float32 tensor of shape \(4,\).*\(2,\)"),
            ("names", lambda t: torch.tensor([0xFF, 0xFE, 0x5B], dtype=torch.uint8), r"_gnmr\.names is not UTF-8"),
            ("names", lambda t: torch.tensor(list(b'{"a": 1}'), dtype=torch.uint8),
             r"_gnmr\.names must be a JSON list of distinct unit names"),
            ("names", lambda t: t.float(), r"_gnmr\.names must be a 1-D torch\.uint8 tensor"),
            ("step", lambda t: torch.tensor(2.5), r"_gnmr\.step must be a 0-d integer tensor"),
            ("lock", None, r"missing _orig_mod\._gnmr\.lock"),
        ],
    )
    def test_bad_state_raises_at_load_naming_the_key(self, saved, key, mutate, match):
        sd = {k: v.clone() for k, v in saved[0].items()}
        full = "_orig_mod._gnmr." + key
        if mutate is None:
            del sd[full]
        else:
            sd[full] = mutate(sd[full])
        model, opt, m = _compiled(CFG, seed=1)
        with pytest.raises(ValueError, match=match):
            m.load_state_dict(sd)  # at load, before any unit exists: not later inside the compiler
        # Nothing was applied: the model still compiles and trains from a fresh controller.
        _step(m, opt, 0)
        assert gnmr_fx.controller(m).step == 1

    def test_unexpected_key_is_rejected(self, saved):
        sd = dict(saved[0])
        sd["_orig_mod._gnmr.bogus"] = torch.zeros(4)
        model, opt, m = _compiled(CFG, seed=1)
        with pytest.raises(ValueError, match=r"unexpected _orig_mod\._gnmr\.bogus"):
            m.load_state_dict(sd)
        gnmr_fx.runtime(m).set_strict_load(False)
        m.load_state_dict(sd)

    def test_unknown_units_listed_at_load(self, saved):
        # The live model has only units 0 and 2 (a unit filter): the checkpoint's 4 and 6 are unknown.
        model, opt, m = _compiled(CFG.replace(unit_filter=["0", "2"]), seed=1)
        m(_batch(0)[0])
        ctl = gnmr_fx.controller(m)
        with pytest.raises(ValueError, match=r"not in this model: \['4', '6'\].*not in the checkpoint: \[\]"):
            m.load_state_dict(saved[0])
        assert ctl.step == 0
        gnmr_fx.runtime(m).set_strict_load(False)  # torch passes hooks no strict flag: GNMR has its own
        m.load_state_dict(saved[0])
        assert ctl.step == 5 and ctl.names == ["0", "2"]
        assert ctl.n_obs.tolist() == saved[0]["_orig_mod._gnmr.n_obs"][:2].tolist()

    def test_unknown_units_listed_at_the_first_step_when_loaded_before_any_run(self, saved):
        model, opt, m = _compiled(CFG.replace(unit_filter=["0", "2"]), seed=1)
        m.load_state_dict(saved[0])  # no unit exists yet: the names are checked at the first step
        x, y = _batch(5)
        nn.functional.mse_loss(m(x), y).backward()
        with pytest.raises(ValueError, match=r"not in this model: \['4', '6'\]"):
            opt.step()

    def test_missing_units_listed(self, saved):
        sd = dict(saved[0])
        _, _, m_small = _compiled(CFG.replace(unit_filter=["0"]), seed=2)
        m_small(_batch(0)[0])
        small = _round_trip(m_small.state_dict())
        assert json.loads(bytes(small["_orig_mod._gnmr.names"].tolist())) == ["0"]
        for k in [k for k in sd if "._gnmr." in k]:
            sd[k] = small[k]
        model, opt, m = _compiled(CFG, seed=1)
        m(_batch(0)[0])
        with pytest.raises(ValueError, match=r"not in the checkpoint: \['2', '4', '6'\]"):
            m.load_state_dict(sd)


class _TwoGraphs(nn.Module):
    def __init__(self):
        super().__init__()
        self.l0, self.l1, self.l2, self.l3 = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        x = self.l1(torch.relu(self.l0(x)))
        torch._dynamo.graph_break()
        return self.l3(torch.relu(self.l2(x)))


def test_budget_is_reapplied_over_all_graphs_whatever_their_compile_order():
    # Locks on l0, l1 (first graph) and l3 (second graph), by risk l0 > l1 > l3.
    # Loaded before the first forward under max_o=0.5 (two of the four equal
    # units): the first graph's units join first, when half of their FLOPs
    # is one unit, yet the budget over all units keeps l0 and l1.
    torch.manual_seed(0)
    a = _TwoGraphs()
    opt = torch.optim.SGD(a.parameters(), lr=1e-2)
    ma = gnmr_fx.compile(a, CFG, backend="eager", optimizer=opt)
    for s in range(5):
        _step(ma, opt, s)
    sd = _round_trip(ma.state_dict())
    assert json.loads(bytes(sd["_orig_mod._gnmr.names"].tolist())) == ["l0", "l1", "l2", "l3"]
    sd["_orig_mod._gnmr.lock"] = torch.tensor([5, 5, 0, 5])
    sd["_orig_mod._gnmr.streak"] = torch.tensor([1, 1, 0, 1])
    sd["_orig_mod._gnmr.risk"] = torch.tensor([3.0, 2.0, 0.0, 1.0])

    torch.manual_seed(1)
    b = _TwoGraphs()
    opt_b = torch.optim.SGD(b.parameters(), lr=1e-2)
    mb = gnmr_fx.compile(b, CFG.replace(max_o=0.5), backend="eager", optimizer=opt_b)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        mb.load_state_dict(sd)
        x, y = _batch(5)
        loss = nn.functional.mse_loss(mb(x), y)
        rt = gnmr_fx.runtime(mb)
        assert len(rt.records) == 2
        assert rt.controller.plan.tolist() == [True, True, False, False]
        assert _graph_plans(rt) == [[True, True], [False, False]]
        loss.backward()  # the first graph's plan did not change after it ran
        opt_b.step()
    assert [str(w.message) for w in seen if "GNMR" in str(w.message)] == [
        "GNMR resume: the checkpoint's locks exceed the budget max_o=0.5; released ['l3'] "
        "(the highest-risk locks that fit are kept)"]


def test_host_plans_of_a_graph_that_ran_are_left_alone_when_the_next_graph_joins():
    # Real-kernel units (CPU _scaled_mm) save their host plan for backward:
    # the second graph joining mid-forward must not rewrite the first's.
    cfg = CFG.replace(recipe="fp8_e4m3", emulate=False)
    torch.manual_seed(0)
    a = _TwoGraphs()
    opt = torch.optim.SGD(a.parameters(), lr=1e-2)
    ma = gnmr_fx.compile(a, cfg, backend="eager", optimizer=opt)
    for s in range(5):
        _step(ma, opt, s)
    sd = _round_trip(ma.state_dict())
    sd["_orig_mod._gnmr.lock"] = torch.tensor([5, 0, 0, 5])
    sd["_orig_mod._gnmr.streak"] = torch.tensor([1, 0, 0, 1])

    torch.manual_seed(1)
    b = _TwoGraphs()
    opt_b = torch.optim.SGD(b.parameters(), lr=1e-2)
    mb = gnmr_fx.compile(b, cfg, backend="eager", optimizer=opt_b)
    mb.load_state_dict(sd)
    x, y = _batch(5)
    loss = nn.functional.mse_loss(mb(x), y)
    rt = gnmr_fx.runtime(mb)
    assert [r.plan_host.tolist() for r in rt.records] == [[True, False], [False, True]]
    loss.backward()
    opt_b.step()
    assert rt.controller.step == 6


# ------------------------------------------------------------------- pins
def test_pins_resume_by_name_and_hold_budget_before_locks():
    """Pins are controller state: saved, restored by unit name (another unit order), checked
    at load; under a smaller budget the pinned unit keeps its place and locks fit in the rest."""
    a = _spiked(max_o=3)  # locks on units 1, 4, 2 (risk order)
    a.pin(torch.tensor([True, False, False, False, False]))
    sd = _round_trip(a.state_dict())
    assert sd["pinned"].tolist() == [True, False, False, False, False]
    names = ["unit4", "unit3", "unit2", "unit1", "unit0"]
    b = GNMRController(names, GNMRConfig(warmup_steps=5, max_o=2, lock_steps=5))
    with pytest.warns(UserWarning, match=r"released \['unit4', 'unit2'\]"):
        b.load_state_dict(sd)  # budget 2: the pin holds one, the riskiest lock (unit1) the other
    assert b.pinned.tolist() == [False, False, False, False, True]
    assert b.plan.tolist() == [False, False, False, True, True]
    b.update(torch.ones(5))
    assert bool(b.plan[4]) and float(b.budget_used()) <= 2.0
    bad = dict(sd, pinned=sd["pinned"].long())
    with pytest.raises(ValueError, match=r"pinned must be a torch\.bool tensor of shape \(5,\)"):
        GNMRController(5, GNMRConfig(warmup_steps=5, max_o=3, lock_steps=5)).load_state_dict(bad)


def test_a_checkpoint_saved_before_pins_were_state_loads_and_keeps_the_live_pins():
    a = _spiked(max_o=3)
    sd = {k: v for k, v in _round_trip(a.state_dict()).items() if k != "pinned"}
    b = GNMRController(5, GNMRConfig(warmup_steps=5, max_o=3, lock_steps=5))
    b.pin(torch.tensor([False, False, False, True, False]))
    with pytest.warns(UserWarning, match=r"released \['unit2'\]"):
        b.load_state_dict(sd)  # budget 3: the live pin holds one, the two riskiest locks the rest
    assert b.pinned.tolist() == [False, False, False, True, False]
    assert b.step == a.step and b.lock.tolist() == [0, 5, 0, 0, 5] and a.lock.tolist() == [0, 5, 5, 0, 5]


def test_model_state_dict_carries_the_pins_through_weights_only_load():
    torch._dynamo.reset()
    model, opt, m = _compiled(CFG)
    for s in range(3):
        _step(m, opt, s)
    gnmr_fx.runtime(m).pin(torch.tensor([False, True, False, False]))
    sd = _round_trip(m.state_dict())
    assert sd["_orig_mod._gnmr.pinned"].tolist() == [False, True, False, False]
    torch._dynamo.reset()
    model2, opt2, m2 = _compiled(CFG, seed=1)
    m2.load_state_dict(sd)
    m2(_batch(5)[0])
    ctl = gnmr_fx.controller(m2)
    assert ctl.pinned.tolist() == [False, True, False, False] and bool(ctl.plan[1])
    assert _graph_plans(gnmr_fx.runtime(m2))[0][1] is True


def test_pins_that_leave_no_room_for_another_unit_say_so():
    """Pins hold budget: when they leave less than the cheapest other unit, GNMR can move no
    unit high, and pin() warns instead of leaving the controller silently idle."""
    c = GNMRController(3, GNMRConfig(max_o=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c.pin(torch.tensor([False, True, False]))  # one unit of room left: quiet
    with pytest.warns(UserWarning, match=r"2 pinned unit\(s\) hold 2 of the budget max_o=2.*cannot move any unit"):
        c.pin(torch.tensor([True, True, False]))
    f = GNMRController(3, GNMRConfig(max_o=0.5), costs=[6.0, 2.0, 2.0])
    with pytest.warns(UserWarning, match="cannot move any unit high"):
        f.pin(torch.tensor([True, False, False]))  # 6 of 10 FLOPs pinned: over the 5 allowed
