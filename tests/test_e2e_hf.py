"""Hugging Face transformers models built from small configs (no download) train under GNMR."""

import math

import pytest
import torch

import gnmr_fx
from gnmr_fx import GNMRConfig
from gnmr_fx.backends.recipes import sqnr

transformers = pytest.importorskip("transformers")

VOCAB = 128


def _gpt2(attn="eager"):
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=VOCAB, n_positions=32,
                                  bos_token_id=0, eos_token_id=0, attn_implementation=attn)
    return transformers.GPT2LMHeadModel(cfg)


def _llama(attn="eager"):
    cfg = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                   hidden_size=64, intermediate_size=128, vocab_size=VOCAB,
                                   max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
                                   attn_implementation=attn)
    return transformers.LlamaForCausalLM(cfg)


GPT2_UNITS = [f"transformer.h.{i}.{u}" for i in range(2)
              for u in ("attn.c_attn", "attn.matmul", "attn.matmul_1", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
GPT2_UNITS += ["lm_head"]
LLAMA_UNITS = [f"model.layers.{i}.{u}" for i in range(2)
               for u in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.matmul",
                         "self_attn.matmul_1", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
LLAMA_UNITS += ["lm_head"]


def _train(model, steps=4, recipe="int8", backend="aot_eager"):
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    m = gnmr_fx.compile(model, GNMRConfig(recipe=recipe, warmup_steps=1, max_o=2), backend=backend, optimizer=opt)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return m, losses


@pytest.mark.parametrize("factory,units", [(_gpt2, GPT2_UNITS), (_llama, LLAMA_UNITS)], ids=["gpt2", "llama"])
def test_hf_model_trains_with_units_discovered(factory, units):
    torch.manual_seed(0)
    m, losses = _train(factory())
    ctl = gnmr_fx.controller(m)
    assert ctl.names == units
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]  # it trains (same batch, 4 AdamW steps)
    assert ctl.step == 4
    assert int(ctl.n_obs.min()) >= 3  # every unit's gradient was observed every step


# The tests of what discovery finds run the rewritten graphs with backend="eager": units are
# found on Dynamo's graph, before any inner compiler (aot_eager and Inductor see the same
# units; the tests above and test_moe_experts_are_one_unit_per_expert_weight train through
# aot_eager).
def test_gpt2_conv1d_units_are_addmm_weight_units():
    m, _ = _train(_gpt2(), steps=1, backend="eager")
    units = {u.name: u for u in gnmr_fx.runtime(m).units}
    assert units["transformer.h.0.attn.c_attn"].op_name == "addmm"
    assert units["transformer.h.0.attn.c_attn"].weight == "transformer.h.0.attn.c_attn.weight"
    # lm_head is tied to the token embedding: named after the layer that calls it.
    assert units["lm_head"].weight == "transformer.wte.weight"


def test_sdpa_attention_is_reported_not_recoverable():
    m, _ = _train(_llama(attn="sdpa"), steps=1, backend="eager")
    rt = gnmr_fx.runtime(m)
    assert "model.layers.0.self_attn.matmul" not in rt.unit_names
    seen = {}
    for r in rt.records:
        for k, v in r.skipped.items():
            seen[k] = seen.get(k, 0) + v
    assert seen.get("scaled_dot_product_attention") == 2
    assert len(rt.unit_names) == 15


def test_torch_compile_backend_gnmr_keeps_the_runtime_on_llama(gnmr_backend_aot_eager):
    # transformers wraps forward as wrapper(*args, **kwargs): the captured
    # frame has no `self`, and the runtime used to be rootless (unreachable,
    # no _gnmr.* keys in checkpoints) while its controller ran.
    # The runtime is found from the captured frame before the inner compiler runs:
    # aot_eager here instead of the entry point's Inductor (minutes of CPU compile for
    # this graph on a fresh machine); Inductor under backend="gnmr": test_passes.py's
    # test_gnmr_backend_entry_point_without_import and test_trust.py's decorated forward.
    torch.manual_seed(0)
    model = _llama()
    compiled = torch.compile(model, backend="gnmr", options={"recipe": "int8", "max_o": 2})
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    compiled(input_ids=ids, labels=ids).loss.backward()
    assert gnmr_backend_aot_eager == ["inductor"]  # one graph, through the gnmr entry point
    rt = gnmr_fx.runtime(model)
    assert gnmr_fx.runtime(compiled) is rt and rt.root is model
    assert rt.unit_names == LLAMA_UNITS
    assert rt.controller.step == 1
    sd = model.state_dict()
    assert int(sd["_gnmr.step"]) == 1 and "_gnmr.hist" in sd


# ------------------------------------------------------------ MoE experts
def _moe(kind, experts=None, dtype=torch.float32):
    common = dict(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, hidden_size=32,
                  vocab_size=VOCAB, max_position_embeddings=32, num_experts_per_tok=2, bos_token_id=0,
                  eos_token_id=0, attn_implementation="eager", experts_implementation=experts)
    torch.manual_seed(0)
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=64, num_local_experts=4, **common)
        model = transformers.MixtralForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3MoeConfig(head_dim=16, intermediate_size=64, moe_intermediate_size=32,
                                          num_experts=4, **common)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    return model.to(dtype)


EXPERT_UNITS = ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"]


def _moe_train(model, steps=2, backend="aot_eager", **cfg):
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    m = gnmr_fx.compile(model, GNMRConfig(recipe="int8", **cfg), backend=backend, optimizer=opt)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(steps):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return m, losses


# Each model once and each expert op once: the op follows the weights' dtype in
# transformers' experts code shared by both models (integrations/moe.py), not the model.
@pytest.mark.parametrize("kind,dtype,op", [("mixtral", torch.float32, "grouped_mm_fallback"),
                                           ("qwen3_moe", torch.bfloat16, "grouped_mm")],
                         ids=["mixtral-fp32", "qwen3_moe-bf16"])
def test_moe_experts_are_one_unit_per_expert_weight(kind, dtype, op):
    # fp32 experts run transformers' grouped_mm fallback (an opaque op):
    # they used to be no unit, silently, while holding most of the FLOPs.
    m, losses = _moe_train(_moe(kind, dtype=dtype))
    rt = gnmr_fx.runtime(m)
    units = {u.name: u for u in rt.units}
    assert [n for n in rt.unit_names if ".experts." in n] == EXPERT_UNITS
    assert [units[n].op_name for n in EXPERT_UNITS] == [op, op]
    assert [units[n].weight for n in EXPERT_UNITS] == EXPERT_UNITS
    ctl = gnmr_fx.controller(m)
    assert ctl.step == 2
    rows = [ctl.names.index(n) for n in EXPERT_UNITS]
    assert ctl.n_obs[rows].tolist() == [2, 2]  # observed at every step
    assert all(torch.isfinite(x) for x in losses)


def test_moe_fp32_experts_high_path_is_exact_and_low_path_is_the_recipe():
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    ref = _moe("mixtral")(input_ids=ids).logits
    out = {}
    for policy in ("always_high", "always_low"):
        torch._dynamo.reset()
        m = gnmr_fx.compile(_moe("mixtral"), GNMRConfig(recipe="int8", policy=policy), backend="eager")
        out[policy] = m(input_ids=ids).logits
        assert [n for n in gnmr_fx.runtime(m).unit_names if ".experts." in n] == EXPERT_UNITS
    assert torch.equal(out["always_high"], ref)
    s = sqnr(ref, out["always_low"])
    assert 20.0 < s < 60.0, s


def test_moe_batched_mm_experts_are_bmm_units():
    m, _ = _moe_train(_moe("mixtral", experts="batched_mm"), steps=1, backend="eager")
    units = [u for u in gnmr_fx.runtime(m).units if ".experts." in u.name]
    assert [(u.name, u.op_name) for u in units] == [("model.layers.0.mlp.experts.bmm", "bmm"),
                                                     ("model.layers.0.mlp.experts.bmm_1", "bmm")]


def test_moe_eager_experts_loop_is_reported_with_its_flop_share():
    # The per-expert loop over data-dependent indices cannot be captured.
    model = _moe("mixtral", experts="eager")
    with pytest.warns(RuntimeWarning) as caught:
        m, _ = _moe_train(model, steps=1, backend="eager")
    rt = gnmr_fx.runtime(m)
    assert not [n for n in rt.unit_names if ".experts." in n]
    assert rt.uncovered_weights() == [("model.layers.0.mlp.experts.gate_up_proj", (4, 128, 32)),
                                      ("model.layers.0.mlp.experts.down_proj", (4, 32, 64))]
    # 16 tokens, top-2 of 4 experts: 2 * 16 * 2 * (128*32 + 32*64) FLOPs outside GNMR.
    outside = 2 * 16 * 2 * (128 * 32 + 32 * 64)
    share = 100 * outside / (outside + sum(u.flops for u in rt.units))
    msg = [str(w.message) for w in caught if "never entered a GNMR graph" in str(w.message)]
    assert len(msg) == 1
    assert f"about {share:.0f}% of the forward matmul FLOPs" in msg[0]
    assert "experts_implementation='grouped_mm'" in msg[0]
