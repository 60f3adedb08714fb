"""CPU tests of the real-kernel host dispatch (torch's CPU ``_scaled_mm`` and ``_int_mm``).

The GPU versions (real cuBLASLt kernels, inductor, sync-debug mode) are in
test_gpu.py; here the same code paths run on the CPU.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F

import gnmr_fx
from gnmr_fx.backends import real_kernels, host_dispatch
from gnmr_fx.backends.recipes import sqnr
from gnmr_fx.backends.paths import low_path
from gnmr_fx.config import GNMRConfig
from gnmr_fx.models import GPTConfig, TinyGPT
from gnmr_fx.passes import counters
from gnmr_fx.passes.state import PLAN_HOST

def _grads(fn, x, w, g):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    y = fn(x, w)
    y.backward(g)
    return y.detach(), x.grad, w.grad


def _xwg(m=64, k=96, n=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen) * 0.1,
            torch.randn(m, n, generator=gen))


REAL = ["fp8_e4m3", "fp8_rowwise", "int8_rowwise"]


@pytest.mark.parametrize("recipe", REAL)
def test_low_path_is_plain_fp8_and_high_path_is_the_op(recipe):
    x, w, g = _xwg()
    plan = torch.tensor([False, True])
    low = _grads(lambda a, b: host_dispatch.dual_linear(a, b, plan=plan, slot=0, recipe=recipe), x, w, g)
    high = _grads(lambda a, b: host_dispatch.dual_linear(a, b, plan=plan, slot=1, recipe=recipe), x, w, g)
    plain = _grads(lambda a, b: real_kernels.lowp_linear(a, b, None, recipe), x, w, g)
    native = _grads(lambda a, b: F.linear(a, b), x, w, g)
    for lo, pl in zip(low, plain):
        assert torch.equal(lo, pl)
    for hi, na in zip(high, native):
        assert torch.equal(hi, na)


@pytest.mark.parametrize("high", ["native", "bf16", "fp32"])
@pytest.mark.parametrize("recipe", REAL)
def test_low_linear_is_the_dual_linear_low_path(recipe, high):
    """``low_linear`` (the unit of the all-low copy, GNMRConfig.low_graph): bitwise
    the values, gradients and dtypes of ``dual_linear`` with its plan low, for
    every real recipe and high path, in fp32 and bf16, on shapes the kernels
    need padded (M = 30, K = 40, N = 24); its folded statistic is ||dW||^2."""
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        x = torch.randn(3, 10, 40, dtype=dtype, requires_grad=True)
        w = torch.randn(24, 40, dtype=dtype, requires_grad=True)
        b = torch.randn(24, dtype=dtype, requires_grad=True)
        probe = torch.zeros(2, requires_grad=True)
        outs = []
        for fn, kw in ((host_dispatch.dual_linear, {}), (host_dispatch.low_linear, {"probe": probe})):
            for t in (x, w, b):
                t.grad = None
            y = fn(x, w, b, plan=torch.tensor([True, False]), slot=1, recipe=recipe, high=high, **kw)
            (y.float() * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
            outs.append([y.detach(), x.grad, w.grad, b.grad])
        for got, want in zip(outs[1], outs[0]):
            assert got.dtype == want.dtype and torch.equal(got, want)
        assert probe.grad[0] == 0 and torch.equal(probe.grad[1], w.grad.float().pow(2).sum())


@pytest.mark.parametrize("recipe", REAL)
def test_real_fp8_sqnr_on_cpu(recipe):
    x, w, g = _xwg(128, 256, 64, seed=1)
    ref = _grads(lambda a, b: F.linear(a.double(), b.double()), x, w, g.double())
    real = _grads(lambda a, b: real_kernels.lowp_linear(a, b, None, recipe), x, w, g)
    emu = _grads(lambda a, b: low_path("linear", a, b, None, recipe=recipe, a_index=0, b_index=1, b_kdim=-1,
                                       b_is_weight=True), x, w, g)
    # e4m3 operands ~30 dB, e5m2 gradients ~25 dB; int8 rowwise ~40 dB.
    floor = 37.0 if recipe.startswith("int8") else 20.0
    for name, r, q, e in zip(("output", "grad_input", "grad_weight"), ref, real, emu):
        s = sqnr(r, q)
        print(f"{recipe} {name}: real vs fp64 {s:.1f} dB, emulated vs fp64 {sqnr(r, e):.1f} dB, "
              f"real vs emulated {sqnr(e, q):.1f} dB")
        assert s >= floor, f"{recipe} {name}: {s:.1f} dB is too low"
        assert s >= sqnr(r, e) - 1.5, (name, s, sqnr(r, e))
    # Same scales and grid as the emulated recipe: only accumulation differs
    # (int32 accumulation of int8 products is exact: the outputs agree to rounding).
    assert sqnr(emu[0], real[0]) >= (100.0 if recipe.startswith("int8") else 35.0)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_real_int8_keeps_a_non_finite_input_visible(bad):
    # int8 has no inf / NaN codes: the row's scale carries it, so the
    # output row of the bad token is non-finite and every other row is finite.
    x, w, _ = _xwg(32, 64, 16, seed=4)
    x[3, 5] = bad
    y = real_kernels.lowp_linear(x, w, None, "int8_rowwise")
    bad_rows = (~torch.isfinite(y)).any(dim=1)
    assert bad_rows.tolist() == [i == 3 for i in range(32)]
    assert (~torch.isfinite(y[3])).all()


def test_int8_codes_are_the_emulated_grid():
    # to_lowp's int8 codes times their scales are fake_quant_int's values, exactly.
    from gnmr_fx.backends.recipes import fake_quant_int

    x = torch.randn(40, 72, generator=torch.Generator().manual_seed(3)) * 5
    for dim in (None, -1, 0):
        q, scale = real_kernels.to_lowp(x, torch.int8, dim)
        assert q.dtype == torch.int8 and int(q.abs().max()) == 127 and int(q.min()) >= -127
        assert torch.equal(q.float() * scale, fake_quant_int(x, bits=8, kdim=dim))


@pytest.mark.parametrize("recipe,m", [("fp8_e4m3", 30), ("int8_rowwise", 30), ("int8_rowwise", 5)])
def test_unaligned_dims_are_padded(recipe, m):
    # _scaled_mm wants dims divisible by 16; _int_mm also M > 16 (5 tokens pad to 32).
    assert real_kernels.padding(m, 40, 24, recipe.startswith("int8")) == ((-m) % 16 if m > 16 else 32 - m, 8, 8)
    x, w, g = _xwg(m, 40, 24, seed=2)
    real = _grads(lambda a, b: real_kernels.lowp_linear(a, b, None, recipe), x, w, g)
    plan = torch.tensor([False])
    host = _grads(lambda a, b: host_dispatch.dual_linear(a, b, plan=plan, slot=0, recipe=recipe), x, w, g)
    ref = _grads(lambda a, b: F.linear(a, b), x, w, g)
    for h, r, q in zip(host, real, ref):
        assert h.shape == q.shape
        assert torch.equal(h, r)
        assert sqnr(q, r) >= 20.0


def _gemm_counts(fn, kernel="aten::_scaled_mm"):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name for e in prof.events()]
    return names.count(kernel), names.count("aten::mm")


@pytest.mark.parametrize("recipe,kernel", [("fp8_e4m3", "aten::_scaled_mm"), ("int8_rowwise", "aten::_int_mm")])
def test_only_the_planned_branch_runs(recipe, kernel):
    x, w, g = _xwg()
    # Three GEMMs per unit and step: output, grad-input, grad-weight.
    low = _gemm_counts(lambda: _grads(
        lambda a, b: host_dispatch.dual_linear(a, b, plan=torch.tensor([False]), slot=0, recipe=recipe),
        x, w, g), kernel)
    high = _gemm_counts(lambda: _grads(
        lambda a, b: host_dispatch.dual_linear(a, b, plan=torch.tensor([True]), slot=0, recipe=recipe),
        x, w, g), kernel)
    assert low[0] == 3  # (torch's CPU kernels may run aten::mm inside, so mm is not counted here)
    assert high == (0, 3)


def _compiled(backend="aot_eager", **cfg):
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(n_layer=1, n_embd=64, block_size=32))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cm = gnmr_fx.compile(model, GNMRConfig(emulate=False, **cfg), backend=backend, optimizer=opt)
    rt = gnmr_fx.runtime(cm)  # the runtime publishes the host plan itself
    idx = torch.randint(0, 256, (2, 32))
    return model, cm, rt, opt, idx


def _force(rt, plan):
    rt.pin(plan)  # keeps the plan through controller updates; also publishes the host copy


@pytest.mark.parametrize("recipe", ["fp8_e4m3", "int8_rowwise"])
def test_compiled_host_dispatch_units_plans_and_statistics(recipe):
    before = counters["insert_dual_path"]["host_dispatch_nodes"]
    model, cm, rt, opt, idx = _compiled(recipe=recipe)
    ref = TinyGPT(model.cfg)
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("_gnmr.")})
    cm(idx, idx).backward()
    opt.step()
    opt.zero_grad()
    rec = rt.records[0]  # the step published the controller's plan to the host copy
    assert torch.equal(rec.rewritten._gnmr_plan_host, rt.controller.plan[rec.unit_ids].cpu())
    kernels = {s.name: s.extra["kernel"] for r in rt.records for s in r.sites}
    real = {"fp8_e4m3": "fp8_e4m3:tensorwise", "int8_rowwise": "int8_rowwise:rowwise"}[recipe]
    assert kernels == {"blocks.0.attn.qkv": real, "blocks.0.attn.matmul": "emulated",
                       "blocks.0.attn.matmul_1": "emulated", "blocks.0.attn.proj": real,
                       "blocks.0.fc": real, "blocks.0.out": real, "head": real}
    assert counters["insert_dual_path"]["host_dispatch_nodes"] - before == 5
    from torch._dynamo.utils import counters as dynamo_counters

    graphs = dynamo_counters["stats"]["unique_graphs"]
    n = rt.controller.num_units
    losses = {}
    for name, plan in (("low", torch.zeros(n, dtype=torch.bool)), ("high", torch.ones(n, dtype=torch.bool)),
                       ("mixed", torch.arange(n) % 2 == 0)):
        _force(rt, plan)
        rec = rt.records[0]
        assert torch.equal(rec.rewritten._gnmr_plan_host, plan[rec.unit_ids])
        losses[name] = cm(idx, idx)
        losses[name].backward()
        if name == "high":
            # Statistics through the host-dispatched unit: ||dL/dW||^2 in the probe.
            slot = next(s.slot for s in rec.sites if s.name == "blocks.0.fc")
            dw = model.blocks[0].fc.weight.grad
            torch.testing.assert_close(rec.probe.grad[slot], dw.double().pow(2).sum().float())
            # All-high is the model as written.
            ref_loss = ref(idx, idx)
            assert torch.equal(losses[name], ref_loss)
        opt.step()
        opt.zero_grad()
        # The runtime step published the controller's (locked) plan again.
        assert torch.equal(rec.rewritten._gnmr_plan_host, plan[rec.unit_ids])
    assert dynamo_counters["stats"]["unique_graphs"] == graphs, "a plan change recompiled"
    assert losses["low"].item() != losses["high"].item()


def test_emulate_true_keeps_the_where_path():
    before = counters["insert_dual_path"]["host_dispatch_nodes"]
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(n_layer=1, n_embd=64, block_size=32))
    cm = gnmr_fx.compile(model, GNMRConfig(emulate=True), backend="eager")
    cm(torch.randint(0, 256, (2, 32)))
    rec = gnmr_fx.runtime(cm).records[0]
    assert not hasattr(rec.rewritten, PLAN_HOST)
    assert counters["insert_dual_path"]["host_dispatch_nodes"] == before
    assert {s.extra["kernel"] for s in rec.sites} == {"emulated"}


def test_errors_name_the_alternative(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    msg = real_kernels.real_kernel_problem("fp8_e4m3", cuda)
    assert "sm_89+" in msg and "sm_80" in msg and "emulate=True" in msg
    with pytest.raises(ValueError, match=r"GNMRConfig.emulate=False: .*sm_89\+.*emulate=True"):
        host_dispatch.kernel_for("linear", (32, 32), (32, 32), "fp8_e4m3", cuda, False)
    # emulate=None (auto) never raises: it emulates where kernels are missing.
    assert host_dispatch.kernel_for("linear", (32, 32), (32, 32), "fp8_e4m3", cuda, None) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    msg = real_kernels.real_kernel_problem("fp8_rowwise", cuda)
    assert "sm_90+" in msg and "recipe='fp8_e4m3'" in msg
    assert host_dispatch.kernel_for("linear", (32, 32), (32, 32), "fp8_e4m3", cuda, None) == "fp8_e4m3:tensorwise"
    with pytest.raises(ValueError, match="recipe 'int8' has no real low-precision kernel.*int8_rowwise"):
        host_dispatch.kernel_for("linear", (32, 32), (32, 32), "int8", cuda, False)
    assert host_dispatch.kernel_for("linear", (32, 32), (32, 32), "int8_rowwise", cuda, None) == "int8_rowwise:rowwise"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert real_kernels.real_kernel_problem("int8_rowwise", cuda) == \
        "int8 kernels need sm_80+, this GPU is sm_75; use emulate=True"
    assert "recipe='int8_rowwise'" not in real_kernels.real_kernel_problem("fp8_e4m3", cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "recipe='int8_rowwise' (real int8, sm_80+)" in real_kernels.real_kernel_problem("fp8_e4m3", cuda)


def test_select_mm_op_picks_the_branch():
    x, w, _ = _xwg()
    ops = real_kernels.output_operands(x, w, real_kernels.REAL_RECIPES["fp8_e4m3"])
    plan = torch.tensor([False, True])
    args = (x, w.t(), ops.a_lp, ops.b_lp, ops.scale_a, ops.scale_b, True)
    assert torch.equal(torch.ops.gnmr.select_mm(plan, 0, *args), real_kernels.lowp_mm(ops, x.dtype))
    assert torch.equal(torch.ops.gnmr.select_mm(plan, 1, *args), x @ w.t())


def test_high_path_in_a_named_dtype():
    # high="bf16": the high path runs the GEMMs in bf16 and returns the unit's dtype.
    x, w, g = _xwg()
    plan = torch.tensor([True])
    y, gx, gw = _grads(lambda a, b: host_dispatch.dual_linear(a, b, plan=plan, slot=0, recipe="fp8_e4m3",
                                                              high="bf16"), x, w, g)
    assert y.dtype == gx.dtype == gw.dtype == torch.float32
    assert torch.equal(y, (x.bfloat16() @ w.bfloat16().t()).float())
    assert torch.equal(gw, (g.bfloat16().t() @ x.bfloat16()).float())


def _deferred_run(defer):
    # Four steps; a runtime callback decides the next step's plan (all-low, all-high, ...), as the
    # controller would, so every step changes what the host plan must say. The deferral is the
    # runtime's (CompiledCall's forward entry), whatever runs the graph: backend="eager".
    model, cm, rt, opt, idx = _compiled(backend="eager")
    rt.defer_host_copy = defer

    def alternate(r):
        n = r.controller.num_units
        r.controller.set_plan(torch.full((n,), r.controller.step % 2 == 1, dtype=torch.bool))

    rt.callbacks.append(alternate)
    losses, host_after_step = [], []
    for _ in range(4):
        loss = cm(idx, idx)
        losses.append(loss.item())
        loss.backward()
        opt.step()  # the runtime's step runs in the optimizer's pre-hook
        opt.zero_grad()
        host_after_step.append([bool(v) for v in rt.records[0].plan_host])
    return rt, losses, host_after_step


def test_step_host_copy_finishes_at_the_next_forward():
    # gnmr_fx.compile defers the step's host copy to the next forward (no drain at the step);
    # the forwards see exactly the plans an immediate copy gives.
    rt, losses, host = _deferred_run(defer=True)
    ref_rt, ref_losses, ref_host = _deferred_run(defer=False)
    assert losses == ref_losses
    assert len(set(losses)) > 1  # the plans differ, so the host plan each forward read matters
    # Right after each step the immediate copy holds the new plan, the deferred one still the plan
    # that step's forward ran with (the one before).
    n = rt.controller.num_units
    assert ref_host == [[s % 2 == 1] * n for s in range(1, 5)]
    assert host == [[False] * n] + ref_host[:-1]
    rec = rt.records[0]
    assert rt._host_pending is not None
    rt.before_forward()
    assert rt._host_pending is None
    assert rec.plan_host.tolist() == ref_host[-1]
    # A plan written between steps replaces a pending copy instead of being overwritten by it,
    # even when the host copy already holds that plan.
    rt.callbacks.clear()
    rt._host_pending = (torch.ones(n, dtype=torch.bool), None, [rec])
    rt.force_plan(rec.plan_host.clone())
    rt.before_forward()
    assert rec.plan_host.tolist() == ref_host[-1]


def test_gnmr_compile_defers_the_host_copy():
    _, cm, rt, _, _ = _compiled()
    assert rt.defer_host_copy  # every forward enters through CompiledCall


@pytest.mark.parametrize("closure", [False, True], ids=["step", "step(closure)"])
def test_optimizer_step_updates_from_this_steps_gradients(closure):
    # Without a closure the update runs in step()'s pre-hook (the gradients are final); with one
    # (LBFGS style) the forward and backward run inside step(), so the update waits for them.
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(n_layer=1, n_embd=64, block_size=32))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cm = gnmr_fx.compile(model, GNMRConfig(), backend="eager", optimizer=opt)
    rt = gnmr_fx.runtime(cm)
    idx = torch.randint(0, 256, (2, 32))

    def loss_and_grads():
        opt.zero_grad()
        loss = cm(idx, idx)
        loss.backward()
        return loss

    for step in range(1, 3):
        if closure:
            opt.step(loss_and_grads)
        else:
            loss_and_grads()
            opt.step()
        assert rt.controller.step == step
        # Every unit was observed at every step: the statistics came from this step's backward.
        assert rt.controller.n_obs.tolist() == [step] * rt.controller.num_units


@pytest.mark.parametrize("backend,recipe,emulate", [("aot_eager", "mxfp4", None), ("inductor", "int8", None),
                                                    ("aot_eager", "fp8_e4m3", False)])
def test_low_graph_runs_on_all_low_steps_and_computes_the_same(backend, recipe, emulate):
    """GNMRConfig(low_graph=True): an all-low step runs the graph copy with the
    low paths inlined (no cond), any other plan the cond graph; the losses and
    gradients equal those of the model without the copy, over plan changes.
    With ``emulate=False`` the graph mixes real-kernel units (the linears, on
    the CPU's _scaled_mm) and emulated ones (attention's batched matmuls)."""
    from torch._dynamo.utils import counters as dynamo_counters

    def run(low_graph):
        torch.manual_seed(0)
        model = TinyGPT(GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=32))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        cm = gnmr_fx.compile(model, GNMRConfig(recipe=recipe, policy="always_low", low_graph=low_graph,
                                               emulate=emulate), backend=backend, optimizer=opt)
        rt = gnmr_fx.runtime(cm)
        idx = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
        out, low_calls = [], []
        for step in range(5):
            if step == 2:
                rt.reset_controller(rt.config.replace(policy="always_high"))
            if step == 3:  # one unit high: not an all-low plan
                rt.reset_controller(rt.config.replace(policy="always_low"))
                plan = torch.zeros(rt.controller.num_units, dtype=torch.bool)
                plan[3] = True
                rt.controller.set_plan(plan)
                rt.write_plan()
            if step == 4:
                rt.reset_controller(rt.config.replace(policy="always_low"))
            before = dynamo_counters["gnmr"]["low_graph_calls"]
            loss = cm(idx, idx)
            loss.backward()
            low_calls.append(dynamo_counters["gnmr"]["low_graph_calls"] - before)
            out.append((loss.detach(), model.blocks[0].fc.weight.grad.clone()))
            opt.step()
            opt.zero_grad()
        return out, low_calls

    ref, ref_calls = run(False)
    got, calls = run(True)
    assert ref_calls == [0, 0, 0, 0, 0]
    assert calls == [1, 1, 0, 0, 1]
    if emulate is False:
        from gnmr_fx.backend import _all_low_copy, _lift_state
        from gnmr_fx.passes.nodes import low_only_path

        model = TinyGPT(GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=32))
        cm = gnmr_fx.compile(model, GNMRConfig(recipe=recipe, emulate=False), backend="eager")
        cm(torch.zeros(1, 8, dtype=torch.long))
        exec_gm, _ = _lift_state(gnmr_fx.runtime(cm).records[0].rewritten)
        targets = {n.target for n in _all_low_copy(exec_gm).graph.nodes if n.op == "call_function"}
        assert {host_dispatch.low_linear, low_only_path} <= targets  # both kinds of unit
    for (l_ref, g_ref), (l_got, g_got) in zip(ref, got):
        torch.testing.assert_close(l_got, l_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-5)


def test_low_graph_with_real_kernels_computes_the_same_as_the_dual_path_graph():
    """Real-kernel units (fp8, on the CPU's _scaled_mm) in the all-low copy are
    ``low_linear`` with the weight statistic folded in: under aot_eager the
    losses, gradients, statistics and plans equal those of the model without
    the copy, bitwise, over steps with a pinned unit (the dual-path graph runs)
    and without (the copy runs)."""
    from torch._dynamo.utils import counters as dynamo_counters
    from gnmr_fx.backend import _all_low_copy, _lift_state
    from gnmr_fx.benchmarks.perf import Llama, LlamaSpec

    spec = LlamaSpec(hidden=64, intermediate=176, heads=4, layers=1, vocab=256, seq=32, batch=2)

    def run(low_graph):
        torch.manual_seed(0)
        model = Llama(spec).to(torch.bfloat16)
        gen = torch.Generator().manual_seed(1)
        idx, tgt = (torch.randint(0, spec.vocab, (spec.batch, spec.seq), generator=gen) for _ in range(2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        cfg = GNMRConfig(recipe="fp8_e4m3", emulate=False, max_o=0.5, threshold=1e30, delta_threshold=1e30,
                         low_graph=low_graph)
        cm = gnmr_fx.compile(model, cfg, backend="aot_eager", optimizer=opt)
        rt = gnmr_fx.runtime(cm)
        out, calls = [], []
        for step in range(4):
            if step in (1, 3):  # a unit pinned high, then none
                pins = torch.zeros(rt.controller.num_units, dtype=torch.bool)
                pins[2] = step == 1
                rt.pin(pins)
            before = dynamo_counters["gnmr"]["low_graph_calls"]
            loss = cm(idx, tgt)
            loss.backward()
            calls.append(dynamo_counters["gnmr"]["low_graph_calls"] - before)
            out.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
            opt.step()
            opt.zero_grad()
            out[-1] += [rt.controller.norm.clone(), rt.controller.ema.clone(), rt.controller.plan.clone()]
        return out, calls, rt

    ref, ref_calls, _ = run(False)
    got, calls, rt = run(True)
    assert ref_calls == [0, 0, 0, 0]
    assert calls == [1, 0, 0, 1]  # a unit pinned high at steps 1 and 2
    assert rt.low_graph_calls == 2  # this runtime's count
    for a, b in zip(ref, got):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    assert rt.controller.n_obs.tolist() == [4] * rt.controller.num_units
    exec_gm, _ = _lift_state(rt.records[0].rewritten)
    targets = [n.target for n in _all_low_copy(exec_gm).graph.nodes if n.op == "call_function"]
    assert host_dispatch.low_linear in targets and host_dispatch.dual_linear not in targets
    assert not any(getattr(t, "__name__", "") == "grad_stats" for t in targets)  # folded into the units


def test_low_graph_leaves_other_dispatch_alone():
    # dispatch="select" picks the branch on the device: no all-low copy to make.
    from gnmr_fx.backend import _all_low_copy, _lift_state
    from gnmr_fx.passes.nodes import low_only_path

    for dispatch, copied in (("select", False), ("host", True)):
        model = TinyGPT(GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=32))
        cm = gnmr_fx.compile(model, GNMRConfig(recipe="int8", dispatch=dispatch, low_graph=True), backend="eager")
        idx = torch.randint(0, 256, (2, 8))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            cm(idx, idx)
        said = [str(w.message) for w in seen if "has no all-low copy" in str(w.message)]
        assert len(said) == (0 if copied else 1), said  # the option doing nothing is said, once per graph
        exec_gm, _ = _lift_state(gnmr_fx.runtime(cm).records[0].rewritten)
        low = _all_low_copy(exec_gm)
        assert (low is not None) == copied, dispatch
        if copied:
            targets = [n.target for n in low.graph.nodes if "gnmr_dual" in n.meta]
            assert targets and all(t is low_only_path for t in targets)



@pytest.mark.parametrize("compiler,dispatch,copied", [("inductor", "host", True), ("aot_eager", "host", False),
                                                      ("inductor", "select", False)])
def test_low_graph_default_copies_under_inductor_only(monkeypatch, compiler, dispatch, copied):
    # low_graph=None (the default): the all-low copy where it buys speed (graphs
    # compiled with Inductor, units picking their path on the host), nothing
    # under the debugging compilers, and no warning where a graph cannot have
    # one (the warning is for an explicit low_graph=True). Inductor itself is
    # replaced by aot_eager here: what is tested is which graphs are compiled.
    from gnmr_fx import backend

    compile_ = backend._compile
    asked = []

    def cheap(gm, inputs, compiler):
        asked.append(compiler)
        return compile_(gm, inputs, "aot_eager")

    monkeypatch.setattr(backend, "_compile", cheap)
    assert GNMRConfig().low_graph is None
    model = TinyGPT(GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=32))
    cm = gnmr_fx.compile(model, GNMRConfig(recipe="int8", dispatch=dispatch, policy="always_low"), backend=compiler)
    idx = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cm(idx, idx).backward()
    assert not [w for w in seen if "low_graph" in str(w.message)]
    assert asked == [compiler] * (2 if copied else 1)  # the dual-path graph, then its copy
    assert gnmr_fx.runtime(cm).low_graph_calls == (1 if copied else 0)


_INT8_GEMM = re.compile(r"(?:extern_kernels\._int_mm|torch\.ops\.gnmr\.int_mm\.default)\("
                        r"(reinterpret_tensor\([^)]*\)[^)]*\)|\w+), (reinterpret_tensor\([^)]*\)[^)]*\)|\w+)")
_TUPLE = r"\(([^()]*)\)"


def _strides(arg: str, code: str) -> tuple:
    """The strides a buffer argument of Inductor's generated code has."""
    m = re.match(rf"reinterpret_tensor\(\w+, {_TUPLE}, {_TUPLE}", arg)
    if m is None:
        m = (re.search(rf"\b{arg} = empty_strided_\w+\({_TUPLE}, {_TUPLE}", code)
             or re.search(rf"assert_size_stride\({arg}, {_TUPLE}, {_TUPLE}", code))
    assert m is not None, f"no strides for {arg} in the generated code"
    return tuple(int(v) for v in m.group(2).split(",") if v.strip())


def test_inductor_gives_int8_gemms_the_imma_layouts():
    # cuBLAS runs _int_mm fast only on a row-major @ column-major pair. Given
    # the choice, Inductor wrote the dw GEMM's first operand column-major (here
    # too: strides (1, 256) before gnmr::int_mm; on the H200 a 5.6x slower
    # kernel). Read from the generated code: all three GEMMs of a compiled
    # int8 linear get the pair.
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model = real_kernels.convert_to_lowp(torch.nn.Sequential(torch.nn.Linear(128, 256, bias=False)), "int8_rowwise")
    x = torch.randn(4, 64, 128, requires_grad=True)
    with torch.no_grad():
        eager = real_kernels.lowp_linear(x, model[0].weight, None, "int8_rowwise")
    compiled = torch.compile(model)
    y, codes = run_and_get_code(lambda: compiled(x))
    _, codes_bw = run_and_get_code(lambda: y.float().pow(2).sum().backward())
    layouts = [(_strides(a, c), _strides(b, c)) for c in codes + codes_bw for a, b in _INT8_GEMM.findall(c)]
    assert len(layouts) == 3
    for (a0, a1), (b0, b1) in layouts:
        assert a1 == 1 and b0 == 1, layouts  # a row-major, b column-major
    assert sqnr(eager, y.detach()) >= 100.0


@pytest.mark.parametrize("rowwise", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_eager_int8_epilogue_is_two_passes_and_the_same_numbers(rowwise, out_dtype):
    # gnmr::select_mm runs the int8 GEMM eagerly (nothing fuses its epilogue):
    # there the scales and the cast take two elementwise passes over the
    # result, not four, and give bitwise what the traced form gives.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is not torch.ops.aten.new_empty.default:  # an allocation, no pass over data
                self.ops.append(func)
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (64, 96), generator=gen, dtype=torch.int8)
    b = real_kernels.col_major(torch.randint(-127, 128, (96, 48), generator=gen, dtype=torch.int8))
    sa = torch.rand((64, 1) if rowwise else (), generator=gen) * 1e-2 + 1e-4
    sb = torch.rand((1, 48) if rowwise else (), generator=gen) * 1e-3 + 1e-5
    traced, eager = Ops(), Ops()
    with traced:
        want = real_kernels.gemm(a, b, sa, sb, out_dtype, False)
    with eager:
        got = real_kernels.gemm(a, b, sa, sb, out_dtype, False, eager=True)
    assert got.dtype == want.dtype == out_dtype and torch.equal(got, want)
    assert eager.ops == [torch.ops.gnmr.int_mm.default, torch.ops.aten.mul.Tensor, torch.ops.aten.mul.out]
    assert len(traced.ops) == (5 if out_dtype == torch.bfloat16 else 4)  # int_mm, float, mul, mul[, to]
