"""export_onnx on Hugging Face decoders with grouped-query attention (sdpa, enable_gqa).

The deprecated TorchScript exporter cannot convert
``scaled_dot_product_attention(enable_gqa=True)``; torch.onnx.export(dynamo=True)
can. Each model is built from a tiny config (no download), exported with a
mixed plan, run in onnxruntime and compared with the GNMR-compiled model
under the same plan.
"""

import collections

import pytest
import torch

import gnmr_fx
from gnmr_fx.backends.recipes import sqnr as quantization_sqnr

transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

VOCAB = 128
COMMON = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
              intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0,
              eos_token_id=0, use_cache=False)  # sdpa attention, the default
MODELS = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=8, **COMMON)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON)),
}
# Per layer q, k, v, o, gate, up, down (the attention matmuls are inside sdpa), plus lm_head.
UNITS = 2 * 7 + 1
HIGH = ("model.layers.0.self_attn.q_proj", "lm_head")


def _build(name):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = MODELS[name]().eval()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    return model, (ids,)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gqa_decoder_int8_matches_onnxruntime(name, tmp_path):
    from gnmr_fx.tools.export import verify_with_onnxruntime

    model, inputs = _build(name)
    cfg = gnmr_fx.GNMRConfig(recipe="int8")
    ex = gnmr_fx.export_onnx(model, inputs, tmp_path / f"{name}.onnx", plan={u: True for u in HIGH}, config=cfg)
    assert ex.opset == 18 and ex.high_units == list(HIGH) and len(ex.low_units) == UNITS - 2
    v = verify_with_onnxruntime(ex, model, inputs, cfg)
    print(f"{name}: onnxruntime vs GNMR (same plan) SQNR {v['sqnr_db']:.1f} dB, max abs err {v['max_abs_err']:.2g}")
    # ONNX == the plan's numerics up to float rounding (measured 135-136 dB).
    assert v["sqnr_db"] >= 100.0, v
    # One QDQ pair per low weight (13), one per distinct low activation: the exporter's
    # optimizer merges identical pairs, so k/v of layer 0 share one, q/k/v of layer 1 one,
    # and gate/up of each layer one (13 - 5 = 8).
    assert v["ops"]["QuantizeLinear"] == v["ops"]["DequantizeLinear"] == 13 + 8
    with torch.no_grad():
        fp32 = model(*inputs).logits
    # ...while int8 really quantizes: far from fp32.
    got = _onnxruntime(ex, inputs)
    assert 20.0 <= quantization_sqnr(fp32, got) <= 60.0, quantization_sqnr(fp32, got)
    ops = collections.Counter(n.op_type for n in onnx.load(ex.path).graph.node)
    assert ops["MatMul"] + ops["Gemm"] >= UNITS  # units, plus the attention matmuls sdpa decomposes into


def test_gqa_llama_fp8_e4m3(tmp_path):
    from gnmr_fx.tools.export import verify_with_onnxruntime

    model, inputs = _build("llama")
    cfg = gnmr_fx.GNMRConfig(recipe="fp8_e4m3")
    ex = gnmr_fx.export_onnx(model, inputs, tmp_path / "llama_fp8.onnx", plan="low", config=cfg)
    assert ex.opset == 19 and len(ex.low_units) == UNITS
    v = verify_with_onnxruntime(ex, model, inputs, cfg)
    print(f"llama fp8_e4m3: onnxruntime vs GNMR (same plan) SQNR {v['sqnr_db']:.1f} dB")
    assert v["sqnr_db"] >= 100.0, v  # measured: bitwise equal (inf dB)
    # 15 weights; activations: q/k/v share one pair, gate/up one, per layer (15 - 6).
    assert v["ops"]["QuantizeLinear"] == 15 + 9


def _onnxruntime(export, inputs):
    import onnxruntime as ort

    from gnmr_fx.tools.export import ort_session_options

    s = ort.InferenceSession(export.path, ort_session_options(export), providers=["CPUExecutionProvider"])
    return torch.from_numpy(s.run(None, {i.name: x.numpy() for i, x in zip(s.get_inputs(), inputs)})[0])
