"""The GNMR passes on real captured graphs: discovery, exactness, recompiles, stats."""

import copy
import importlib
import io
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import gnmr_fx
from gnmr_fx import GNMRConfig
from gnmr_fx.backends.recipes import get_recipe, sqnr
from gnmr_fx.models import GPTConfig, TinyGPT
from gnmr_fx.passes import counters

TINY = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32)
TINY_GPT_UNITS = [
    f"blocks.{i}.{u}"
    for i in range(2)
    for u in ("attn.qkv", "attn.matmul", "attn.matmul_1", "attn.proj", "fc", "out")
] + ["head"]


def _gpt(seed=0):
    torch.manual_seed(seed)
    return TinyGPT(TINY)


# One block (7 units: the block's 6 and the head): what the compilers and the dispatch
# modes do to a unit does not depend on how many blocks repeat it, and the compiles
# (Inductor's above all) cost time per graph node.
TINY1 = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32)
TINY1_UNITS = 7  # blocks.0's six units and head


def _gpt1(seed=0):
    torch.manual_seed(seed)
    return TinyGPT(TINY1)


def _batch(seed=0, b=4):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, TINY.vocab_size, (b, TINY.block_size), generator=g)
    return idx, torch.roll(idx, -1, dims=1)


class Conv1D(nn.Module):
    """Hugging Face GPT-2's Conv1D: a linear with a [in, out] weight, via addmm."""

    def __init__(self, nx, nf):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], -1)


class AddmmMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = Conv1D(16, 32)
        self.c_proj = Conv1D(32, 16)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, idx):
        return self.conv(self.emb(idx).unsqueeze(1)).sum()


class BreakNet(nn.Module):
    """A graph break between two linears (a host read, as real models do)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x)
        torch._dynamo.graph_break()
        return self.b(torch.relu(h)) @ h.t()


def _check(model, inputs, expected_units, config=None, backend="eager"):
    """Compile, run once, and assert the discovered unit names."""
    before = counters["discover_units"]["units"]
    m = gnmr_fx.compile(model, config or GNMRConfig(), backend=backend)
    m(*inputs)
    names = gnmr_fx.controller(m).names
    assert names == expected_units
    assert counters["discover_units"]["units"] - before == len(expected_units)
    return m


class TestDiscover:
    def test_tiny_gpt_units_named_after_modules(self):
        _check(_gpt(), _batch()[:1], TINY_GPT_UNITS)

    def test_addmm_units_have_weights(self):
        m = _check(AddmmMLP(), (torch.randn(2, 3, 16),), ["c_fc", "c_proj"])
        units = gnmr_fx.runtime(m).units
        assert [u.op_name for u in units] == ["addmm", "addmm"]
        assert [u.weight for u in units] == ["c_fc.weight", "c_proj.weight"]
        assert units[0].flops == 2 * 6 * 16 * 32

    def test_weightless_attention_matmuls(self):
        m = _check(_gpt(), _batch()[:1], TINY_GPT_UNITS)
        units = {u.name: u for u in gnmr_fx.runtime(m).units}
        assert units["blocks.0.attn.matmul"].weight is None
        assert units["blocks.0.attn.matmul"].op_name == "matmul"
        assert units["blocks.0.attn.qkv"].weight == "blocks.0.attn.qkv.weight"

    def test_negative_no_recoverable_ops(self):
        before = counters["insert_dual_path"]["dual_path_nodes"]
        m = gnmr_fx.compile(ConvNet(), backend="eager")
        m(torch.randint(0, 10, (2, 5)))
        rt = gnmr_fx.runtime(m)
        assert rt.units == []
        assert rt.records[0].skipped == {"embedding": 1, "conv2d": 1}
        assert counters["insert_dual_path"]["dual_path_nodes"] == before

    def test_names_stable_across_recompiles_and_runs(self):
        m = gnmr_fx.compile(_gpt(), backend="eager")
        idx, _ = _batch()
        m(idx)
        m(idx[:, :8])  # new shape: Dynamo recompiles
        rt = gnmr_fx.runtime(m)
        assert len(rt.records) >= 2
        assert rt.unit_names == TINY_GPT_UNITS
        assert [s.name for s in rt.records[-1].sites] == TINY_GPT_UNITS
        # A second, independent compile of an identical model names identically.
        m2 = gnmr_fx.compile(_gpt(1), backend="eager")
        m2(idx)
        assert gnmr_fx.runtime(m2).unit_names == TINY_GPT_UNITS

    @pytest.mark.parametrize("dispatch,counter", [("host", "dispatch_path_nodes"), ("select", "dual_path_nodes")])
    def test_counters(self, dispatch, counter):
        counters.clear()
        _check(_gpt(), _batch()[:1], TINY_GPT_UNITS, GNMRConfig(dispatch=dispatch))
        assert dict(counters["insert_dual_path"]) == {counter: 13}
        assert counters["insert_grad_stats"]["stats_nodes"] == 13


class TestFilter:
    def test_patterns_restrict_units(self):
        cfg = GNMRConfig(unit_filter=["blocks.*.fc", "head"])
        m = gnmr_fx.compile(_gpt(), cfg, backend="eager", example_inputs=_batch()[:1])
        rt = gnmr_fx.runtime(m)
        assert rt.unit_names == ["blocks.0.fc", "blocks.1.fc", "head"]
        assert len(rt.units) == 13 and sum(u.included for u in rt.units) == 3

    def test_pattern_matching_nothing_is_an_error(self):
        cfg = GNMRConfig(unit_filter=["blocks.*.fc", "lm_head"])
        with pytest.raises(ValueError, match=r"pattern\(s\) \['lm_head'\] match no unit"):
            gnmr_fx.compile(_gpt(), cfg, backend="eager", example_inputs=_batch()[:1])

    def test_callable_filter(self):
        cfg = GNMRConfig(unit_filter=lambda name, op: op is torch.matmul or op.__name__ == "matmul")
        m = gnmr_fx.compile(_gpt(), cfg, backend="eager", example_inputs=_batch()[:1])
        assert gnmr_fx.runtime(m).unit_names == [n for n in TINY_GPT_UNITS if "matmul" in n]

    def test_filter_excluding_everything_is_an_error(self):
        cfg = GNMRConfig(unit_filter=lambda name, op: False)
        with pytest.raises(ValueError, match="excludes every unit"):
            gnmr_fx.compile(_gpt(), cfg, backend="eager", example_inputs=_batch()[:1])


def _run(model, compiled, policy_plan, batch, steps=1):
    rt = gnmr_fx.runtime(compiled)
    losses = []
    for _ in range(steps):
        if policy_plan is not None:
            rt.set_plan(policy_plan)
        loss = compiled(*batch)
        loss.backward()
        losses.append(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return losses, grads


DISPATCHES = ["host", "select"]


class TestNumerics:
    @pytest.mark.parametrize("dispatch", DISPATCHES)
    @pytest.mark.parametrize("backend", ["eager", "aot_eager"])
    def test_all_high_equals_uncompiled(self, backend, dispatch):
        ref_model = _gpt1()
        model = copy.deepcopy(ref_model)
        batch = _batch()
        ref_loss = ref_model(*batch)
        ref_loss.backward()
        m = gnmr_fx.compile(model, GNMRConfig(policy="always_high", recipe="int4", dispatch=dispatch), backend=backend)
        loss = m(*batch)
        loss.backward()
        pairs = [(p.grad, q.grad) for p, q in zip(ref_model.parameters(), model.parameters())]
        if backend == "eager":
            # The high path is the original call: bitwise identical.
            assert torch.equal(loss, ref_loss)
            assert all(torch.equal(a, b) for a, b in pairs)
        else:
            torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
            for a, b in pairs:
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize("dispatch", DISPATCHES)
    @pytest.mark.parametrize("recipe", ["fp8_e4m3", "fp8_rowwise", "int8", "int4"])
    def test_all_low_is_exactly_the_recipe(self, recipe, dispatch):
        lin = nn.Linear(64, 32)
        x = torch.randn(16, 64)
        cfg = GNMRConfig(recipe=recipe, policy="always_low", dispatch=dispatch)
        m = gnmr_fx.compile(copy.deepcopy(lin), cfg, backend="eager")
        r = get_recipe(recipe)
        expected = F.linear(r.quantize_input(x, -1), r.quantize_weight(lin.weight, -1), lin.bias)
        assert torch.equal(m(x), expected)

    def test_all_low_sqnr_on_tiny_gpt(self):
        # Logits SQNR (dB) of the whole model, all units low vs fp32.
        idx, _ = _batch()
        ref = _gpt()(idx)
        db = {}
        for recipe in ("fp8_e4m3", "int8", "int4"):
            m = gnmr_fx.compile(_gpt(), GNMRConfig(recipe=recipe, policy="always_low"), backend="eager")
            db[recipe] = sqnr(ref, m(idx))
        assert db["int8"] >= 35.0, db
        assert db["fp8_e4m3"] >= 22.0, db
        assert 8.0 <= db["int4"] < db["fp8_e4m3"] < db["int8"], db


class _SyncCounter(TorchDispatchMode):
    """Counts host reads of tensor values (a device-to-host sync on GPU), and
    those of ``host_plans``: the CPU plans that dispatch="host" reads by design
    (on a GPU, the host copy; on the CPU, the plan itself)."""

    def __init__(self, host_plans=()):
        super().__init__()
        self.syncs = 0
        self.plan_reads = 0
        self.host_plans = {t.untyped_storage().data_ptr() for t in host_plans}

    @classmethod
    def ignore_compile_internals(cls):
        # Otherwise Dynamo skips compiled frames while the mode is on, and the
        # model would run uncompiled: the mode would not see GNMR's graph.
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            if args[0].untyped_storage().data_ptr() in self.host_plans:
                self.plan_reads += 1
            else:
                self.syncs += 1
        return func(*args, **(kwargs or {}))


class TestRecompiles:
    @pytest.mark.parametrize("dispatch", DISPATCHES)
    def test_plan_flips_cause_zero_recompiles_eager(self, dispatch):
        model = _gpt()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        m = gnmr_fx.compile(model, GNMRConfig(recipe="int8", dispatch=dispatch), backend="eager", optimizer=opt)
        rt = gnmr_fx.runtime(m)
        batch = _batch()
        m(*batch).backward()
        opt.step()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        losses = []
        for flip in range(6):
            plan = torch.zeros(13, dtype=torch.bool)
            plan[flip::3] = True
            rt.set_plan(plan)
            losses.append(float(m(*batch)))
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
        assert len(rt.records) == 1
        assert len(set(losses)) > 1  # the plan really changed the numerics

    @pytest.mark.parametrize("dispatch", DISPATCHES)
    def test_no_host_reads_in_forward_backward_or_step(self, dispatch):
        model = _gpt()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        cfg = GNMRConfig(recipe="int8", warmup_steps=1, dispatch=dispatch)
        m = gnmr_fx.compile(model, cfg, backend="eager", optimizer=opt)
        batch = _batch()
        m(*batch).backward()  # compile outside the counted region
        opt.step()
        rec = gnmr_fx.runtime(m).records[0]
        with _SyncCounter(host_plans=[rec.plan]) as mode:
            for _ in range(3):
                m(*batch).backward()
                gnmr_fx.runtime(m).step()
        assert mode.syncs == 0
        # host: each unit reads its plan entry once per forward (the CPU plan); select: never.
        assert mode.plan_reads == (3 * 13 if dispatch == "host" else 0)


@pytest.fixture(scope="module")
def inductor_vs_eager():
    """The inductor compiles (slow on CPU), one per dispatch, shared by the tests that need them."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    results = {}
    plan = torch.zeros(TINY1_UNITS, dtype=torch.bool)
    plan[::2] = True
    for dispatch in DISPATCHES:
        for backend in ("eager", "aot_eager", "inductor"):
            model = _gpt1()
            cfg = GNMRConfig(recipe="fp8_e4m3", dispatch=dispatch)
            m = gnmr_fx.compile(model, cfg, backend=backend, example_inputs=_batch())
            assert gnmr_fx.runtime(m).unit_names == TINY_GPT_UNITS[:6] + ["head"]
            losses, grads = _run(model, m, plan, _batch())
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            flipped = []
            for k in range(3):  # flip the plan on the compiled model
                gnmr_fx.runtime(m).set_plan(torch.roll(plan, k + 1))
                flipped.append(float(m(*_batch())))
            recompiles = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
            results[backend, dispatch] = (losses[0], grads, recompiles, flipped)
    return results


class TestCompilers:
    @pytest.mark.parametrize("dispatch", DISPATCHES)
    def test_backends_agree(self, inductor_vs_eager, dispatch):
        # Every backend and dispatch against one reference: eager, branch-free select.
        ref_loss, ref_grads, _, ref_flipped = inductor_vs_eager["eager", "select"]
        for backend in ("eager", "aot_eager", "inductor"):
            loss, grads, _, flipped = inductor_vs_eager[backend, dispatch]
            torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(flipped, ref_flipped, rtol=1e-4, atol=1e-4)
            for name in ref_grads:
                torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=1e-4, msg=name)

    @pytest.mark.parametrize("dispatch", DISPATCHES)
    @pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
    def test_zero_recompiles_when_plan_flips(self, inductor_vs_eager, backend, dispatch):
        assert inductor_vs_eager[backend, dispatch][2] == 0


_GEMMS = ("aten::mm", "aten::addmm", "aten::bmm")


def _op_counts(step):
    """Matmul kernels (forward and backward) and fake-quant roundings one training step runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    names = [e.name for e in prof.events()]
    return sum(names.count(g) for g in _GEMMS), names.count("aten::round")


class TestDispatch:
    """dispatch="host": one branch per unit, chosen by reading the CPU plan."""

    @pytest.mark.parametrize("backend", ["eager", "aot_eager"])
    def test_only_the_planned_branch_runs(self, backend):
        batch = _batch()
        plain = torch.compile(_gpt1(), backend=backend)
        plain(*batch).backward()  # compile outside the profile
        counts = {"plain": _op_counts(lambda: plain(*batch).backward())}
        for dispatch in DISPATCHES:
            model = _gpt1()
            m = gnmr_fx.compile(model, GNMRConfig(recipe="int8", dispatch=dispatch), backend=backend)
            m(*batch).backward()  # compile outside the profile
            assert gnmr_fx.controller(m).num_units == TINY1_UNITS
            for plan in ("high", "low"):
                gnmr_fx.runtime(m).force_plan([plan == "high"] * TINY1_UNITS)
                counts[dispatch, plan] = _op_counts(lambda: m(*batch).backward())
        gemms, rounds = counts["plain"]
        assert gemms > 0 and rounds == 0
        # host: the plain model's matmuls, and roundings only on the low path
        # (traced, backward rounds the operands again: cond saves only its inputs).
        assert counts["host", "high"] == (gemms, 0), counts
        assert counts["host", "low"][0] == gemms, counts
        assert counts["host", "low"][1] == (1 if backend == "eager" else 2) * counts["select", "low"][1], counts
        # select: both branches, whatever the plan; 2 roundings (a and b) per unit.
        assert counts["select", "high"] == counts["select", "low"] == (2 * gemms, 2 * TINY1_UNITS), counts

    def test_aliased_operands_traced_as_eager(self):
        # q and k of the attention matmul are views of one qkv output
        # (operands torch.cond refuses to alias): traced and eager agree.
        class QK(nn.Module):
            def __init__(self):
                super().__init__()
                self.qkv = nn.Linear(8, 16)

            def forward(self, x):
                q, k = self.qkv(x).split(8, dim=-1)
                return q @ k.transpose(-2, -1)

        torch.manual_seed(0)
        x = torch.randn(2, 5, 8)
        out = {}
        for backend in ("eager", "aot_eager"):
            mod = QK()
            torch.manual_seed(0)
            mod.load_state_dict(QK().state_dict())
            m = gnmr_fx.compile(mod, GNMRConfig(recipe="int4", policy="always_low", max_o=0), backend=backend)
            y = m(x)
            y.square().sum().backward()
            out[backend] = (y.detach(), mod.qkv.weight.grad.clone())
        assert torch.equal(out["eager"][0], out["aot_eager"][0])
        torch.testing.assert_close(out["aot_eager"][1], out["eager"][1], rtol=1e-6, atol=1e-6)

    @pytest.mark.parametrize("dispatch", DISPATCHES)
    def test_named_high_path_dtype(self, dispatch):
        # high_path="bf16": the high branch runs in bf16 and returns the unit's dtype.
        from gnmr_fx.backends.paths import high_path

        lin = nn.Linear(16, 8)
        x = torch.randn(4, 16)
        cfg = GNMRConfig(recipe="int8", policy="always_high", high_path="bf16", dispatch=dispatch)
        m = gnmr_fx.compile(copy.deepcopy(lin), cfg, backend="aot_eager")
        y = m(x)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, high_path("linear", x, lin.weight, lin.bias, high="bf16"), rtol=0, atol=1e-6)

    def test_gpu_units_read_the_host_copy(self):
        # Units on a device other than the CPU read _gnmr_plan_host, the copy the
        # runtime publishes once per optimizer step (a "meta" graph stands in for a GPU one).
        from torch.fx.passes.fake_tensor_prop import FakeTensorProp

        from gnmr_fx.passes import run_passes
        from gnmr_fx.passes.nodes import dispatch_path

        def f(x, w):
            return F.linear(x, w) @ w

        for device, plan in (("cpu", "_gnmr_plan"), ("meta", "_gnmr_plan_host")):
            gm = torch.fx.symbolic_trace(f)
            FakeTensorProp(gm).propagate(torch.empty(4, 8, device=device), torch.empty(3, 8, device=device))
            gm = run_passes(gm, GNMRConfig(recipe="int8", policy="always_high"))
            duals = [n for n in gm.graph.nodes if "gnmr_dual" in n.meta]
            assert [n.target for n in duals] == [dispatch_path, dispatch_path]
            assert {n.kwargs["plan"].target for n in duals} == {plan}
            assert hasattr(gm, "_gnmr_plan_host") == (device == "meta")
        assert gm._gnmr_plan_host.device.type == "cpu" and gm._gnmr_plan_host.tolist() == [True, True]

    def test_real_and_emulated_gpu_units_share_one_host_plan_input(self, monkeypatch):
        # A GPU graph whose linear has a real kernel and whose batched matmul is
        # emulated reads the host plan from both rewrites. It must stay one
        # get_attr node and become one graph input (two broke every real-kernel
        # model on the H200: "no attribute '_gnmr_plan_host'").
        from torch.fx.passes.fake_tensor_prop import FakeTensorProp

        from gnmr_fx.backend import _lift_state
        from gnmr_fx.backends.host_dispatch import dual_linear
        from gnmr_fx.passes import run_passes
        from gnmr_fx.passes.nodes import dispatch_path

        idp = importlib.import_module("gnmr_fx.passes.insert_dual_path")  # the module, not the pass
        monkeypatch.setattr(idp, "kernel_for", lambda op, a, b, recipe, device, emulate:
                            "fp8_e4m3:tensorwise" if op == "linear" else None)

        def f(x, w, q, k):
            return F.linear(x, w).sum() + torch.bmm(q, k).sum()

        gm = torch.fx.symbolic_trace(f)
        args = [torch.empty(s, device="meta") for s in ((4, 8), (16, 8), (2, 3, 5), (2, 5, 3))]
        FakeTensorProp(gm).propagate(*args)
        gm = run_passes(gm, GNMRConfig(recipe="fp8_e4m3", policy="always_high", dispatch="host"))
        duals = [n for n in gm.graph.nodes if "gnmr_dual" in n.meta]
        assert sorted(str(n.target) for n in duals) == sorted(str(t) for t in (dual_linear, dispatch_path))
        reads = [n for n in gm.graph.find_nodes(op="get_attr") if n.target == "_gnmr_plan_host"]
        assert len(reads) == 1 and {n.kwargs["plan"] for n in duals} == {reads[0]}
        exec_gm, names = _lift_state(gm)
        assert sorted(names) == ["_gnmr_plan_host", "_gnmr_probe"]
        placeholders = [n.target for n in exec_gm.graph.find_nodes(op="placeholder")]
        assert placeholders[-2:] == names and not exec_gm.graph.find_nodes(op="get_attr")

    def test_lift_state_gives_one_input_per_tensor_read_twice(self):
        from gnmr_fx.backend import _lift_state

        gm = torch.fx.symbolic_trace(lambda x: x)
        gm.register_buffer("_gnmr_plan", torch.ones(2, dtype=torch.bool))
        x = next(iter(gm.graph.find_nodes(op="placeholder")))
        out = next(iter(gm.graph.find_nodes(op="output")))
        with gm.graph.inserting_after(x):
            a, b = gm.graph.get_attr("_gnmr_plan"), gm.graph.get_attr("_gnmr_plan")
        with gm.graph.inserting_before(out):
            s = gm.graph.call_function(torch.add, (a, b))
        out.args = ((x, s),)
        gm.recompile()
        exec_gm, names = _lift_state(gm)
        assert names == ["_gnmr_plan"]
        plan = torch.tensor([True, False])
        y, z = exec_gm(torch.zeros(1), plan)
        assert torch.equal(z, plan + plan)


class TestGraphBreak:
    def test_units_in_every_graph_and_training_works(self):
        model = BreakNet()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        m = gnmr_fx.compile(model, GNMRConfig(recipe="int8", warmup_steps=1), backend="aot_eager", optimizer=opt)
        x = torch.randn(4, 8)
        for _ in range(3):
            m(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        rt = gnmr_fx.runtime(m)
        assert len(rt.records) == 2
        assert rt.unit_names == ["a", "b", "matmul"]
        assert [[s.name for s in r.sites] for r in rt.records] == [["a"], ["b", "matmul"]]
        assert gnmr_fx.controller(m).step == 3
        assert int(gnmr_fx.controller(m).n_obs.min()) == 3  # every unit observed every step
        plan = torch.tensor([True, False, True])
        rt.set_plan(plan)
        assert [r.plan.tolist() for r in rt.records] == [[True], [False, True]]


class TestStatistics:
    # The grad-stats node sits outside the dual path, so it sees the unit's
    # gradient whichever branch ran (and however it was dispatched).
    @pytest.mark.parametrize("dispatch", DISPATCHES)
    @pytest.mark.parametrize("policy", ["always_high", "always_low"])
    @pytest.mark.parametrize("backend", ["eager", "aot_eager"])
    def test_weight_unit_records_weight_grad_norm(self, backend, policy, dispatch):
        lin = nn.Linear(8, 4)
        m = gnmr_fx.compile(lin, GNMRConfig(policy=policy, dispatch=dispatch, recipe="int4"), backend=backend)
        m(torch.randn(3, 8)).sin().sum().backward()  # no optimizer: one update per backward
        norm = float(gnmr_fx.controller(m).norm[0])
        assert norm == pytest.approx(lin.weight.grad.norm().item(), rel=1e-6)
        assert gnmr_fx.runtime(m).records[0].probe.grad is None  # read and cleared

    @pytest.mark.parametrize("dispatch", DISPATCHES)
    @pytest.mark.parametrize("backend", ["eager", "aot_eager"])
    def test_weightless_unit_records_output_grad_norm(self, backend, dispatch):
        class MM(nn.Module):
            def forward(self, a, b):
                return a @ b

        a, b = torch.randn(3, 4, requires_grad=True), torch.randn(4, 5, requires_grad=True)
        m = gnmr_fx.compile(MM(), GNMRConfig(policy="always_high", dispatch=dispatch), backend=backend)
        y = m(a, b)
        gy = torch.randn_like(y)
        y.backward(gy)
        assert float(gnmr_fx.controller(m).norm[0]) == pytest.approx(gy.norm().item(), rel=1e-6)

    def test_micro_batches_accumulate_sum_of_squares(self):
        lin = nn.Linear(8, 4)
        opt = torch.optim.SGD(lin.parameters(), lr=0.0)
        m = gnmr_fx.compile(lin, GNMRConfig(policy="always_high"), backend="eager", optimizer=opt)
        sq = 0.0
        for k in range(3):
            lin.weight.grad = None
            m(torch.randn(2, 8)).pow(k + 1).sum().backward()
            sq += lin.weight.grad.pow(2).sum().item()
        opt.step()  # the controller reads the accumulated statistic here
        ctl = gnmr_fx.controller(m)
        assert ctl.step == 1
        assert float(ctl.norm[0]) == pytest.approx(sq**0.5, rel=1e-5)
        assert float(ctl.mu[0]) == pytest.approx(sq**0.5, rel=1e-5)


class TestCheckpoint:
    @staticmethod
    def _train(model, opt, m, steps, start):
        plans, losses = [], []
        for s in range(start, start + steps):
            idx, tgt = _batch(seed=s)
            if s % 5 == 3:  # a loss spike: every unit's gradient jumps
                loss = m(idx, tgt) * 30.0
            else:
                loss = m(idx, tgt)
            loss.backward()
            opt.step()
            opt.zero_grad()
            plans.append(gnmr_fx.controller(m).plan.clone())
            losses.append(float(loss))
        return plans, losses

    def test_resume_gives_identical_plan_sequence(self):
        cfg = GNMRConfig(recipe="int8", warmup_steps=2, max_o=3, lock_steps=2)
        model = _gpt()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        m = gnmr_fx.compile(model, cfg, backend="eager", optimizer=opt)
        self._train(model, opt, m, 6, 0)
        buf = io.BytesIO()
        torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, buf)
        plans_a, losses_a = self._train(model, opt, m, 10, 6)
        assert sum(int(p.sum()) for p in plans_a) > 0  # some unit went high

        torch._dynamo.reset()
        model_b = _gpt(seed=123)  # different init: everything must come from the checkpoint
        opt_b = torch.optim.AdamW(model_b.parameters(), lr=1e-3)
        m_b = gnmr_fx.compile(model_b, cfg, backend="eager", optimizer=opt_b)
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True)
        assert any(k.startswith("_orig_mod._gnmr.") for k in ckpt["model"])
        m_b.load_state_dict(ckpt["model"])
        opt_b.load_state_dict(ckpt["opt"])
        plans_b, losses_b = self._train(model_b, opt_b, m_b, 10, 6)
        assert [p.tolist() for p in plans_a] == [p.tolist() for p in plans_b]
        assert losses_a == losses_b
        assert gnmr_fx.controller(m_b).step == 16


def test_gnmr_backend_entry_point_without_import():
    """torch.compile(model, backend="gnmr") works with no gnmr_fx import."""
    code = (
        "import torch, sys\n"
        "m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))\n"
        "c = torch.compile(m, backend='gnmr', options={'recipe': 'int8', 'max_o': 1})\n"
        "c(torch.randn(4, 8)).sum().backward()\n"
        "assert 'gnmr_fx' in sys.modules\n"
        "rt = sys.modules['gnmr_fx'].runtime(m)\n"
        "print(rt.unit_names, rt.config.recipe, rt.controller.step)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['0', '2'] int8 1"


class GroupedMoE(nn.Module):
    """Two experts through torch._grouped_mm, as Hugging Face MoE layers call it."""

    def __init__(self):
        super().__init__()
        self.experts = nn.Parameter((torch.randn(2, 16, 16) * 0.1).bfloat16())

    def forward(self, x, offs):
        return torch._grouped_mm(x, self.experts, offs=offs)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm")
def test_grouped_mm_unit():
    x = torch.randn(32, 16).bfloat16()
    offs = torch.tensor([16, 32], dtype=torch.int32)
    ref = GroupedMoE()
    out = {}
    for policy in ("always_high", "always_low"):
        torch._dynamo.reset()
        m = gnmr_fx.compile(copy.deepcopy(ref), GNMRConfig(policy=policy, recipe="int8"), backend="eager")
        out[policy] = m(x, offs)
        assert gnmr_fx.controller(m).names == ["experts"]
        assert gnmr_fx.runtime(m).units[0].op_name == "grouped_mm"
    assert torch.equal(out["always_high"], ref(x, offs))
    assert 20.0 < sqnr(ref(x, offs).float(), out["always_low"].float()) < 60.0


def test_bf16_autocast_training():
    model = _gpt1()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    m = gnmr_fx.compile(model, GNMRConfig(recipe="fp8_e4m3"), backend="aot_eager", optimizer=opt)
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(*_batch())
        loss.backward()
        opt.step()
        opt.zero_grad()
    ctl = gnmr_fx.controller(m)
    assert ctl.step == 2 and ctl.names == TINY_GPT_UNITS[:6] + ["head"]
    assert torch.isfinite(ctl.norm).all() and (ctl.norm > 0).all()


class RepeatedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x)
        torch._dynamo.graph_break()  # Dynamo captures this frame once, for every block
        return self.b(h) @ h.t() @ h


class RepeatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([RepeatedBlock() for _ in range(3)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_graph_shared_by_module_instances_gets_units_per_instance(backend):
    torch.manual_seed(0)
    model = RepeatedNet()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    m = gnmr_fx.compile(model, GNMRConfig(policy="always_high"), backend=backend, optimizer=opt)
    x = torch.randn(2, 8)
    m(x).sum().backward()
    opt.step()
    rt = gnmr_fx.runtime(m)
    expected = [f"blocks.{i}.{u}" for i in range(3) for u in ("a", "b", "matmul", "matmul_1")]
    assert rt.unit_names == expected
    assert any(r.instance_of is not None for r in rt.records)  # Dynamo really reused a graph
    ref(x).sum().backward()
    norms = dict(zip(rt.unit_names, gnmr_fx.controller(m).norm.tolist()))
    for i in range(3):  # each instance measured its own weight gradient
        assert norms[f"blocks.{i}.a"] == pytest.approx(ref.blocks[i].a.weight.grad.norm().item(), rel=1e-5)
        assert norms[f"blocks.{i}.b"] == pytest.approx(ref.blocks[i].b.weight.grad.norm().item(), rel=1e-5)


class TestBareGraph:
    """The passes run end to end on a bare GraphModule + config, with no runtime."""

    @staticmethod
    def _traced():
        from torch.fx.passes.shape_prop import ShapeProp

        def f(x, w):
            return F.linear(x, w) @ w

        gm = torch.fx.symbolic_trace(f)
        ShapeProp(gm).propagate(torch.randn(4, 8), torch.randn(3, 8))
        return gm

    def test_run_passes_rewrites_every_unit(self):
        from gnmr_fx.passes import run_passes

        before = counters["insert_dual_path"]["dispatch_path_nodes"]
        gm = run_passes(self._traced(), GNMRConfig(recipe="int8"))
        units = [n.meta["gnmr_dual"] for n in gm.graph.nodes if "gnmr_dual" in n.meta]
        assert [(s.name, s.slot) for s in units] == [("linear", 0), ("matmul", 1)]
        assert counters["insert_dual_path"]["dispatch_path_nodes"] - before == 2
        assert gm._gnmr_plan.shape == (2,) and gm._gnmr_probe.shape == (2,)
        x, w = torch.randn(4, 8), torch.randn(3, 8)
        gm._gnmr_plan.fill_(True)  # all high: the graph as written
        assert torch.equal(gm(x, w), F.linear(x, w) @ w)

    @pytest.mark.parametrize("name", ["insert_grad_stats", "insert_dual_path", "assign_slots"])
    def test_insert_passes_refuse_a_graph_without_slots(self, name):
        import gnmr_fx.passes as passes

        gm = self._traced()
        if name != "assign_slots":
            passes.discover_units(gm, GNMRConfig())
        with pytest.raises(ValueError, match=f"{name}: run discover_units"):
            getattr(passes, name)(gm, GNMRConfig())
