"""CPU tests of the real-kernel host dispatch (torch's CPU ``_scaled_mm``).

The GPU versions (real cuBLASLt kernels, inductor, sync-debug mode) are in
test_gpu.py; here the same code paths run on the CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gnmr_fx
from gnmr_fx.backends import fp8_kernels, host_dispatch
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


@pytest.mark.parametrize("recipe", ["fp8_e4m3", "fp8_rowwise"])
def test_low_path_is_plain_fp8_and_high_path_is_the_op(recipe):
    x, w, g = _xwg()
    plan = torch.tensor([False, True])
    low = _grads(lambda a, b: host_dispatch.dual_linear(a, b, plan=plan, slot=0, recipe=recipe), x, w, g)
    high = _grads(lambda a, b: host_dispatch.dual_linear(a, b, plan=plan, slot=1, recipe=recipe), x, w, g)
    plain = _grads(lambda a, b: fp8_kernels.fp8_linear(a, b, None, recipe), x, w, g)
    native = _grads(lambda a, b: F.linear(a, b), x, w, g)
    for lo, pl in zip(low, plain):
        assert torch.equal(lo, pl)
    for hi, na in zip(high, native):
        assert torch.equal(hi, na)


@pytest.mark.parametrize("recipe", ["fp8_e4m3", "fp8_rowwise"])
def test_real_fp8_sqnr_on_cpu(recipe):
    x, w, g = _xwg(128, 256, 64, seed=1)
    ref = _grads(lambda a, b: F.linear(a.double(), b.double()), x, w, g.double())
    real = _grads(lambda a, b: fp8_kernels.fp8_linear(a, b, None, recipe), x, w, g)
    emu = _grads(lambda a, b: low_path("linear", a, b, None, recipe=recipe, a_index=0, b_index=1, b_kdim=-1,
                                       b_is_weight=True), x, w, g)
    for name, r, q, e in zip(("output", "grad_input", "grad_weight"), ref, real, emu):
        s = sqnr(r, q)
        assert s >= 20.0, f"{recipe} {name}: {s:.1f} dB is too low"
        assert s >= sqnr(r, e) - 1.5, (name, s, sqnr(r, e))
    # Same scales and grid as the emulated recipe: only accumulation differs.
    assert sqnr(emu[0], real[0]) >= 35.0


def test_unaligned_dims_are_padded():
    x, w, g = _xwg(30, 40, 24, seed=2)
    real = _grads(lambda a, b: fp8_kernels.fp8_linear(a, b, None, "fp8_e4m3"), x, w, g)
    plan = torch.tensor([False])
    host = _grads(lambda a, b: host_dispatch.dual_linear(a, b, plan=plan, slot=0, recipe="fp8_e4m3"), x, w, g)
    ref = _grads(lambda a, b: F.linear(a, b), x, w, g)
    for h, r, q in zip(host, real, ref):
        assert h.shape == q.shape
        assert torch.equal(h, r)
        assert sqnr(q, r) >= 20.0


def _gemm_counts(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name for e in prof.events()]
    return names.count("aten::_scaled_mm"), names.count("aten::mm")


def test_only_the_planned_branch_runs():
    x, w, g = _xwg()
    # Three GEMMs per unit and step: output, grad-input, grad-weight.
    low = _gemm_counts(lambda: _grads(
        lambda a, b: host_dispatch.dual_linear(a, b, plan=torch.tensor([False]), slot=0, recipe="fp8_e4m3"),
        x, w, g))
    high = _gemm_counts(lambda: _grads(
        lambda a, b: host_dispatch.dual_linear(a, b, plan=torch.tensor([True]), slot=0, recipe="fp8_e4m3"),
        x, w, g))
    assert low[0] == 3  # (torch's CPU _scaled_mm runs aten::mm inside, so mm is not counted here)
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


def test_compiled_host_dispatch_units_plans_and_statistics():
    before = counters["insert_dual_path"]["host_dispatch_nodes"]
    model, cm, rt, opt, idx = _compiled()
    ref = TinyGPT(model.cfg)
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("_gnmr.")})
    cm(idx, idx).backward()
    opt.step()
    opt.zero_grad()
    rec = rt.records[0]  # the step published the controller's plan to the host copy
    assert torch.equal(rec.rewritten._gnmr_plan_host, rt.controller.plan[rec.unit_ids].cpu())
    kernels = {s.name: s.extra["kernel"] for r in rt.records for s in r.sites}
    assert kernels == {"blocks.0.attn.qkv": "fp8_e4m3:tensorwise", "blocks.0.attn.matmul": "emulated",
                       "blocks.0.attn.matmul_1": "emulated", "blocks.0.attn.proj": "fp8_e4m3:tensorwise",
                       "blocks.0.fc": "fp8_e4m3:tensorwise", "blocks.0.out": "fp8_e4m3:tensorwise",
                       "head": "fp8_e4m3:tensorwise"}
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
    msg = fp8_kernels.real_kernel_problem("fp8_e4m3", cuda)
    assert "sm_89+" in msg and "sm_80" in msg and "emulate=True" in msg
    with pytest.raises(ValueError, match=r"GNMRConfig.emulate=False: .*sm_89\+.*emulate=True"):
        host_dispatch.kernel_for("linear", (32, 32), (32, 32), "fp8_e4m3", cuda, False)
    # emulate=None (auto) never raises: it emulates where kernels are missing.
    assert host_dispatch.kernel_for("linear", (32, 32), (32, 32), "fp8_e4m3", cuda, None) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    msg = fp8_kernels.real_kernel_problem("fp8_rowwise", cuda)
    assert "sm_90+" in msg and "recipe='fp8_e4m3'" in msg
    assert host_dispatch.kernel_for("linear", (32, 32), (32, 32), "fp8_e4m3", cuda, None) == "fp8_e4m3:tensorwise"
    with pytest.raises(ValueError, match="recipe 'int8' has no real low-precision kernel"):
        host_dispatch.kernel_for("linear", (32, 32), (32, 32), "int8", cuda, False)


def test_select_mm_op_picks_the_branch():
    x, w, _ = _xwg()
    ops = fp8_kernels.output_operands(x, w, fp8_kernels.REAL_RECIPES["fp8_e4m3"])
    plan = torch.tensor([False, True])
    args = (x, w.t(), ops.a_lp, ops.b_lp, ops.scale_a, ops.scale_b, True)
    assert torch.equal(torch.ops.gnmr.select_mm(plan, 0, *args), fp8_kernels.scaled_mm(ops, x.dtype))
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
