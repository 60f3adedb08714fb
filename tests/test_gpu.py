"""GPU-only tests of the real low-precision kernels (fp8, int8) and the host dispatch.

Skipped on machines without a CUDA GPU of compute capability 8.9+ (CI has
none); run on the lent GPU with ``benchmarks/gpu_suite.sh``.
"""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch
import torch.nn.functional as F

_CAP = torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_CAP < (8, 9), reason="needs a CUDA GPU with sm_89+ for fp8 kernels (none here)"),
]

import gnmr_fx  # noqa: E402
from gnmr_fx.backends import real_kernels, host_dispatch  # noqa: E402
from gnmr_fx.backends.recipes import sqnr  # noqa: E402
from gnmr_fx.backends.paths import low_path  # noqa: E402
from gnmr_fx.config import GNMRConfig  # noqa: E402
from gnmr_fx.models import GPTConfig, TinyGPT  # noqa: E402


@contextlib.contextmanager
def _syncs_raise(enabled: bool = True):
    """A host sync inside the block raises (``torch.cuda.set_sync_debug_mode("error")``)."""
    torch.cuda.set_sync_debug_mode("error" if enabled else 0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)

RECIPES = ["fp8_e4m3", "int8_rowwise"] + (["fp8_rowwise"] if _CAP >= (9, 0) else [])
# Where SQNR numbers land for the lent-GPU report (benchmarks/PERF.md).
_SQNR_LOG = os.environ.get("GNMR_SQNR_LOG")


def _grads(fn, x, w, g):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    y = fn(x, w)
    y.backward(g)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("recipe", RECIPES)
def test_real_fp8_sqnr_vs_emulated_and_fp32(recipe):
    torch.manual_seed(0)
    dev = "cuda"
    x = torch.randn(512, 1024, device=dev, dtype=torch.bfloat16)
    w = torch.randn(768, 1024, device=dev, dtype=torch.bfloat16) * 0.02
    g = torch.randn(512, 768, device=dev, dtype=torch.bfloat16)
    ref = _grads(lambda a, b: F.linear(a.float(), b.float()), x, w, g.float())
    real = _grads(lambda a, b: real_kernels.lowp_linear(a, b, None, recipe), x, w, g)
    emu = _grads(lambda a, b: low_path("linear", a, b, None, recipe=recipe, a_index=0, b_index=1, b_kdim=-1,
                                       b_is_weight=True), x, w, g)
    names = ("output", "grad_input", "grad_weight")
    got = {}
    for name, r, q, e in zip(names, ref, real, emu):
        got[name] = {"real_vs_fp32": sqnr(r, q), "emulated_vs_fp32": sqnr(r, e), "real_vs_emulated": sqnr(e, q)}
    if _SQNR_LOG:
        with open(_SQNR_LOG, "a") as f:
            f.write(json.dumps({"recipe": recipe, **got}) + "\n")
    print(recipe, json.dumps(got, indent=1))
    for name in names:
        s = got[name]
        # e4m3 operands: ~30 dB each; e5m2 gradients: ~25 dB; int8 rowwise ~40 dB.
        floor = 35.0 if recipe.startswith("int8") else 20.0
        assert s["real_vs_fp32"] >= floor, f"{recipe} {name}: real vs fp32 {s['real_vs_fp32']:.1f} dB is too low"
        # The real kernel must be as accurate as the emulation it replaces.
        assert s["real_vs_fp32"] >= s["emulated_vs_fp32"] - 1.5, (recipe, name, s)
    assert got["output"]["real_vs_emulated"] >= 30.0, got["output"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_host_dispatch_runs_one_branch_exactly(recipe):
    torch.manual_seed(1)
    x = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(384, 256, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(4, 64, 384, device="cuda", dtype=torch.bfloat16)
    plan = torch.tensor([False, True])
    low = _grads(lambda a, b: host_dispatch.dual_linear(a, b, plan=plan, slot=0, recipe=recipe), x, w, g)
    high = _grads(lambda a, b: host_dispatch.dual_linear(a, b, plan=plan, slot=1, recipe=recipe), x, w, g)
    real = _grads(lambda a, b: real_kernels.lowp_linear(a, b, None, recipe), x, w, g)
    native = _grads(lambda a, b: F.linear(a, b), x, w, g)
    for lo, re_ in zip(low, real):
        assert torch.equal(lo, re_)  # the low path IS the plain fp8 linear
    for hi, na in zip(high, native):
        assert torch.equal(hi, na)  # the high path IS the op as written


def _model_and_data(seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=128)
    model = TinyGPT(cfg).cuda().to(torch.bfloat16)
    idx = torch.randint(0, 256, (4, 64), device="cuda")
    tgt = torch.randint(0, 256, (4, 64), device="cuda")
    return model, idx, tgt


def _set_plan(rt, high_mask):
    rt.pin(high_mask)  # as the benchmark does: the controller keeps this plan; publishes the host copy


def test_real_kernels_chosen_automatically():
    model, idx, tgt = _model_and_data()
    cm = gnmr_fx.compile(model, GNMRConfig(), backend="aot_eager")
    cm(idx, tgt)
    kernels = {s.name: s.extra["kernel"] for r in gnmr_fx.runtime(cm).records for s in r.sites}
    assert kernels["blocks.0.fc"] == "fp8_e4m3:tensorwise"
    assert kernels["blocks.0.attn.matmul"] == "emulated"  # batched: no real kernel


# emulate=None: real fp8 kernels (dual_linear) where they exist; True: every
# unit emulated, dispatched on the same host plan (dispatch_path, torch.cond).
@pytest.mark.parametrize("emulate,recipe", [(None, "fp8_e4m3"), (None, "int8_rowwise"), (True, "fp8_e4m3")],
                         ids=["real", "real-int8", "emulated"])
def test_no_host_sync_and_zero_recompiles_on_plan_flips(emulate, recipe):
    model, idx, tgt = _model_and_data()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cm = gnmr_fx.compile(model, GNMRConfig(recipe=recipe, max_o=0.5, emulate=emulate), backend="inductor",
                         optimizer=opt)
    rt = gnmr_fx.runtime(cm)
    for _ in range(2):  # compile + warm up (compilation may sync)
        cm(idx, tgt).backward()
        opt.step()
        opt.zero_grad()
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    n = rt.controller.num_units
    gen = torch.Generator().manual_seed(0)
    plans = [torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)]
    plans += [torch.rand(n, generator=gen) < 0.5 for _ in range(3)]
    losses = []
    for plan in plans:
        _set_plan(rt, plan)
        torch.cuda.synchronize()
        with _syncs_raise():
            loss = cm(idx, tgt)
            loss.backward()
        # The runtime's step (controller update + the one plan copy to the
        # host) runs here, in opt.step(), outside the checked region.
        opt.step()
        opt.zero_grad()
        assert torch.equal(rt.records[0].rewritten._gnmr_plan_host, plan[rt.records[0].unit_ids.cpu()])
        losses.append(loss.detach())
    assert counters["stats"]["unique_graphs"] == graphs, "a plan change recompiled"
    assert all(torch.isfinite(v) for v in losses)
    if emulate is None:
        kernels = {s.extra["kernel"] for r in rt.records for s in r.sites}
        assert f"{recipe}:{'tensorwise' if recipe == 'fp8_e4m3' else 'rowwise'}" in kernels, kernels


def test_plan_changes_the_kernels_without_recompiling():
    model, idx, tgt = _model_and_data(seed=3)
    ref = model.float()(idx).detach()
    model = model.to(torch.bfloat16)
    cm = gnmr_fx.compile(model, GNMRConfig(), backend="inductor")
    rt = gnmr_fx.runtime(cm)
    from torch._dynamo.utils import counters

    with torch.no_grad():
        cm(idx)
        graphs = counters["stats"]["unique_graphs"]
        n = rt.controller.num_units
        out = {}
        for name, plan in (("low", torch.zeros(n, dtype=torch.bool)), ("high", torch.ones(n, dtype=torch.bool))):
            _set_plan(rt, plan)
            out[name] = cm(idx).float()
    assert counters["stats"]["unique_graphs"] == graphs
    s_low, s_high = sqnr(ref, out["low"]), sqnr(ref, out["high"])
    print("logits SQNR vs fp32: low", s_low, "high", s_high)
    assert s_high > s_low + 3.0, (s_low, s_high)


@pytest.mark.parametrize("emulate", [None, True], ids=["real", "emulated"])
def test_plan_lag_publishes_the_previous_steps_plan_without_syncs(emulate):
    model, idx, tgt = _model_and_data(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cm = gnmr_fx.compile(model, GNMRConfig(max_o=0.5, plan_lag=1, emulate=emulate), backend="aot_eager",
                         optimizer=opt)
    rt = gnmr_fx.runtime(cm)
    cm(idx, tgt).backward()  # compile
    opt.step()
    opt.zero_grad()
    n = rt.controller.num_units
    gen = torch.Generator().manual_seed(0)
    plans = [torch.rand(n, generator=gen) < 0.5 for _ in range(5)]
    # Decide the plan of each step ourselves, in a step callback: the runtime copies it to the host after them.
    rt.callbacks.insert(0, lambda r: setattr(r.controller, "plan", plans[r.controller.step % 5].to(r.controller.device)))
    rec = rt.records[0]
    seen = []
    for _ in range(5):
        with _syncs_raise():
            cm(idx, tgt).backward()
        opt.step()
        opt.zero_grad()
        seen.append((rt.controller.step, rec.plan_host.clone()))
    for (step, host), (prev_step, _) in zip(seen[1:], seen):
        # After step t the host holds the plan decided at step t-1.
        assert torch.equal(host, plans[prev_step % 5][rec.unit_ids.cpu()]), step


@pytest.mark.parametrize("recipe", ["mxfp4", "nvfp4", "nvfp4_sr"])
def test_emulated_dispatch_runs_the_model_or_the_recipe(recipe):
    """GPU units emulated under dispatch="host": all-high is the model as
    written (through torch.cond on the host plan), all-low the recipe applied
    by hand (the graph's all-low copy, the default under Inductor); training
    steps on either path (stochastic rounding of gradients for *_sr) with no
    sync and no recompile when the plan flips."""
    from torch._dynamo.utils import counters

    from gnmr_fx.benchmarks.emulation import FakeQuantGPT
    from gnmr_fx.passes.nodes import dispatch_path

    torch.manual_seed(0)
    cfg = GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=128)
    ref = TinyGPT(cfg).cuda()
    idx = torch.randint(0, 256, (4, 64), device="cuda")
    model = TinyGPT(cfg).cuda()
    model.load_state_dict(ref.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the runtime steps (and copies the plan) in opt.step()
    cm = gnmr_fx.compile(model, GNMRConfig(recipe=recipe, policy="always_high"), backend="inductor", optimizer=opt)
    rt = gnmr_fx.runtime(cm)
    cm(idx, idx).backward()  # compile the training graph
    opt.step()
    opt.zero_grad()
    rec = rt.records[0]
    assert {n.target for n in rec.rewritten.graph.nodes if "gnmr_dual" in n.meta} == {dispatch_path}
    loss = {}
    graphs = counters["stats"]["unique_graphs"]
    for policy in ("always_low", "always_high", "always_low"):
        rt.reset_controller(rt.config.replace(policy=policy))  # publishes the host plan
        assert bool(rec.plan_host.all()) == (policy == "always_high")
        torch.cuda.synchronize()
        with _syncs_raise():
            loss[policy] = cm(idx, idx)
            loss[policy].backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        opt.zero_grad()
    assert counters["stats"]["unique_graphs"] == graphs, "a plan flip recompiled"
    with torch.no_grad():
        torch.testing.assert_close(loss["always_high"], ref(idx, idx), rtol=1e-5, atol=1e-5)
        # fp4 grids are coarse: a last-bit difference between Inductor and eager can move an
        # element to the next grid point, so the low path is compared as a loss, to 1e-3.
        torch.testing.assert_close(loss["always_low"], FakeQuantGPT(ref, recipe)(idx, idx), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("recipe", ["int4", "mxfp4_sr"])
def test_no_grad_forward_after_training_under_autocast(recipe):
    """The stability benchmark's evaluation: after training steps under bf16
    autocast, the compiled model runs under no_grad (Inductor compiles an
    inference graph whose conds take the attention's strided q, k, v views)
    and gives the training forward's loss on the same weights and plan.
    Regression: a copy of the operands made before the cond was once dropped
    by Inductor on CUDA, and the cond's branch asserted on the strides."""
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=128)
    model = TinyGPT(cfg).cuda()
    idx = torch.randint(0, 256, (8, 64), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        cm = gnmr_fx.compile(model, GNMRConfig(recipe=recipe), backend="inductor", optimizer=opt,
                             example_inputs=(idx, idx))
    rt = gnmr_fx.runtime(cm)
    for policy in ("always_low", "always_high"):
        rt.reset_controller(rt.config.replace(policy=policy))
        for _ in range(2):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = cm(idx, idx)
            loss.backward()
            opt.step()
            opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            train_loss = cm(idx, idx)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            eval_loss = cm(idx, idx)
        assert torch.isfinite(eval_loss)
        torch.testing.assert_close(eval_loss.float(), train_loss.detach().float(), rtol=2e-2, atol=2e-2)


def test_low_graph_on_the_gpu_same_numbers_no_sync():
    """GNMRConfig(low_graph=True) on CUDA: all-low steps run the copy with the
    low paths inlined, chosen from the host copy of the plan with no sync
    (sync debug mode "error" around forward and backward); the losses equal
    those of the cond graph's; a step with a unit high runs the cond graph."""
    from torch._dynamo.utils import counters

    def run(low_graph):
        torch.manual_seed(0)
        model = TinyGPT(GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=128)).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        cm = gnmr_fx.compile(model, GNMRConfig(recipe="mxfp4", policy="always_low", low_graph=low_graph),
                             backend="inductor", optimizer=opt)
        rt = gnmr_fx.runtime(cm)
        idx = torch.randint(0, 256, (4, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        losses, calls = [], []
        for step in range(4):
            if step == 2:
                rt.reset_controller(rt.config.replace(policy="always_high"))
            if step == 3:
                rt.reset_controller(rt.config.replace(policy="always_low"))
            torch.cuda.synchronize()
            before = counters["gnmr"]["low_graph_calls"]
            with _syncs_raise(step > 0):  # the first step compiles
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = cm(idx, idx)
                loss.backward()
            calls.append(counters["gnmr"]["low_graph_calls"] - before)
            losses.append(loss.detach().float())
            opt.step()
            opt.zero_grad()
        return losses, calls

    ref, ref_calls = run(False)
    got, calls = run(True)
    assert ref_calls == [0, 0, 0, 0] and calls == [1, 1, 0, 1]
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)


def test_low_graph_with_real_fp8_is_the_plain_fp8_model_no_sync():
    """GNMRConfig(low_graph=True) with real fp8 kernels on CUDA: an all-low step
    runs the copy whose units are ``low_linear`` (no select_mm, no bf16 operand
    kept for a high path), chosen with no sync and no recompile; its loss is
    the plain fp8 model's (``convert_to_lowp`` + torch.compile), bitwise, and
    its gradients within bf16 rounding; a step with a unit pinned high runs
    the dual-path graph."""
    from torch._dynamo.utils import counters
    from gnmr_fx.benchmarks.perf import Llama, LlamaSpec, _shared_copy

    spec = LlamaSpec(hidden=256, intermediate=512, heads=4, layers=2, vocab=512, seq=128, batch=4)
    torch.manual_seed(0)
    base = Llama(spec).cuda().to(torch.bfloat16)
    base.cos, base.sin = base.cos.float(), base.sin.float()
    idx, tgt = (torch.randint(0, spec.vocab, (spec.batch, spec.seq), device="cuda") for _ in range(2))

    def loss_and_grads(model):
        for p in base.parameters():
            p.grad = None
        loss = model(idx, tgt)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in base.parameters()]

    ref = loss_and_grads(torch.compile(real_kernels.convert_to_lowp(_shared_copy(base), "fp8_e4m3")))
    cfg = GNMRConfig(recipe="fp8_e4m3", emulate=False, threshold=1e30, delta_threshold=1e30, low_graph=True)
    opt = torch.optim.SGD(base.parameters(), lr=0.0)
    cm = gnmr_fx.compile(_shared_copy(base), cfg, optimizer=opt)
    rt = gnmr_fx.runtime(cm)
    got = loss_and_grads(cm)  # compiles both graphs
    opt.step()
    assert torch.equal(got[0], ref[0])
    for g, r in zip(got[1:], ref[1:]):
        torch.testing.assert_close(g, r, rtol=1.6e-2, atol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    calls = []
    for step in range(3):
        pins = torch.zeros(rt.controller.num_units, dtype=torch.bool)
        pins[0] = step == 1
        rt.pin(pins)
        torch.cuda.synchronize()
        before = counters["gnmr"]["low_graph_calls"]
        with _syncs_raise():
            loss = cm(idx, tgt)
            loss.backward()
        calls.append(counters["gnmr"]["low_graph_calls"] - before)
        assert torch.isfinite(loss)
        opt.step()
        opt.zero_grad()
    assert calls == [1, 0, 1]
    assert counters["stats"]["unique_graphs"] == graphs  # no recompile
