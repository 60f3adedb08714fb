"""Smoke test of the stability benchmark harness (tiny model, a few steps).

Checks the JSON schema, that the cost columns are computed from the plans
the compiled graphs actually ran, and the detection scoring on a known case.
"""

import argparse
import doctest
import json
import math
import pathlib
import re

import pytest
import torch

from gnmr_fx.benchmarks import arms, data, stability
from gnmr_fx.arguments import InputError

RUN_KEYS = {"scenario", "arm", "seed", "steps", "lr", "train_loss", "val", "wall_s", "plans", "final_val",
            "best_val", "final_train", "spikes", "diverged", "high_unit_steps_pct", "flop_high_pct", "triggers"}
SUMMARY_KEYS = {"arm", "seeds", "final_val", "best_val", "gap_pct", "spikes", "high_unit_steps_pct",
                "flop_high_pct", "wall_s", "diverged"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("stability")
    parser = argparse.ArgumentParser()
    stability.add_arguments(parser)
    args = parser.parse_args(["--preset", "smoke", "--scenarios", "a", "--seeds", "0",
                              "--arms", "always_high", "static@2", "gnmr@1", "--out", str(out)])
    assert stability.run(args) == 0
    return out, json.loads((out / "results.json").read_text())


def test_schema_and_outputs(smoke):
    out, doc = smoke
    assert {"command", "preset", "seeds", "arms", "machine", "date_utc", "corpus", "definitions"} <= set(doc["meta"])
    assert doc["meta"]["corpus"]["bytes"] == {"train": 50_000, "tune": 5_000, "val": 5_000}
    sc = doc["scenarios"]["a"]
    assert sc["config"]["recipe"] == "int4"
    n = len(sc["units"])
    assert n == 7 and len(sc["costs"]) == n  # 1 block: 6 units + head
    assert [r["arm"] for r in sc["runs"]] == ["always_high", "static@2", "gnmr@1"]
    for r in sc["runs"]:
        assert RUN_KEYS <= set(r), RUN_KEYS - set(r)
        assert r["steps"] == 6 and len(r["train_loss"]) == 6 and len(r["plans"]) == 6
        assert [s for s, _ in r["val"]] == [3, 6]
        assert all(math.isfinite(v) for v in r["train_loss"])
    assert [row["arm"] for row in sc["summary"]] == ["always_high", "static@2", "gnmr@1"]
    for row in sc["summary"]:
        assert SUMMARY_KEYS <= set(row)
    assert sc["summary"][0]["gap_pct"] == [0.0, 0.0]
    for name in ("tables.md", "loss_a.png", "frontier.png"):
        assert (out / name).stat().st_size > 0


def test_cost_columns_come_from_the_actual_plans(smoke):
    _, doc = smoke
    sc = doc["scenarios"]["a"]
    costs = torch.tensor(sc["costs"])
    n = len(sc["units"])
    by_arm = {r["arm"]: r for r in sc["runs"]}
    # The plans read out of the graphs are what each arm prescribes.
    assert all(p == list(range(n)) for p in by_arm["always_high"]["plans"])
    assert all(p == [0, n - 1] for p in by_arm["static@2"]["plans"])
    assert all(len(p) <= 1 for p in by_arm["gnmr@1"]["plans"])
    for r in sc["runs"]:
        plans = torch.zeros(len(r["plans"]), n, dtype=torch.bool)
        for t, high in enumerate(r["plans"]):
            plans[t, high] = True
        unit_pct = 100.0 * plans.float().mean().item()
        flop_pct = 100.0 * (plans.float() @ costs).sum().item() / (len(r["plans"]) * costs.sum().item())
        assert r["high_unit_steps_pct"] == pytest.approx(unit_pct, abs=1e-9)
        assert r["flop_high_pct"] == pytest.approx(flop_pct, rel=1e-6)
    static = next(row for row in sc["summary"] if row["arm"] == "static@2")
    assert static["high_unit_steps_pct"][0] == pytest.approx(200.0 / n)
    assert static["flop_high_pct"][0] == pytest.approx(100.0 * (costs[0] + costs[-1]).item() / costs.sum().item(),
                                                       rel=1e-6)


def test_detection_scoring():
    names = ["blocks.0.qkv", "blocks.0.fc", "blocks.1.fc", "head"]
    trig = torch.zeros(30, 4, dtype=torch.bool)
    trig[11, 1] = True  # outlier at 10 on blocks.0.fc, seen one step late
    trig[10, 2] = True  # downstream of the outlier: chain-rule explained, a strict false positive
    trig[10, 0] = True  # upstream of the outlier: a false positive under both rules
    trig[20, 0] = True  # upstream of the grad blow-up at 20: explained
    trig[25, 3] = True  # nothing happened at 25: a false positive on a clean step
    # the grad blow-up at 20 on blocks.1.fc itself is missed
    events = [(10, "blocks.0.fc", "outlier"), (20, "blocks.1.fc", "grad_blowup")]
    d = stability.detection_metrics(events, trig, names, warmup=5)
    assert d["faults"] == 2 and d["detected"] == 1 and d["recall"] == 0.5
    assert d["recall_by_kind"] == {"outlier": 1.0, "grad_blowup": 0.0}
    assert d["latency"] == 1.0
    assert d["unit_steps"] == 4 * 25
    assert d["false_positives"] == 2 and d["fp_per_1k"] == 20.0
    assert d["fp_strict_per_1k"] == 40.0
    assert d["fp_clean_per_1k"] == pytest.approx(1000.0 / (4 * 21))


def test_arms_and_budgets():
    assert arms.parse_arm("gnmr@5%").budget == 0.05
    assert arms.parse_arm("random@2") == arms.ArmSpec("random@2", "random", 2)
    costs = torch.tensor([4.0, 1.0, 1.0, 4.0])
    assert arms.budget_units(0.25, costs) == 2  # 25% of 10 FLOPs buys the two cheap units
    assert arms.StaticPlan(5, 3).plan.tolist() == [True, True, False, False, True]
    rnd = arms.RandomPlan(6, 2, lock_steps=3, seed=0)
    held = [rnd.plan.clone()]
    for _ in range(6):
        rnd._draw()
        held.append(rnd.plan.clone())
    assert all(int(p.sum()) == 2 for p in held)  # always exactly the budget
    assert torch.equal(held[0], held[1]) and torch.equal(held[0], held[2])  # locked for 3 steps
    # A unit-count budget draws from the generator only when a slot is free (older results' draws).
    rnd = arms.RandomPlan(6, 2, lock_steps=3, seed=0)
    state = rnd.gen.get_state()
    rnd._draw()  # both slots still locked
    assert torch.equal(rnd.gen.get_state(), state)
    # A FLOP fraction is a FLOP cap (40% of 12 FLOPs), filled to within one unit of it.
    costs6 = torch.tensor([4.0, 1.0, 1.0, 4.0, 1.0, 1.0])
    rnd = arms.RandomPlan(6, 0.4, lock_steps=2, seed=1, costs=costs6)
    spent = []
    for _ in range(40):
        rnd._draw()
        spent.append(float(costs6[rnd.plan].sum()))
    assert max(spent) <= 4.8 + 1e-9 and min(spent) >= 4.0 - 1e-9  # full but never over the cap
    with pytest.raises(ValueError, match="costs"):
        arms.RandomPlan(6, 0.4, lock_steps=2, seed=1)
    # static@10% of a model whose outer units are dear: the cap binds, the set stays outermost.
    plan = arms.first_last_plan(torch.tensor([3.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0]), 0.4)
    assert plan.tolist() == [True, False, False, False, False, False, False, False, False, True]
    assert arms.first_last_plan(torch.ones(37), 12).sum() == 12  # an int budget is a unit count
    # A FLOP budget no end unit (or, for random, no unit) fits is an error, not an always_low arm.
    with pytest.raises(InputError, match=r"static@1%: neither the first unit \(30% of the FLOPs\)"):
        arms.first_last_plan(torch.tensor([3.0, 4.0, 3.0]), 0.01)
    with pytest.raises(InputError, match="random@1%: no unit fits the budget"):
        arms.RandomPlan(3, 0.01, lock_steps=2, seed=0, costs=torch.tensor([3.0, 4.0, 3.0]))
    with pytest.raises(ValueError, match="kind must be one of"):
        arms.ArmSpec("x", "sometimes")


def test_zclip_clips_only_spikes():
    p = torch.nn.Parameter(torch.zeros(4))
    z = arms.ZClip(warmup=5)
    for i in range(30):
        p.grad = torch.full((4,), 1.0 + 0.01 * (i % 3))
        z([p])
    assert z.n_clipped == 0
    p.grad = torch.full((4,), 50.0)
    z([p])
    assert z.n_clipped == 1 and p.grad.norm().item() < 2.5


def test_split_is_fixed_and_disjoint():
    files = data.stdlib_files()
    splits = {f: data.split_of(f) for f in files}
    assert set(splits.values()) == {"train", "tune", "val"}
    val = sum(s == "val" for s in splits.values()) / len(files)
    assert 0.05 < val < 0.15


def test_doctests():
    from benchmarks import pick_high_start, regime_table

    for mod in (stability, arms, data, regime_table, pick_high_start):
        assert doctest.testmod(mod).failed == 0


def test_regime_table_counts_only_healthy_high_and_clear_low_gap(tmp_path):
    import gzip
    import json

    from gnmr_fx.benchmarks import regime_table

    def run(arm, seed, lr, val, diverged=False):
        return {"arm": arm, "seed": seed, "lr": lr, "final_val": val, "diverged": diverged, "flop_high_pct": 0.0}

    runs = [run("always_high", 0, 1e-3, 1.00), run("always_low", 0, 1e-3, 1.05),   # counts: +5%
            run("always_high", 0, 3e-3, 1.50), run("always_low", 0, 3e-3, 1.80),   # high unhealthy
            run("always_high", 0, 1e-4, 1.05), run("always_low", 0, 1e-4, 1.06),   # +0.95%: no
            run("always_high", 1, 1e-4, 1.05), run("always_low", 1, 1e-4, None, True)]  # a divergence
    doc = {"meta": {"date_utc": "today"},
           "scenarios": {"x": {"config": {"key": "x"}, "runs": runs}}}
    (tmp_path / "r").mkdir()
    with gzip.open(tmp_path / "r" / "results.json.gz", "wt") as f:
        json.dump(doc, f)
    rows = regime_table.regime_rows(regime_table.load_runs([str(tmp_path / "r")]), 3.0, 10.0)
    got = {r["lr"]: (r["healthy"], r["counts"]) for r in rows}
    assert got == {1e-4: (True, True), 1e-3: (True, True), 3e-3: (False, False)}
    assert rows[1]["low_gap"] == pytest.approx(5.0)
    assert "1 diverged" in regime_table.format_rows(rows)
    # LR sensitivity: always_high is stable within 10% of its best (1.00) at 1e-3 and 1e-4 (1.05),
    # not at 3e-3 (1.50); always_low is stable only at 1e-3 (a divergence at 1e-4).
    ranges = {a["arm"]: a for a in regime_table.lr_ranges(regime_table.load_runs([str(tmp_path / "r")]), "x", 10.0)}
    assert ranges["always_high"]["stable"] == [1e-4, 1e-3] and ranges["always_low"]["stable"] == [1e-3]
    assert ranges["always_low"]["cells"][1e-4] == (pytest.approx(1.06), 2, 1)
    assert "| always_low  | 1.060 (n=2, 1 diverged) | 1.050 (n=1) | 1.800 (n=1) | 0.001" in \
        regime_table.format_lr_ranges(list(ranges.values()))
    assert regime_table.load_runs([str(tmp_path / "r")], ("r:x",)) == []
    # A --tuning run (tune split) in the same folders is left out.
    (tmp_path / "r" / "t").mkdir()
    with gzip.open(tmp_path / "r" / "t" / "results.json.gz", "wt") as f:
        json.dump(dict(doc, meta={"date_utc": "today", "split": "tune (tuning run)"}), f)
    assert len(regime_table.load_runs([str(tmp_path / "r")])) == len(runs)
    # Another model preset is another variant, never paired with these runs.
    (tmp_path / "r" / "w").mkdir()
    with gzip.open(tmp_path / "r" / "w" / "results.json.gz", "wt") as f:
        json.dump(dict(doc, meta={"date_utc": "today", "preset": "gpu-wide"}), f)
    variants = [r["variant"] for r in regime_table.load_runs([str(tmp_path / "r")])]
    assert variants.count("x") == len(runs) and variants.count("x.gpu-wide") == len(runs)
    # The per-regime arm table: paired with the same seed's always_high.
    stats = {a["arm"]: a for a in regime_table.arm_stats(regime_table.load_runs([str(tmp_path / "r")]), "x", 1e-3)}
    assert set(stats) == {"always_high", "always_low"} and stats["always_low"]["gaps"] == [pytest.approx(5.0)]


def test_regime_table_an_always_high_whose_val_rose_is_not_healthy(tmp_path):
    """The only LR of a sweep is its own best: health also needs a validation curve that
    did not climb on the way (s19a's gpu-wide always_high: 2.37 -> 2.61 -> 2.20)."""
    import gzip
    import json

    from gnmr_fx.benchmarks import regime_table

    def run(arm, val_curve):
        return {"arm": arm, "seed": 0, "lr": 3e-3, "final_val": val_curve[-1][1], "diverged": False,
                "flop_high_pct": 0.0, "val": val_curve}

    for curve, healthy in (([[250, 2.37], [500, 2.61], [750, 2.20]], False),   # rose 10%
                           ([[250, 2.37], [500, 2.40], [750, 2.20]], True)):   # rose 1.3%: noise
        doc = {"meta": {"date_utc": "today"}, "scenarios": {"x": {"config": {"key": "x"}, "runs": [
            run("always_high", curve), run("always_low", [[250, 2.5], [750, 2.4]])]}}}
        folder = tmp_path / str(healthy)
        folder.mkdir()
        with gzip.open(folder / "results.json.gz", "wt") as f:
            json.dump(doc, f)
        (row,) = regime_table.regime_rows(regime_table.load_runs([str(folder)]), 3.0, 10.0, 5.0)
        assert (row["healthy"], row["counts"]) == (healthy, healthy)
        assert ("no (val rose 10%)" in regime_table.format_rows([row])) is not healthy
    assert regime_table.val_rise_pct([[1, 1.0], [2, float("nan")]]) == float("inf")
    # One of two always_high seeds diverged: not healthy, and the table says why.
    runs = [dict(run("always_high", [[250, 2.4], [750, 2.2]]), seed=0),
            dict(run("always_high", [[250, 2.4], [750, float("nan")]]), seed=1, final_val=None, diverged=True),
            dict(run("always_low", [[250, 2.5], [750, 2.4]]), seed=0)]
    rows = regime_table.regime_rows([dict(r, variant="x", source="s") for r in runs], 3.0, 10.0, 5.0)
    assert (rows[0]["healthy"], rows[0]["unhealthy"]) == (False, "diverged")


def test_regime_table_reads_call_folders_and_refuses_a_run_counted_twice(tmp_path):
    import gzip
    import json

    from gnmr_fx.arguments import InputError
    from gnmr_fx.benchmarks import regime_table

    def write(folder, runs):
        folder.mkdir(parents=True)
        with gzip.open(folder / "results.json.gz", "wt") as f:
            json.dump({"meta": {"date_utc": "today"}, "scenarios": {"x": {"config": {"key": "x"}, "runs": runs}}}, f)

    def run(arm, seed, val, flops=0.0):
        return {"arm": arm, "seed": seed, "lr": 1e-3, "final_val": val, "diverged": False, "flop_high_pct": flops,
                "spikes": 0, "high_unit_steps_pct": flops, "wall_s": 1.0}

    # A device call of gpu_call.sh: one sub-folder per bench.
    write(tmp_path / "call" / "high", [run("always_high", 0, 1.0), run("always_high", 1, 1.0)])
    write(tmp_path / "call" / "low", [run("always_low", 0, 1.2), run("always_low", 1, 1.4)])
    write(tmp_path / "call" / "g", [run("gnmr@2", 0, 1.1, 1.0), run("gnmr@2", 1, 1.4, 2.0)])
    runs = regime_table.load_runs([str(tmp_path / "call")])
    assert {r["source"] for r in runs} == {"call/high", "call/low", "call/g"}
    stats = {a["arm"]: a for a in regime_table.arm_stats(runs, "x", 1e-3)}
    assert stats["gnmr@2"]["gaps"] == [pytest.approx(10.0), pytest.approx(40.0)]
    assert stats["gnmr@2"]["closed"] == [pytest.approx(50.0), pytest.approx(0.0)]
    assert stats["gnmr@2"]["flops_high"] == pytest.approx(1.5)
    assert "+25.0 ± 35.4" in regime_table.format_arm_table(list(stats.values()))
    write(tmp_path / "again", [run("gnmr@2", 1, 1.3)])
    with pytest.raises(InputError, match="seed 1 is in both call/g and again"):
        regime_table.load_runs([str(tmp_path / "call"), str(tmp_path / "again")])


def test_tuned_static_and_high_first_arms_follow_their_plans(tmp_path):
    parser = argparse.ArgumentParser()
    stability.add_arguments(parser)
    args = parser.parse_args(["--preset", "smoke", "--scenarios", "e", "--seeds", "0", "--no-plots",
                              "--arms", "always_high", "static_tuned@2", "high_first@50%", "high_first@1",
                              "gnmr@1+high_first@2", "gnmr@1+lag", "static=fc", "gnmr@1+lock@20", "--out", str(tmp_path)])
    assert stability.run(args) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    runs = {r["arm"]: r for r in doc["scenarios"]["e"]["runs"]}
    units = doc["scenarios"]["e"]["units"]
    # static_tuned: the two units its tune-split gains chose, high on every step.
    chosen = runs["static_tuned@2"]["static_set"]
    assert len(chosen) == 2 and set(chosen) <= set(units)
    idx = sorted(units.index(u) for u in chosen)
    assert runs["static_tuned@2"]["plans"] == [idx] * 6
    # high_first: every unit high for the first 3 (50% of 6) or 1 steps, then none.
    every = list(range(len(units)))
    assert runs["high_first@50%"]["plans"] == [every] * 3 + [[]] * 3
    assert runs["high_first@1"]["plans"] == [every] + [[]] * 5
    # GNMR with a high start: every unit for 2 steps, then at most max_o=1 unit.
    hs = runs["gnmr@1+high_first@2"]["plans"]
    assert hs[:2] == [every] * 2 and all(len(p) <= 1 for p in hs[2:])
    assert (runs["gnmr@1+high_first@2"]["high_start_steps"], runs["gnmr@1+high_first@2"]["plan_lag"]) == (2, 0)
    # +lock@N: that arm's controller ran with lock_steps N and max_lock_steps max(50, 5 N).
    assert (runs["gnmr@1+lock@20"]["lock_steps"], runs["gnmr@1+lock@20"]["max_lock_steps"]) == (20, 100)
    assert (runs["gnmr@1+lag"]["lock_steps"], runs["gnmr@1+lag"]["max_lock_steps"]) == (10, 50)
    # static=REGEX: the units whose names match, high on every step.
    fc = [i for i, u in enumerate(units) if "fc" in u]
    assert fc and runs["static=fc"]["plans"] == [fc] * 6
    # +lag: that arm ran with plan_lag=1 (read back from the runtime), the others with 0.
    assert runs["gnmr@1+lag"]["plan_lag"] == 1 and runs["static_tuned@2"]["plan_lag"] == 0


def test_pick_by_gain_and_high_first_parse():
    assert arms.parse_arm("static_tuned@10%").budget == 0.1
    assert arms.parse_arm("high_first@200").budget == 200
    spec = arms.parse_arm("gnmr@10%+high_first@0.05")
    assert (spec.name, spec.kind, spec.budget, spec.high_start) == ("gnmr@10%+high_first@5%", "gnmr", 0.1, 0.05)
    lag = arms.parse_arm("gnmr@10%+high_first@5%+lag")
    assert (lag.name, lag.high_start, lag.plan_lag) == ("gnmr@10%+high_first@5%+lag", 0.05, 1)
    for bad, msg in (("static@2+high_first@5%", "after a gnmr or static_grad arm"), ("gnmr@2+high_first@x", "gnmr@2\\+high_first@x"),
                     ("always_low+lag", "goes once, after a gnmr arm"), ("gnmr@2+lag+lag", "goes once")):
        with pytest.raises(InputError, match=msg):
            arms.parse_arm(bad)
    assert arms.high_first_steps(0.1, 2000) == 200 and arms.high_first_steps(5000, 2000) == 2000
    gain = torch.tensor([0.0, 0.2, 0.1])
    assert arms.pick_by_gain(gain, torch.ones(3), 3).tolist() == [False, True, True]  # no gain, never bought


def test_val_loss_is_the_eager_all_high_model():
    # gnmr_fx.compile compiles forward in place: the benchmark must score with
    # the class's own forward (every matmul high), not the plan's numerics.
    import functools

    import gnmr_fx
    from gnmr_fx.models import GPTConfig, TinyGPT

    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32))
    ref = TinyGPT(model.cfg)
    ref.load_state_dict(model.state_dict())
    x = torch.randint(0, 256, (2, 16))
    gnmr_fx.compile(model, gnmr_fx.GNMRConfig(recipe="int4", policy="always_low"), backend="eager")
    with torch.no_grad():
        low = model(x)
        eager = functools.partial(type(model).forward, model)(x)
        assert torch.equal(eager, ref(x))
        assert not torch.equal(low, eager)


def _spec_lines():
    calls = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "calls"
    for spec in sorted(calls.glob("*.spec")):
        for n, line in enumerate(spec.read_text().splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                yield pytest.param(line.split(), id=f"{spec.stem}:{n}")


@pytest.mark.parametrize("words", list(_spec_lines()))
def test_every_call_spec_line_parses(words):
    # A device call runs each line as `gnmr-fx bench stability ARGS`; a typo in an arm or a
    # scenario would be found only on the GPU, after the call's set-up time was spent.
    from gnmr_fx.cli import build_parser

    name, args = words[0], words[1:]
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", name), name
    ns = build_parser().parse_args(["bench", "stability", *args, "--out", "/tmp/unused"])
    assert ns.arms and ns.seeds, words


def test_pick_high_start_writes_a_val_call_from_tune_runs_only(tmp_path):
    # The rule that picks the high start N reads tune-split runs only (a val file beside them
    # is ignored), prefers the shorter start within 1% of the best, and writes benches that parse.
    import gzip
    import json

    from benchmarks import pick_high_start as pick
    from gnmr_fx.cli import build_parser

    def results(split, rows):
        runs = {}
        for regime, arm, val, flops in rows:
            runs.setdefault(regime, []).append(dict(arm=arm, seed=100, lr=3e-3, final_val=val,
                                                    flop_high_pct=flops, diverged=False))
        return {"meta": {"split": split, "date_utc": "today"}, "scenarios": {
            f"{g}_lr0.003": {"config": {"key": g}, "runs": r} for g, r in runs.items()}}

    rows = [(g, a, v, f) for g in ("a", "e-mxfp4_sr") for a, v, f in (
        ("always_high", 1.0, 100.0), ("gnmr@10%+high_first@2.5%", 1.5, 3.0),
        ("gnmr@10%+high_first@5%", 1.205, 5.6 if g == "a" else 6.2), ("gnmr@10%+high_first@10%", 1.2, 10.3))]
    (tmp_path / "tune").mkdir()
    (tmp_path / "val").mkdir()
    with gzip.open(tmp_path / "tune" / "results.json.gz", "wt") as f:
        json.dump(results("tune (tuning run)", rows), f)
    # A val run that would win if it were read.
    (tmp_path / "val" / "results.json").write_text(json.dumps(results("train / val", [
        ("a", "gnmr@10%+high_first@2.5%", 0.5, 3.0), ("a", "always_high", 1.0, 100.0)])))
    spec = tmp_path / "call.spec"
    assert pick.main([str(tmp_path), "--spec", str(spec)]) == 0
    lines = [ln.split() for ln in spec.read_text().splitlines() if ln and not ln.startswith("#")]
    arms = sorted({w[-1] for w in lines})
    assert arms == ["gnmr@10%+high_first@5%", "high_first@5%", "high_first@6.5%"], arms
    assert len(lines) == 2 * 3 * 3
    for words in lines:
        build_parser().parse_args(["bench", "stability", *words[1:], "--out", "/tmp/unused"])
    with pytest.raises(SystemExit, match="no tune always_high"):
        pick.choose(pick.load_runs([str(tmp_path / "val")], tuning=True), regimes=("a",))


def test_fine_tuning_benches_share_one_pretraining_through_the_cache(tmp_path):
    """Scenario d split over benches (and recipes): with --pretrain-cache the second bench
    does not pretrain again, and both fine-tune from the same checkpoint."""
    parser = argparse.ArgumentParser()
    stability.add_arguments(parser)
    cache = tmp_path / "cache"
    docs = []
    for name, scen, arm in (("b1", "d", "always_high"), ("b2", "d-mxfp4", "always_low")):
        args = parser.parse_args(["--preset", "smoke", "--scenarios", scen, "--seeds", "0", "--no-plots",
                                  "--arms", arm, "--out", str(tmp_path / name), "--pretrain-cache", str(cache)])
        assert stability.run(args) == 0
        docs.append(json.loads((tmp_path / name / "results.json").read_text()))
    (pre1,), (pre2,) = (next(iter(d["scenarios"].values()))["pretrain"] for d in docs)
    assert (pre1["shared"], pre2["shared"]) == (False, True)
    assert pre1["checkpoint"] == pre2["checkpoint"] and pre1["val"] == pre2["val"]
    assert len(list(cache.glob("*.pt"))) == 1 and not list(cache.glob("*.tmp"))
    # Another seed is another pretraining.
    args = parser.parse_args(["--preset", "smoke", "--scenarios", "d", "--seeds", "1", "--no-plots",
                              "--arms", "always_high", "--out", str(tmp_path / "b3"), "--pretrain-cache", str(cache)])
    assert stability.run(args) == 0
    assert len(list(cache.glob("*.pt"))) == 2
    # Both benches of seed 0 start fine-tuning from the same weights: their first train
    # losses (before any update of the arm) are the same to fp32 rounding.
    l1 = next(iter(docs[0]["scenarios"].values()))["runs"][0]["train_loss"][0]
    l2 = next(iter(docs[1]["scenarios"].values()))["runs"][0]["train_loss"][0]
    assert abs(l1 - l2) < 0.05 * abs(l1)


def test_tuned_static_set_of_a_fine_tuning_profiles_the_checkpoint(tmp_path):
    """In a fine-tuning scenario static_tuned profiles the checkpoint every arm starts from (no
    fresh tune run); the gains and what was profiled are kept with the run."""
    parser = argparse.ArgumentParser()
    stability.add_arguments(parser)
    args = parser.parse_args(["--preset", "smoke", "--scenarios", "d-mxfp4", "--seeds", "0", "--no-plots",
                              "--arms", "always_low", "static_tuned@2", "--out", str(tmp_path)])
    assert stability.run(args) == 0
    sc = next(iter(json.loads((tmp_path / "results.json").read_text())["scenarios"].values()))
    run = {r["arm"]: r for r in sc["runs"]}["static_tuned@2"]
    tuning = run["static_tuning"]
    assert (tuning["profiled"], tuning["tune_run_steps"]) == ("checkpoint", 0)
    gains = torch.tensor(tuning["gain_list"])
    assert gains.numel() == len(sc["units"]) and gains.abs().max() > 0
    # The set is the two units of largest positive gain, high on every step.
    top = sorted(torch.argsort(gains, descending=True)[:2].tolist())
    assert all(gains[i] > 0 for i in top)
    assert sorted(sc["units"].index(u) for u in run["static_set"]) == top
    assert run["plans"] == [top] * len(run["plans"])


def test_pretrain_cache_waits_for_the_first_run_and_keeps_no_partial_checkpoint(tmp_path):
    calls = []

    def run():
        calls.append(1)
        return {"final_val": 1.5}

    def save(path):
        torch.save({"w": torch.ones(2)}, path)

    ckpt, rec = stability.cached_pretrain(tmp_path, "k", run, save)
    assert rec["shared"] is False and ckpt.exists()
    ckpt2, rec2 = stability.cached_pretrain(tmp_path, "k", run, save)
    assert (ckpt2, rec2["shared"], rec2["final_val"], len(calls)) == (ckpt, True, 1.5, 1)

    def boom(path):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        stability.cached_pretrain(tmp_path, "k2", run, boom)
    assert not (tmp_path / "k2.json").exists()  # a later bench pretrains again
    _, rec3 = stability.cached_pretrain(tmp_path, "k2", run, save)
    assert rec3["shared"] is False and len(calls) == 3


def test_static_named_arm_rejects_a_pattern_that_names_no_unit():
    with pytest.raises(InputError, match="matches none of the 2 units"):
        arms.named_units_plan("attn.matmul", ["blocks.0.fc", "blocks.0.out"])
    for bad in ("static=", "static=(unclosed"):
        with pytest.raises(InputError, match="static="):
            arms.parse_arm(bad)


@pytest.mark.parametrize("bad", ["static@2+lock@5", "gnmr@2+lock@0", "gnmr@2+lock@x", "gnmr@2+lock@5+lock@6",
                                 "gnmr@2+lag+lock@5"])
def test_lock_arm_goes_once_after_a_gnmr_arm(bad):
    with pytest.raises(InputError, match="lock@N"):
        arms.parse_arm(bad)


def test_per_arm_tasks_give_the_same_runs_as_one_task(tmp_path):
    """--per-arm: one worker process per arm (how one command fills a GPU with runs side by
    side); each arm starts from the seed's initial weights, data order and a fresh optimizer,
    so on the CPU its run is bitwise the run the arm gets inside one sequential task. Scenario
    d's arms share one pretraining (the per-arm pretrain cache in OUT)."""
    parser = argparse.ArgumentParser()
    stability.add_arguments(parser)
    docs = {}
    for mode in ("one", "per-arm"):
        args = parser.parse_args(["--preset", "smoke", "--scenarios", "d", "--seeds", "0", "--no-plots",
                                  "--arms", "always_high", "gnmr@1", "--out", str(tmp_path / mode)]
                                 + (["--per-arm", "--jobs", "2"] if mode == "per-arm" else []))
        assert stability.run(args) == 0
        docs[mode] = json.loads((tmp_path / mode / "results.json").read_text())
    one, per = (next(iter(docs[m]["scenarios"].values())) for m in ("one", "per-arm"))
    assert [r["arm"] for r in per["runs"]] == ["always_high", "gnmr@1"]
    for a, b in zip(one["runs"], per["runs"]):
        assert (a["arm"], a["train_loss"], a["val"], a["plans"]) == (b["arm"], b["train_loss"], b["val"], b["plans"])
    assert len(per["pretrain"]) == 1 and per["pretrain"][0]["val"] == one["pretrain"][0]["val"]
    assert len(list((tmp_path / "per-arm" / "pretrain").glob("*.pt"))) == 1
    assert docs["per-arm"]["meta"]["per_arm"] is True


def test_trigger_report_finds_when_and_where_and_the_spikes_at_plan_changes(tmp_path, capsys):
    import gzip

    from gnmr_fx import cli
    from gnmr_fx.benchmarks import trigger_report

    units = ["blocks.0.attn.matmul", "blocks.1.attn.matmul", "blocks.0.fc", "head"]
    losses = [1.0] * 40
    losses[30] = 3.0  # a spike on the step the plan changed
    losses[35] = 3.0  # a spike on a quiet step
    plans = [[]] * 30 + [[0]] * 10
    run = {"arm": "gnmr@2", "seed": 0, "lr": 1e-3, "final_val": 1.0, "diverged": False, "train_loss": losses,
           "plans": plans, "trigger_list": [[25, 0], [29, 1], [29, 0], [33, 2]], "val": [[20, 2.0], [40, 1.5]]}
    doc = {"meta": {"date_utc": "today"}, "scenarios": {"x": {"config": {"key": "x"}, "units": units, "runs": [run]}}}
    (tmp_path / "r").mkdir()
    with gzip.open(tmp_path / "r" / "results.json.gz", "wt") as f:
        json.dump(doc, f)
    rep = trigger_report.run_report(dict(run, units=units), window=20)
    assert (rep["triggers"], rep["first_trigger"], rep["spikes"], rep["spikes_at_plan_change"]) == (4, 25, 2, 1)
    assert rep["trigger_share"] == {"blocks.attn.matmul": 0.75, "blocks.fc": 0.25}
    assert rep["high_share"] == {"blocks.attn.matmul": 1.0}
    assert rep["plan_change_base_rate"] == pytest.approx(2 / 15)  # steps 30, 31 of 25..39
    assert rep["train_loss_windows"] == [1.0, pytest.approx(1.2)]
    assert cli.main(["bench", "triggers", str(tmp_path / "r"), "--variant", "x"]) == 0
    printed = capsys.readouterr().out
    assert "blocks.attn.matmul 75%" in printed
    assert rep["val"] == [2.0, 1.5] and rep["val_path"] == [] and "| 2.000 1.500 " in printed
    assert cli.main(["bench", "triggers", str(tmp_path / "r"), "--variant", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no run of variant 'nope'" in err and err.count("\n") == 1


def test_val_path_scores_the_arms_own_path_and_changes_no_training(tmp_path):
    """--val-path: validation through the compiled model on the arm's plan. It must not touch
    training (the same losses and plans bitwise, +lag arms included), always_high's path is
    the eager all-high model (the same numbers), and always_low's path is the quantized one."""
    parser = argparse.ArgumentParser()
    stability.add_arguments(parser)
    docs = {}
    for mode in ("plain", "path"):
        args = parser.parse_args(["--preset", "smoke", "--scenarios", "a", "--seeds", "0", "--no-plots",
                                  "--arms", "always_high", "always_low", "gnmr@1+lag", "--out", str(tmp_path / mode)]
                                 + (["--val-path"] if mode == "path" else []))
        assert stability.run(args) == 0
        docs[mode] = {r["arm"]: r for r in json.loads((tmp_path / mode / "results.json").read_text())
                      ["scenarios"]["a"]["runs"]}
    for arm, r in docs["path"].items():
        plain = docs["plain"][arm]
        assert (r["train_loss"], r["plans"], r["val"]) == (plain["train_loss"], plain["plans"], plain["val"])
        assert "val_path" not in plain and [s for s, _ in r["val_path"]] == [s for s, _ in r["val"]]
    high, low = docs["path"]["always_high"], docs["path"]["always_low"]
    assert [v for _, v in high["val_path"]] == pytest.approx([v for _, v in high["val"]], rel=1e-5)
    # int4 activations: the quantized path scores differently from the same weights in high precision
    # (by ~8e-3 nats at the first eval; the smoke model's late evals sit near uniform, where the
    # difference can shrink below 1e-4 on some CPUs, so the largest difference is what is asserted).
    assert max(abs(p - v) for (_, p), (_, v) in zip(low["val_path"], low["val"])) > 1e-3
    # bench regimes: the paired gap of the final path val, beside the val gap.
    from gnmr_fx.benchmarks import regime_table

    stats = {a["arm"]: a for a in regime_table.arm_stats(regime_table.load_runs([str(tmp_path / "path")]), "a.smoke", 3e-2)}
    want = 100 * (low["val_path"][-1][1] - high["val_path"][-1][1]) / high["val_path"][-1][1]
    assert stats["always_low"]["path_gaps"] == [pytest.approx(want)]
    assert stats["always_low"]["path_gaps"] != stats["always_low"]["gaps"]


def test_grad_error_profile_picks_its_set_and_leaves_the_other_arms_bitwise(tmp_path):
    """static_grad profiles the checkpoint on the tune split (per unit, the relative error of the
    whole model's gradient with only that unit low), keeps the units of largest error high, and
    the profile perturbs nothing: always_low run after it is bitwise always_low run alone
    (stochastic rounding draws included)."""
    parser = argparse.ArgumentParser()
    stability.add_arguments(parser)

    def bench(out, *arms_):
        args = parser.parse_args(["--preset", "smoke", "--scenarios", "d-mxfp4_sr", "--seeds", "0", "--no-plots",
                                  "--arms", *arms_, "--out", str(out)])
        assert stability.run(args) == 0
        sc = next(iter(json.loads((out / "results.json").read_text())["scenarios"].values()))
        return sc, {r["arm"]: r for r in sc["runs"]}

    sc, runs = bench(tmp_path / "with", "always_low", "static_grad@2")  # the profile runs before every arm
    _, alone = bench(tmp_path / "alone", "always_low")
    assert runs["always_low"]["train_loss"] == alone["always_low"]["train_loss"]
    assert runs["always_low"]["val"] == alone["always_low"]["val"]
    prof = runs["static_grad@2"]["static_tuning"]
    assert (prof["profiled"], prof["criterion"]) == ("checkpoint", "grad_error")
    err = torch.tensor(prof["gain_list"])
    # One relative error per unit, finite, positive (every low path moves the gradient), and the
    # all-low error is at least the largest single-unit one's order.
    assert err.numel() == len(sc["units"]) and bool(torch.isfinite(err).all()) and bool((err > 0).all())
    assert prof["all_low_grad_error"] > 0.5 * float(err.max())
    top = sorted(torch.argsort(err, descending=True)[:2].tolist())
    assert sorted(sc["units"].index(u) for u in runs["static_grad@2"]["static_set"]) == top
    assert runs["static_grad@2"]["plans"] == [top] * len(runs["static_grad@2"]["plans"])
    assert arms.parse_arm("static_grad@10%").name == "static_grad@10%"
    # What GNMR sees of the same passes: one finite, positive norm ratio (all low / all high) per unit.
    ratio = torch.tensor(prof["stat_ratio_list"])
    assert ratio.numel() == err.numel() and bool(torch.isfinite(ratio).all()) and bool((ratio > 0).all())


def test_profile_rows_name_the_units_that_stand_out():
    from gnmr_fx.benchmarks import regime_table

    def run(seed, err, ratio):
        return {"variant": "d", "lr": 1e-3, "seed": seed, "units": ["u0", "u1", "head"],
                "static_tuning": {"criterion": "grad_error", "gain_list": err, "stat_ratio_list": ratio,
                                  "all_low_grad_error": 0.9}}

    rows = regime_table.profile_rows([run(0, [0.1, 0.1, 0.6], [1.2, 3.0, 1.3]), run(1, [0.1, 0.12, 0.65], [1.1, 2.0, 1.3]),
                                      {"variant": "d", "lr": 1e-3, "seed": 2, "static_tuning": {"criterion": "loss"}}])
    assert len(rows) == 1 and rows[0]["seeds"] == [0, 1]
    assert list(rows[0]["standout"]) == ["head"] and rows[0]["standout"]["head"] == ([0.6, 0.65], [1.3, 1.3])
    text = regime_table.format_profile_rows(rows)
    assert "head 0.600–0.650 (norm 1.30)" in text and "1.10–3.00" in text


def test_profile_pins_combine_with_a_high_start_and_with_gnmr(tmp_path):
    """static_grad@K+high_first@N: every unit high for N steps, then exactly static_grad@K's set;
    gnmr@M+pin_grad@K: the same set pinned (GNMRRuntime.pin) on every step's plan under GNMR,
    and recorded as the run's pinned_set; the pins' budget counts against M."""
    parser = argparse.ArgumentParser()
    stability.add_arguments(parser)
    args = parser.parse_args(["--preset", "smoke", "--scenarios", "d-mxfp4_sr", "--seeds", "0", "--no-plots",
                              "--arms", "static_grad@2", "static_grad@2+high_first@3", "gnmr@3+pin_grad@2",
                              "--out", str(tmp_path)])
    assert stability.run(args) == 0
    sc = next(iter(json.loads((tmp_path / "results.json").read_text())["scenarios"].values()))
    runs = {r["arm"]: r for r in sc["runs"]}
    n = len(sc["units"])
    chosen = sorted(sc["units"].index(u) for u in runs["static_grad@2"]["static_set"])
    assert len(chosen) == 2
    started = runs["static_grad@2+high_first@3"]
    assert started["static_set"] == runs["static_grad@2"]["static_set"]
    assert started["plans"] == [list(range(n))] * 3 + [chosen] * (len(started["plans"]) - 3)
    pinned = runs["gnmr@3+pin_grad@2"]
    assert sorted(sc["units"].index(u) for u in pinned["pinned_set"]) == chosen
    assert "static_set" not in pinned and pinned["static_tuning"]["criterion"] == "grad_error"
    assert all(set(chosen) <= set(plan) and len(plan) <= 3 for plan in pinned["plans"])
    with pytest.raises(InputError, match="pin_grad"):
        arms.parse_arm("static_grad@2+pin_grad@1")
    with pytest.raises(InputError, match="high start"):
        arms.parse_arm("static@2+high_first@3")


def test_fine_tuning_records_its_checkpoint_digest_and_deterministic_runs_repeat(tmp_path):
    """--deterministic (deterministic kernels in the worker) is recorded in the meta; each
    seed's pretraining record carries the sha256 of the checkpoint the arms fine-tune: two
    commands of one seed give the same digest and bitwise the same losses, another seed
    another digest."""
    parser = argparse.ArgumentParser()
    stability.add_arguments(parser)

    def bench(out, seed):
        args = parser.parse_args(["--preset", "smoke", "--scenarios", "d", "--seeds", str(seed), "--no-plots",
                                  "--arms", "always_low", "--deterministic", "--out", str(out)])
        import torch._inductor.config as inductor_config

        try:
            assert stability.run(args) == 0
        finally:  # run_task set them in this (test) process: the tests after this one compile
            torch.use_deterministic_algorithms(False)
            inductor_config.deterministic = False
        doc = json.loads((out / "results.json").read_text())
        (sc,) = doc["scenarios"].values()
        (pre,) = sc["pretrain"]
        return doc["meta"], sc["runs"][0], pre["weights_sha256"]

    meta, run_a, digest_a = bench(tmp_path / "a", 0)
    _, run_b, digest_b = bench(tmp_path / "b", 0)
    _, _, digest_c = bench(tmp_path / "c", 1)
    assert meta["deterministic"] is True
    assert digest_a == digest_b != digest_c and len(digest_a) == 64
    assert run_a["train_loss"] == run_b["train_loss"]
