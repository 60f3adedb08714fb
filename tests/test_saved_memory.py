"""Saved-for-backward memory of real-kernel units (issue 13), on the CPU.

The perf benchmark's Llama (benchmarks/perf.py), shrunk, compiled with Inductor
two ways: the plain fp8 model (``convert_to_lowp`` + ``torch.compile``) and
GNMR (``gnmr_fx.compile``, real ``fp8_e4m3`` kernels, host dispatch). With
every unit low, GNMR must keep alive for the backward what the plain model
keeps, plus its plan (one bool per unit). Before the fix it also kept the bf16
input of every unit ([tokens, in], one tensor per distinct input: 3 x
[tokens, hidden] + 1 x [tokens, intermediate] per layer and 1 x [tokens, hidden]
for lm_head; 896 MiB by these shapes at the benchmark's 8b geometry):
``gnmr::select_mm`` read it in the backward, so Inductor's partitioner saved it
instead of recomputing it (see ``host_dispatch._recomputable``).

The high path stays exact: bitwise the model as written under the eager and
aot_eager compilers. Under Inductor the backward recomputes the input of the
grad-weight GEMM, and a recomputed value can differ from the forward's by
rounding (seen on the CPU for dW of ``down_proj``, whose input is
``silu(gate) * up``): checked against the compiled model as written within
bf16 rounding.
"""

from __future__ import annotations

import collections

import pytest
import torch

import gnmr_fx
from gnmr_fx.backends import host_dispatch, real_kernels
from gnmr_fx.benchmarks.perf import Llama, LlamaSpec, _shared_copy
from gnmr_fx.config import GNMRConfig

SPEC = LlamaSpec(hidden=64, intermediate=176, heads=4, layers=1, vocab=256, seq=64, batch=2)
TOKENS = SPEC.seq * SPEC.batch
UNITS = 7 * SPEC.layers + 1  # q, k, v, o, gate, up, down per layer + lm_head


@pytest.fixture(autouse=True)
def _no_compile_caches():
    # The cache keys do not cover the Python source of an autograd.Function's
    # backward: a graph cached by another version of host_dispatch would be reused.
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield


def _base():
    torch.manual_seed(0)
    model = Llama(SPEC).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, SPEC.vocab, (SPEC.batch, SPEC.seq), generator=gen)
    tgt = torch.randint(0, SPEC.vocab, (SPEC.batch, SPEC.seq), generator=gen)
    return model, idx, tgt


def _gnmr(base, backend):
    # The dual-path graph on every step (low_graph=False): what a step with a
    # unit high runs; the all-low copy has its own test below.
    cfg = GNMRConfig(recipe="fp8_e4m3", emulate=False, threshold=1e30, delta_threshold=1e30, low_graph=False)
    return gnmr_fx.compile(_shared_copy(base), cfg, backend=backend)


def _saved(model, base, idx, tgt):
    """(shape, dtype) -> count and total bytes of the distinct non-parameter
    storages that one forward saves for the backward; then runs the backward."""
    params = {p.untyped_storage().data_ptr() for p in base.parameters()}
    storages: dict = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages.setdefault(ptr, (tuple(t.shape), t.dtype, t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(idx, tgt)
    loss.backward()
    for p in base.parameters():
        p.grad = None
    kinds = collections.Counter((shape, dtype) for shape, dtype, _ in storages.values())
    return kinds, sum(n for _, _, n in storages.values())


def _loss_and_grads(model, base, idx, tgt):
    for p in base.parameters():
        p.grad = None
    loss = model(idx, tgt)
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in base.parameters()]


def test_gnmr_saves_what_plain_fp8_saves_and_high_path_stays_close():
    base, idx, tgt = _base()
    plain = torch.compile(real_kernels.convert_to_lowp(_shared_copy(base), "fp8_e4m3"))
    _saved(plain, base, idx, tgt)  # compile
    plain_kinds, plain_bytes = _saved(plain, base, idx, tgt)

    gm = _gnmr(base, "inductor")
    _saved(gm, base, idx, tgt)  # compile, discover the units
    rt = gnmr_fx.runtime(gm)
    assert rt.controller.num_units == UNITS
    assert {s.extra["kernel"] for r in rt.records for s in r.sites} == {"fp8_e4m3:tensorwise"}
    rt.force_plan(torch.zeros(UNITS, dtype=torch.bool))
    kinds, nbytes = _saved(gm, base, idx, tgt)
    # Tolerance: the plan alone, one bool per unit (8 bytes here; an activation is 16 KiB).
    assert kinds - plain_kinds == collections.Counter({((UNITS,), torch.bool): 1}), (kinds, plain_kinds)
    assert plain_kinds - kinds == collections.Counter()
    assert nbytes - plain_bytes == UNITS

    # All high: the model as written within bf16 rounding (see the module docstring).
    rt.force_plan(torch.ones(UNITS, dtype=torch.bool))
    high = _loss_and_grads(gm, base, idx, tgt)
    ref = _loss_and_grads(torch.compile(_shared_copy(base)), base, idx, tgt)
    assert torch.equal(high[0], ref[0])  # the forward is the model as written
    for h, r in zip(high[1:], ref[1:]):
        torch.testing.assert_close(h, r, atol=2e-5, rtol=1.6e-2)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_high_path_is_bitwise_the_model_as_written(backend):
    base, idx, tgt = _base()
    gm = _gnmr(base, backend)
    _loss_and_grads(gm, base, idx, tgt)
    rt = gnmr_fx.runtime(gm)
    rt.force_plan(torch.ones(rt.controller.num_units, dtype=torch.bool))
    high = _loss_and_grads(gm, base, idx, tgt)
    ref = _loss_and_grads(base, base, idx, tgt)
    for h, r in zip(high, ref):
        assert torch.equal(h, r)


def test_the_identity_is_exact_and_only_traced():
    t = torch.tensor([1.5, -0.0, 0.0, float("inf"), -float("inf"), float("nan"), -3e-8], dtype=torch.bfloat16)
    assert torch.equal(host_dispatch._recomputable(t).view(torch.int16), t.view(torch.int16))
    assert not host_dispatch._tracing()


@pytest.mark.parametrize("model", ["llama", "hf-llama"])
def test_low_graph_all_low_step_is_the_plain_fp8_model(model):
    """GNMRConfig(low_graph=True) with real kernels: on an all-low step GNMR runs
    the copy whose units are ``low_linear`` (no ``gnmr::select_mm``, no bf16
    operand for a high path): under Inductor it computes bitwise what the plain
    fp8 model computes and saves what it saves, where the dual-path graph differs
    by bf16 rounding (it materialises each unit's bf16 input, which Inductor's
    fusion otherwise keeps in fp32); a step with a unit high runs the dual-path graph."""
    from torch._dynamo.utils import counters as dynamo_counters

    cfg = GNMRConfig(recipe="fp8_e4m3", emulate=False, threshold=1e30, delta_threshold=1e30, low_graph=True)
    if model == "hf-llama":  # transformers' LlamaForCausalLM from config; lm_head bf16, as in bench perf
        pytest.importorskip("transformers")
        from gnmr_fx.benchmarks import perf

        torch.manual_seed(0)
        base = perf.MODELS[model](SPEC).to(torch.bfloat16)
        idx, tgt = _base()[1:]
        cfg = cfg.replace(unit_filter=perf.HF_UNITS)
        convert = lambda name, mod: perf._converted(model, name, mod)  # noqa: E731
        units = 7 * SPEC.layers
    else:
        base, idx, tgt = _base()
        convert, units = None, UNITS
    plain = torch.compile(real_kernels.convert_to_lowp(_shared_copy(base), "fp8_e4m3", convert))
    ref = _loss_and_grads(plain, base, idx, tgt)
    plain_kinds, plain_bytes = _saved(plain, base, idx, tgt)

    gm = gnmr_fx.compile(_shared_copy(base), cfg)
    rt = gnmr_fx.runtime(gm)
    calls = dynamo_counters["gnmr"]["low_graph_calls"]
    low = _loss_and_grads(gm, base, idx, tgt)  # compiles both graphs; the plan starts all low
    assert dynamo_counters["gnmr"]["low_graph_calls"] == calls + 1 and rt.low_graph_calls == 1
    assert rt.controller.num_units == units
    for got, want in zip(low, ref):
        assert torch.equal(got, want)
    kinds, nbytes = _saved(gm, base, idx, tgt)
    assert (kinds, nbytes) == (plain_kinds, plain_bytes), (kinds - plain_kinds, plain_kinds - kinds)
    assert rt.controller.n_obs.tolist() == [2] * units  # the copy keeps the statistics nodes

    plan = torch.zeros(units, dtype=torch.bool)
    plan[0] = True
    rt.force_plan(plan)
    calls = dynamo_counters["gnmr"]["low_graph_calls"]
    mixed = _loss_and_grads(gm, base, idx, tgt)
    assert dynamo_counters["gnmr"]["low_graph_calls"] == calls  # the dual-path graph ran
    assert not torch.equal(mixed[0], ref[0])
    torch.testing.assert_close(mixed[0], ref[0], rtol=1e-3, atol=0)


def test_dynamo_metadata_kept_only_where_aotautograd_can_use_it():
    # _graph_copy keeps Dynamo's input sources (so AOTAutograd knows the
    # parameters); a graph module that still holds a parameter with no source
    # would make AOTAutograd assert, so _compile drops the metadata there.
    from gnmr_fx.backend import _check_dynamo_metadata, _graph_copy, _lift_state

    base, idx, tgt = _base()
    gm = _gnmr(base, "eager")
    gm(idx, tgt)
    exec_gm, names = _lift_state(gnmr_fx.runtime(gm).records[0].rewritten)
    assert names and "dynamo_compile_id" in exec_gm.meta
    assert all(hasattr(n, "_dynamo_source") for n in exec_gm.graph.find_nodes(op="placeholder"))
    _check_dynamo_metadata(exec_gm)
    assert "dynamo_compile_id" in exec_gm.meta  # every input has a source, no parameter left on it

    stray = _graph_copy(exec_gm)
    stray.register_parameter("extra", torch.nn.Parameter(torch.zeros(1)))
    _check_dynamo_metadata(stray)
    assert "dynamo_compile_id" not in stray.meta
    plain = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    assert "dynamo_compile_id" not in _graph_copy(plain).meta
