"""CPU smoke tests of the benchmark harnesses (tiny configurations only)."""

from __future__ import annotations

import argparse
import json
import math
import os
import re

import pytest
import torch

from gnmr_fx.benchmarks import emulation, overhead, perf


def _args(module, argv):
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return p.parse_args(argv)


def test_perf_harness_writes_its_table(tmp_path):
    out, md = tmp_path / "perf.json", tmp_path / "perf.md"
    args = _args(perf, ["--sizes", "tiny", "--arms", "bf16,lowp,gnmr,pin@5%", "--device", "cpu", "--backend", "eager",
                        "--steps", "2", "--rounds", "1", "--warmup", "0", "--out", str(out), "--md", str(md)])
    assert perf.run(args) == 0
    res = json.loads(out.read_text())
    rows = {r["arm"]: r for r in res["rows"]}
    assert list(rows) == ["bf16", "lowp", "gnmr", "pin@5%"]
    assert rows["bf16"]["vs_bf16"] == 1.0 and rows["lowp"]["vs_lowp"] == 1.0
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["n_steps"] == 2 and r["recompiles"] == 0
    # pin@5% pins the largest units that fit in 5% of the FLOPs: the budget used, not exceeded.
    assert 0.0 < rows["pin@5%"]["high_flops"] <= 0.05
    assert rows["gnmr"]["high_flops"] == 0.0
    # On the CPU, automatic selection emulates (real fp8 kernels are a GPU feature).
    assert res["extras"]["tiny"]["gnmr_kernels"] == {"emulated": 15}
    text = md.read_text()
    assert re.search(r"^\| tiny +\| pin@5% +\|", text, re.M), text
    assert "command: `gnmr-fx bench perf --model llama --sizes tiny --arms bf16,lowp,gnmr,pin@5%" in text


def test_perf_harness_runs_the_hf_llama(tmp_path):
    # transformers' LlamaForCausalLM from config: the decoder layers' 14 linears
    # are units; lm_head stays out of every arm (plain lowp converts 14 linears too).
    pytest.importorskip("transformers")

    out = tmp_path / "perf.json"
    args = _args(perf, ["--model", "hf-llama", "--sizes", "tiny", "--arms", "bf16,lowp,gnmr,pin@10%",
                        "--device", "cpu", "--backend", "eager", "--steps", "1", "--rounds", "1", "--warmup", "0",
                        "--out", str(out)])
    assert perf.run(args) == 0
    res = json.loads(out.read_text())
    extra = res["extras"]["tiny"]
    assert extra["gnmr_units"] == 14 and extra["gnmr_kernels"] == {"emulated": 14}
    rows = {r["arm"]: r for r in res["rows"]}
    assert set(rows) == {"bf16", "lowp", "gnmr", "pin@10%"} and all(r["recompiles"] == 0 for r in rows.values())
    assert 0.0 < rows["pin@10%"]["high_flops"] <= 0.10
    assert res["environment"]["command"].startswith("gnmr-fx bench perf --model hf-llama --sizes tiny")
    m = perf.HFLlama(perf.SIZES["tiny"])
    names = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and perf._converted("hf-llama", n, mod)]
    assert len(names) == 14 and not any(n.endswith("lm_head") for n in names)


def test_perf_rejects_unknown_arms():
    with pytest.raises(ValueError, match="unknown arm"):
        perf.run(_args(perf, ["--arms", "bf16,fp16"]))


def test_llama_flops_and_loss():
    s = perf.SIZES["tiny"]
    model = perf.Llama(s)
    idx = torch.randint(0, s.vocab, (1, s.seq))
    loss = model(idx, idx)
    assert abs(loss.item() - torch.log(torch.tensor(float(s.vocab))).item()) < 1.0  # ~ uniform at init
    per_layer = 4 * 64 * 64 + 3 * 64 * 176
    assert perf.llama_flops_per_token(s) == 6.0 * (2 * per_layer + 64 * 256) + 2 * 6 * 64 * 64


def test_overhead_bench_constant_ops(tmp_path):
    out = tmp_path / "overhead.json"
    args = _args(overhead, ["--units", "10,100", "--reps", "5", "--no-reference", "--out", str(out)])
    assert overhead.run(args) == 0
    res = json.loads(out.read_text())
    ops = [r["ops_per_update"] for r in res["rows"]]
    assert ops[0] == ops[1] > 0, ops  # the update's op count does not grow with units
    assert res["constant_ops"] is True


def test_overhead_bench_times_the_compiled_rule(tmp_path):
    out = tmp_path / "overhead.json"
    args = _args(overhead, ["--units", "10", "--reps", "3", "--no-reference", "--compiled", "--out", str(out)])
    assert overhead.run(args) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["update_us_compiled"] > 0 and row["compiled_vs_eager"] == row["update_us_compiled"] / row["update_us"]


def test_emulation_harness_writes_its_table(tmp_path, capsys):
    out, md = tmp_path / "emulation.json", tmp_path / "emulation.md"
    args = _args(emulation, ["--layers", "1", "--embd", "32", "--heads", "2", "--context", "16", "--batch", "2",
                             "--steps", "1", "--rounds", "2", "--warmup", "0", "--backend", "eager",
                             "--check", "--limit", "1e-9", "--profile", "--out", str(out), "--md", str(md)])
    assert emulation.run(args) == 1  # --check: no arm runs in a billionth of its reference's time
    # One progress line per arm as its compile ends (what a call cut by its timeout still shows).
    progress = [l for l in capsys.readouterr().err.splitlines() if "first step (compile)" in l]
    assert [l.split(" ")[0] for l in progress] == list(emulation.DEFAULT_ARMS)
    res = json.loads(out.read_text())
    assert {"command", "environment", "model", "backend", "rows", "targets"} <= set(res)
    rows = {r["arm"]: r for r in res["rows"]}
    assert list(rows) == list(emulation.DEFAULT_ARMS)
    for arm, r in rows.items():
        assert r["n_steps"] == 2 and r["recompiles"] == 0, r
        assert math.isfinite(r["step_ms"]) and r["step_ms"] > 0
        assert r["vs"] == emulation.REFERENCE.get(arm)
        assert r["ratio"] is None if arm == "plain" else (math.isfinite(r["ratio"]) and r["ratio"] > 0), r
    assert [(t["arm"], t["vs"], t["met"]) for t in res["targets"]] == [("high", "plain", False),
                                                                       ("low", "fake_quant", False)]
    assert "command: `gnmr-fx bench emulation --arms plain,fake_quant,high,low" in md.read_text()
    # --profile: one profiled step per arm; the host-dispatch GNMR arms dispatch more ATen ops than
    # the models without GNMR computing the same numbers (the statistics nodes, the plan reads).
    prof = res["profiles"]
    assert list(prof) == ["plain"] + [f"{a}:int8" for a in emulation.DEFAULT_ARMS[1:]]
    assert all(p["aten_ops"] > 0 and p["wall_ms"] > 0 for p in prof.values())
    assert prof["high:int8"]["aten_ops"] > prof["plain"]["aten_ops"]
    assert prof["low:int8"]["aten_ops"] > prof["fake_quant:int8"]["aten_ops"]
    assert "One profiled step per arm" in md.read_text() and res["command"].endswith("--profile")


def test_emulation_option_arms_build_their_configs(monkeypatch):
    # The arms of the off-by-default options: each builds its own model with its
    # GNMRConfig (low_graph / compile_controller), against fake_quant; none is a default arm.
    import gnmr_fx

    seen = {}
    real = gnmr_fx.compile

    def spy(model, config, **kw):
        seen[(config.policy, config.dispatch, config.low_graph, config.compile_controller)] = config
        return real(model, config, **kw)

    monkeypatch.setattr(gnmr_fx, "compile", spy)
    args = _args(emulation, ["--arms", "low,low_graph,low_cc,low_graph_cc", "--layers", "1", "--embd", "32",
                             "--heads", "2", "--context", "16", "--batch", "2", "--backend", "eager"])
    args.arms, args.recipes = args.arms.split(","), ["int8"]  # as run() parses them
    arms = emulation.build_arms(args, torch.device("cpu"))
    assert [a.name for a in arms] == ["low", "low_graph", "low_cc", "low_graph_cc"]
    assert set(seen) == {("always_low", "host", lg, cc) for lg in (False, True) for cc in (False, True)}
    assert {emulation.REFERENCE[a.name] for a in arms} == {"fake_quant"}
    assert not {"low_graph", "low_cc", "low_graph_cc"} & set(emulation.DEFAULT_ARMS)


@pytest.mark.parametrize("dispatch", ["host", "select"])
def test_fake_quant_reference_is_what_always_low_computes(dispatch):
    # The benchmark's by-hand reference and GNMR's always_low: the same numbers, bitwise (eager).
    import copy

    import gnmr_fx
    from gnmr_fx.models import GPTConfig, TinyGPT

    torch.manual_seed(0)
    gpt = TinyGPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32))
    idx = torch.randint(0, 256, (2, 16))
    ref = emulation.FakeQuantGPT(copy.deepcopy(gpt), "int4")
    m = gnmr_fx.compile(gpt, gnmr_fx.GNMRConfig(recipe="int4", policy="always_low", dispatch=dispatch),
                        backend="eager")
    loss, ref_loss = m(idx, idx), ref(idx, idx)
    loss.backward()
    ref_loss.backward()
    assert torch.equal(loss, ref_loss)
    for p, q in zip(gpt.parameters(), ref.gpt.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_perf_call_runs_parts_in_turn_under_the_budget_and_bundles_after_each(tmp_path):
    """benchmarks/perf_call.sh: each part gets its own timeout (cut to what is left of
    BUDGET), a part with under 30 s left is skipped, and $OUT/perf.tgz holds every part's
    output even when a part times out."""
    import subprocess
    import tarfile

    spec = tmp_path / "c.perf"
    spec.write_text("# parts\n"
                    "a 60 env FOO=\"x y\" bash -c 'echo \"[$FOO]\" > \"$OUT/a.txt\"'\n"
                    "b 2 sleep 20\n"
                    "c 600 true\n"
                    "d max true\n")
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), BUDGET="50")
    res = subprocess.run(["bash", "benchmarks/perf_call.sh", str(spec)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    log = res.stdout
    assert "a: rc=0" in log and "b: rc=124" in log  # b's own 2 s timeout
    assert "== c (timeout" in log and "(timeout 600s)" not in log  # c cut to what is left of 50 s
    assert re.search(r"== d \(timeout (\d+)s\)", log) and int(re.search(r"== d \(timeout (\d+)s\)", log)[1]) <= 35
    with tarfile.open(out / "perf.tgz") as tar:
        names = tar.getnames()
        assert "./a/a.txt" in names and "./call.log" in names
        assert tar.extractfile("./a/a.txt").read() == b"[x y]\n"
    bad = subprocess.run(["bash", "benchmarks/perf_call.sh", str(tmp_path / "missing")], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_perf_harness_compiled_controller_arm(tmp_path):
    # gnmr_compiled: the same model and runtime, the controller's rule compiled
    # (GNMRConfig.compile_controller); switching arms swaps the controller, and
    # no timed step compiles anything.
    out = tmp_path / "perf.json"
    args = _args(perf, ["--sizes", "tiny", "--arms", "lowp,gnmr,gnmr_compiled", "--device", "cpu", "--backend", "eager",
                        "--steps", "2", "--rounds", "2", "--warmup", "1", "--out", str(out)])
    assert perf.run(args) == 0
    rows = {r["arm"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["lowp", "gnmr", "gnmr_compiled"]
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["n_steps"] == 4 and r["recompiles"] == 0, r
    assert rows["gnmr_compiled"]["high_flops"] == 0.0


def test_perf_harness_low_graph_arm(tmp_path):
    # gnmr_lowg / gnmr_dual: GNMR compiled again with GNMRConfig(low_graph=True /
    # False), each its own runtime; with no unit high every timed step of
    # gnmr_lowg runs the all-low copy, and the JSON says so (a copy that never
    # ran would time the wrong graph). Under the eager compiler the default
    # (low_graph=None) builds no copy, and low_graph=False never does.
    out = tmp_path / "perf.json"
    args = _args(perf, ["--sizes", "tiny", "--arms", "lowp,gnmr,gnmr_lowg,gnmr_dual", "--device", "cpu",
                        "--backend", "eager", "--steps", "2", "--rounds", "2", "--warmup", "1", "--out", str(out)])
    assert perf.run(args) == 0
    rows = {r["arm"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["lowp", "gnmr", "gnmr_lowg", "gnmr_dual"]
    for r in rows.values():
        assert r["n_steps"] == 4 and r["recompiles"] == 0, r
    assert rows["gnmr_lowg"]["low_graph_calls"] >= 4 and rows["gnmr"]["low_graph_calls"] == 0
    assert rows["gnmr_dual"]["low_graph_calls"] == 0
    assert rows["gnmr_lowg"]["high_flops"] == rows["gnmr_dual"]["high_flops"] == 0.0


def test_perf_harness_torchao_int8_arm(tmp_path):
    # torchao_int8 (torchao's int8 mixed-precision training, the reference of the
    # int8_rowwise recipe): with its own optimizer where torchao is installed; where
    # it is not (CI), the arm is left out and the JSON says why.
    try:
        import torchao.prototype.quantized_training  # noqa: F401
        have = True
    except ImportError:
        have = False
    out = tmp_path / "perf.json"
    args = _args(perf, ["--sizes", "tiny", "--arms", "lowp,torchao_int8", "--recipe", "int8_rowwise", "--device",
                        "cpu", "--backend", "eager", "--steps", "2", "--rounds", "1", "--warmup", "1",
                        "--out", str(out)])
    assert perf.run(args) == 0
    doc = json.loads(out.read_text())
    rows = {r["arm"]: r for r in doc["rows"]}
    note = doc["extras"]["tiny"]["torchao_int8"]
    if have:
        assert list(rows) == ["lowp", "torchao_int8"] and rows["torchao_int8"]["n_steps"] == 2
        assert rows["lowp"]["vs_torchao_int8"] > 0 and "parameters of its own" in note
    else:
        assert list(rows) == ["lowp"] and note.startswith("not run:")
    assert "torchao_int8" not in perf.DEFAULT_ARMS


def test_arm_switches_keep_each_arms_settings():
    # Switching to gnmr_compiled swaps the controller (a reset re-applies the
    # config's plan_lag): the arm after it must still get its own settings.
    import gnmr_fx
    from gnmr_fx.config import GNMRConfig
    from gnmr_fx.models import GPTConfig, TinyGPT

    model = TinyGPT(GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=32))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cm = gnmr_fx.compile(model, GNMRConfig(recipe="int8"), backend="eager", optimizer=opt)
    rt = gnmr_fx.runtime(cm)
    idx = torch.randint(0, 256, (2, 8))
    cm(idx, idx).backward()
    opt.step()
    for arm, lag, compiled in [("gnmr_compiled", 0, True), ("gnmr_lag", 1, False), ("gnmr_compiled", 0, True),
                               ("gnmr", 0, False)]:
        perf._plan_setter(rt, 0.0, arm)()
        assert (rt.plan_lag, rt.config.compile_controller, rt.controller.config.compile_controller) == \
            (lag, compiled, compiled), arm


def test_profile_diff_groups_an_emulation_profile(tmp_path, capsys):
    # benchmarks/profile_diff.py on a bench emulation JSON (no --size): kernel
    # kinds per arm; a JSON without per-kernel data is a clear error, exit 2.
    from gnmr_fx.benchmarks import profile_diff

    doc = {"profiles": {
        "fake_quant:mxfp4": {"per_kernel_ms": {"triton_poi_fused_x": [0.5, 3], "nvjet_gemm": [1.0, 2]}},
        "low_graph_cc:mxfp4": {"per_kernel_ms": {"triton_poi_fused_x": [0.5, 3], "nvjet_gemm": [1.0, 2],
                                                 "triton_red_fused_pow_sum_1": [0.25, 4]}},
        "plain": {"wall_ms": 1.0}}}
    path = tmp_path / "emulation.json"
    path.write_text(json.dumps(doc))
    assert profile_diff.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "| fake_quant:mxfp4 | low_graph_cc:mxfp4 |" in out and "plain" not in out
    assert "| triton reduction: sum of squares (GNMR statistics, RMSNorm backward) | 0.00 / 0 | 0.25 / 4 |" in out
    assert "| total | 1.50 / 5 | 1.75 / 9 |" in out
    path.write_text(json.dumps({"profiles": {"plain": {"wall_ms": 1.0}}}))
    assert profile_diff.main([str(path)]) == 2
    assert "no per-kernel profile" in capsys.readouterr().err


def test_graph_kernels_counts_code_lines_not_comments():
    # benchmarks/graph_kernels.py counts calls on code lines only: Inductor's
    # comments and asserts name the same ops.
    from gnmr_fx.benchmarks.graph_kernels import code_stats

    code = "\n".join([
        "cpp_fused_a_0 = async_compile.cpp_pybinding(['float*'], '''...''')",
        "triton_poi_b_1 = async_compile.triton('triton_poi_b_1', '''...''')",
        "def call(args):",
        "        buf0 = empty_strided_cpu((4, 4), (4, 1), torch.float32)",
        "        # Topologically Sorted Source Nodes: [dual_linear], Original ATen: [aten.mm]",
        "        extern_kernels.mm(buf0, buf0, out=buf0)",
        "        buf1 = torch.ops.aten._scaled_mm.default(buf0, buf0, buf0, buf0)",
        "        buf2 = torch.ops.gnmr.select_mm.default(plan, 0, buf0, buf0, buf0, buf0, s, s, True)",
        "        assert_size_stride(buf2, (4, 4), (4, 1), 'torch.ops.gnmr.select_mm.default')",
        "        # buffer buf2 (op: torch.ops.gnmr.select_mm.default) is assumed to be not aligned",
    ])
    assert code_stats(code) == (2, 2, 1, 1)
