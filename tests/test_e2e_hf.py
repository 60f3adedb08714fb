"""Hugging Face transformers models built from small configs (no download) train under GNMR."""

import math

import pytest
import torch

import gnmr_fx
from gnmr_fx import GNMRConfig

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


def _train(model, steps=4, recipe="int8"):
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    m = gnmr_fx.compile(model, GNMRConfig(recipe=recipe, warmup_steps=1, max_o=2), backend="aot_eager", optimizer=opt)
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


def test_gpt2_conv1d_units_are_addmm_weight_units():
    m, _ = _train(_gpt2(), steps=1)
    units = {u.name: u for u in gnmr_fx.runtime(m).units}
    assert units["transformer.h.0.attn.c_attn"].op_name == "addmm"
    assert units["transformer.h.0.attn.c_attn"].weight == "transformer.h.0.attn.c_attn.weight"
    # lm_head is tied to the token embedding: named after the layer that calls it.
    assert units["lm_head"].weight == "transformer.wte.weight"


def test_sdpa_attention_is_reported_not_recoverable():
    m, _ = _train(_llama(attn="sdpa"), steps=1)
    rt = gnmr_fx.runtime(m)
    assert "model.layers.0.self_attn.matmul" not in rt.unit_names
    seen = {}
    for r in rt.records:
        for k, v in r.skipped.items():
            seen[k] = seen.get(k, 0) + v
    assert seen.get("scaled_dot_product_attention") == 2
    assert len(rt.unit_names) == 15
